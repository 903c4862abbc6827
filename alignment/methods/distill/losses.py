"""Per-token distillation losses: pure functions of a student and a teacher distribution over one support.

Each loss maps a :class:`Support` of ``N`` counted tokens to per-token values of shape ``(N,)``; the trainer
weights, sums and normalises them. With ``p_T = exp(teacher_logp)``, ``p_S = exp(student_logp)`` (both at the loss
temperature ``τ``), raw logits ``z_T``, ``z_S`` and sums over the support:

* ``forward_kl``: ``KL(p_T‖p_S) = Σ p_T (log p_T - log p_S)`` (Hinton et al. 2015, https://arxiv.org/abs/1503.02531).
* ``reverse_kl``: ``KL(p_S‖p_T)`` (MiniLLM, https://arxiv.org/abs/2306.08543).
* ``jsd``: the generalised JSD of GKD (https://arxiv.org/abs/2306.13649), ``β KL(p_T‖m) + (1-β) KL(p_S‖m)`` with
  ``m = β p_T + (1-β) p_S`` and ``β = jsd_beta``. As in TRL's ``GKDTrainer``, ``β = 0`` is forward KL and ``β = 1``
  reverse KL exactly; this is discontinuous, since the mixture formula tends to 0 at both ends. For
  ``0 < β < 1`` the value is at most the binary entropy ``h(β)`` (``log 2`` at ``β = ½``).
* ``skew_forward_kl``: ``KL(p_T ‖ a p_T + (1-a) p_S)``; ``skew_reverse_kl``: ``KL(p_S ‖ (1-a) p_T + a p_S)``, with
  ``a = skew_alpha`` (DistiLLM, https://arxiv.org/abs/2402.03898).
* ``soft_cross_entropy``: ``-Σ p_T log p_S`` (forward KL plus the teacher's entropy, which has no gradient).
* ``mse``: ``Σ_v (z_S - z_T)²``; ``cosine``: ``1 - cos(z_S, z_T)``. Both on raw logits (before temperature).
* ``earth_mover``: ``Σ_v |sort↓(p_S)_v - sort↓(p_T)_v|``, the closed-form Wasserstein-1 of Universal Logit
  Distillation (https://arxiv.org/abs/2402.12030), here between distributions over one vocabulary.
* ``alpha_beta``: the AB-divergence ``D_AB^(a,b)(p_T‖p_S)`` of Cichocki, Cruces & Amari 2011
  (https://doi.org/10.3390/e13010134), ``a = ab_alpha``, ``b = ab_beta``, with ``P = p_T``, ``Q = p_S``:
  ``-1/(ab) Σ (P^a Q^b - a/(a+b) P^(a+b) - b/(a+b) Q^(a+b))`` in general and the paper's limits where ``a``,
  ``b`` or ``a+b`` is 0 (see :func:`alpha_beta`). ``a = 1, b = 0`` is forward KL; ``a = 0, b = 1`` reverse KL.
* ``slim``: ``-(1 - exp(-p_T(y) / max(p_S(y), 1e-9))) · p_T^τ(y) · log p_S^τ(y)`` at the hard label ``y``; the
  coefficient uses temperature-1 probabilities.
* ``tvd``: ``½ Σ |p_T - p_S|``.

**Supports.** A full support is the vocabulary (width ``V``) and carries raw logits. A top-k support (width
``k + 1``, :func:`topk_support`) holds the teacher's ``k`` most likely ids plus one tail bucket with the rest of
each distribution's mass; the losses flagged ``topk`` in :data:`LOSSES` are computed on it as written, over the
``k + 1`` buckets. A top-k support has no logits and no label fields; a loss that needs them raises a
``ValueError`` naming itself. Zero probabilities (``-inf`` log-probs: a captured tail, masked ids) count as
``0 · log 0 = 0`` with finite gradients wherever the divergence itself is finite.

Deviations from the toolkit these losses were ported from: the AB-divergence is the paper's, with a gradient
through the student (the original's value depended on the teacher only); ``slim`` receives only counted tokens, as
ignored positions are dropped before any loss, which fixes the original's crash on one-hot ``-100`` labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

from alignment.methods.distill.divergences import TAU_SQUARED_LOSSES, TOPK_LOSSES, Divergence

SLIM_MIN_STUDENT_PROB = 1e-9
"""Floor on ``p_S(y)`` in the ``slim`` coefficient, as in the original."""


@dataclass(frozen=True)
class LossParams:
    """The shape parameters of the losses that have any."""

    jsd_beta: float = 0.5
    """``β`` of ``jsd``, in ``[0, 1]``: the teacher's weight in the mixture; 0 is forward KL, 1 reverse KL."""
    skew_alpha: float = 0.1
    """``a`` of ``skew_forward_kl``/``skew_reverse_kl``, in ``[0, 1)``: the skewing distribution's own weight."""
    ab_alpha: float = 1.0
    """``a`` of ``alpha_beta``: the teacher's exponent (any real; ``a = 1, b = 0`` is forward KL)."""
    ab_beta: float = 0.5
    """``b`` of ``alpha_beta``: the student's exponent (any real; ``a = 0, b = 1`` is reverse KL)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must lie in [0, 1], got {self.jsd_beta}")
        if not 0.0 <= self.skew_alpha < 1.0:
            raise ValueError(f"skew_alpha must lie in [0, 1) (1 makes both skew losses 0), got {self.skew_alpha}")


@dataclass(frozen=True)
class Support:
    """Student and teacher distributions of ``N`` tokens over one support (the vocabulary, or top-k + tail)."""

    student_logp: torch.Tensor
    """``(N, K)`` student log-probs at the loss temperature: ``K = V`` (full vocabulary) or ``k + 1`` (top-k + tail)."""
    teacher_logp: torch.Tensor
    """``(N, K)`` teacher log-probs at the loss temperature, over the same buckets; may hold ``-inf``."""
    student_logits: torch.Tensor | None = None
    """``(N, V)`` raw student logits (before temperature); None exactly when the support is top-k."""
    teacher_logits: torch.Tensor | None = None
    """``(N, V)`` raw teacher logits (before temperature); None on a top-k support."""
    student_label_logp: torch.Tensor | None = None
    """``(N,)`` ``log p_S(y)`` of each token's hard label at temperature 1 (``slim``); None on a top-k support."""
    teacher_label_logp: torch.Tensor | None = None
    """``(N,)`` ``log p_T(y)`` at temperature 1."""
    student_label_logp_tau: torch.Tensor | None = None
    """``(N,)`` ``log p_S^τ(y)``: the student's label log-prob at the loss temperature."""
    teacher_label_logp_tau: torch.Tensor | None = None
    """``(N,)`` ``log p_T^τ(y)``: the teacher's label log-prob at the loss temperature."""

    def __post_init__(self) -> None:
        if self.student_logp.ndim != 2 or self.student_logp.shape != self.teacher_logp.shape:
            raise ValueError(
                f"student and teacher log-probs must both be (N, K), got {tuple(self.student_logp.shape)} and "
                f"{tuple(self.teacher_logp.shape)}"
            )


