"""Contrastive Preference Optimization (Xu et al. 2024, https://arxiv.org/abs/2401.08417), reference-free.

With ``z = log π(y_w) - log π(y_l)`` (summed completion log-probs; length-normalised for ``ipo`` and ``simpo``)
the per-pair preference term is, by ``loss_type``:

* ``sigmoid`` (CPO eq. 3): ``-(1 - ε) log sigmoid(β z) - ε log sigmoid(-β z)``, ε = ``label_smoothing``;
* ``hinge`` (SLiC): ``max(0, 1 - β z)``;
* ``ipo`` (Azar et al. 2023, eq. 17): ``(z - 1/(2β))²``;
* ``simpo`` (Meng et al. 2024): ``-(1 - ε) log sigmoid(β z - g) - ε log sigmoid(g - β z)``, g = ``simpo_gamma``.

Loss = mean_pairs(term) + ``cpo_alpha`` · NLL(y_w), the NLL a token mean over the chosen completions.
Rewards (logged) are ``β · z``'s two sides, ``β log π(y)``.

These are TRL's ``trl.experimental.cpo`` formulas (compared against its ``CPOTrainer`` in the tests), with its
``simpo_gamma`` meaning: the margin gamma on the β-scaled scale (TRL subtracts ``simpo_gamma / β`` from ``z`` before
scaling by β). Deviations: no AlphaPO reward transform (``alpha``); label smoothing with ``hinge``/``ipo`` is
rejected at config time instead of ignored; NLL and pair means are taken over the whole optimizer step
(:mod:`alignment.methods.pairwise.core`), which equals TRL's per-micro-batch means without gradient accumulation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import TYPE_CHECKING, TypeAlias

from alignment.methods.pairwise.core import PairLogps, PairwiseConfig, PreferenceLoss, Progress
from alignment.ranges import bounded, check_fields

if TYPE_CHECKING:
    import torch

    from alignment.config import RunConfig
    from alignment.context import RunContext


class CpoVariant(StrEnum):
    """Preference term applied to the log-prob difference ``z``."""

    sigmoid = "sigmoid"
    hinge = "hinge"
    ipo = "ipo"
    simpo = "simpo"


@dataclass
class CpoConfig(PairwiseConfig):
    """Contrastive Preference Optimization (reference-free)."""

    name: str = "cpo"
    """Registry key."""
    beta: float = bounded(0.1, gt=0)
    """Scale of the log-prob difference inside the preference term (TRL ``beta``)."""
    loss_type: CpoVariant = CpoVariant.sigmoid
    """Preference term; ``ipo`` and ``simpo`` use length-normalised log-probs."""
    label_smoothing: float = bounded(0.0, ge=0, le=0.5)
    """Probability ε that a pair's label is flipped (``sigmoid`` and ``simpo`` only), in [0, 0.5]."""
    simpo_gamma: float = bounded(0.5, ge=0)
    """SimPO target reward margin gamma (``loss_type=simpo`` only), on the β-scaled scale."""
    cpo_alpha: float = bounded(1.0, ge=0)
    """Weight of the chosen completions' token-mean NLL (0 gives pure SimPO with ``loss_type=simpo``)."""

    def __post_init__(self) -> None:
        check_fields(self, "method")
        if self.label_smoothing and self.loss_type not in SMOOTHED:
            raise ValueError(f"method.label_smoothing applies to loss_type {sorted(SMOOTHED)}, not {self.loss_type}")


# --- the pure losses -----------------------------------------------------------------------------------------


