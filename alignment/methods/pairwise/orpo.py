"""Odds Ratio Preference Optimization (Hong et al. 2024, https://arxiv.org/abs/2403.07691), reference-free.

With length-normalised completion log-probs ``lbar(y) = log π(y) / |y|`` and ``odds(y) = e^lbar / (1 - e^lbar)``:

    log_odds = log odds(y_w) - log odds(y_l) = (lbar_w - lbar_l) - (log(1 - e^lbar_w) - log(1 - e^lbar_l))
    L = NLL(y_w) - β · mean_pairs log sigmoid(log_odds)          (paper eqs. 4-7, with λ = β)

NLL(y_w) is a token mean over the chosen completions. Rewards (logged) are ``β lbar(y)``; ``log_odds_ratio``
(mean log sigmoid(log_odds)) and ``log_odds_chosen`` (mean log_odds) are logged as TRL does.

The odds-ratio term is ``trl.experimental.orpo``'s ``ORPOTrainer`` term (compared against it in the tests),
including its numerically stable ``log(1 - e^x)``. Deviations: the NLL covers the chosen completion tokens only
(the official code's ``--disable_prompt_loss``), where TRL and the official default also train on the prompt
tokens; the shared forward counts completion tokens only, and prompt NLL would teach the model to write prompts.
NLL and pair means are taken over the whole optimizer step (:mod:`alignment.methods.pairwise.core`), which equals the
per-micro-batch means without gradient accumulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from alignment.methods.pairwise.core import PairLogps, PairwiseConfig, PreferenceLoss, Progress
from alignment.ranges import bounded

if TYPE_CHECKING:
    import torch

    from alignment.config import RunConfig
    from alignment.context import RunContext


@dataclass
class OrpoConfig(PairwiseConfig):
    """Odds Ratio Preference Optimization (reference-free; NLL on chosen plus an odds-ratio term)."""

    name: str = "orpo"
    """Registry key."""
    beta: float = bounded(0.1, ge=0)
    """Weight λ of the odds-ratio term relative to the chosen NLL (TRL ``beta``)."""


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - e^x)`` for ``x < 0``, stable on both sides of ``-ln 2`` (Mächler 2012); same shape as ``x``."""
    import torch

    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds_ratio(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor) -> torch.Tensor:
    """``log odds(y_w) - log odds(y_l)`` from mean completion log-probs, ``(batch,)`` each."""
    return (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))


def orpo_loss(policy: PairLogps, *, beta: float) -> PreferenceLoss:
    """ORPO on one micro-batch: ``-β log sigmoid(log_odds)`` per pair, plus the chosen NLL with weight 1."""
    import torch

    chosen, rejected = policy.chosen_mean.float(), policy.rejected_mean.float()
    log_odds = log_odds_ratio(chosen, rejected)
    ratio = torch.nn.functional.logsigmoid(log_odds)
    return PreferenceLoss(
        per_pair_loss=-beta * ratio,
        chosen_reward=beta * chosen.detach(),
        rejected_reward=beta * rejected.detach(),
        chosen_nll_weight=1.0,
        metrics={"log_odds_ratio": float(ratio.detach().mean()), "log_odds_chosen": float(log_odds.detach().mean())},
    )


def _loss_fn(policy: PairLogps, reference: PairLogps | None, progress: Progress, *, beta: float) -> PreferenceLoss:
    return orpo_loss(policy, beta=beta)


def run(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Train with ORPO through the shared pairwise trainer (no reference model); final metrics."""
    from alignment.methods.pairwise.core import run_pairwise

    method = cfg.method
    assert isinstance(method, OrpoConfig)
    loss_fn = partial(_loss_fn, beta=method.beta)
    return run_pairwise(cfg, ctx, loss_fn, max_length=method.max_length, reference_kind=None)
