"""The names of the distillation divergences and what each accepts, without importing torch (configs use them).

The functions themselves are in :mod:`alignment.methods.distill.losses`.
"""

from __future__ import annotations

from enum import StrEnum


class Divergence(StrEnum):
    """A per-token divergence between the teacher's and the student's distributions (``method.loss``)."""

    forward_kl = "forward_kl"
    reverse_kl = "reverse_kl"
    jsd = "jsd"
    skew_forward_kl = "skew_forward_kl"
    skew_reverse_kl = "skew_reverse_kl"
    soft_cross_entropy = "soft_cross_entropy"
    mse = "mse"
    cosine = "cosine"
    earth_mover = "earth_mover"
    alpha_beta = "alpha_beta"
    slim = "slim"
    tvd = "tvd"


TOPK_LOSSES = frozenset(
    {
        Divergence.forward_kl,
        Divergence.reverse_kl,
        Divergence.jsd,
        Divergence.skew_forward_kl,
        Divergence.skew_reverse_kl,
        Divergence.soft_cross_entropy,
        Divergence.tvd,
    }
)
"""Losses computable on a top-k + tail-bucket support (a ``topk`` teacher cache); the others need the full
distribution (``mse``, ``cosine``: raw logits; ``earth_mover``, ``alpha_beta``: every probability; ``slim``: the
teacher's probability of the hard label)."""

TAU_SQUARED_LOSSES = frozenset(set(Divergence) - {Divergence.soft_cross_entropy, Divergence.mse, Divergence.cosine})
"""Losses multiplied by tau^2 unless ``method.temperature_squared`` says otherwise."""
