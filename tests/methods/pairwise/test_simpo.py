"""SimPO: hand-computed loss values per variant, limits, gradients, the link to CPO's simpo variant, a tiny run.

Inputs are :class:`PairLogps` of summed log-probs and token counts; SimPO works on the means, Δ = mean chosen -
mean rejected. Values are worked out in the comments (softplus(x) = log(1 + e^x)).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from alignment.methods.pairwise import simpo
from alignment.methods.pairwise.core import PairCounts, PairLogps, total_loss
from alignment.methods.pairwise.cpo import CpoVariant, cpo_loss
from alignment.methods.pairwise.simpo import SIMPO_LOSSES, SimpoConfig, SimpoVariant, simpo_loss
from tests.methods.helpers import TINY_DEMO_PAIRS, run_method


def means(chosen: list[float], rejected: list[float]) -> PairLogps:
    """Pairs whose mean log-probs are the given values: sums over 2 chosen and 4 rejected tokens."""
    n = len(chosen)
    return PairLogps(
        torch.tensor([2 * c for c in chosen], requires_grad=True),
        torch.tensor([4 * r for r in rejected], requires_grad=True),
        torch.full((n,), 2.0),
        torch.full((n,), 4.0),
    )


def per_pair(policy: PairLogps, variant: SimpoVariant, **kwargs: Any) -> list[float]:
    out = simpo_loss(policy, loss_type=variant, **{"beta": 2.0, "gamma": 0.5, **kwargs})
    return out.per_pair_loss.detach().tolist()


def test_defaults_are_the_simpo_repository_defaults() -> None:
    cfg = SimpoConfig()
    # beta = 2.0 and gamma_beta_ratio = 0.25 in princeton-nlp/SimPO's SimPOConfig: gamma = 0.25 * 2.0 = 0.5.
    assert (cfg.beta, cfg.gamma, cfg.sft_weight, cfg.loss_type) == (2.0, 0.5, 0.0, SimpoVariant.sigmoid)


def test_sigmoid_values_and_limit() -> None:
    # softplus(-(2 Δ - 0.5)): Δ = -1 - (-1.25) = 0.25 -> 0 -> log 2 = 0.6931472;
    # Δ = 0.5 -> 0.5 -> softplus(-0.5) = 0.4740770;  Δ = -0.25 -> -1 -> softplus(1) = 1.3132617.
    policy = means([-1.0, -1.0, -1.25], [-1.25, -1.5, -1.0])
    assert per_pair(policy, SimpoVariant.sigmoid) == pytest.approx([0.6931472, 0.4740770, 1.3132617], abs=1e-6)
    # eps = 0.5 at 2 Δ - 0.5 = 0.5: 0.5 * (softplus(-0.5) + softplus(0.5)) = 0.5 * (0.4740770 + 0.9740770).
    smoothed = per_pair(means([-1.0], [-1.5]), SimpoVariant.sigmoid, label_smoothing=0.5)
    assert smoothed == pytest.approx([0.7240770], abs=1e-6)
    # Limit: Δ -> +inf gives 0 (Δ = 100: softplus(-199.5) ~ 1e-87).
    assert per_pair(means([0.0], [-100.0]), SimpoVariant.sigmoid) == pytest.approx([0.0], abs=1e-12)


def test_hinge_values_and_limit() -> None:
    # max(0, 1 - (2 Δ - 0.5)): Δ = 0.25 -> 1.0;  Δ = 0 -> 1.5;  Δ = -0.5 -> 2.5.
    policy = means([-1.0, -2.0, -1.5], [-1.25, -2.0, -1.0])
    assert per_pair(policy, SimpoVariant.hinge) == pytest.approx([1.0, 1.5, 2.5])
    # Limit: zero once 2 Δ - 0.5 >= 1, i.e. Δ >= 0.75.
    assert per_pair(means([-1.0, -1.0], [-1.75, -3.0]), SimpoVariant.hinge) == pytest.approx([0.0, 0.0])


def test_sigmoid_is_cpo_simpo_variant_without_nll() -> None:
    policy = means([-1.0, -0.3, -2.0], [-1.2, -0.9, -1.0])
    ours = simpo_loss(policy, beta=2.5, gamma=1.2).per_pair_loss
    theirs = cpo_loss(policy, beta=2.5, loss_type=CpoVariant.simpo, simpo_gamma=1.2, cpo_alpha=0.0).per_pair_loss
    assert torch.allclose(ours, theirs)


def test_total_adds_sft_weight_times_chosen_nll_and_rewards_are_scaled_means() -> None:
    # Chosen NLL, token mean: (2 + 2) / (2 + 2) = 1; pair terms 0.6931472 (Δ = 0.25) and 0.4740770 (Δ = 0.5).
    policy = means([-1.0, -1.0], [-1.25, -1.5])
    out = simpo_loss(policy, beta=2.0, gamma=0.5, sft_weight=0.3)
    assert (out.chosen_nll_weight, out.rejected_nll_weight) == (0.3, 0.0)
    loss = float(total_loss(out, policy, PairCounts.of(policy)).detach())
    assert loss == pytest.approx((0.6931472 + 0.4740770) / 2 + 0.3 * 1.0, abs=1e-6)
    assert out.chosen_reward.tolist() == pytest.approx([-2.0, -2.0])
    assert out.rejected_reward.tolist() == pytest.approx([-2.5, -3.0])


@pytest.mark.parametrize("variant", list(SIMPO_LOSSES))
def test_every_variant_has_finite_gradients(variant: SimpoVariant) -> None:
    policy = means([-3.0, -0.01, -20.0], [-0.2, -5.0, -20.0])
    out = simpo_loss(policy, beta=2.0, gamma=0.5, loss_type=variant, sft_weight=0.5)
    assert out.per_pair_loss.shape == (3,)
    total_loss(out, policy, PairCounts.of(policy)).backward()
    for grad in (policy.chosen.grad, policy.rejected.grad):
        assert grad is not None
        assert torch.isfinite(grad).all()


def test_label_smoothing_only_with_sigmoid() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        SimpoConfig(loss_type=SimpoVariant.hinge, label_smoothing=0.1)


def test_run_trains_and_evaluates(compose: Any, tmp_path: Path) -> None:
    metrics = run_method(simpo.run, compose, tmp_path, [*TINY_DEMO_PAIRS, "method=simpo"])
    assert math.isfinite(metrics["train_loss"])
    assert math.isfinite(metrics["eval_loss"])
    assert "eval_rewards/margins" in metrics
