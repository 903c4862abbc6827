"""Distillation losses: independent float64 references, edge inputs, gradients, and top-k supports.

The references below use numpy and plain Python loops over one token's probabilities, not the module's helpers.
Hand-computed case (two buckets, ``p_T = (1/2, 1/2)``, ``p_S = (1/4, 3/4)``):

* ``forward_kl = ½ ln 2 + ½ ln(2/3) = ½ ln(4/3) = 0.1438410``;
* ``reverse_kl = ¼ ln(1/2) + ¾ ln(3/2) = -0.1732868 + 0.3040988 = 0.1308120``;
* ``soft_cross_entropy = -(½ ln ¼ + ½ ln ¾) = ½ (1.3862944 + 0.2876821) = 0.8369882``;
* ``tvd = ½ (¼ + ¼) = 0.25``; ``earth_mover``: sorted ``(¾, ¼)`` against ``(½, ½)``, ``¼ + ¼ = 0.5``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import pytest
import torch

from alignment.methods.distill.divergences import Divergence
from alignment.methods.distill.losses import (
    LOSSES,
    LossParams,
    Support,
    hard_label_weights,
    topk_support,
    topk_teacher,
)

N, V = 6, 50
TAUS = (1.0, 2.0)
Array = npt.NDArray[np.float64]


# Independent references: one token at a time, in numpy float64.


@dataclass
class Row:
    """One token: tempered probabilities over the support, raw logits and label probabilities where known."""

    ps: Array
    pt: Array
    zs: Array | None = None
    zt: Array | None = None
    label_ps: float = math.nan
    label_pt: float = math.nan
    label_ps_tau: float = math.nan
    label_pt_tau: float = math.nan


def softmax(z: Array) -> Array:
    e = np.exp(z - z.max())
    return e / e.sum()


def kl(a: Array, b: Array) -> float:
    return sum(float(ai * math.log(ai / bi)) for ai, bi in zip(a, b, strict=True) if ai > 0)


def ref_jsd(r: Row, p: LossParams) -> float:
    beta = p.jsd_beta
    if beta == 0.0:
        return kl(r.pt, r.ps)
    if beta == 1.0:
        return kl(r.ps, r.pt)
    m = beta * r.pt + (1 - beta) * r.ps
    return beta * kl(r.pt, m) + (1 - beta) * kl(r.ps, m)


def ref_cosine(r: Row, p: LossParams) -> float:
    assert r.zs is not None
    assert r.zt is not None
    return 1.0 - float(r.zs @ r.zt) / math.sqrt(float(r.zs @ r.zs) * float(r.zt @ r.zt))


def ref_mse(r: Row, p: LossParams) -> float:
    assert r.zs is not None
    assert r.zt is not None
    return sum((s - t) ** 2 for s, t in zip(r.zs, r.zt, strict=True))


def ref_earth_mover(r: Row, p: LossParams) -> float:
    return sum(abs(s - t) for s, t in zip(sorted(r.ps, reverse=True), sorted(r.pt, reverse=True), strict=True))


def ref_alpha_beta(r: Row, p: LossParams) -> float:
    """Cichocki, Cruces & Amari (2011), eq. 4 and its limits, with ``P = p_T`` and ``Q = p_S``."""
    a, b, big_p, q = p.ab_alpha, p.ab_beta, r.pt, r.ps
    if a == 0 and b == 0:
        return 0.5 * float(((np.log(big_p) - np.log(q)) ** 2).sum())
    if a + b == 0:
        return float((np.log(q**a / big_p**a) + (q**a / big_p**a) ** -1 - 1).sum()) / a**2
    if b == 0:
        return float((big_p**a * np.log(big_p**a / q**a) - big_p**a + q**a).sum()) / a**2
    if a == 0:
        return float((q**b * np.log(q**b / big_p**b) - q**b + big_p**b).sum()) / b**2
    inner = big_p**a * q**b - a / (a + b) * big_p ** (a + b) - b / (a + b) * q ** (a + b)
    return -float(inner.sum()) / (a * b)


def ref_slim(r: Row, p: LossParams) -> float:
    return -(1 - math.exp(-r.label_pt / max(r.label_ps, 1e-9))) * r.label_pt_tau * math.log(r.label_ps_tau)


REFERENCE: dict[Divergence, Callable[[Row, LossParams], float]] = {
    Divergence.forward_kl: lambda r, p: kl(r.pt, r.ps),
    Divergence.reverse_kl: lambda r, p: kl(r.ps, r.pt),
    Divergence.jsd: ref_jsd,
    Divergence.skew_forward_kl: lambda r, p: kl(r.pt, p.skew_alpha * r.pt + (1 - p.skew_alpha) * r.ps),
    Divergence.skew_reverse_kl: lambda r, p: kl(r.ps, (1 - p.skew_alpha) * r.pt + p.skew_alpha * r.ps),
    Divergence.soft_cross_entropy: lambda r, p: (
        -sum(float(t * math.log(s)) for s, t in zip(r.ps, r.pt, strict=True) if t > 0)
    ),
    Divergence.mse: ref_mse,
    Divergence.cosine: ref_cosine,
    Divergence.earth_mover: ref_earth_mover,
    Divergence.alpha_beta: ref_alpha_beta,
    Divergence.slim: ref_slim,
    Divergence.tvd: lambda r, p: 0.5 * float(np.abs(r.pt - r.ps).sum()),
}

AB_LIMITS = [(1.0, 0.0), (0.0, 1.0), (0.7, 0.0), (0.0, 0.7), (1.0, -1.0), (-0.5, 0.5), (0.0, 0.0)]
AB_GENERAL = [(1.0, 0.5), (0.5, 0.5), (2.0, -0.5), (-0.5, 1.5)]
CASES: list[tuple[Divergence, LossParams]] = [
    *((d, LossParams()) for d in Divergence),
    *((Divergence.jsd, LossParams(jsd_beta=b)) for b in (0.0, 0.1, 0.9, 1.0)),
    *(
        (d, LossParams(skew_alpha=a))
        for d in (Divergence.skew_forward_kl, Divergence.skew_reverse_kl)
        for a in (0, 0.5)
    ),
    *((Divergence.alpha_beta, LossParams(ab_alpha=a, ab_beta=b)) for a, b in AB_GENERAL + AB_LIMITS),
]


# Inputs.


def logits(seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(N, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def labels(seed: int) -> torch.Tensor:
    return torch.randint(V, (N,), generator=torch.Generator().manual_seed(seed))


def full_support(zs: torch.Tensor, zt: torch.Tensor, tau: float, y: torch.Tensor) -> Support:
    """A full-vocabulary support as the trainer builds one, from raw logits ``(N, V)`` and labels ``(N,)``."""
    ls, lt = torch.log_softmax(zs / tau, dim=-1), torch.log_softmax(zt / tau, dim=-1)
    ls1, lt1 = torch.log_softmax(zs, dim=-1), torch.log_softmax(zt, dim=-1)
    at = y[:, None]
    return Support(
        student_logp=ls,
        teacher_logp=lt,
        student_logits=zs,
        teacher_logits=zt,
        student_label_logp=ls1.gather(-1, at)[:, 0],
        teacher_label_logp=lt1.gather(-1, at)[:, 0],
        student_label_logp_tau=ls.gather(-1, at)[:, 0],
        teacher_label_logp_tau=lt.gather(-1, at)[:, 0],
    )


def reference_rows(zs: torch.Tensor, zt: torch.Tensor, tau: float, y: torch.Tensor) -> list[Row]:
    rows = []
    for zs_row, zt_row, label in zip(zs.numpy(), zt.numpy(), y.tolist(), strict=True):
        ps, pt, ps1, pt1 = softmax(zs_row / tau), softmax(zt_row / tau), softmax(zs_row), softmax(zt_row)
        rows.append(Row(ps, pt, zs_row, zt_row, ps1[label], pt1[label], ps[label], pt[label]))
    return rows


def student_grad(d: Divergence, p: LossParams, zs: torch.Tensor, zt: torch.Tensor, tau: float) -> torch.Tensor:
    """The gradient of the summed loss w.r.t. the student's raw logits."""
    leaf = zs.clone().requires_grad_(True)
    LOSSES[d].fn(full_support(leaf, zt, tau, labels(9)), p).sum().backward()
    assert leaf.grad is not None
    return leaf.grad


