"""Direct Preference Optimization (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) and TRL's loss family.

With ``s_w = log π(y_w) - log π_ref(y_w)`` and ``s_l = log π(y_l) - log π_ref(y_l)`` (completion log-probs summed
over tokens) and ``Δ = s_w - s_l``, the default ``sigmoid`` loss per pair is ``-logsigmoid(β·Δ)``. Every loss type of
TRL 1.16's ``DPOTrainer`` is one pure function below (one per :class:`DpoLossType`, collected in
:data:`DPO_LOSSES`), with TRL's formula; several types are summed with ``loss_weights`` (RPO = ``sigmoid`` +
``sft``, MPO-style mixes):

* ``hinge`` (SLiC, https://arxiv.org/abs/2305.10425): ``max(0, 1 - β·Δ)``.
* ``ipo`` (https://arxiv.org/abs/2310.12036): ``(Δ̄ - 1/(2β))²`` with ``Δ̄`` from per-token mean log-ratios.
* ``exo_pair`` (https://arxiv.org/abs/2402.00856): ``KL(softmax(β·[s_w, s_l]) ‖ [1-ε, ε])``, needs ``ε > 0``.
* ``nca_pair`` (https://arxiv.org/abs/2402.05369): ``-logsigmoid(β s_w) - ½ logsigmoid(-β s_w) - ½ logsigmoid(-β s_l)``.
* ``robust`` (cDPO-robust, https://arxiv.org/abs/2403.00409): unbiased under label-flip rate ``ε``.
* ``bco_pair`` (https://arxiv.org/abs/2404.04656): ``-logsigmoid(β s_w) - logsigmoid(-β s_l)`` (no reward shift).
* ``sppo_hard`` (https://arxiv.org/abs/2405.00675): ``(s_w - 1/(2β))² + (s_l + 1/(2β))²``.
* ``aot`` / ``aot_unpaired`` (https://arxiv.org/abs/2406.05882): sigmoid on the sorted quantiles of the batch.
* ``apo_zero`` / ``apo_down`` (https://arxiv.org/abs/2408.06266).
* ``discopop`` (https://arxiv.org/abs/2406.08414): logistic/exponential blend, mixed by ``sigmoid(β·Δ/τ)``.
* ``sft``: token-mean NLL of the chosen completions (RPO, https://arxiv.org/abs/2404.19733).
* ``sigmoid_norm``: ``-logsigmoid(β·Δ̄)`` on per-token mean log-ratios.
* ``label_smoothing`` ``ε`` is the label-flip rate of ``robust``, EXO's target and the cDPO smoothing of
  ``aot``/``aot_unpaired``: ``-(1-ε) logsigmoid(z) - ε logsigmoid(-z)``. As in TRL 1.16, ``sigmoid`` ignores it.

The implicit rewards are ``β·s_w`` and ``β·s_l`` (detached). Deviations from TRL: only the reverse-KL
divergence (no ``f_divergence_type``, ``ld_alpha``, WPO weighting); ``sft`` is a chosen-NLL term that the
shared trainer normalises over the whole optimizer step (TRL takes the token mean per micro-batch, which differs
under gradient accumulation); ``robust`` with ``ε`` outside ``[0, 0.5)`` is an error (TRL warns; 0.5 divides by
zero), and so is ``ε > 0`` with no loss type that reads it (TRL ignores it silently). ``aot``/``aot_unpaired``
sort within each micro-batch, as TRL does, so they depend on the micro-batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import TYPE_CHECKING, Protocol

from alignment.methods.pairwise.core import PairLogps, PairwiseConfig, PreferenceLoss, Progress, run_pairwise
from alignment.models.config import ReferenceKind
from alignment.ranges import RANGE, Range, bounded, check_fields

if TYPE_CHECKING:
    import torch

    from alignment.config import RunConfig
    from alignment.context import RunContext


class DpoLossType(StrEnum):
    """TRL 1.16 ``DPOConfig.loss_type`` values (Enum, so a typo fails at compose time listing these)."""

    sigmoid = "sigmoid"
    hinge = "hinge"
    ipo = "ipo"
    exo_pair = "exo_pair"
    nca_pair = "nca_pair"
    robust = "robust"
    bco_pair = "bco_pair"
    sppo_hard = "sppo_hard"
    aot = "aot"
    aot_unpaired = "aot_unpaired"
    apo_zero = "apo_zero"
    apo_down = "apo_down"
    discopop = "discopop"
    sft = "sft"
    sigmoid_norm = "sigmoid_norm"


SMOOTHED = frozenset({DpoLossType.exo_pair, DpoLossType.robust, DpoLossType.aot, DpoLossType.aot_unpaired})
"""The loss types that read ``label_smoothing``."""


@dataclass
class DpoConfig(PairwiseConfig):
    """Direct Preference Optimization and TRL's DPO loss family."""

    name: str = "dpo"
    """Registry key."""
    learning_rate: float = 1e-6
    """Peak learning rate; TRL's DPO default, for full fine-tuning (LoRA typically wants ~1e-5 to 1e-4)."""
    beta: float = bounded(0.1, gt=0)
    """Inverse temperature of the implicit reward; larger keeps the policy closer to the reference."""
    loss_type: list[DpoLossType] = field(default_factory=lambda: [DpoLossType.sigmoid])
    """Loss terms, summed with ``loss_weights`` (e.g. ``[sigmoid, sft]`` is RPO)."""
    loss_weights: list[float] = field(default_factory=list, metadata={RANGE: Range(ge=0)})
    """Weight of each ``loss_type`` term, same length; empty means 1.0 each."""
    label_smoothing: float = bounded(0.0, ge=0, le=0.5)
    """Assumed label-flip rate ε of ``robust`` and ``aot*`` (cDPO form); EXO's target (must be > 0 there)."""
    discopop_tau: float = bounded(0.05, gt=0)
    """Temperature of DiscoPOP's mixing sigmoid."""
    reference: ReferenceKind = ReferenceKind.auto
    """Where reference log-probs come from: a frozen copy, the policy without adapters, or precomputed."""

    def __post_init__(self) -> None:
        check_fields(self, "method")
        types = [DpoLossType(t) for t in self.loss_type]
        if not types:
            raise ValueError(f"method.loss_type needs at least one of {[t.value for t in DpoLossType]}")
        names = [t.value for t in types]
        if self.loss_weights and len(self.loss_weights) != len(types):
            raise ValueError(
                f"method.loss_weights has {len(self.loss_weights)} values for {len(types)} loss types {names}"
            )
        if DpoLossType.exo_pair in types and self.label_smoothing <= 0:
            raise ValueError("method.loss_type=exo_pair needs method.label_smoothing > 0 (EXO recommends 1e-3)")
        if DpoLossType.robust in types and not 0 <= self.label_smoothing < 0.5:
            raise ValueError("method.loss_type=robust needs 0 <= method.label_smoothing < 0.5")
        if self.label_smoothing and not SMOOTHED.intersection(types):
            raise ValueError(
                f"method.label_smoothing only affects {sorted(t.value for t in SMOOTHED)}; loss_type={names} would "
                "ignore it"
            )


