"""The prompt codebook's estimators: pure tensor functions from continuous vectors to real-token embeddings.

A codebook ``C`` of shape ``(P, L, d)`` holds ``P`` prompts of ``L`` continuous vectors in the frozen model's
input-embedding space; ``E`` of shape ``(V, d)`` is that model's own embedding matrix (referenced, never copied)
and ``forbidden`` a boolean ``(V,)`` mask of ids no prompt may use. Every estimator returns a :class:`Quantised`
whose forward value is exactly ``E[ids]`` for hard ids, so what the model sees in training is a real token
sequence; the estimators differ only in the gradient:

* Gumbel straight-through (the original toolkit's, seed spec §6.3; Jang et al. 2017,
  https://arxiv.org/abs/1611.01144): logits ``u`` (:func:`vocabulary_logits`, forbidden ids at ``-inf``),
  ``π = softmax((u + clip(s, -0.2, 0.2)·g)/τ)`` with Gumbel noise ``g`` and a trainable scale ``s``,
  ``ids = argmax π``, ``embeds = E[ids] + (π@E - sg(π@E))``: the gradient flows through the soft mixture into
  ``C`` and ``s`` (:func:`gumbel_straight_through`).
* PEZ (Wen et al. 2023, https://arxiv.org/abs/2302.03668): ``ids`` = the nearest allowed embedding by cosine,
  ``embeds = E[ids] + (C - sg(C))``: the gradient at the projection is applied to ``C`` unchanged
  (:func:`pez_project`).

The temperature follows the original's cosine anneal (§6.4, :func:`temperature`); the auxiliary terms are the
prompts' diversity and the relaxed mass on forbidden ids (§6.5, :func:`diversity`, :func:`forbidden_mass`).

Deviations from the original: forbidden ids get ``-inf`` instead of ``-max float`` (the same probabilities, and no
overflow when divided by a small ``τ``); ``ids`` is the argmax of the tempered logits rather than of ``π`` (the
same token, without ties from saturated probabilities); the Gumbel noise is finite for every uniform draw; the
codebook is kept in fp32 whatever the model's dtype; ``cosine`` logits are new, as is PEZ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from alignment.methods.prompt_opt.estimators import LogitKind

NOISE_SCALE_BOUND = 0.2
"""The trainable Gumbel noise scale ``s`` is used clamped to ``[-0.2, 0.2]``, as in the original."""
GUMBEL_EPS = 1e-10
"""Offset inside both logarithms of the Gumbel transform, so that every uniform draw in ``[0, 1)`` is finite."""
COSINE_EPS = 1e-8
"""Floor on the vector norms of ``cosine`` logits and PEZ, so that a zero vector scores 0 instead of NaN."""
INIT_NOISE_STD = 0.01
"""Standard deviation of the Gaussian added to every initial codebook vector, as in the original."""


@dataclass(frozen=True)
class Quantised:
    """The hard prompt an estimator hands to the model, and what it was chosen from."""

    embeds: Tensor
    """``(P, L, d)`` in the embeddings' dtype: forward value exactly ``E[ids]``; the gradient is the estimator's."""
    ids: Tensor
    """``(P, L)`` long: the hard token ids."""
    probs: Tensor | None
    """``(P, L, V)`` fp32: the relaxed distribution ``π`` (Gumbel estimator), ``None`` for PEZ."""


def temperature(step: int, max_steps: int, tau0: float, tau_end: float) -> float:
    """The Gumbel temperature at ``step``: ``τ(t) = τ_end + ½(τ₀ - τ_end)(1 + cos(π·min(1, t/T)))``, ``T = max_steps``.

    A pure function of the step, so a resumed run anneals exactly as an uninterrupted one. ``τ(0) = τ₀``,
    ``τ(T/2) = (τ₀ + τ_end)/2``, and ``τ = τ_end`` from ``T`` on. A negative step counts as 0, and an unknown
    horizon (``max_steps < 1``, e.g. before a trainer knows it) gives ``τ₀``: the schedule has not started.
    """
    if max_steps < 1:
        return tau0
    progress = min(1.0, max(0.0, step / max_steps))
    return tau_end + 0.5 * (tau0 - tau_end) * (1.0 + math.cos(math.pi * progress))


def _dot_logits(codebook: Tensor, embeddings: Tensor) -> Tensor:
    """``⟨c, E_v⟩``: ``(P, L, d)`` x ``(V, d)`` -> ``(P, L, V)`` fp32, the product in the embeddings' dtype."""
    return (codebook.to(embeddings.dtype) @ embeddings.T).float()