def sigmoid_loss(logratio: torch.Tensor, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """``-(1 - ε) log sigmoid(β z) - ε log sigmoid(-β z)`` per pair; ``logratio`` z is ``(batch,)``."""
    import torch

    scaled = beta * logratio
    return -(1 - label_smoothing) * torch.nn.functional.logsigmoid(
        scaled
    ) - label_smoothing * torch.nn.functional.logsigmoid(-scaled)


def hinge_loss(logratio: torch.Tensor, *, beta: float) -> torch.Tensor:
    """``max(0, 1 - β z)`` per pair, ``(batch,)``."""
    import torch

    return torch.relu(1 - beta * logratio)


def ipo_loss(logratio: torch.Tensor, *, beta: float) -> torch.Tensor:
    """``(z - 1/(2β))²`` per pair, ``(batch,)``; zero at ``z = 1/(2β)``."""
    return (logratio - 1 / (2 * beta)) ** 2


def simpo_loss(logratio: torch.Tensor, *, beta: float, gamma: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """``-(1 - ε) log sigmoid(β z - gamma) - ε log sigmoid(gamma - β z)`` per pair, ``(batch,)``."""
    return sigmoid_loss(logratio - gamma / beta, beta=beta, label_smoothing=label_smoothing)


VariantFn: TypeAlias = "Callable[[torch.Tensor, float, float, float], torch.Tensor]"
"""``(z (batch,), beta, simpo_gamma, label_smoothing) -> (batch,)``."""


def _sigmoid(z: torch.Tensor, beta: float, gamma: float, label_smoothing: float) -> torch.Tensor:
    return sigmoid_loss(z, beta=beta, label_smoothing=label_smoothing)


def _hinge(z: torch.Tensor, beta: float, gamma: float, label_smoothing: float) -> torch.Tensor:
    return hinge_loss(z, beta=beta)


def _ipo(z: torch.Tensor, beta: float, gamma: float, label_smoothing: float) -> torch.Tensor:
    return ipo_loss(z, beta=beta)


def _simpo(z: torch.Tensor, beta: float, gamma: float, label_smoothing: float) -> torch.Tensor:
    return simpo_loss(z, beta=beta, gamma=gamma, label_smoothing=label_smoothing)


def cpo_loss(
    policy: PairLogps,
    *,
    beta: float,
    loss_type: CpoVariant,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
) -> PreferenceLoss:
    """CPO on one micro-batch: the variant's term on ``z`` (length-normalised where the variant says so)."""
    if loss_type in LENGTH_NORMALISED:
        chosen, rejected = policy.chosen_mean, policy.rejected_mean
    else:
        chosen, rejected = policy.chosen, policy.rejected
    per_pair = CPO_LOSSES[loss_type](chosen - rejected, beta, simpo_gamma, label_smoothing)
    return PreferenceLoss(
        per_pair_loss=per_pair,
        chosen_reward=beta * chosen.detach(),
        rejected_reward=beta * rejected.detach(),
        chosen_nll_weight=cpo_alpha,
    )


def _loss_fn(policy: PairLogps, reference: PairLogps | None, progress: Progress, *, cfg: CpoConfig) -> PreferenceLoss:
    return cpo_loss(
        policy,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing,
        simpo_gamma=cfg.simpo_gamma,
        cpo_alpha=cfg.cpo_alpha,
    )


def run(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Train with CPO through the shared pairwise trainer (no reference model); final metrics."""
    from alignment.methods.pairwise.core import run_pairwise

    method = cfg.method
    assert isinstance(method, CpoConfig)
    return run_pairwise(cfg, ctx, partial(_loss_fn, cfg=method), max_length=method.max_length, reference_kind=None)


CPO_LOSSES: dict[CpoVariant, VariantFn] = {
    CpoVariant.sigmoid: _sigmoid,
    CpoVariant.hinge: _hinge,
    CpoVariant.ipo: _ipo,
    CpoVariant.simpo: _simpo,
}
"""Per-pair preference term of each variant, ``(z (batch,), config) -> (batch,)``."""
LENGTH_NORMALISED = frozenset({CpoVariant.ipo, CpoVariant.simpo})
"""Variants whose ``z`` uses mean (not summed) completion log-probs, as TRL's CPO does."""
SMOOTHED = frozenset({CpoVariant.sigmoid, CpoVariant.simpo})
"""Variants that take ``label_smoothing``."""