# Registry and values.


def test_every_divergence_has_a_spec_and_a_reference() -> None:
    assert set(LOSSES) == set(Divergence) == set(REFERENCE)
    assert {d for d, spec in LOSSES.items() if spec.topk} == {
        Divergence.forward_kl,
        Divergence.reverse_kl,
        Divergence.jsd,
        Divergence.skew_forward_kl,
        Divergence.skew_reverse_kl,
        Divergence.soft_cross_entropy,
        Divergence.tvd,
    }
    assert {d for d, spec in LOSSES.items() if not spec.tau_squared} == {
        Divergence.soft_cross_entropy,
        Divergence.mse,
        Divergence.cosine,
    }


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize(("d", "p"), CASES, ids=[f"{d}-{i}" for i, (d, _) in enumerate(CASES)])
def test_matches_the_float64_reference(d: Divergence, p: LossParams, tau: float) -> None:
    zs, zt, y = logits(0), logits(1), labels(2)
    got = LOSSES[d].fn(full_support(zs, zt, tau, y), p)
    assert got.shape == (N,)
    want = [REFERENCE[d](row, p) for row in reference_rows(zs, zt, tau, y)]
    assert got.tolist() == pytest.approx(want, rel=1e-10, abs=1e-10)


def test_hand_computed_two_bucket_case() -> None:
    x = Support(
        student_logp=torch.tensor([[0.25, 0.75]], dtype=torch.float64).log(),
        teacher_logp=torch.tensor([[0.5, 0.5]], dtype=torch.float64).log(),
        student_logits=torch.zeros(1, 2, dtype=torch.float64),  # marks the support as full (earth_mover)
    )
    p = LossParams()
    want = {
        Divergence.forward_kl: 0.1438410,
        Divergence.reverse_kl: 0.1308120,
        Divergence.soft_cross_entropy: 0.8369882,
        Divergence.tvd: 0.25,
        Divergence.earth_mover: 0.5,
    }
    for d, value in want.items():
        assert LOSSES[d].fn(x, p).item() == pytest.approx(value, abs=1e-7), d