def _cosine_logits(codebook: Tensor, embeddings: Tensor) -> Tensor:
    """``cos(c, E_v)``: ``(P, L, d)`` x ``(V, d)`` -> ``(P, L, V)`` fp32; the norms are floored at ``COSINE_EPS``.

    Dividing the dot products by ``|E_v|`` (a ``(V,)`` vector) avoids a normalised ``(V, d)`` copy of ``E``.
    """
    unit = F.normalize(codebook, dim=-1, eps=COSINE_EPS)
    norms = torch.linalg.vector_norm(embeddings, dim=-1, dtype=torch.float32).clamp_min(COSINE_EPS)
    return torch.div(_dot_logits(unit, embeddings), norms)


def vocabulary_logits(
    codebook: Tensor, embeddings: Tensor, forbidden: Tensor, *, kind: LogitKind, scale: float
) -> Tensor:
    """Every vocabulary token's score for every codebook vector: ``scale · LOGITS[kind](C, E)``, forbidden ``-inf``.

    ``codebook`` is ``(P, L, d)``, ``embeddings`` ``(V, d)`` (the model's own matrix, not copied), ``forbidden`` a
    ``(V,)`` bool mask; returns ``(P, L, V)`` fp32. The matrix product runs in the embeddings' dtype (the codebook
    is cast down), so a bf16 model needs no fp32 copy of ``E`` (``V·d·4`` bytes) in the forward or saved for the
    backward; bf16 rounding of the logits (relative ``2^-8``) is far below the Gumbel noise. A forbidden id gets
    ``-inf``: probability exactly 0, never the argmax, and a zero (not NaN) gradient through a softmax. If every
    id is forbidden the softmax is NaN; the config rejects that before anything loads.
    """
    logits = LOGITS[kind](codebook, embeddings) * scale
    return logits.masked_fill(forbidden, float("-inf"))


def gumbel_from_uniform(uniform: Tensor) -> Tensor:
    """Gumbel(0, 1) samples from uniform ones: ``g = -log(-log(U + ε) + ε)``, ``ε = 1e-10``, finite on ``[0, 1]``.

    The original's ``-log(-log(U + ε))`` is ``+inf`` where ``U + ε`` rounds to 1; the outer ``ε`` caps it at
    ``-log ε ≈ 23.03``. ``U = 0`` gives ``-log(-log ε) ≈ -3.137``.
    """
    return -torch.log(-torch.log(uniform + GUMBEL_EPS) + GUMBEL_EPS)


