"""The codebook estimators on a 5-token, 2-dimensional vocabulary, with values worked out by hand.

The vocabulary (rows of ``E``) is ``e0 = (1, 0)``, ``e1 = (0, 1)``, ``e2 = (-1, 0)``, ``e3 = (2, 2)``,
``e4 = (0, -1)``; id 3 is forbidden unless a test says otherwise. It has the largest dot product with every
codebook vector of positive coordinates, so a test that picks it has found a masking bug. The downstream loss is
``J = Σ w·embeds`` with ``w = (1, 2)``, so ``h_v = ⟨w, e_v⟩ = (1, 2, -1, 6, -2)``.

**Straight-through, no noise, τ = 1, c = (ln 2, 0):** dot logits ``u = (ln 2, 0, -ln 2, -inf, 0)``,
``exp(u) = (2, 1, ½, 0, 1)`` summing to 9/2, so ``π = (4/9, 2/9, 1/9, 0, 2/9)`` and ``ids = 0``. Forward:
``embeds = e0 = (1, 0)``. ``Σ π h = (4 + 4 - 1 - 4)/9 = 1/3``; ``∂J/∂u = π(h - 1/3) = (8, 10, -4, 0, -14)/27``;
``∂J/∂c = Σ_v ∂J/∂u_v e_v = (8 + 4, 10 + 14)/27 = (4/9, 8/9)``.

**Straight-through with noise, τ = ½, s = 0.1, c = (ln 2, 0), g = (0, 0, 25 ln 2, 3, 0):**
``u + s g = (ln 2, 0, -ln 2 + 2.5 ln 2, -inf, 0) = (ln 2, 0, 1.5 ln 2, -inf, 0)``; divided by τ:
``(2 ln 2, 0, 3 ln 2, -inf, 0)``, ``exp = (4, 1, 8, 0, 1)`` summing to 14, ``π = (2/7, 1/14, 4/7, 0, 1/14)``; the
noise moves the argmax from 0 to 2: ``embeds = e2 = (-1, 0)``. ``Σ π h = (4 + 2 - 8 - 2)/14 = -2/7``;
``∂J/∂x = π(h + 2/7)/τ = 2·(18, 8, -20, 0, -6)/49 = (36, 16, -40, 0, -12)/49``;
``∂J/∂c = (36 + 40, 16 + 12)/49 = (76/49, 4/7)``; ``∂J/∂s = Σ ∂J/∂x_v g_v = -40/49 · 25 ln 2 = -1000 ln 2/49``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from alignment.methods.prompt_opt.codebook import (
    LOGITS,
    Quantised,
    diversity,
    forbidden_mass,
    gumbel_from_uniform,
    gumbel_noise,
    gumbel_straight_through,
    hard_ids,
    initial_codebook,
    pez_project,
    temperature,
    vocabulary_logits,
)
from alignment.methods.prompt_opt.estimators import Estimator, LogitKind

LN2 = math.log(2.0)
E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [2.0, 2.0], [0.0, -1.0]])
FORBID_3 = torch.tensor([False, False, False, True, False])
NONE_FORBIDDEN = torch.zeros(5, dtype=torch.bool)
W = torch.tensor([1.0, 2.0])


def leaf(*rows: tuple[float, float]) -> torch.Tensor:
    """A ``(1, len(rows), 2)`` fp32 codebook that records its gradient."""
    return torch.tensor([list(rows)]).requires_grad_()


def straight_through(
    codebook: torch.Tensor, *, tau: float, noise: torch.Tensor | None, s: torch.Tensor, embeddings: torch.Tensor = E
) -> Quantised:
    logits = vocabulary_logits(codebook, embeddings, FORBID_3, kind=LogitKind.dot, scale=1.0)
    return gumbel_straight_through(logits, embeddings, tau=tau, noise=noise, noise_scale=s)


def test_temperature_schedule() -> None:
    # τ0 = 0.5, τ_end = 0.005, T = 100: τ(T/2) = 0.005 + 0.2475·(1 + cos(π/2)) = 0.2525;
    # τ(T/4) = 0.005 + 0.2475·(1 + √2/2) = 0.4275089; from T on, τ_end; an unknown horizon keeps τ0.
    values = [temperature(t, 100, 0.5, 0.005) for t in (0, 25, 50, 100, 200, -5)]
    assert values == pytest.approx([0.5, 0.4275089, 0.2525, 0.005, 0.005, 0.5], abs=1e-7)
    assert temperature(7, 0, 0.5, 0.005) == 0.5


@pytest.mark.parametrize(
    ("kind", "scale", "expected"),
    [
        # c = (3, 4): dot products (3, 4, -3, 14, -4), times 2.
        (LogitKind.dot, 2.0, [6.0, 8.0, -6.0, -math.inf, -8.0]),
        # |c| = 5: cosines (0.6, 0.8, -0.6, 14/(5·2√2) = 7/(5√2), -0.8), times 10.
        (LogitKind.cosine, 10.0, [6.0, 8.0, -6.0, -math.inf, -8.0]),
    ],
)
def test_vocabulary_logits_values(kind: LogitKind, scale: float, expected: list[float]) -> None:
    logits = vocabulary_logits(torch.tensor([[[3.0, 4.0]]]), E, FORBID_3, kind=kind, scale=scale)
    assert logits.dtype == torch.float32
    assert logits.shape == (1, 1, 5)
    assert logits[0, 0].tolist() == pytest.approx(expected)
    unmasked = vocabulary_logits(torch.tensor([[[3.0, 4.0]]]), E, NONE_FORBIDDEN, kind=kind, scale=scale)
    assert unmasked[0, 0, 3].item() == pytest.approx({LogitKind.dot: 28.0, LogitKind.cosine: 70 / (5 * 2**0.5)}[kind])


def test_cosine_logit_gradient_and_zero_vectors() -> None:
    # ∂cos(c, e)/∂c = (ê - cos·ĉ)/|c|: c = (3, 4), e0: ((1, 0) - 0.6·(0.6, 0.8))/5 = (0.128, -0.096); scale 10.
    codebook = leaf((3.0, 4.0))
    vocabulary_logits(codebook, E, FORBID_3, kind=LogitKind.cosine, scale=10.0)[0, 0, 0].backward()
    assert codebook.grad is not None
    assert codebook.grad[0, 0].tolist() == pytest.approx([1.28, -0.96])
    # A zero codebook vector and a zero embedding row score 0, with a finite gradient.
    zero = leaf((0.0, 0.0))
    with_zero_row = torch.cat([E, torch.zeros(1, 2)])
    logits = vocabulary_logits(zero, with_zero_row, torch.zeros(6, dtype=torch.bool), kind=LogitKind.cosine, scale=3.0)
    assert logits.tolist() == [[[0.0] * 6]]
    logits.sum().backward()
    assert zero.grad is not None
    assert torch.isfinite(zero.grad).all()


def test_straight_through_forward_and_gradient_without_noise() -> None:
    codebook = leaf((LN2, 0.0))
    s = torch.tensor(0.05, requires_grad=True)
    out = straight_through(codebook, tau=1.0, noise=None, s=s)
    assert out.ids.tolist() == [[0]]
    assert torch.equal(out.embeds, torch.tensor([[[1.0, 0.0]]]))
    assert out.probs is not None
    assert out.probs[0, 0].tolist() == pytest.approx([4 / 9, 2 / 9, 1 / 9, 0.0, 2 / 9])
    (W * out.embeds).sum().backward()
    assert codebook.grad is not None
    assert codebook.grad[0, 0].tolist() == pytest.approx([4 / 9, 8 / 9])
    assert s.grad is None  # no noise term: the scale is not in the graph


def test_straight_through_forward_and_gradient_with_noise() -> None:
    codebook = leaf((LN2, 0.0))
    s = torch.tensor(0.1, requires_grad=True)
    noise = torch.tensor([[[0.0, 0.0, 25 * LN2, 3.0, 0.0]]])
    out = straight_through(codebook, tau=0.5, noise=noise, s=s)
    assert out.ids.tolist() == [[2]]
    assert torch.equal(out.embeds, torch.tensor([[[-1.0, 0.0]]]))
    assert out.probs is not None
    assert out.probs[0, 0].tolist() == pytest.approx([2 / 7, 1 / 14, 4 / 7, 0.0, 1 / 14])
    (W * out.embeds).sum().backward()
    assert codebook.grad is not None
    assert s.grad is not None
    assert codebook.grad[0, 0].tolist() == pytest.approx([76 / 49, 4 / 7])
    assert s.grad.item() == pytest.approx(-1000 * LN2 / 49)


def test_noise_scale_is_clamped() -> None:
    # s = 0.5 acts as 0.2 and, clamped, gets a zero gradient; the codebook still gets one.
    noise = torch.tensor([[[0.0, 0.0, 25 * LN2, 3.0, 0.0]]])
    clamped = torch.tensor(0.5, requires_grad=True)
    out = straight_through(leaf((LN2, 0.0)), tau=0.5, noise=noise, s=clamped)
    at_bound = straight_through(leaf((LN2, 0.0)), tau=0.5, noise=noise, s=torch.tensor(0.2))
    assert out.probs is not None
    assert at_bound.probs is not None
    assert torch.equal(out.probs, at_bound.probs)
    # 0.2 moves e2's tempered logit to 2·(-ln 2 + 5 ln 2) = 8 ln 2 against 2 ln 2 for e0: π2 = 256/(256 + 4 + 1 + 1).
    assert out.probs[0, 0, 2].item() == pytest.approx(256 / 262)
    (W * out.embeds).sum().backward()
    assert clamped.grad is not None
    assert clamped.grad.item() == 0.0


def test_forbidden_ids_never_chosen_zero_probability_finite_gradients() -> None:
    # Positive codebook coordinates: e3 = (2, 2) has the largest dot product at every position, and large noise.
    generator = torch.Generator().manual_seed(0)
    codebook = (torch.rand(3, 4, 2, generator=generator) + 0.5).requires_grad_()
    s = torch.tensor(0.2, requires_grad=True)
    for tau in (1.0, 0.005):
        noise = gumbel_noise((3, 4, 5), generator=generator)
        out = straight_through(codebook, tau=tau, noise=noise, s=s)
        assert out.probs is not None
        assert not (out.ids == 3).any()
        assert (out.probs[..., 3] == 0).all()
        (W * out.embeds).sum().backward()
        assert codebook.grad is not None
        assert s.grad is not None
        assert torch.isfinite(codebook.grad).all()
        assert torch.isfinite(s.grad).all()
    for kind in LogitKind:
        logits = vocabulary_logits(codebook, E, FORBID_3, kind=kind, scale=1.0)
        assert not (hard_ids(logits) == 3).any()


def test_hard_ids_is_the_noiseless_argmax() -> None:
    # c = (3, 4) at position 0 (dot (3, 4, -3, -inf, -4): id 1), c = (-1, -5) at position 1 ((-1, -5, 1, -inf, 5): 4).
    logits = vocabulary_logits(torch.tensor([[[3.0, 4.0], [-1.0, -5.0]]]), E, FORBID_3, kind=LogitKind.dot, scale=1.0)
    assert hard_ids(logits).tolist() == [[1, 4]]
    assert hard_ids(logits).dtype == torch.long


def test_pez_is_nearest_by_cosine_with_identity_gradient() -> None:
    # c = (1, 0.2): dot products (1, 0.2, -1, 2.4, -0.2) pick e3; cosines, |c| = √1.04:
    # (1/√1.04 = 0.9806, 0.1961, -0.9806, 2.4/(√1.04·2√2) = 0.8321, -0.1961) pick e0.
    # c = (-0.3, -1): cosines (-0.287, -0.958, 0.287, -0.832, 0.958) pick e4.
    codebook = leaf((1.0, 0.2), (-0.3, -1.0))
    out = pez_project(codebook, E, NONE_FORBIDDEN)
    assert out.ids.tolist() == [[0, 4]]
    assert out.probs is None
    assert torch.equal(out.embeds, torch.tensor([[[1.0, 0.0], [0.0, -1.0]]]))
    (W * out.embeds).sum().backward()
    assert codebook.grad is not None
    assert codebook.grad.tolist() == [[[1.0, 2.0], [1.0, 2.0]]]
    # Forbidding e0 leaves e3 (0.8321) as the nearest for the first vector.
    forbid_0 = torch.tensor([True, False, False, False, False])
    assert pez_project(codebook, E, forbid_0).ids.tolist() == [[3, 4]]


def test_bf16_embeddings_give_exact_bf16_rows_and_fp32_gradients() -> None:
    embeddings = (E * 1.0078125).bfloat16()  # 1 + 2^-7: not every value is a small integer
    generator = torch.Generator().manual_seed(1)
    codebook = torch.randn(2, 3, 2, generator=generator).requires_grad_()
    s = torch.tensor(0.05, requires_grad=True)
    noise = gumbel_noise((2, 3, 5), generator=generator)
    logits = vocabulary_logits(codebook, embeddings, FORBID_3, kind=LogitKind.dot, scale=1.0)
    assert logits.dtype == torch.float32
    for out in (
        gumbel_straight_through(logits, embeddings, tau=0.5, noise=noise, noise_scale=s),
        pez_project(codebook, embeddings, FORBID_3),
    ):
        assert out.embeds.dtype == torch.bfloat16
        assert out.embeds.shape == (2, 3, 2)
        assert torch.equal(out.embeds, embeddings[out.ids])
        codebook.grad = None
        (W.bfloat16() * out.embeds).sum().backward()
        assert codebook.grad is not None
        assert codebook.grad.dtype == torch.float32
        assert torch.isfinite(codebook.grad).all()
        assert codebook.grad.abs().sum() > 0


def test_gumbel_noise_is_finite_and_seeded() -> None:
    # U = 0: -log(-log(1e-10) + 1e-10) = -log(23.02585) = -3.136618; U = ½: -log(ln 2) = 0.366513;
    # U = 1 - 2^-24 (the largest fp32 below 1): -log(5.96e-8 + 1e-10) = 16.634; U = 1 would be 23.03, not inf.
    uniform = torch.tensor([0.0, 0.5, 1.0 - 2**-24, 1.0])
    values = gumbel_from_uniform(uniform)
    assert values.tolist() == pytest.approx([-3.136618, 0.366513, 16.634, -math.log(1e-10)], abs=2e-3)
    first = gumbel_noise((200, 500), generator=torch.Generator().manual_seed(3))
    assert first.dtype == torch.float32
    assert first.shape == (200, 500)
    assert torch.isfinite(first).all()
    assert torch.equal(first, gumbel_noise((200, 500), generator=torch.Generator().manual_seed(3)))
    # Gumbel(0, 1): mean 0.5772 (Euler's constant), variance π²/6 = 1.6449; 100 000 draws: standard error 0.004.
    assert first.mean().item() == pytest.approx(0.5772, abs=0.02)
    assert first.var().item() == pytest.approx(1.6449, abs=0.05)


def test_diversity_hand_values_and_gradient() -> None:
    # Prompt means over L = 2: [(2, 0), (0, 0)] -> (1, 0); [(0, 1), (0, 3)] -> (0, 2); [(2, 0), (4, 0)] -> (3, 0).
    a = [[2.0, 0.0], [0.0, 0.0]]
    orthogonal = [[0.0, 1.0], [0.0, 3.0]]
    parallel = [[2.0, 0.0], [4.0, 0.0]]
    diagonal = [[1.0, 1.0], [1.0, 1.0]]  # mean (1, 1)
    single = torch.tensor([a]).requires_grad_()
    d1 = diversity(single)
    assert d1.item() == 0.0
    d1.backward()  # a zero still attached to the codebook
    assert single.grad is not None
    assert torch.equal(single.grad, torch.zeros(1, 2, 2))
    assert diversity(torch.tensor([a, parallel])).item() == pytest.approx(1 / 4)  # cos 1 over P² = 4
    # (1, 0), (0, 2), (1, 1): cosines 0, 1/√2, 1/√2 -> √2/9.
    assert diversity(torch.tensor([a, orthogonal, diagonal])).item() == pytest.approx(2**0.5 / 9)
    # Orthogonal means m0 = (1, 0), m1 = (0, 2): D = cos/4 = 0; ∂cos/∂m0 = m̂1/|m0| = (0, 1), ∂cos/∂m1 = m̂0/|m1| =
    # (½, 0); each row is ½ of its mean and D is cos/4: rows of prompt 0 get (0, 1/8), rows of prompt 1 (1/16, 0).
    pair = torch.tensor([a, orthogonal]).requires_grad_()
    d2 = diversity(pair)
    assert d2.item() == pytest.approx(0.0, abs=1e-7)
    d2.backward()
    assert pair.grad is not None
    assert torch.allclose(pair.grad, torch.tensor([[[0.0, 0.125]] * 2, [[0.0625, 0.0]] * 2]))


def test_forbidden_mass() -> None:
    # Forbidden {3, 4}: position 0 holds 0.4 + 0.0, position 1 holds 0.25 + 0.25; mean 0.45.
    probs = torch.tensor([[[0.1, 0.2, 0.3, 0.4, 0.0], [0.5, 0.0, 0.0, 0.25, 0.25]]])
    forbidden = torch.tensor([False, False, False, True, True])
    assert forbidden_mass(probs, forbidden).item() == pytest.approx(0.45)
    assert forbidden_mass(probs, NONE_FORBIDDEN).item() == 0.0


def test_initial_codebook_without_and_with_init_ids() -> None:
    # Mean embedding ((1 + 0 - 1 + 2 + 0)/5, (0 + 1 + 0 + 2 - 1)/5) = (0.4, 0.4).
    mean_init = initial_codebook(E, 3, 4, init_ids=None, pad_id=4, generator=torch.Generator().manual_seed(5))
    assert mean_init.shape == (3, 4, 2)
    assert mean_init.dtype == torch.float32
    noise = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(mean_init, torch.tensor([0.4, 0.4]) + 0.01 * noise)
    assert not torch.equal(mean_init[0], mean_init[1])  # independent noise per prompt
    # init ids [1, 3] padded with pad id 4 to L = 4: rows e1, e3, e4, e4 for every prompt (bf16 embeddings, fp32 out).
    text_init = initial_codebook(
        E.bfloat16(), 2, 4, init_ids=[1, 3], pad_id=4, generator=torch.Generator().manual_seed(5)
    )
    assert text_init.dtype == torch.float32
    rows = torch.tensor([[0.0, 1.0], [2.0, 2.0], [0.0, -1.0], [0.0, -1.0]])
    text_noise = torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(text_init, rows + 0.01 * text_noise)
    with pytest.raises(ValueError, match="more than prompt_len=1"):
        initial_codebook(E, 1, 1, init_ids=[0, 1], pad_id=4, generator=torch.Generator())


def test_every_estimator_and_logit_kind_is_exercised() -> None:
    """Each enum member maps to a working path; a new member without one fails here."""
    assert set(LOGITS) == set(LogitKind)
    estimators: dict[Estimator, Callable[[torch.Tensor], Quantised]] = {
        Estimator.gumbel: lambda c: straight_through(c, tau=1.0, noise=None, s=torch.tensor(0.0)),
        Estimator.pez: lambda c: pez_project(c, E, FORBID_3),
    }
    assert set(estimators) == set(Estimator)
    for estimator in Estimator:
        codebook = leaf((LN2, 0.0))
        out = estimators[estimator](codebook)
        assert out.ids.tolist() == [[0]], estimator  # c = (ln 2, 0) is nearest e0 by dot and by cosine
        (W * out.embeds).sum().backward()
        assert codebook.grad is not None
        assert codebook.grad.abs().sum() > 0
    for kind in LogitKind:
        logits = vocabulary_logits(torch.tensor([[[3.0, 4.0]]]), E, FORBID_3, kind=kind, scale=1.0)
        assert hard_ids(logits).tolist() == [[1]], kind  # e1: dot 4 and cosine 0.8 both the best allowed
