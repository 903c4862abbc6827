"""Simple Margin Preference Optimization (SMPO; the original toolkit's own method, no paper), reference-free.

Per sequence ``lbar(y)`` is the mean log-prob over completion tokens. Per pair ``Δ = lbar(y_w) - lbar(y_l)`` and
``z = β (Δ - m_t)``; the preference term ``f(z)`` by ``loss_type``:

* ``smooth_lower_bound`` (default): ``max(0, -z)²`` — a one-sided squared hinge, zero once Δ ≥ m_t;
* ``sigmoid``: ``-log sigmoid(z)``;  ``hinge``: ``max(0, -z)`` (no offset of 1, unlike SLiC);  ``ipo``: ``z²``.

    L = mean_pairs f(z) + r · NLL(y_w) + (1 - r) · NLL(y_l),        r = ``chosen_sft_ratio``

with the NLLs token means. The positive rejected-NLL weight deliberately keeps the rejected likelihood from
collapsing. The margin ramps linearly, ``m_t = 0.01 + (m* - 0.01) · min(1, t/T)`` at optimizer step t of T, or is
fixed at ``m* = target_margin`` without the schedule. Rewards (logged) are ``β lbar(y)``, so ``rewards/accuracies``
is the fraction of pairs with ``lbar(y_w) > lbar(y_l)``; ``target_margin`` (m_t, unscaled) and ``chosen_sft_loss`` /
``rejected_sft_loss`` (this micro-batch's token-mean NLLs) are logged too.

Deviations from the original (seed spec §3), each a fix: the margin is a pure function of the step, so the
schedule no longer crashes on the first step; the loss is normalised over the optimizer step, so gradient
accumulation gives the same gradient as a bigger micro-batch; ``weighted_sft_loss`` (mis-logged there) is not
logged. The original's three per-token log-prob shaping options (EOS inversion on rejected sequences, percentile
winsorising, ``min_log_prob`` floor) never took effect there and are not offered: the shared forward returns
per-sequence sums, not per-token log-probs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch.nn.functional import logsigmoid

from alignment.methods.common import MethodConfig
from alignment.methods.pairwise import PairLogps, PreferenceLoss, Progress

if TYPE_CHECKING:
    from alignment.config import RunConfig
    from alignment.context import RunContext

INITIAL_MARGIN = 0.01
"""Margin at step 0 when the schedule is on (the original's value)."""


class SmpoVariant(StrEnum):
    """Preference term ``f(z)``, ``z = β (Δ - m_t)``."""

    smooth_lower_bound = "smooth_lower_bound"
    sigmoid = "sigmoid"
    hinge = "hinge"
    ipo = "ipo"


@dataclass
class SmpoConfig(MethodConfig):
    """Simple Margin Preference Optimization (reference-free, length-normalised, balancing SFT terms)."""

    name: str = "smpo"
    """Registry key."""
    beta: float = 1.2
    """Scale of the margin gap ``Δ - m_t`` (and of the logged rewards)."""
    target_margin: float = 0.35
    """Target margin m* on the difference of mean per-token log-probs (unscaled), ≥ 0."""
    chosen_sft_ratio: float = 0.8
    """Weight r of the chosen NLL; the rejected NLL gets 1 - r. In [0, 1]."""
    loss_type: SmpoVariant = SmpoVariant.smooth_lower_bound
    """Preference term."""
    use_margin_schedule: bool = True
    """Ramp the margin linearly from 0.01 at step 0 to ``target_margin`` at ``max_steps``."""
    max_length: int = 1024
    """Tokens per prompt + completion; longer pairs are cut at the completion's end (counted and reported)."""

    def __post_init__(self) -> None:
        if self.target_margin < 0:
            raise ValueError(f"method.target_margin must be >= 0, got {self.target_margin}")
        if not 0.0 <= self.chosen_sft_ratio <= 1.0:
            raise ValueError(f"method.chosen_sft_ratio must be in [0, 1], got {self.chosen_sft_ratio}")


# --- the pure losses -----------------------------------------------------------------------------------------


def smooth_lower_bound_loss(z: torch.Tensor) -> torch.Tensor:
    """``max(0, -z)²`` per pair, ``(batch,)``."""
    return torch.relu(-z) ** 2


def sigmoid_loss(z: torch.Tensor) -> torch.Tensor:
    """``-log sigmoid(z)`` per pair, ``(batch,)``."""
    return -logsigmoid(z)


def hinge_loss(z: torch.Tensor) -> torch.Tensor:
    """``max(0, -z)`` per pair, ``(batch,)``."""
    return torch.relu(-z)


def ipo_loss(z: torch.Tensor) -> torch.Tensor:
    """``z²`` per pair, ``(batch,)``: pulls Δ to exactly m_t."""
    return z**2


def margin_at(progress: Progress, *, target_margin: float, scheduled: bool) -> float:
    """``m_t = 0.01 + (m* - 0.01) · min(1, t/T)`` with the schedule, ``m*`` without."""
    if not scheduled:
        return target_margin
    fraction = min(1.0, progress.step / max(progress.max_steps, 1))
    return INITIAL_MARGIN + (target_margin - INITIAL_MARGIN) * fraction


def smpo_loss(
    policy: PairLogps,
    *,
    beta: float,
    margin: float,
    chosen_sft_ratio: float,
    loss_type: SmpoVariant = SmpoVariant.smooth_lower_bound,
) -> PreferenceLoss:
    """SMPO on one micro-batch at margin ``m_t = margin``; NLL weights r and 1 - r go to the trainer's token means."""
    chosen, rejected = policy.chosen_mean, policy.rejected_mean
    z = beta * (chosen - rejected - margin)
    chosen_nll = -policy.chosen.detach().sum() / policy.chosen_tokens.sum().clamp(min=1)
    rejected_nll = -policy.rejected.detach().sum() / policy.rejected_tokens.sum().clamp(min=1)
    return PreferenceLoss(
        per_pair_loss=SMPO_LOSSES[loss_type](z),
        chosen_reward=beta * chosen.detach(),
        rejected_reward=beta * rejected.detach(),
        chosen_nll_weight=chosen_sft_ratio,
        rejected_nll_weight=1.0 - chosen_sft_ratio,
        metrics={
            "target_margin": margin,
            "chosen_sft_loss": float(chosen_nll),
            "rejected_sft_loss": float(rejected_nll),
        },
    )


def _loss_fn(policy: PairLogps, reference: PairLogps | None, progress: Progress, *, cfg: SmpoConfig) -> PreferenceLoss:
    margin = margin_at(progress, target_margin=cfg.target_margin, scheduled=cfg.use_margin_schedule)
    return smpo_loss(
        policy, beta=cfg.beta, margin=margin, chosen_sft_ratio=cfg.chosen_sft_ratio, loss_type=cfg.loss_type
    )


def run(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Train with SMPO through the shared pairwise trainer (no reference model); final metrics."""
    from alignment.methods.pairwise import run_pairwise

    method = cfg.method
    assert isinstance(method, SmpoConfig)
    return run_pairwise(cfg, ctx, partial(_loss_fn, cfg=method), max_length=method.max_length, reference_kind=None)


SMPO_LOSSES: dict[SmpoVariant, Callable[[torch.Tensor], torch.Tensor]] = {
    SmpoVariant.smooth_lower_bound: smooth_lower_bound_loss,
    SmpoVariant.sigmoid: sigmoid_loss,
    SmpoVariant.hinge: hinge_loss,
    SmpoVariant.ipo: ipo_loss,
}
"""``f(z)`` of each variant, ``(batch,) -> (batch,)``."""