def gumbel_noise(
    shape: tuple[int, ...], *, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Fp32 Gumbel(0, 1) noise of ``shape`` (:func:`gumbel_from_uniform` of ``torch.rand``).

    Drawn on ``device``, by default the generator's device (CPU without a generator); a generator must live on
    the device it draws on.
    """
    if device is None and generator is not None:
        device = generator.device
    return gumbel_from_uniform(torch.rand(shape, generator=generator, device=device, dtype=torch.float32))


def hard_ids(logits: Tensor) -> Tensor:
    """Evaluation's ids: ``argmax_v u_v`` of ``(P, L, V)`` logits, no noise -> ``(P, L)`` long."""
    return logits.argmax(dim=-1)


def gumbel_straight_through(
    logits: Tensor, embeddings: Tensor, *, tau: float, noise: Tensor | None, noise_scale: Tensor
) -> Quantised:
    """Gumbel-softmax straight-through quantisation of ``(P, L, V)`` logits over ``(V, d)`` embeddings.

    ``π = softmax((u + clip(s, -0.2, 0.2)·g)/τ)``, ``ids = argmax``, soft ``ẽ = π @ E`` and
    ``embeds = E[ids] + (ẽ - sg(ẽ))``. The forward value is exactly ``E[ids]`` (``ẽ - ẽ`` is exactly 0); the
    gradient of a loss ``J`` is ``∂J/∂u_v = π_v(h_v - Σ_w π_w h_w)/τ`` with ``h_v = ⟨∂J/∂embeds, E_v⟩``, and
    ``∂J/∂s = Σ_v (∂J/∂u_v)·g_v`` while ``|s| < 0.2`` (0 once clamped). ``noise`` is ``(P, L, V)`` Gumbel noise,
    or ``None`` for no noise term (then ``s`` gets no gradient); ``noise_scale`` is the 0-dim parameter ``s``.
    The mixture is formed in the embeddings' dtype, like :func:`vocabulary_logits`. Forbidden ids (``-inf``
    logits) get probability exactly 0 and a zero gradient.
    """
    if tau <= 0:
        raise ValueError(f"the Gumbel temperature must be positive, got tau={tau}")
    tempered = logits if noise is None else logits + noise_scale.clamp(-NOISE_SCALE_BOUND, NOISE_SCALE_BOUND) * noise
    tempered = tempered / tau
    probs = torch.softmax(tempered, dim=-1)
    ids = tempered.detach().argmax(dim=-1)
    soft = probs.to(embeddings.dtype) @ embeddings
    return Quantised(embeds=embeddings[ids] + (soft - soft.detach()), ids=ids, probs=probs)


def pez_project(codebook: Tensor, embeddings: Tensor, forbidden: Tensor) -> Quantised:
    """PEZ projection: ``ids`` = the allowed token nearest each ``(P, L, d)`` vector by cosine, no noise.

    ``embeds = E[ids] + (C - sg(C))`` in the embeddings' dtype: the forward value is exactly ``E[ids]`` and
    ``∂J/∂C = ∂J/∂embeds`` (the identity), as PEZ writes the gradient at the projection into the continuous
    prompt. Nearest by cosine is not the largest dot product where embedding norms differ.
    """
    with torch.no_grad():
        ids = hard_ids(vocabulary_logits(codebook, embeddings, forbidden, kind=LogitKind.cosine, scale=1.0))
    straight = (codebook - codebook.detach()).to(embeddings.dtype)
    return Quantised(embeds=embeddings[ids] + straight, ids=ids, probs=None)


def diversity(codebook: Tensor) -> Tensor:
    """The original's diversity penalty ``D = (1/P²) Σ_{i<j} cos(C̄_i, C̄_j)``, ``C̄_i`` = mean over positions.

    ``codebook`` is ``(P, L, d)``; returns a 0-dim fp32 tensor. The upper-triangle sum is divided by ``P²``, not by
    the ``P(P-1)/2`` pairs (as the original; so two identical prompts give ¼). ``P = 1`` has no pair: ``D`` is a
    zero that still depends on the codebook (its gradient is zero), so callers need no special case.
    """
    means = F.normalize(codebook.float().mean(dim=1), dim=-1, eps=COSINE_EPS)
    num_prompts = means.shape[0]
    upper = torch.triu(torch.ones(num_prompts, num_prompts, dtype=torch.bool, device=means.device), diagonal=1)
    return (means @ means.T)[upper].sum() / num_prompts**2


def forbidden_mass(probs: Tensor, forbidden: Tensor) -> Tensor:
    """``S = mean over the P·L positions of Σ_{v forbidden} π_v``: ``(P, L, V)`` probs, ``(V,)`` mask -> 0-dim."""
    return probs[..., forbidden].sum(dim=-1).mean()


def initial_codebook(
    embeddings: Tensor,
    num_prompts: int,
    prompt_len: int,
    *,
    init_ids: list[int] | None,
    pad_id: int,
    generator: torch.Generator,
) -> Tensor:
    """The starting codebook, fp32 ``(P, L, d)`` on the embeddings' device, as the original initialised it.

    Without ``init_ids`` every vector is the mean embedding plus ``0.01·N(0, I)``. With ``init_ids`` (tokenised,
    at most ``L`` of them) position ``l`` starts at ``E[init_ids[l]] + 0.01·N`` and positions past the text at the
    pad embedding ``E[pad_id] + 0.01·N`` (the original padded the init text to ``L``), the same ids for every
    prompt with independent noise. The noise, ``(P, L, d)``, is drawn from ``generator`` on its own device. The
    codebook is the trainable parameter and stays fp32 even for a bf16 model: small optimizer steps would
    vanish in bf16 rounding; the estimators cast it down where it meets ``E``.
    """
    if num_prompts < 1 or prompt_len < 1:
        raise ValueError(f"need num_prompts >= 1 and prompt_len >= 1, got {num_prompts} and {prompt_len}")
    if init_ids is None:
        base = embeddings.mean(dim=0, dtype=torch.float32).expand(prompt_len, -1)
    else:
        if len(init_ids) > prompt_len:
            raise ValueError(f"the init prompt has {len(init_ids)} tokens, more than prompt_len={prompt_len}")
        ids = [*init_ids, *[pad_id] * (prompt_len - len(init_ids))]
        base = embeddings[torch.tensor(ids, device=embeddings.device)].float()
    shape = (num_prompts, prompt_len, embeddings.shape[-1])
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return base + INIT_NOISE_STD * noise.to(embeddings.device)


LOGITS: dict[LogitKind, Callable[[Tensor, Tensor], Tensor]] = {
    LogitKind.dot: _dot_logits,
    LogitKind.cosine: _cosine_logits,
}
"""The unscaled, unmasked ``(P, L, V)`` fp32 logits of each :class:`LogitKind`."""
