"""Simple Preference Optimization (Meng et al. 2024, https://arxiv.org/abs/2405.14734), reference-free.

With length-normalised completion log-probs ``lbar(y) = log π(y) / |y|`` and ``Δ = lbar(y_w) - lbar(y_l)``, the per-pair
term is, by ``loss_type``:

* ``sigmoid`` (paper eq. 6): ``-(1 - ε) log sigmoid(β Δ - g) - ε log sigmoid(g - β Δ)``, g = ``gamma``,
  ε = ``label_smoothing``;
* ``hinge`` (the SimPO repository's option): ``max(0, 1 - (β Δ - gamma))``.

Loss = mean_pairs(term) + ``sft_weight`` · NLL(y_w). Rewards (logged) are ``β lbar(y)``.

gamma is the target reward margin on the β-scaled scale; the SimPO repository's ``gamma_beta_ratio`` is ``gamma/β`` and
TRL's CPO ``simpo_gamma`` is gamma itself. Defaults ``β = 2.0``, ``gamma = 0.5`` are the repository's (``beta=2.0``,
``gamma_beta_ratio=0.25``); the paper tunes β in [2, 10] and gamma/β in [0, 1] per model. The pair terms are CPO's
(:mod:`alignment.methods.pairwise.cpo`) on ``Δ - gamma/β``. Deviation: the repository's ``sft_weight`` term is the mean
over
pairs of each chosen sequence's mean NLL; ours is a token mean over the optimizer step's chosen completions, the
normalisation every pairwise method here shares (the two agree when chosen completions have equal lengths).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import TYPE_CHECKING, TypeAlias

from alignment.methods.pairwise.core import PairLogps, PairwiseConfig, PreferenceLoss, Progress
from alignment.methods.pairwise.cpo import hinge_loss, sigmoid_loss
from alignment.ranges import bounded, check_fields

if TYPE_CHECKING:
    import torch

    from alignment.config import RunConfig
    from alignment.context import RunContext


class SimpoVariant(StrEnum):
    """Preference term applied to the margin ``β Δ - gamma``."""

    sigmoid = "sigmoid"
    hinge = "hinge"


@dataclass
class SimpoConfig(PairwiseConfig):
    """Simple Preference Optimization (reference-free, length-normalised)."""

    name: str = "simpo"
    """Registry key."""
    beta: float = bounded(2.0, gt=0)
    """Scale of the length-normalised log-prob difference (the reward scale)."""
    gamma: float = bounded(0.5, ge=0)
    """Target reward margin gamma, on the β-scaled scale (``gamma/β`` is the repository's ``gamma_beta_ratio``)."""
    loss_type: SimpoVariant = SimpoVariant.sigmoid
    """Preference term."""
    label_smoothing: float = bounded(0.0, ge=0, le=0.5)
    """Probability ε that a pair's label is flipped (``sigmoid`` only), in [0, 0.5]."""
    sft_weight: float = bounded(0.0, ge=0)
    """Weight of the chosen completions' token-mean NLL."""

    def __post_init__(self) -> None:
        check_fields(self, "method")
        if self.label_smoothing and self.loss_type is not SimpoVariant.sigmoid:
            raise ValueError(f"method.label_smoothing applies to loss_type sigmoid only, not {self.loss_type}")


VariantFn: TypeAlias = "Callable[[torch.Tensor, float, float, float], torch.Tensor]"
"""``(Δ (batch,), beta, gamma, label_smoothing) -> (batch,)``."""


def sigmoid_term(delta: torch.Tensor, beta: float, gamma: float, label_smoothing: float) -> torch.Tensor:
    """``-(1 - ε) log sigmoid(β Δ - gamma) - ε log sigmoid(gamma - β Δ)`` per pair; ``delta`` is ``(batch,)``."""
    return sigmoid_loss(delta - gamma / beta, beta=beta, label_smoothing=label_smoothing)


def hinge_term(delta: torch.Tensor, beta: float, gamma: float, label_smoothing: float) -> torch.Tensor:
    """``max(0, 1 - (β Δ - gamma))`` per pair, ``(batch,)``."""
    return hinge_loss(delta - gamma / beta, beta=beta)


def simpo_loss(
    policy: PairLogps,
    *,
    beta: float,
    gamma: float,
    loss_type: SimpoVariant = SimpoVariant.sigmoid,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
) -> PreferenceLoss:
    """SimPO on one micro-batch, from summed log-probs and token counts."""
    chosen, rejected = policy.chosen_mean, policy.rejected_mean
    return PreferenceLoss(
        per_pair_loss=SIMPO_LOSSES[loss_type](chosen - rejected, beta, gamma, label_smoothing),
        chosen_reward=beta * chosen.detach(),
        rejected_reward=beta * rejected.detach(),
        chosen_nll_weight=sft_weight,
    )


def _loss_fn(policy: PairLogps, reference: PairLogps | None, progress: Progress, *, cfg: SimpoConfig) -> PreferenceLoss:
    return simpo_loss(
        policy,
        beta=cfg.beta,
        gamma=cfg.gamma,
        loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing,
        sft_weight=cfg.sft_weight,
    )


def run(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Train with SimPO through the shared pairwise trainer (no reference model); final metrics."""
    from alignment.methods.pairwise.core import run_pairwise

    method = cfg.method
    assert isinstance(method, SimpoConfig)
    return run_pairwise(cfg, ctx, partial(_loss_fn, cfg=method), max_length=method.max_length, reference_kind=None)


SIMPO_LOSSES: dict[SimpoVariant, VariantFn] = {
    SimpoVariant.sigmoid: sigmoid_term,
    SimpoVariant.hinge: hinge_term,
}
"""Per-pair preference term of each variant."""
