"""The names of the prompt estimators and logit kinds, without importing torch (configs use them).

The functions themselves are in :mod:`alignment.methods.prompt_opt.codebook`.
"""

from __future__ import annotations

from enum import StrEnum


class Estimator(StrEnum):
    """How a gradient reaches the continuous codebook through the hard token choice (``method.estimator``)."""

    gumbel = "gumbel"
    """Gumbel-softmax straight-through: the forward uses the argmax token's embedding, the gradient flows through
    the relaxed mixture ``softmax((u + s·g)/τ) @ E`` into the codebook and the noise scale (the original's)."""
    pez = "pez"
    """PEZ ("Hard Prompts Made Easy", Wen et al. 2023, https://arxiv.org/abs/2302.03668): project each vector to
    the nearest allowed embedding by cosine; the gradient at the projection is applied to the continuous vector."""


class LogitKind(StrEnum):
    """How a codebook vector scores the vocabulary for the Gumbel estimator (``method.logits``)."""

    dot = "dot"
    """``scale · ⟨c, E_v⟩``, the original's raw dot product."""
    cosine = "cosine"
    """``scale · cos(c, E_v)``: bounded logits, so ``scale/τ`` alone sets how peaked the relaxation is."""
