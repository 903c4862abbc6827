"""The pairwise trainer's logged preference metrics: means over every pair of every micro-batch and rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import alignment.training.metrics as metrics_module
from alignment.methods.pairwise.core import PairLogps, PreferenceLoss
from alignment.methods.pairwise.trainer import PairwiseTrainer
from tests.methods.helpers import sgd_step_args, tiny_model


def _micro_batch(chosen: list[float], rejected: list[float], margin: float) -> tuple[PreferenceLoss, PairLogps]:
    """Rewards as given, policy log-probs ``-1`` (chosen) and ``-2`` (rejected) per pair, a scalar metric."""
    pairs = len(chosen)
    out = PreferenceLoss(
        torch.zeros(pairs), torch.tensor(chosen), torch.tensor(rejected), metrics={"target_margin": margin}
    )
    ones = torch.ones(pairs)
    return out, PairLogps(-ones, -2 * ones, ones, ones)


def test_logged_metrics_are_over_all_pairs_not_means_of_micro_batch_or_rank_means(
    tiny_random_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Micro-batches of 1 and 3 pairs on this rank, 4 pairs on a second one.

    This rank: chosen rewards 1 | 0, 0, 0 (sum 1), margins 1 | -1, -1, 1 (2 positive), target margins 0.5 (1
    pair) and 0.1 (3 pairs): sums 1, 2, 0.8 over 4 pairs. The other rank: sums 4, 4, 0.8 over 4 pairs. Over the
    8 pairs: rewards/chosen 5/8, rewards/accuracies 6/8, target_margin 1.6/8 = 0.2. (Means of the micro-batch
    means on this rank alone: 0.5, 0.67 and 0.3.)
    """
    trainer = PairwiseTrainer(
        model=tiny_model(tiny_random_path), args=sgd_step_args(tmp_path), loss_fn=None, reference=None
    )
    trainer._record(*_micro_batch([1.0], [0.0], 0.5), "train")
    trainer._record(*_micro_batch([0.0, 0.0, 0.0], [1.0, 1.0, -1.0], 0.1), "train")
    other = {"rewards/chosen": (4.0, 4.0), "rewards/accuracies": (4.0, 4.0), "target_margin": (0.8, 4.0)}
    monkeypatch.setattr(metrics_module, "gather_from_ranks", lambda local: [local, other])
    logged = trainer.logged_metrics("train")
    assert logged["rewards/chosen"] == pytest.approx(5 / 8)
    assert logged["rewards/accuracies"] == pytest.approx(6 / 8)
    assert logged["target_margin"] == pytest.approx(0.2)
    assert logged["logps/chosen"] == pytest.approx(-1.0)  # this rank's 4 pairs (the other sent no such key)
    monkeypatch.setattr(metrics_module, "gather_from_ranks", lambda local: [local])
    assert trainer.logged_metrics("train") == {}  # forgotten once logged
