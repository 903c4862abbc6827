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
logged.

Token log-prob shaping (seed spec §3.5). The original's three per-token shaping options never took effect there
(each wrote into a boolean-mask copy, and sliced flattened tokens instead of sequences). Here they are offered
behind flags that default off, implemented row-wise as intended, by :func:`shape_token_logps` on the policy's
token log-probs before the per-sequence means of the preference term, in this order:

1. ``invert_rejected_eos``: negate the log-prob of the tokenizer's EOS token in rejected completions, so that
   pushing the rejected likelihood down does not teach the model to avoid ending;
2. ``lower_clip_percentile``: clamp each rejected token log-prob from below at that quantile of its sequence;
3. ``upper_clip_percentile``: clamp each chosen token log-prob from above at that quantile of its sequence;
4. ``min_log_prob``: floor each rejected token log-prob at that value.

Quantiles are taken per sequence over its completion tokens, on a detached copy (linear interpolation), where the
original meant one quantile over the whole micro-batch's rejected (or chosen) tokens: per sequence, a pair's loss
does not depend on which pairs share its micro-batch, so gradient accumulation stays exact. Clamped tokens get no
gradient. The shaping touches only the preference term and the logged rewards: the NLL terms, ``logps/*`` and
``chosen_sft_loss``/``rejected_sft_loss`` use the plain log-probs (the original took the NLLs from the logits).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import TYPE_CHECKING

from alignment.methods.pairwise.core import PairLogps, PairwiseConfig, PreferenceLoss, Progress, TokenShaper
from alignment.ranges import bounded, check_fields

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

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
class SmpoConfig(PairwiseConfig):
    """Simple Margin Preference Optimization (reference-free, length-normalised, balancing SFT terms)."""

    name: str = "smpo"
    """Registry key."""
    beta: float = bounded(1.2, gt=0)
    """Scale of the margin gap ``Δ - m_t`` (and of the logged rewards)."""
    target_margin: float = bounded(0.35, ge=0)
    """Target margin m* on the difference of mean per-token log-probs (unscaled), ≥ 0."""
    chosen_sft_ratio: float = bounded(0.8, ge=0, le=1)
    """Weight r of the chosen NLL; the rejected NLL gets 1 - r. In [0, 1]."""
    loss_type: SmpoVariant = SmpoVariant.smooth_lower_bound
    """Preference term."""
    use_margin_schedule: bool = True
    """Ramp the margin linearly from 0.01 at step 0 to ``target_margin`` at ``max_steps``."""
    invert_rejected_eos: bool = False
    """Negate the log-prob of the tokenizer's EOS token in rejected completions (preference term only), so that
    lowering the rejected likelihood does not teach the model to avoid ending. Off in the original (no effect)."""
    lower_clip_percentile: float | None = bounded(None, gt=0, le=0.5)
    """Winsorise each rejected sequence's token log-probs from below at this quantile of that sequence's own
    completion tokens (a fraction in (0, 0.5], detached; preference term only). None: off. The original's default
    0.02 had no effect."""
    upper_clip_percentile: float | None = bounded(None, ge=0.5, lt=1)
    """Winsorise each chosen sequence's token log-probs from above at this quantile of that sequence's own
    completion tokens (a fraction in [0.5, 1), detached; preference term only). None: off."""
    min_log_prob: float | None = bounded(None, lt=0)
    """Floor on each rejected token log-prob (< 0), applied after the winsorising (preference term only). None: off.
    The original's default -2.3 (about ln 0.1) had no effect."""

    def __post_init__(self) -> None:
        check_fields(self, "method")

    @property
    def shapes_tokens(self) -> bool:
        """Whether any token log-prob shaping option is on."""
        return self.invert_rejected_eos or any(
            v is not None for v in (self.lower_clip_percentile, self.upper_clip_percentile, self.min_log_prob)
        )


# --- the pure losses -----------------------------------------------------------------------------------------


def smooth_lower_bound_loss(z: torch.Tensor) -> torch.Tensor:
    """``max(0, -z)²`` per pair, ``(batch,)``."""
    import torch

    return torch.relu(-z) ** 2


def sigmoid_loss(z: torch.Tensor) -> torch.Tensor:
    """``-log sigmoid(z)`` per pair, ``(batch,)``."""
    import torch

    return -torch.nn.functional.logsigmoid(z)


def hinge_loss(z: torch.Tensor) -> torch.Tensor:
    """``max(0, -z)`` per pair, ``(batch,)``."""
    import torch

    return torch.relu(-z)


def ipo_loss(z: torch.Tensor) -> torch.Tensor:
    """``z²`` per pair, ``(batch,)``: pulls Δ to exactly m_t."""
    return z**2


# --- token log-prob shaping (seed spec §3.5, row-wise) ----------------------------------------------------------


def row_quantiles(values: torch.Tensor, sequence_ids: torch.Tensor, rows: int, q: float) -> torch.Tensor:
    """Per row ``i`` the ``q`` quantile (linear interpolation) of ``values[sequence_ids == i]``, detached, float32.

    ``values`` and ``sequence_ids`` are flat and equally long; a row with no value gets NaN.
    """
    import torch

    owner, order = torch.sort(sequence_ids, stable=True)
    ordered = values.detach().float()[order]
    counts = torch.zeros(rows, dtype=torch.long, device=values.device).index_add(0, owner, torch.ones_like(owner))
    starts = counts.cumsum(0) - counts
    rank = torch.arange(owner.numel(), device=values.device) - starts[owner]
    width = max(int(counts.max()) if rows else 0, 1)
    padded = torch.full((rows, width), float("nan"), device=values.device)
    padded[owner, rank] = ordered
    return torch.nanquantile(padded, q, dim=1)


def shape_token_logps(
    token_logps: torch.Tensor,
    targets: torch.Tensor,
    sequence_ids: torch.Tensor,
    mask: torch.Tensor,
    num_pairs: int,
    *,
    eos_token_id: int | None = None,
    invert_rejected_eos: bool = False,
    lower_clip_percentile: float | None = None,
    upper_clip_percentile: float | None = None,
    min_log_prob: float | None = None,
) -> torch.Tensor:
    """SMPO's token log-prob shaping (a :data:`~alignment.methods.pairwise.core.TokenShaper` once bound).

    Flat tensors of one packed micro-batch: sequences ``0..num_pairs-1`` are chosen, the rest rejected; only
    positions in ``mask`` change. In order: EOS inversion on rejected, lower winsorising of rejected and upper of
    chosen tokens at per-sequence quantiles of the values at that point, then the ``min_log_prob`` floor on rejected.
    """
    import torch

    rejected = mask & (sequence_ids >= num_pairs)
    chosen = mask & (sequence_ids < num_pairs)
    rows = 2 * num_pairs
    shaped = token_logps
    if invert_rejected_eos:
        if eos_token_id is None:
            raise ValueError("invert_rejected_eos needs the tokenizer's eos_token_id")
        shaped = torch.where(rejected & (targets == eos_token_id), -shaped, shaped)
    # The two winsorisings act on disjoint rows (rejected from below, chosen from above), each row at its own
    # quantile of its values after the EOS inversion.
    clips = [(rejected, lower_clip_percentile, True), (chosen, upper_clip_percentile, False)]
    for side, q, lower in clips:
        if q is None:
            continue
        off = -math.inf if lower else math.inf
        per_row = row_quantiles(shaped[side], sequence_ids[side], rows, q).to(shaped.dtype).nan_to_num(off)
        bound = torch.where(side, per_row[sequence_ids], off)
        shaped = shaped.clamp(min=bound) if lower else shaped.clamp(max=bound)
    if min_log_prob is not None:
        floor = torch.where(rejected, min_log_prob, -math.inf).to(shaped.dtype)
        shaped = shaped.clamp(min=floor)
    return shaped


def token_shaper(cfg: SmpoConfig, eos_token_id: int | None) -> TokenShaper | None:
    """The shaper for ``cfg``'s options, or None when all are off (the forward then sums plain log-probs only)."""
    if not cfg.shapes_tokens:
        return None
    if cfg.invert_rejected_eos and eos_token_id is None:
        raise ValueError("method.invert_rejected_eos=true needs a tokenizer with an eos_token (model.eos_token)")
    return partial(
        shape_token_logps,
        eos_token_id=eos_token_id,
        invert_rejected_eos=cfg.invert_rejected_eos,
        lower_clip_percentile=cfg.lower_clip_percentile,
        upper_clip_percentile=cfg.upper_clip_percentile,
        min_log_prob=cfg.min_log_prob,
    )


# --- the loss ----------------------------------------------------------------------------------------------------


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
    """SMPO on one micro-batch at margin ``m_t = margin``; NLL weights r and 1 - r go to the trainer's token means.

    The preference term and rewards use ``policy.shaped`` where the forward shaped token log-probs; the NLLs never.
    """
    preference = policy.shaped if policy.shaped is not None else policy
    chosen, rejected = preference.chosen_mean, preference.rejected_mean
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


def smpo_loss_fn(
    policy: PairLogps, reference: PairLogps | None, progress: Progress, *, cfg: SmpoConfig
) -> PreferenceLoss:
    """The trainer's loss function of a run: :func:`smpo_loss` with the margin scheduled at ``progress``."""
    margin = margin_at(progress, target_margin=cfg.target_margin, scheduled=cfg.use_margin_schedule)
    return smpo_loss(
        policy, beta=cfg.beta, margin=margin, chosen_sft_ratio=cfg.chosen_sft_ratio, loss_type=cfg.loss_type
    )


def run(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Train with SMPO through the shared pairwise trainer (no reference model); final metrics."""
    from alignment.methods.pairwise.core import run_pairwise

    method = cfg.method
    assert isinstance(method, SmpoConfig)

    def make_token_shaper(tokenizer: PreTrainedTokenizerBase) -> TokenShaper | None:
        return token_shaper(method, tokenizer.eos_token_id if method.invert_rejected_eos else None)

    return run_pairwise(
        cfg,
        ctx,
        partial(smpo_loss_fn, cfg=method),
        max_length=method.max_length,
        reference_kind=None,
        make_token_shaper=make_token_shaper,
    )


SMPO_LOSSES: dict[SmpoVariant, Callable[[torch.Tensor], torch.Tensor]] = {
    SmpoVariant.smooth_lower_bound: smooth_lower_bound_loss,
    SmpoVariant.sigmoid: sigmoid_loss,
    SmpoVariant.hinge: hinge_loss,
    SmpoVariant.ipo: ipo_loss,
}
"""``f(z)`` of each variant, ``(batch,) -> (batch,)``."""