LossFn = Callable[[Support, LossParams], torch.Tensor]
"""A per-token loss: ``(support, params) -> (N,)``."""


@dataclass(frozen=True)
class LossSpec:
    """One loss and what it needs from the support."""

    fn: LossFn
    """The per-token loss function."""
    topk: bool
    """Whether it is computable on a top-k + tail-bucket support (it needs only the two log-prob tensors)."""
    tau_squared: bool
    """Whether the trainer scales it by ``τ²`` by default (keeps gradient magnitudes comparable across ``τ``)."""
    needs: str
    """What it needs from the support, for error messages."""


# Support builders.


def _logsumexp_outside(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``(N,)`` log of the mass of ``logp`` outside ``ids`` ``(N, k)``; ``-inf`` (zero gradient) if none."""
    inside = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, ids, True)
    rest = logp.masked_fill(inside, -math.inf)
    # logsumexp of an all -inf row has a NaN gradient; such rows are summed as zeros and then set to -inf.
    empty = (rest == -math.inf).all(dim=-1)
    return torch.logsumexp(rest.masked_fill(empty[:, None], 0.0), dim=-1).masked_fill(empty, -math.inf)


def topk_teacher(teacher_logp_full: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's ``k`` most likely ids per token, their log-probs and the log of the remaining mass.

    Args:
        teacher_logp_full: ``(N, V)`` log-probs normalised over the full vocabulary, so the top-k values stored
            are normalised too (not a softmax over the k).
        k: ids kept per token, ``1 <= k <= V``.

    Returns:
        ``ids`` ``(N, k)`` (long), ``topk_logp`` ``(N, k)`` and ``tail_logp`` ``(N,)``: the logsumexp of the other
        ``V - k`` log-probs, i.e. ``log(1 - Σ exp(topk_logp))`` without its cancellation; ``-inf`` when ``k = V``.
    """
    vocab = teacher_logp_full.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must lie in [1, {vocab}] (the vocabulary), got {k}")
    topk_logp, ids = teacher_logp_full.topk(k, dim=-1)
    return ids, topk_logp, _logsumexp_outside(teacher_logp_full, ids)


def topk_support(
    student_logp_full: torch.Tensor, ids: torch.Tensor, teacher_topk_logp: torch.Tensor, teacher_tail_logp: torch.Tensor
) -> Support:
    """The ``k + 1``-bucket support: the teacher's ``k`` ids, then one tail bucket with the rest of each mass.

    Args:
        student_logp_full: ``(N, V)`` student log-probs at the loss temperature (carries the gradient).
        ids: ``(N, k)`` the teacher's distinct token ids per token (from :func:`topk_teacher`).
        teacher_topk_logp: ``(N, k)`` the teacher's log-probs at ``ids``, normalised over the full vocabulary.
        teacher_tail_logp: ``(N,)`` log of the teacher's mass outside ``ids``.

    Returns:
        A :class:`Support` of width ``k + 1`` with no logits or labels. The student's tail is the logsumexp of its
        log-probs outside ``ids`` (not ``log(1 - Σ)``, which cancels catastrophically when the k ids hold nearly all
        the mass).
    """
    student = torch.cat(
        [student_logp_full.gather(-1, ids), _logsumexp_outside(student_logp_full, ids)[:, None]], dim=-1
    )
    teacher = torch.cat([teacher_topk_logp, teacher_tail_logp[:, None]], dim=-1)
    return Support(student_logp=student, teacher_logp=teacher)


def hard_label_weights(student_label_logp: torch.Tensor, teacher_label_logp: torch.Tensor) -> torch.Tensor:
    """``(N,)`` per-token weights ``c_t = (1 - p_S(y_t)) · p_T(y_t)``, detached (a weight, not a gradient path).

    Both inputs are ``(N,)`` label log-probs at temperature 1: tokens the student already predicts, or the teacher
    doubts, weigh less.
    """
    return (-torch.expm1(student_label_logp) * teacher_label_logp.exp()).detach()


# Shared pieces of the losses. Zero probabilities are masked out before any arithmetic and the result filled in
# afterwards, so no 0 · inf is ever formed and gradients through the masked entries are exactly 0.


def _lacks(name: Divergence) -> ValueError:
    return ValueError(
        f"distillation loss {name.value!r} needs {LOSSES[name].needs}, which this support does not carry (a top-k "
        "support has only the log-probs of k ids and a tail bucket)"
    )


def _require_full(x: Support, name: Divergence) -> None:
    if x.student_logits is None:
        raise _lacks(name)


def _logits(x: Support, name: Divergence) -> tuple[torch.Tensor, torch.Tensor]:
    if x.student_logits is None or x.teacher_logits is None:
        raise _lacks(name)
    return x.student_logits, x.teacher_logits


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``(N,)`` ``KL(a‖b) = Σ a (log a - log b)`` over the last dim, with ``0 · log 0 = 0``."""
    zero = log_a == -math.inf
    safe_a = log_a.masked_fill(zero, 0.0)
    return (safe_a.exp() * (safe_a - log_b.masked_fill(zero, 0.0))).masked_fill(zero, 0.0).sum(dim=-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight: float) -> torch.Tensor:
    """``log(w·a + (1-w)·b)`` elementwise, in log space; ``-inf`` (finite gradient) where both are 0."""
    if weight == 0.0:
        return log_b
    if weight == 1.0:
        return log_a
    a = log_a + math.log(weight)
    b = log_b + math.log1p(-weight)
    both = (a == -math.inf) & (b == -math.inf)
    return torch.logaddexp(a.masked_fill(both, 0.0), b.masked_fill(both, 0.0)).masked_fill(both, -math.inf)


# The losses: (support, params) -> (N,).


def forward_kl(x: Support, p: LossParams) -> torch.Tensor:
    """``KL(p_T‖p_S)`` per token."""
    return _kl(x.teacher_logp, x.student_logp)


def reverse_kl(x: Support, p: LossParams) -> torch.Tensor:
    """``KL(p_S‖p_T)`` per token; ``+inf`` where the student puts mass on a teacher zero."""
    return _kl(x.student_logp, x.teacher_logp)


def jsd(x: Support, p: LossParams) -> torch.Tensor:
    """Generalised JSD ``β KL(p_T‖m) + (1-β) KL(p_S‖m)``, ``m = β p_T + (1-β) p_S``; KL limits at ``β ∈ {0, 1}``."""
    beta = p.jsd_beta
    if beta == 0.0:
        return forward_kl(x, p)
    if beta == 1.0:
        return reverse_kl(x, p)
    mixture = _log_mix(x.teacher_logp, x.student_logp, beta)
    return beta * _kl(x.teacher_logp, mixture) + (1.0 - beta) * _kl(x.student_logp, mixture)


def skew_forward_kl(x: Support, p: LossParams) -> torch.Tensor:
    """``KL(p_T ‖ a p_T + (1-a) p_S)`` per token."""
    return _kl(x.teacher_logp, _log_mix(x.teacher_logp, x.student_logp, p.skew_alpha))


def skew_reverse_kl(x: Support, p: LossParams) -> torch.Tensor:
    """``KL(p_S ‖ (1-a) p_T + a p_S)`` per token."""
    return _kl(x.student_logp, _log_mix(x.student_logp, x.teacher_logp, p.skew_alpha))


def soft_cross_entropy(x: Support, p: LossParams) -> torch.Tensor:
    """``-Σ p_T log p_S`` per token."""
    zero = x.teacher_logp == -math.inf
    teacher = x.teacher_logp.masked_fill(zero, 0.0).exp()
    return -(teacher * x.student_logp.masked_fill(zero, 0.0)).masked_fill(zero, 0.0).sum(dim=-1)


def mse(x: Support, p: LossParams) -> torch.Tensor:
    """``Σ_v (z_S - z_T)²`` per token, on raw logits."""
    student, teacher = _logits(x, Divergence.mse)
    return (student - teacher).square().sum(dim=-1)


def cosine(x: Support, p: LossParams) -> torch.Tensor:
    """``1 - cos(z_S, z_T)`` per token, on raw logits."""
    student, teacher = _logits(x, Divergence.cosine)
    return 1.0 - F.cosine_similarity(student, teacher, dim=-1)


def earth_mover(x: Support, p: LossParams) -> torch.Tensor:
    """``Σ_v |sort↓(p_S)_v - sort↓(p_T)_v|`` per token (ULD's closed form); needs the full vocabulary."""
    _require_full(x, Divergence.earth_mover)
    student = x.student_logp.exp().sort(dim=-1, descending=True).values
    teacher = x.teacher_logp.exp().sort(dim=-1, descending=True).values
    return (student - teacher).abs().sum(dim=-1)


def _ab_one_zero(log_x: torch.Tensor, log_y: torch.Tensor, a: float) -> torch.Tensor:
    """Terms of the ``b = 0`` limit ``(1/a²)(x^a log(x^a/y^a) - x^a + y^a)`` (``a = 0``: swap ``x``, ``y``)."""
    zero = log_x == -math.inf
    safe_x = log_x.masked_fill(zero, 0.0)
    x_a, y_a = (a * safe_x).exp(), (a * log_y).exp()
    terms = x_a * (a * (safe_x - log_y) - 1.0) + y_a
    # At x = 0 the term is y^a for a > 0 and +inf for a < 0 (x^a·log x^a diverges).
    at_zero = y_a if a > 0 else torch.full_like(y_a, math.inf)
    return torch.where(zero, at_zero, terms) / a**2


def _ab_opposite(log_p: torch.Tensor, log_q: torch.Tensor, a: float) -> torch.Tensor:
    """Terms of the ``a = -b`` limit ``(1/a²)(log(Q^a/P^a) + (Q^a/P^a)^(-1) - 1)``; ``+inf`` at ``P = 0``."""
    zero = log_p == -math.inf
    a_log_ratio = a * (log_p.masked_fill(zero, 0.0) - log_q)
    terms = (torch.expm1(a_log_ratio) - a_log_ratio) / a**2
    return terms.masked_fill(zero, math.inf)


def _ab_general(log_p: torch.Tensor, log_q: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Terms of ``-(1/(ab))(P^a Q^b - a/(a+b) P^(a+b) - b/(a+b) Q^(a+b))``, powers as ``exp(a log P)``."""
    s = a + b
    joint = (a * log_p + b * log_q).exp()
    return -(joint - (a / s) * (s * log_p).exp() - (b / s) * (s * log_q).exp()) / (a * b)


def alpha_beta(x: Support, p: LossParams) -> torch.Tensor:
    """AB-divergence ``D_AB^(a,b)(p_T‖p_S)`` per token; needs the full vocabulary.

    Cases (Cichocki, Cruces & Amari 2011), with ``P = p_T``, ``Q = p_S``:

    * ``a, b, a+b ≠ 0``: ``-1/(ab) Σ (P^a Q^b - a/(a+b) P^(a+b) - b/(a+b) Q^(a+b))``;
    * ``a ≠ 0, b = 0``: ``1/a² Σ (P^a log(P^a/Q^a) - P^a + Q^a)`` (``a = 1``: ``KL(P‖Q)``);
    * ``a = 0, b ≠ 0``: ``1/b² Σ (Q^b log(Q^b/P^b) - Q^b + P^b)`` (``b = 1``: ``KL(Q‖P)``);
    * ``a = -b ≠ 0``: ``1/a² Σ (log(Q^a/P^a) + (Q^a/P^a)^(-1) - 1)``;
    * ``a = b = 0``: ``½ Σ (log P - log Q)²``.

    Each limit is the general formula's continuous extension. A teacher zero (``P = 0``) is exact for positive
    exponents; with a negative exponent on it the divergence is infinite.
    """
    _require_full(x, Divergence.alpha_beta)
    a, b = p.ab_alpha, p.ab_beta
    log_p, log_q = x.teacher_logp, x.student_logp
    if a == 0.0 and b == 0.0:
        terms = 0.5 * (log_p - log_q).square()
    elif a + b == 0.0:
        terms = _ab_opposite(log_p, log_q, a)
    elif b == 0.0:
        terms = _ab_one_zero(log_p, log_q, a)
    elif a == 0.0:
        terms = _ab_one_zero(log_q, log_p, b)
    else:
        terms = _ab_general(log_p, log_q, a, b)
    return terms.sum(dim=-1)


def slim(x: Support, p: LossParams) -> torch.Tensor:
    """``-(1 - exp(-p_T(y)/max(p_S(y), 1e-9))) · p_T^τ(y) · log p_S^τ(y)`` per token (needs the label fields).

    Only counted tokens reach a loss (ignored positions are dropped first), so there is no ``-100`` handling here.
    """
    labels = (x.student_label_logp, x.teacher_label_logp, x.student_label_logp_tau, x.teacher_label_logp_tau)
    student, teacher, student_tau, teacher_tau = labels
    if student is None or teacher is None or student_tau is None or teacher_tau is None:
        raise _lacks(Divergence.slim)
    ratio = teacher.exp() / student.exp().clamp(min=SLIM_MIN_STUDENT_PROB)
    return torch.expm1(-ratio) * teacher_tau.exp() * student_tau


def tvd(x: Support, p: LossParams) -> torch.Tensor:
    """``½ Σ |p_T - p_S|`` per token."""
    return 0.5 * (x.teacher_logp.exp() - x.student_logp.exp()).abs().sum(dim=-1)


_LOGPROBS = "the two log-prob tensors"
_FULL = "the full vocabulary distribution"
_LOGITS = "raw logits over the full vocabulary"
_FUNCTIONS: dict[Divergence, tuple[LossFn, str]] = {
    Divergence.forward_kl: (forward_kl, _LOGPROBS),
    Divergence.reverse_kl: (reverse_kl, _LOGPROBS),
    Divergence.jsd: (jsd, _LOGPROBS),
    Divergence.skew_forward_kl: (skew_forward_kl, _LOGPROBS),
    Divergence.skew_reverse_kl: (skew_reverse_kl, _LOGPROBS),
    Divergence.soft_cross_entropy: (soft_cross_entropy, _LOGPROBS),
    Divergence.mse: (mse, _LOGITS),
    Divergence.cosine: (cosine, _LOGITS),
    Divergence.earth_mover: (earth_mover, _FULL),
    Divergence.alpha_beta: (alpha_beta, _FULL),
    Divergence.slim: (slim, "hard-label log-probs (at temperature 1 and tau)"),
    Divergence.tvd: (tvd, _LOGPROBS),
}

LOSSES: dict[Divergence, LossSpec] = {
    name: LossSpec(fn, topk=name in TOPK_LOSSES, tau_squared=name in TAU_SQUARED_LOSSES, needs=needs)
    for name, (fn, needs) in _FUNCTIONS.items()
}
"""Every loss, keyed by its config name; the flags come from the torch-free sets in :mod:`.divergences`."""