# --- the loss terms: each (batch,) per pair -----------------------------------------------------------------------


class DpoTerm(Protocol):
    """One loss type: per-pair loss ``(batch,)`` from policy and reference log-probs."""

    def __call__(
        self, policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float, discopop_tau: float
    ) -> torch.Tensor:
        """Per-pair loss, ``(batch,)``."""
        ...


def _logratios(policy: PairLogps, reference: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s_w, s_l)``: summed log-ratios to the reference, each ``(batch,)``."""
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


def _mean_delta(policy: PairLogps, reference: PairLogps) -> torch.Tensor:
    """``Δ̄ = s_w/|y_w| - s_l/|y_l|``: the margin of per-token mean log-ratios, ``(batch,)``."""
    chosen, rejected = _logratios(policy, reference)
    return chosen / policy.chosen_tokens.clamp(min=1) - rejected / policy.rejected_tokens.clamp(min=1)


def _smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """cDPO: ``-(1-ε) logsigmoid(z) - ε logsigmoid(-z)``."""
    import torch

    return -(1 - label_smoothing) * torch.nn.functional.logsigmoid(
        z
    ) - label_smoothing * torch.nn.functional.logsigmoid(-z)


def sigmoid_loss(policy: PairLogps, reference: PairLogps, *, beta: float, **_: float) -> torch.Tensor:
    """DPO: ``-logsigmoid(β·Δ)``. As in TRL 1.16, no label smoothing here (cDPO lives on in ``robust``/``aot``)."""
    import torch

    chosen, rejected = _logratios(policy, reference)
    return -torch.nn.functional.logsigmoid(beta * (chosen - rejected))


def hinge_loss(policy: PairLogps, reference: PairLogps, *, beta: float, **_: float) -> torch.Tensor:
    """SLiC hinge: ``max(0, 1 - β·Δ)``."""
    import torch

    chosen, rejected = _logratios(policy, reference)
    return torch.relu(1 - beta * (chosen - rejected))


def ipo_loss(policy: PairLogps, reference: PairLogps, *, beta: float, **_: float) -> torch.Tensor:
    """IPO: ``(Δ̄ - 1/(2β))²``, on per-token mean log-ratios (as TRL, confirmed with the IPO authors)."""
    return (_mean_delta(policy, reference) - 1 / (2 * beta)) ** 2


def exo_pair_loss(
    policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float, **_: float
) -> torch.Tensor:
    """EXO-pref: ``KL(softmax(β·[s_w, s_l]) || [1-ε, ε])``, needs ``ε > 0``.

    With ``z = β·Δ``: ``sigmoid(z)(logsigmoid(z) - log(1-ε)) + sigmoid(-z)(logsigmoid(-z) - log ε)``.
    """
    import torch

    chosen, rejected = _logratios(policy, reference)
    z = beta * (chosen - rejected)
    epsilon = torch.tensor(label_smoothing, dtype=z.dtype, device=z.device)
    winner = torch.sigmoid(z) * (torch.nn.functional.logsigmoid(z) - torch.log1p(-epsilon))
    loser = torch.sigmoid(-z) * (torch.nn.functional.logsigmoid(-z) - torch.log(epsilon))
    return winner + loser


def nca_pair_loss(policy: PairLogps, reference: PairLogps, *, beta: float, **_: float) -> torch.Tensor:
    """NCA: ``-logsigmoid(β s_w) - ½ logsigmoid(-β s_w) - ½ logsigmoid(-β s_l)``."""
    import torch

    chosen, rejected = _logratios(policy, reference)
    return (
        -torch.nn.functional.logsigmoid(beta * chosen)
        - 0.5 * torch.nn.functional.logsigmoid(-beta * chosen)
        - 0.5 * torch.nn.functional.logsigmoid(-beta * rejected)
    )


def robust_loss(
    policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float, **_: float
) -> torch.Tensor:
    """Robust DPO: ``(-(1-ε) logsigmoid(β·Δ) + ε logsigmoid(-β·Δ)) / (1 - 2ε)``."""
    import torch

    chosen, rejected = _logratios(policy, reference)
    z = beta * (chosen - rejected)
    clean = -(1 - label_smoothing) * torch.nn.functional.logsigmoid(z)
    flipped = -label_smoothing * torch.nn.functional.logsigmoid(-z)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def bco_pair_loss(policy: PairLogps, reference: PairLogps, *, beta: float, **_: float) -> torch.Tensor:
    """BCO on pairs (as TRL 1.16: no running reward shift): ``-logsigmoid(β s_w) - logsigmoid(-β s_l)``."""
    import torch

    chosen, rejected = _logratios(policy, reference)
    return -torch.nn.functional.logsigmoid(beta * chosen) - torch.nn.functional.logsigmoid(-beta * rejected)


def sppo_hard_loss(policy: PairLogps, reference: PairLogps, *, beta: float, **_: float) -> torch.Tensor:
    """SPPO with hard win probabilities: ``(s_w - 1/(2β))² + (s_l + 1/(2β))²``."""
    chosen, rejected = _logratios(policy, reference)
    return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2


def aot_loss(
    policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float, **_: float
) -> torch.Tensor:
    """AOT (paired): smoothed sigmoid of ``β·(sort(l_w - l_l) - sort(l^ref_w - l^ref_l))`` over the micro-batch."""
    import torch

    policy_sorted = torch.sort(policy.chosen - policy.rejected, dim=0).values
    reference_sorted = torch.sort(reference.chosen - reference.rejected, dim=0).values
    return _smoothed_sigmoid(beta * (policy_sorted - reference_sorted), label_smoothing)


def aot_unpaired_loss(
    policy: PairLogps, reference: PairLogps, *, beta: float, label_smoothing: float, **_: float
) -> torch.Tensor:
    """AOT (unpaired): smoothed sigmoid of ``β·(sort(s_w) - sort(s_l))`` over the micro-batch."""
    import torch

    chosen, rejected = _logratios(policy, reference)
    chosen_sorted = torch.sort(chosen, dim=0).values
    rejected_sorted = torch.sort(rejected, dim=0).values
    return _smoothed_sigmoid(beta * (chosen_sorted - rejected_sorted), label_smoothing)


def apo_zero_loss(policy: PairLogps, reference: PairLogps, *, beta: float, **_: float) -> torch.Tensor:
    """APO-zero (chosen better than the model's own outputs): ``1 - sigmoid(β s_w) + sigmoid(β s_l)``."""
    import torch

    chosen, rejected = _logratios(policy, reference)
    return 1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)


