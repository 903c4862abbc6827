"""Per-run ``curves.png``: one panel per metric family from a hand-written ``metrics.jsonl``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from alignment.plots import family_of, run_figure, write_run_curves

PNG = b"\x89PNG\r\n\x1a\n"


def _run_dir(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return run


def _panels(figure: Any) -> dict[str, list[str]]:
    """``title -> legend labels`` of every axis; an axis without a legend maps to []."""
    panels = {}
    for axis in figure.axes:
        legend = axis.get_legend()
        panels[axis.get_title()] = [t.get_text() for t in legend.get_texts()] if legend is not None else []
    return panels


# A DPO run as the trainer logs it: train records, an eval at steps 0 and 2, the final summary (train_loss).
DPO_RECORDS = [
    {"step": 0, "epoch": 0, "eval_loss": 0.69, "eval_rewards/accuracies": 0.0, "eval_rewards/margins": 0.0},
    {"step": 1, "epoch": 0.5, "loss": 0.69, "rewards/accuracies": 0.5, "rewards/margins": 0.01, "grad_norm": 3.0},
    {"step": 2, "epoch": 1.0, "loss": 0.6, "rewards/accuracies": 1.0, "rewards/margins": 0.2, "learning_rate": 1e-5},
    {"step": 2, "epoch": 1.0, "eval_loss": 0.62, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.15},
    {"step": 2, "epoch": 1.0, "eval_exact_match": 0.25},
    {"step": 2, "epoch": 1.0, "train_loss": 0.645, "train_runtime": 3.2},
]


def test_a_dpo_run_gets_loss_accuracy_and_reward_panels(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, DPO_RECORDS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = write_run_curves(run)
    assert path == run / "curves.png"
    assert path.read_bytes()[:8] == PNG
    figure = run_figure(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    assert figure is not None
    assert _panels(figure) == {
        "loss": ["train loss", "eval loss"],
        "accuracy": ["eval_exact_match", "eval_rewards/accuracies", "rewards/accuracies"],
        "rewards": ["eval_rewards/margins", "rewards/margins"],
    }
    loss = figure.axes[0]
    assert [list(line.get_xdata()) for line in loss.get_lines()] == [[1, 2], [0, 2]]
    assert [list(line.get_ydata()) for line in loss.get_lines()] == [[0.69, 0.6], [0.69, 0.62]]
    ticks = [t for t in loss.get_xticks() if loss.get_xlim()[0] <= t <= loss.get_xlim()[1]]
    assert ticks
    assert all(float(t).is_integer() for t in ticks), ticks  # steps, never 0.25 steps
    assert all(axis.get_xlabel() == "step" for axis in figure.axes)


def test_distillation_and_classification_metrics_get_their_own_panels(tmp_path: Path) -> None:
    records = [
        {"step": 1, "loss": 2.0, "distill/reverse_kl": 1.5, "ce": 3.0, "top1_agreement": 0.2, "accuracy": 0.5},
        {"step": 2, "loss": 1.0, "distill/reverse_kl": 0.5, "ce": 2.0, "top1_agreement": 0.4, "accuracy": 0.75},
        {"step": 2, "eval_loss": 1.1, "eval_distill/reverse_kl": 0.6, "eval_accuracy": 0.7, "eval_f1_macro": 0.6},
    ]
    figure = run_figure(records)
    assert figure is not None
    assert _panels(figure) == {
        "loss": ["train loss", "eval loss"],
        "distillation": ["ce", "distill/reverse_kl", "eval_distill/reverse_kl"],
        "accuracy": ["accuracy", "eval_accuracy", "eval_f1_macro", "top1_agreement"],
    }


def test_families() -> None:
    assert [family_of(k) for k in ("loss", "eval_loss", "train_loss", "learning_rate", "grad_norm")] == [
        "loss",
        "loss",
        None,  # the run's average, logged once at the end: not a curve
        None,
        None,
    ]
    assert family_of("eval_rewards/chosen") == "rewards"
    assert family_of("eval_top1_agreement") == "accuracy"
    assert family_of("eval_mean_token_accuracy") == "accuracy"  # SFT's
    assert family_of("eval_runtime") is None


def test_nothing_to_plot_writes_nothing(tmp_path: Path) -> None:
    """A data tool (no metrics.jsonl) or a run that logged no curve leaves no curves.png."""
    assert write_run_curves(tmp_path) is None
    run = _run_dir(tmp_path, [{"step": 0, "train_runtime": 1.0}])
    assert write_run_curves(run) is None
    assert not (run / "curves.png").exists()