ZERO_AT_EQUALITY = [
    *((d, LossParams()) for d in Divergence if d not in (Divergence.soft_cross_entropy, Divergence.slim)),
    *((Divergence.jsd, LossParams(jsd_beta=b)) for b in (0.0, 0.1, 0.9, 1.0)),
    *((d, LossParams(skew_alpha=0.0)) for d in (Divergence.skew_forward_kl, Divergence.skew_reverse_kl)),
    *((Divergence.alpha_beta, LossParams(ab_alpha=a, ab_beta=b)) for a, b in AB_GENERAL + AB_LIMITS),
]


@pytest.mark.parametrize(("d", "p"), ZERO_AT_EQUALITY, ids=[f"{d}-{i}" for i, (d, _) in enumerate(ZERO_AT_EQUALITY)])
def test_identical_distributions_give_zero(d: Divergence, p: LossParams) -> None:
    z = logits(3)
    assert LOSSES[d].fn(full_support(z, z.clone(), 2.0, labels(4)), p).abs().max().item() < 1e-12


# Gradients and edge inputs.


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("d", list(LOSSES))
def test_student_gradient_is_finite_and_nonzero(d: Divergence, tau: float) -> None:
    grad = student_grad(d, LossParams(), logits(5), logits(6), tau)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 1e-6


@pytest.mark.parametrize(("a", "b"), AB_GENERAL + AB_LIMITS)
def test_alpha_beta_gradient_reaches_the_student(a: float, b: float) -> None:
    grad = student_grad(Divergence.alpha_beta, LossParams(ab_alpha=a, ab_beta=b), logits(5), logits(6), 1.0)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 1e-6