def apo_down_loss(policy: PairLogps, reference: PairLogps, *, beta: float, **_: float) -> torch.Tensor:
    """APO-down (chosen worse than the model's own outputs): ``sigmoid(β s_w) + 1 - sigmoid(β·Δ)``."""
    import torch

    chosen, rejected = _logratios(policy, reference)
    return torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * (chosen - rejected))


def discopop_loss(
    policy: PairLogps, reference: PairLogps, *, beta: float, discopop_tau: float, **_: float
) -> torch.Tensor:
    """DiscoPOP: ``(1 - m)·(-logsigmoid(z)) + m·exp(-z)`` with ``z = β·Δ`` and ``m = sigmoid(z/τ)``."""
    import torch

    chosen, rejected = _logratios(policy, reference)
    z = beta * (chosen - rejected)
    mix = torch.sigmoid(z / discopop_tau)
    return -torch.nn.functional.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def sft_loss(policy: PairLogps, reference: PairLogps, **_: float) -> torch.Tensor:
    """No per-pair part: the chosen NLL is a token mean over the step, added by :func:`dpo_loss` as a weight."""
    import torch

    return torch.zeros_like(policy.chosen)


def sigmoid_norm_loss(policy: PairLogps, reference: PairLogps, *, beta: float, **_: float) -> torch.Tensor:
    """Length-normalised DPO: ``-logsigmoid(β·Δ̄)`` on per-token mean log-ratios."""
    import torch

    return -torch.nn.functional.logsigmoid(beta * _mean_delta(policy, reference))


