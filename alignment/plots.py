"""Training curves from ``metrics.jsonl``: a run's ``curves.png``, and the series the sweep report plots.

A run's figure has one panel per metric family, so values of one scale share an axis: ``loss`` (train and eval
loss), ``distillation`` (``distill/<divergence>``, ``ce``), ``accuracy`` (``rewards/accuracies``,
``exact_match``, SFT's ``mean_token_accuracy``, ``top1_agreement``, a classifier's ``accuracy``, F1 and ROC-AUC)
and ``rewards`` (chosen, rejected, margins), each logged as a train key and as its ``eval_`` twin. Other keys
(learning rate, gradient norm, throughput) are not plotted. Figures are built on matplotlib's Agg canvas without
pyplot: no display, no global figure state.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Series = list[tuple[int, float]]
"""``(step, value)`` pairs sorted by step."""

FAMILIES: dict[str, tuple[str, ...]] = {
    "loss": ("loss",),
    "distillation": ("distill/", "ce"),
    "accuracy": (
        "rewards/accuracies",
        "exact_match",
        "mean_token_accuracy",
        "top1_agreement",
        "accuracy",
        "f1_macro",
        "f1_micro",
        "roc_auc",
    ),
    "rewards": ("rewards/chosen", "rewards/rejected", "rewards/margins"),
}
"""Panel title -> the metric names (without ``eval_``) it shows; a name ending in ``/`` matches a prefix."""

CURVES_FILE = "curves.png"
"""A run's plot, beside its ``metrics.jsonl``."""


def family_of(key: str) -> str | None:
    """The panel a logged key belongs to, or None for a key that is not plotted."""
    name = key.removeprefix("eval_")
    for family, names in FAMILIES.items():
        if any(name.startswith(n) if n.endswith("/") else name == n for n in names):
            return family
    return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl``; a torn last line (a job killed mid-write) is skipped; [] without the file."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def curves_from(records: Iterable[dict[str, Any]]) -> dict[str, Series]:
    """``metric -> [(step, value)]`` sorted by step; a step logged again after a resume keeps the last value."""
    series: dict[str, dict[int, float]] = {}
    for record in records:
        step = record.get("step")
        if not isinstance(step, int):
            continue
        for key, value in record.items():
            if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            series.setdefault(key, {})[step] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


def new_figure(panels: int, *, columns: int = 2) -> tuple[Figure, list[Axes]]:
    """A figure on the Agg canvas with ``panels`` axes, ``columns`` per row (fewer when there are fewer panels)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = max(1, min(columns, panels))
    rows = -(-panels // columns)
    figure = Figure(figsize=(5.5 * columns, 3.8 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(rows, columns, i + 1) for i in range(panels)]


def draw_panel(axis: Axes, title: str, lines: list[tuple[str, Series]]) -> None:
    """One panel: a line per ``(label, series)``, integer step ticks, grid and a legend."""
    from matplotlib.ticker import MaxNLocator

    for label, series in lines:
        steps, values = zip(*series, strict=True)
        axis.plot(steps, values, marker="o" if len(series) < 20 else None, label=label)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("step")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")


def run_figure(records: Iterable[dict[str, Any]]) -> Figure | None:
    """One run's curves: a panel per metric family that has a logged series (None when none has)."""
    curves = curves_from(records)
    grouped: dict[str, list[tuple[str, Series]]] = {family: [] for family in FAMILIES}
    for key in sorted(curves):
        if key in ("loss", "eval_loss"):
            continue
        if (family := family_of(key)) is not None:
            grouped[family].append((key, curves[key]))
    grouped["loss"] = [
        (label, curves[k]) for k, label in (("loss", "train loss"), ("eval_loss", "eval loss")) if k in curves
    ]
    panels = {family: lines for family, lines in grouped.items() if lines}
    if not panels:
        return None
    figure, axes = new_figure(len(panels))
    for axis, (family, lines) in zip(axes, panels.items(), strict=True):
        draw_panel(axis, family, lines)
    return figure


def write_run_curves(run_dir: Path) -> Path | None:
    """Plot ``<run_dir>/metrics.jsonl`` into ``<run_dir>/curves.png``; None (nothing written) when nothing plots."""
    figure = run_figure(read_jsonl(run_dir / "metrics.jsonl"))
    if figure is None:
        return None
    path = run_dir / CURVES_FILE
    figure.savefig(path, dpi=110)
    return path