def one_hot_ish_teacher() -> torch.Tensor:
    zt = logits(7)
    zt[:, 3] = 1000.0
    return zt


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("d", list(LOSSES))
def test_near_one_hot_teacher_is_finite(d: Divergence, tau: float) -> None:
    value = LOSSES[d].fn(full_support(logits(8), one_hot_ish_teacher(), tau, labels(9)), LossParams())
    assert torch.isfinite(value).all()
    assert torch.isfinite(student_grad(d, LossParams(), logits(8), one_hot_ish_teacher(), tau)).all()


# Raw logits are a model's output and never -inf, so mse and cosine are not given masked logits; the student's
# mass on the teacher's zeros makes reverse KL infinite by definition.
MASKED_FINITE = [d for d in Divergence if d not in (Divergence.mse, Divergence.cosine, Divergence.reverse_kl)]


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("d", MASKED_FINITE)
def test_teacher_zeros_give_finite_values_and_gradients(d: Divergence, tau: float) -> None:
    """The teacher puts no mass on half the vocabulary (``-inf`` log-probs); labels fall on both halves."""
    zs = logits(10).requires_grad_(True)
    zt_leaf = logits(11).requires_grad_(True)
    zt = zt_leaf.masked_fill(torch.arange(V) >= V // 2, -math.inf)
    x = full_support(zs, zt, tau, labels(12))
    assert (x.teacher_logp == -math.inf).any()
    value = LOSSES[d].fn(x, LossParams())
    assert torch.isfinite(value).all()
    value.sum().backward()
    assert zs.grad is not None
    assert zt_leaf.grad is not None
    assert torch.isfinite(zs.grad).all()
    assert zs.grad.abs().sum() > 0
    assert torch.isfinite(zt_leaf.grad).all()


def test_reverse_kl_is_infinite_on_teacher_zeros() -> None:
    zt = logits(11).masked_fill(torch.arange(V) >= V // 2, -math.inf)
    assert (
        LOSSES[Divergence.reverse_kl].fn(full_support(logits(10), zt, 1.0, labels(12)), LossParams()) == math.inf
    ).all()


# JSD.


def test_jsd_endpoints_are_the_kl_divergences() -> None:
    x = full_support(logits(13), logits(14), 1.0, labels(15))
    forward, reverse = LOSSES[Divergence.forward_kl].fn, LOSSES[Divergence.reverse_kl].fn
    jsd = LOSSES[Divergence.jsd].fn
    assert torch.equal(jsd(x, LossParams(jsd_beta=0.0)), forward(x, LossParams()))
    assert torch.equal(jsd(x, LossParams(jsd_beta=1.0)), reverse(x, LossParams()))
    # The documented discontinuity: the mixture formula tends to 0 at the ends.
    assert (jsd(x, LossParams(jsd_beta=1e-6)) < 1e-4 * forward(x, LossParams())).all()


def test_jsd_is_symmetric_at_one_half() -> None:
    x = full_support(logits(13), logits(14), 1.0, labels(15))
    swapped = Support(student_logp=x.teacher_logp, teacher_logp=x.student_logp)
    jsd, p = LOSSES[Divergence.jsd].fn, LossParams(jsd_beta=0.5)
    torch.testing.assert_close(jsd(x, p), jsd(swapped, p), rtol=0, atol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.5, 0.9])
def test_jsd_is_bounded_by_the_binary_entropy(beta: float) -> None:
    """``0 <= JSD_β <= h(β) = -β ln β - (1-β) ln(1-β)``, reached by disjoint supports (``ln 2`` at ``β = ½``)."""
    bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    jsd, p = LOSSES[Divergence.jsd].fn, LossParams(jsd_beta=beta)
    value = jsd(full_support(logits(16, scale=10.0), logits(17, scale=10.0), 1.0, labels(18)), p)
    assert ((value >= 0) & (value <= bound)).all()
    half = torch.arange(V) >= V // 2
    disjoint = full_support(
        logits(16).masked_fill(half, -math.inf), logits(17).masked_fill(~half, -math.inf), 1.0, labels(18)
    )
    torch.testing.assert_close(jsd(disjoint, p), torch.full((N,), bound, dtype=torch.float64), rtol=0, atol=1e-12)


# Alpha-beta.


def test_alpha_beta_one_zero_is_forward_kl_and_zero_one_is_reverse_kl() -> None:
    x = full_support(logits(19), logits(20), 2.0, labels(21))
    ab = LOSSES[Divergence.alpha_beta].fn
    forward, reverse = (
        LOSSES[Divergence.forward_kl].fn(x, LossParams()),
        LOSSES[Divergence.reverse_kl].fn(x, LossParams()),
    )
    torch.testing.assert_close(ab(x, LossParams(ab_alpha=1.0, ab_beta=0.0)), forward, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ab(x, LossParams(ab_alpha=0.0, ab_beta=1.0)), reverse, rtol=1e-12, atol=1e-12)


# (limit (a, b), nearby (a, b), relative tolerance). The gap closes linearly (about 12·eps relative here, as the
# log-ratios are large); the general formula cancels to O(ab) inside, so the double limit is approached from 1e-5
# (float64 keeps ~1e-6 of it) and the others from 1e-6.
AB_NEARBY = [
    ((1.0, 0.0), (1.0, 1e-6), 1e-4),
    ((0.0, 1.0), (1e-6, 1.0), 1e-4),
    ((0.7, 0.0), (0.7, 1e-6), 1e-4),
    ((0.0, 0.7), (1e-6, 0.7), 1e-4),
    ((1.0, -1.0), (1.0, -1.0 + 1e-6), 1e-4),
    ((-0.5, 0.5), (-0.5, 0.5 + 1e-6), 1e-4),
    ((0.0, 0.0), (1e-5, 1e-5), 1e-3),
]


@pytest.mark.parametrize(("limit", "nearby", "rel"), AB_NEARBY)
def test_alpha_beta_limits_continue_the_general_formula(
    limit: tuple[float, float], nearby: tuple[float, float], rel: float
) -> None:
    x = full_support(logits(22), logits(23), 1.0, labels(24))
    ab = LOSSES[Divergence.alpha_beta].fn
    at_limit = ab(x, LossParams(ab_alpha=limit[0], ab_beta=limit[1]))
    near = ab(x, LossParams(ab_alpha=nearby[0], ab_beta=nearby[1]))
    assert near.tolist() == pytest.approx(at_limit.tolist(), rel=rel)


@pytest.mark.parametrize(("a", "b"), AB_GENERAL + AB_LIMITS)
def test_alpha_beta_swaps_its_arguments_with_its_exponents(a: float, b: float) -> None:
    """``D_AB^(a,b)(P‖Q) = D_AB^(b,a)(Q‖P)``, and it is non-negative."""
    x = full_support(logits(22), logits(23), 1.0, labels(24))
    swapped = Support(student_logp=x.teacher_logp, teacher_logp=x.student_logp, student_logits=x.teacher_logits)
    ab = LOSSES[Divergence.alpha_beta].fn
    value = ab(x, LossParams(ab_alpha=a, ab_beta=b))
    torch.testing.assert_close(value, ab(swapped, LossParams(ab_alpha=b, ab_beta=a)), rtol=1e-9, atol=1e-12)
    assert (value >= 0).all()


# Top-k supports.


def test_topk_teacher_stores_full_vocabulary_log_probs() -> None:
    lt = torch.log_softmax(logits(25), dim=-1)
    ids, topk_logp, tail = topk_teacher(lt, 8)
    assert ids.shape == topk_logp.shape == (N, 8)
    torch.testing.assert_close(topk_logp, lt.gather(-1, ids), rtol=0, atol=0)
    assert (topk_logp[:, :-1] >= topk_logp[:, 1:]).all()
    assert (
        topk_logp[:, -1:] >= lt.masked_fill(torch.zeros_like(lt, dtype=torch.bool).scatter(-1, ids, True), -math.inf)
    ).all()
    for row, row_ids, row_tail in zip(lt.exp().numpy(), ids.tolist(), tail.tolist(), strict=True):
        outside = sum(float(pv) for v, pv in enumerate(row) if v not in row_ids)
        assert row_tail == pytest.approx(math.log(outside), rel=1e-12)
    with pytest.raises(ValueError, match="k must lie"):
        topk_teacher(lt, V + 1)


def test_topk_support_with_every_id_is_the_full_support() -> None:
    zs, zt = logits(26), logits(27)
    x = full_support(zs, zt, 2.0, labels(28))
    ids, topk_logp, tail = topk_teacher(x.teacher_logp, V)
    assert (tail == -math.inf).all()
    leaf = x.student_logp.detach().requires_grad_(True)
    support = topk_support(leaf, ids, topk_logp, tail)
    assert support.student_logits is None
    assert (support.student_logp[:, -1] == -math.inf).all()
    for spec in LOSSES.values():
        if spec.topk:
            torch.testing.assert_close(spec.fn(support, LossParams()), spec.fn(x, LossParams()), rtol=1e-12, atol=1e-12)
    torch.stack([spec.fn(support, LossParams()).sum() for spec in LOSSES.values() if spec.topk]).sum().backward()
    assert leaf.grad is not None
    assert torch.isfinite(leaf.grad).all()


def bucketed(q: Array, ids: list[int]) -> Array:
    """The probabilities at ``ids``, then the sum of all the others."""
    return np.array([*(q[v] for v in ids), sum(q[v] for v in range(len(q)) if v not in ids)])


@pytest.mark.parametrize("d", [d for d, spec in LOSSES.items() if spec.topk])
@pytest.mark.parametrize("k", [1, 5, V - 1])
def test_topk_losses_match_a_bucketed_reference(d: Divergence, k: int) -> None:
    zs, zt, tau = logits(29), logits(30), 2.0
    student_logp = torch.log_softmax(zs / tau, dim=-1).requires_grad_(True)
    ids, topk_logp, tail = topk_teacher(torch.log_softmax(zt / tau, dim=-1), k)
    got = LOSSES[d].fn(topk_support(student_logp, ids, topk_logp, tail), LossParams())
    assert got.shape == (N,)
    want = []
    for zs_row, zt_row, row_ids in zip(zs.numpy(), zt.numpy(), ids.tolist(), strict=True):
        ps, pt = softmax(zs_row / tau), softmax(zt_row / tau)
        want.append(REFERENCE[d](Row(bucketed(ps, row_ids), bucketed(pt, row_ids)), LossParams()))
    assert got.tolist() == pytest.approx(want, rel=1e-10, abs=1e-10)
    got.sum().backward()
    assert student_logp.grad is not None
    assert torch.isfinite(student_logp.grad).all()


@pytest.mark.parametrize("d", list(LOSSES))
def test_topk_flag_says_whether_a_loss_runs_on_a_topk_support(d: Divergence) -> None:
    ids, topk_logp, tail = topk_teacher(torch.log_softmax(logits(31), dim=-1), 5)
    support = topk_support(torch.log_softmax(logits(32), dim=-1), ids, topk_logp, tail)
    spec = LOSSES[d]
    if spec.topk:
        assert torch.isfinite(spec.fn(support, LossParams())).all()
    else:
        with pytest.raises(ValueError, match=re.escape(f"'{d.value}' needs {spec.needs}")):
            spec.fn(support, LossParams())


# Hard-label weights and parameters.


def test_hard_label_weights_are_detached_and_follow_the_formula() -> None:
    student = torch.tensor([math.log(0.25), 0.0, math.log(0.5)], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([math.log(0.5), math.log(0.5), -math.inf], dtype=torch.float64, requires_grad=True)
    weights = hard_label_weights(student, teacher)
    assert not weights.requires_grad
    assert weights.tolist() == pytest.approx([0.75 * 0.5, 0.0, 0.0], abs=1e-15)


@pytest.mark.parametrize("bad", [{"jsd_beta": -0.1}, {"jsd_beta": 1.1}, {"skew_alpha": 1.0}, {"skew_alpha": -0.5}])
def test_loss_params_reject_out_of_range_values(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        replace(LossParams(), **bad)


def test_support_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        Support(student_logp=torch.zeros(2, 3), teacher_logp=torch.zeros(2, 4))