def dpo_loss(
    policy: PairLogps,
    reference: PairLogps,
    *,
    beta: float,
    loss_types: list[DpoLossType],
    loss_weights: list[float] | None = None,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
) -> PreferenceLoss:
    """``Σ_k w_k · term_k`` per pair, plus ``w_sft`` on the chosen NLL; rewards ``β·s_w``, ``β·s_l`` (detached)."""
    import torch

    weights = list(loss_weights) if loss_weights else [1.0] * len(loss_types)
    per_pair = torch.zeros_like(policy.chosen)
    chosen_nll_weight = 0.0
    for loss_type, weight in zip(loss_types, weights, strict=True):
        term = DPO_LOSSES[DpoLossType(loss_type)]
        per_pair = per_pair + weight * term(
            policy, reference, beta=beta, label_smoothing=label_smoothing, discopop_tau=discopop_tau
        )
        chosen_nll_weight += weight * CHOSEN_NLL_SHARE[DpoLossType(loss_type)]
    chosen, rejected = _logratios(policy.detach(), reference.detach())
    return PreferenceLoss(
        per_pair_loss=per_pair,
        chosen_reward=beta * chosen,
        rejected_reward=beta * rejected,
        chosen_nll_weight=chosen_nll_weight,
    )


def _loss_fn(cfg: DpoConfig, policy: PairLogps, reference: PairLogps | None, progress: Progress) -> PreferenceLoss:
    """The shared trainer's ``LossFn`` for DPO: every DPO type needs the reference."""
    assert reference is not None
    return dpo_loss(
        policy,
        reference,
        beta=cfg.beta,
        loss_types=list(cfg.loss_type),
        loss_weights=list(cfg.loss_weights),
        label_smoothing=cfg.label_smoothing,
        discopop_tau=cfg.discopop_tau,
    )


def run(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Validate and tokenise pairs, set up the reference, train with the shared pairwise trainer; final metrics."""
    method = cfg.method
    assert isinstance(method, DpoConfig)
    return run_pairwise(
        cfg, ctx, partial(_loss_fn, method), max_length=method.max_length, reference_kind=method.reference
    )


DPO_LOSSES: dict[DpoLossType, DpoTerm] = {
    DpoLossType.sigmoid: sigmoid_loss,
    DpoLossType.hinge: hinge_loss,
    DpoLossType.ipo: ipo_loss,
    DpoLossType.exo_pair: exo_pair_loss,
    DpoLossType.nca_pair: nca_pair_loss,
    DpoLossType.robust: robust_loss,
    DpoLossType.bco_pair: bco_pair_loss,
    DpoLossType.sppo_hard: sppo_hard_loss,
    DpoLossType.aot: aot_loss,
    DpoLossType.aot_unpaired: aot_unpaired_loss,
    DpoLossType.apo_zero: apo_zero_loss,
    DpoLossType.apo_down: apo_down_loss,
    DpoLossType.discopop: discopop_loss,
    DpoLossType.sft: sft_loss,
    DpoLossType.sigmoid_norm: sigmoid_norm_loss,
}
"""Per-pair term of each loss type."""

CHOSEN_NLL_SHARE: dict[DpoLossType, float] = {t: 1.0 if t is DpoLossType.sft else 0.0 for t in DpoLossType}
"""Weight each loss type puts on the step-level token-mean NLL of the chosen completions (only ``sft``)."""
