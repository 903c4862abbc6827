"""Summary statistics of generations: reward and response length per generator model, as tables, JSON and a PNG.

For each generator model and each metric (reward, response length in characters and in tokens) the summary
holds the count, mean, population standard deviation, min, max and the 3/10/25/50/75/90/97th percentiles
(numpy's default linear interpolation between order statistics). Several models are compared side by side:
one table per metric with a column per model, and one histogram panel per metric with the models overlaid on
shared bins, so the distributions are directly comparable.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

PERCENTILES = (3, 10, 25, 50, 75, 90, 97)
STATISTICS = ("count", "mean", "std", "min", "max", *(f"p{q}" for q in PERCENTILES))
"""Keys of :func:`describe`, in table order."""

Summary = dict[str, dict[str, dict[str, float]]]
"""``summary[model][metric][statistic]``."""


class Metric(StrEnum):
    """What is measured per scored response."""

    reward = "reward"
    length_chars = "length_chars"
    length_tokens = "length_tokens"


METRIC_LABELS: dict[Metric, str] = {
    Metric.reward: "Reward",
    Metric.length_chars: "Response length (characters)",
    Metric.length_tokens: "Response length (tokens)",
}


def describe(values: Sequence[float]) -> dict[str, float]:
    """Count, mean, population std, min, max and the :data:`PERCENTILES` of ``values``.

    Example: ``[1, 2, 3, 4]`` gives mean 2.5, std sqrt(1.25) = 1.118034, p25 = 1.75 (rank 0.25·3 = 0.75 between
    1 and 2), p50 = 2.5, p3 = 1.09. An empty sequence gives only ``count = 0``: there is nothing else to report,
    and NaN would not be valid JSON.
    """
    import numpy as np

    if not values:
        return {"count": 0.0}
    array = np.asarray(values, dtype=np.float64)
    stats = {
        "count": float(array.size),
        "mean": float(array.mean()),
        "std": float(array.std()),
        "min": float(array.min()),
        "max": float(array.max()),
    }
    stats.update({f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(array, PERCENTILES), strict=True)})
    return stats


def summarize(values: Mapping[str, Mapping[Metric, Sequence[float]]]) -> Summary:
    """``values[model][metric]`` (raw per-response numbers) to ``summary[model][metric][statistic]``."""
    return {model: {metric.value: describe(v) for metric, v in metrics.items()} for model, metrics in values.items()}


def _cell(stats: Mapping[str, float], key: str) -> str:
    if key not in stats:
        return "-"
    value = stats[key]
    return f"{value:.0f}" if key == "count" else f"{value:.4f}"


def comparison_table(summary: Summary, metric: Metric) -> Table:
    """Rows: the statistics; columns: the models (side by side); a model without data shows ``-``."""
    from rich.table import Table

    table = Table(title=f"{METRIC_LABELS[metric]} by generator model")
    table.add_column("statistic")
    models = list(summary)
    for model in models:
        table.add_column(model, justify="right")
    for key in STATISTICS:
        table.add_row(key, *(_cell(summary[model].get(metric.value, {}), key) for model in models))
    return table


def print_summary(summary: Summary, console: Console | None = None) -> None:
    """Print one comparison table per metric present in the summary."""
    from rich.console import Console

    console = console or Console()
    present = {metric for per_model in summary.values() for metric in per_model}
    for metric in Metric:
        if metric.value in present:
            console.print(comparison_table(summary, metric))


def save_summary(summary: Summary, path: Path) -> None:
    """Write the summary as JSON (``{model: {metric: {statistic: value}}}``)."""
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")


def plot_histograms(values: Mapping[str, Mapping[Metric, Sequence[float]]], path: Path, *, bins: int = 30) -> None:
    """One panel per metric, each model's histogram overlaid on bins shared by all models; saved as PNG.

    Uses matplotlib's object API on the Agg canvas, so no display and no pyplot global state is needed.
    """
    import numpy as np
    from matplotlib.figure import Figure

    metrics = [m for m in Metric if any(m in per_model for per_model in values.values())]
    figure = Figure(figsize=(5 * max(len(metrics), 1), 4), layout="constrained")
    axes = figure.subplots(1, max(len(metrics), 1), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=False):
        pooled = [x for per_model in values.values() for x in per_model.get(metric, [])]
        if not pooled:
            ax.set_title(f"{METRIC_LABELS[metric]}: no data")
            continue
        edges = np.histogram_bin_edges(np.asarray(pooled, dtype=np.float64), bins=bins)
        for model, per_model in values.items():
            data = per_model.get(metric, [])
            if data:
                ax.hist(data, bins=edges, alpha=0.5, label=f"{model} (n={len(data)})")
        ax.set_title(METRIC_LABELS[metric])
        ax.set_ylabel("responses")
        ax.legend(fontsize="small")
    figure.savefig(path, dpi=100)
