"""DPO: hand-computed values of every loss type, equality with TRL 1.16's DPOTrainer, config, and run invariants.

Notation in the cases below: ``s_w``/``s_l`` are the chosen/rejected log-ratios to the reference (the reference
log-probs are 0 unless a case says otherwise, so the policy log-probs *are* the log-ratios), ``Δ = s_w - s_l``,
``z = β·Δ``, ``sig`` the logistic function and ``softplus(x) = log(1 + e^x) = -logsigmoid(-x)``. Values use
``sig(ln 3) = 0.75``, ``sig(-ln 3) = 0.25``, ``ln 2 = 0.693147``, ``ln 0.75 = -0.287682``, ``ln 0.25 = -1.386294``,
``softplus(1) = 1.313262``, ``softplus(-1) = 0.313262``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from alignment.config import to_run_config
from alignment.methods.pairwise.core import PairCounts, PairLogps, sequence_logps, total_loss
from alignment.methods.pairwise.dpo import DPO_LOSSES, DpoConfig, DpoLossType, dpo_loss
from alignment.registry import METHODS, dpo
from tests.methods.helpers import ONE_SGD_STEP, Loaded, pair_row, read_logs, run_method, trainable, write_jsonl

LN3 = math.log(3.0)
LN2 = math.log(2.0)


def pairs(
    chosen: list[float],
    rejected: list[float],
    chosen_tokens: list[float] | None = None,
    rejected_tokens: list[float] | None = None,
) -> PairLogps:
    """PairLogps from plain lists (one token per sequence unless given)."""
    ones = [1.0] * len(chosen)
    return PairLogps(
        torch.tensor(chosen, dtype=torch.float64),
        torch.tensor(rejected, dtype=torch.float64),
        torch.tensor(chosen_tokens or ones, dtype=torch.float64),
        torch.tensor(rejected_tokens or ones, dtype=torch.float64),
    )


def zeros(n: int = 1) -> PairLogps:
    return pairs([0.0] * n, [0.0] * n)


def total(loss_type: DpoLossType, policy: PairLogps, reference: PairLogps, **kwargs: Any) -> torch.Tensor:
    """The whole micro-batch loss (``mean(per pair) + NLL weights``) of one loss type, as the trainer takes it."""
    out = dpo_loss(policy, reference, loss_types=[loss_type], **{"beta": 1.0, **kwargs})
    return total_loss(out, policy, PairCounts.of(policy))


@dataclass
class Case:
    """One hand-computed value: ``total(loss_type, policy, reference, **kwargs) == expected``."""

    loss_type: DpoLossType
    policy: PairLogps
    expected: float
    kwargs: dict[str, float] = field(default_factory=dict)
    reference: PairLogps | None = None
    why: str = ""


T = DpoLossType
CASES = [
    # sigmoid: softplus(-z)
    Case(T.sigmoid, pairs([1.0], [-1.0]), 0.313262, {"beta": 0.5}, why="z = 0.5·2 = 1: softplus(-1)"),
    Case(T.sigmoid, zeros(), 0.693147, why="z = 0: ln 2"),
    Case(T.sigmoid, pairs([-2.0], [0.0]), 2.126928, why="z = -2: ln(1 + e²) = 2.126928"),
    # hinge: max(0, 1 - z)
    Case(T.hinge, pairs([1.0], [-1.0]), 0.5, {"beta": 0.25}, why="z = 0.25·2 = 0.5: 1 - 0.5"),
    Case(T.hinge, zeros(), 1.0, why="z = 0: 1"),
    Case(T.hinge, pairs([2.0], [0.0]), 0.0, why="z = 2 > 1: 0"),
    # ipo: (Δ̄ - 1/(2β))², Δ̄ from per-token means
    Case(T.ipo, pairs([4.0], [-2.0], [2.0], [1.0]), 9.0, {"beta": 0.5}, why="Δ̄ = 4/2 + 2/1 = 4: (4 - 1)²"),
    Case(T.ipo, zeros(), 1.0, {"beta": 0.5}, why="Δ̄ = 0: (0 - 1)²"),
    Case(T.ipo, pairs([3.0], [0.0], [3.0], [5.0]), 1.0, {"beta": 0.25}, why="Δ̄ = 3/3 = 1: (1 - 2)²"),
    # exo_pair: KL([sig(z), sig(-z)] || [1-ε, ε])
    Case(T.exo_pair, zeros(), 0.0, {"label_smoothing": 0.5}, why="[.5,.5] vs [.5,.5]: 0"),
    Case(
        T.exo_pair, zeros(), 0.510826, {"label_smoothing": 0.1}, why="[.5,.5] vs [.9,.1]: ln .5 - .5 ln .09 = 0.510826"
    ),
    Case(
        T.exo_pair,
        pairs([LN3], [0.0]),
        0.130812,
        {"label_smoothing": 0.5},
        why="[.75,.25] vs [.5,.5]: .75 ln 1.5 + .25 ln .5 = 0.304099 - 0.173287",
    ),
    # nca_pair: -logsig(βs_w) - ½ logsig(-βs_w) - ½ logsig(-βs_l)
    Case(T.nca_pair, zeros(), 1.386294, why="ln 2 + ½ ln 2 + ½ ln 2 = 2 ln 2"),
    Case(T.nca_pair, pairs([LN3], [-LN3]), 1.124670, why="-ln .75 - ½ ln .25 - ½ ln .75 = 0.431523 + 0.693147"),
    Case(T.nca_pair, pairs([0.0], [LN3]), 1.732868, why="ln 2 + ½ ln 2 - ½ ln .25 = 1.039721 + 0.693147"),
    # robust: (-(1-ε) logsig(z) + ε logsig(-z)) / (1 - 2ε)
    Case(T.robust, zeros(), 0.693147, {"label_smoothing": 0.1}, why="(.9 ln 2 - .1 ln 2)/.8 = ln 2"),
    Case(
        T.robust,
        pairs([LN3], [0.0]),
        -0.261624,
        {"label_smoothing": 0.25},
        why="(-.75 ln .75 + .25 ln .25)/.5 = (0.215762 - 0.346574)/.5",
    ),
    Case(
        T.robust,
        pairs([0.0], [LN3]),
        1.935601,
        {"label_smoothing": 0.25},
        why="(-.75 ln .25 + .25 ln .75)/.5 = (1.039721 - 0.071921)/.5",
    ),
    # bco_pair: -logsig(βs_w) - logsig(-βs_l)
    Case(T.bco_pair, zeros(), 1.386294, why="2 ln 2"),
    Case(T.bco_pair, pairs([LN3], [-LN3]), 0.575364, why="-2 ln .75"),
    Case(T.bco_pair, pairs([-LN3], [0.0]), 2.079442, why="-ln .25 + ln 2"),
    # sppo_hard: (s_w - 1/(2β))² + (s_l + 1/(2β))²
    Case(T.sppo_hard, zeros(), 2.0, {"beta": 0.5}, why="(0 - 1)² + (0 + 1)²"),
    Case(T.sppo_hard, pairs([3.0], [1.0]), 8.0, {"beta": 0.5}, why="(3 - 1)² + (1 + 1)²"),
    Case(T.sppo_hard, zeros(), 8.0, {"beta": 0.25}, why="(0 - 2)² + (0 + 2)²"),
    # aot: smoothed sigmoid of β(sort(policy Δ) - sort(reference Δ)) over the batch
    Case(
        T.aot,
        pairs([2.0, 0.0], [0.0, 1.0]),
        (1.313262 + 0.313262) / 2,
        reference=pairs([0.0, 1.0], [0.0, 0.0]),
        why="policy Δ [2,-1] -> [-1,2], reference Δ [0,1]: deltas [-1,1]; mean(softplus(1), softplus(-1))",
    ),
    Case(T.aot, zeros(), 0.693147, {"label_smoothing": 0.25}, why="z = 0: .75 ln 2 + .25 ln 2"),
    Case(
        T.aot,
        pairs([LN3], [0.0]),
        0.562335,
        {"label_smoothing": 0.25},
        why="z = ln 3: -.75 ln .75 - .25 ln .25 = 0.215762 + 0.346574",
    ),
    # aot_unpaired: smoothed sigmoid of β(sort(s_w) - sort(s_l))
    Case(
        T.aot_unpaired,
        pairs([2.0, -1.0], [0.0, 3.0]),
        1.313262,
        why="paired Δ would be [2,-4]; sort(s_w) [-1,2] - sort(s_l) [0,3] = [-1,-1]: softplus(1) each",
    ),
    Case(T.aot_unpaired, zeros(), 0.693147, {"label_smoothing": 0.25}, why="z = 0: ln 2"),
    Case(
        T.aot_unpaired,
        pairs([0.0], [LN3]),
        1.111642,
        {"label_smoothing": 0.25},
        why="z = -ln 3: -.75 ln .25 - .25 ln .75 = 1.039721 + 0.071921",
    ),
    # apo_zero: 1 - sig(βs_w) + sig(βs_l)
    Case(T.apo_zero, zeros(), 1.0, why="1 - .5 + .5"),
    Case(T.apo_zero, pairs([LN3], [-LN3]), 0.5, why="1 - .75 + .25"),
    Case(T.apo_zero, pairs([-LN3], [LN3]), 1.5, why="1 - .25 + .75"),
    # apo_down: sig(βs_w) + 1 - sig(βΔ)
    Case(T.apo_down, zeros(), 1.0, why=".5 + 1 - .5"),
    Case(T.apo_down, pairs([LN3], [0.0]), 1.0, why=".75 + 1 - .75"),
    Case(T.apo_down, pairs([0.0], [-LN3]), 0.75, why=".5 + 1 - .75"),
    # discopop: (1 - m) softplus(-z) + m e^{-z}, m = sig(z/τ)
    Case(T.discopop, zeros(), 0.846574, why="m = .5: .5 ln 2 + .5·1"),
    Case(T.discopop, pairs([LN3], [0.0]), 0.321921, {"discopop_tau": 1.0}, why="m = .75: .25·0.287682 + .75/3"),
    Case(T.discopop, pairs([0.0], [LN3]), 1.789721, {"discopop_tau": 1.0}, why="m = .25: .75·1.386294 + .25·3"),
    # sft: token mean of -log π(y_w) over the micro-batch (no per-pair term)
    Case(T.sft, pairs([-2.0, -4.0], [-9.0, -9.0], [1.0, 3.0]), 1.5, why="(2 + 4)/(1 + 3) tokens"),
    Case(T.sft, pairs([-3.0], [0.0], [2.0]), 1.5, why="3/2"),
    Case(T.sft, pairs([-3.0], [-1.0], [3.0], [1.0]), 1.0, why="3/3: rejected ignored"),
    # sigmoid_norm: softplus(-βΔ̄)
    Case(T.sigmoid_norm, pairs([4.0], [-2.0], [2.0], [1.0]), 0.313262, {"beta": 0.25}, why="Δ̄ = 4, z = 1"),
    Case(T.sigmoid_norm, zeros(), 0.693147, why="ln 2"),
    Case(T.sigmoid_norm, pairs([-3.0], [0.0], [3.0], [5.0]), 1.313262, why="Δ̄ = -1: softplus(1)"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.loss_type.value}")
def test_hand_computed_value(case: Case) -> None:
    reference = case.reference or zeros(case.policy.chosen.numel())
    value = total(case.loss_type, case.policy, reference, **case.kwargs)
    assert float(value) == pytest.approx(case.expected, abs=1e-6), case.why


def test_every_loss_type_has_three_hand_computed_cases() -> None:
    assert set(DPO_LOSSES) == set(DpoLossType)
    counts = {t: sum(c.loss_type is t for c in CASES) for t in DPO_LOSSES}
    assert all(n >= 3 for n in counts.values()), counts


# --- limiting cases, one per loss type -----------------------------------------------------------------------------

BIG = 50.0


def _limit_sigmoid() -> None:
    # label_smoothing = 0 (it is never read by sigmoid): exactly -logsigmoid(β·Δ) for any margins; → 0 as z → ∞.
    policy, reference = pairs([0.3, -1.2, 2.0], [0.1, 0.4, -3.0]), pairs([0.2, 0.0, 1.0], [-0.5, 0.1, 0.0])
    margin = (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)
    expected = -torch.nn.functional.logsigmoid(0.1 * margin).mean()
    assert float(total(T.sigmoid, policy, reference, beta=0.1)) == pytest.approx(float(expected), abs=1e-12)
    assert float(total(T.sigmoid, pairs([BIG], [0.0]), zeros())) < 1e-20


def _limit_hinge() -> None:
    # Zero from z = 1 on, and linear below: at Δ = -1/β it is 2.
    assert float(total(T.hinge, pairs([10.0], [0.0]), zeros(), beta=0.1)) == 0.0
    assert float(total(T.hinge, pairs([0.0], [10.0]), zeros(), beta=0.1)) == pytest.approx(2.0)


def _limit_ipo() -> None:
    # Zero at a per-token margin of exactly 1/(2β), whatever the lengths.
    beta = 0.1
    policy = pairs([5.0 * 4 - 1.0 * 4], [-1.0 * 7], [4.0], [7.0])  # Δ̄ = (20-4)/4 + 1 = 5 = 1/(2β)
    assert float(total(T.ipo, policy, zeros(), beta=beta)) == pytest.approx(0.0, abs=1e-12)


def _limit_exo_pair() -> None:
    # Zero when softmax(β·[s_w, s_l]) equals the target [1-ε, ε], i.e. z = ln((1-ε)/ε).
    epsilon = 0.1
    value = total(T.exo_pair, pairs([math.log(9.0)], [0.0]), zeros(), label_smoothing=epsilon)
    assert float(value) == pytest.approx(0.0, abs=1e-12)


def _limit_nca_pair() -> None:
    # s_w = 0, s_l → -∞: ln 2 + ½ ln 2 + 0.
    assert float(total(T.nca_pair, pairs([0.0], [-BIG]), zeros())) == pytest.approx(1.5 * LN2, abs=1e-12)


def _limit_robust() -> None:
    # ε = 0 reduces to sigmoid.
    policy = pairs([0.7, -0.2], [0.1, 0.9])
    assert float(total(T.robust, policy, zeros(2))) == pytest.approx(float(total(T.sigmoid, policy, zeros(2))))


def _limit_bco_pair() -> None:
    assert float(total(T.bco_pair, pairs([BIG], [-BIG]), zeros())) < 1e-20


def _limit_sppo_hard() -> None:
    # Zero when s_w = 1/(2β) and s_l = -1/(2β).
    assert float(total(T.sppo_hard, pairs([5.0], [-5.0]), zeros(), beta=0.1)) == pytest.approx(0.0, abs=1e-12)


def _limit_aot() -> None:
    # With one pair, sorting does nothing: aot is sigmoid.
    policy, reference = pairs([0.7], [0.1]), pairs([0.2], [0.4])
    assert float(total(T.aot, policy, reference)) == pytest.approx(float(total(T.sigmoid, policy, reference)))


def _limit_aot_unpaired() -> None:
    # With one pair, aot_unpaired is sigmoid too.
    policy, reference = pairs([0.7], [0.1]), pairs([0.2], [0.4])
    value = total(T.aot_unpaired, policy, reference)
    assert float(value) == pytest.approx(float(total(T.sigmoid, policy, reference)))


def _limit_apo_zero() -> None:
    assert float(total(T.apo_zero, pairs([BIG], [-BIG]), zeros())) < 1e-20


def _limit_apo_down() -> None:
    assert float(total(T.apo_down, pairs([-BIG], [-2 * BIG - BIG]), zeros())) < 1e-20


def _limit_discopop() -> None:
    # τ → 0: the mix is a step, so z > 0 gives e^{-z} and z < 0 gives softplus(-z).
    assert float(total(T.discopop, pairs([1.0], [0.0]), zeros(), discopop_tau=1e-6)) == pytest.approx(math.exp(-1))
    assert float(total(T.discopop, pairs([0.0], [1.0]), zeros(), discopop_tau=1e-6)) == pytest.approx(1.313262, 1e-6)


def _limit_sft() -> None:
    # A certain chosen completion (log-prob 0) costs nothing.
    assert float(total(T.sft, pairs([0.0], [-3.0], [4.0]), zeros())) == 0.0


def _limit_sigmoid_norm() -> None:
    # One token per completion: the mean is the sum, so sigmoid_norm is sigmoid.
    policy = pairs([0.7, -0.2], [0.1, 0.9])
    assert float(total(T.sigmoid_norm, policy, zeros(2))) == pytest.approx(float(total(T.sigmoid, policy, zeros(2))))


LIMITS = {
    T.sigmoid: _limit_sigmoid,
    T.hinge: _limit_hinge,
    T.ipo: _limit_ipo,
    T.exo_pair: _limit_exo_pair,
    T.nca_pair: _limit_nca_pair,
    T.robust: _limit_robust,
    T.bco_pair: _limit_bco_pair,
    T.sppo_hard: _limit_sppo_hard,
    T.aot: _limit_aot,
    T.aot_unpaired: _limit_aot_unpaired,
    T.apo_zero: _limit_apo_zero,
    T.apo_down: _limit_apo_down,
    T.discopop: _limit_discopop,
    T.sft: _limit_sft,
    T.sigmoid_norm: _limit_sigmoid_norm,
}


@pytest.mark.parametrize("loss_type", list(DPO_LOSSES), ids=str)
def test_limiting_case(loss_type: DpoLossType) -> None:
    LIMITS[loss_type]()


@pytest.mark.parametrize("loss_type", list(DPO_LOSSES), ids=str)
def test_gradients_are_finite_and_reach_the_policy(loss_type: DpoLossType) -> None:
    torch.manual_seed(0)
    chosen = (torch.randn(4, dtype=torch.float64) * 3).requires_grad_()
    rejected = (torch.randn(4, dtype=torch.float64) * 3).requires_grad_()
    tokens = torch.tensor([1.0, 3.0, 7.0, 2.0], dtype=torch.float64)
    policy = PairLogps(chosen, rejected, tokens, tokens.flip(0))
    reference = PairLogps(torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64), tokens, tokens)
    smoothing = 0.1 if loss_type in dpo.SMOOTHED else 0.0
    out = dpo_loss(policy, reference, beta=0.1, loss_types=[loss_type], label_smoothing=smoothing)
    loss = total_loss(out, policy, PairCounts.of(policy))
    loss.backward()
    assert torch.isfinite(loss)
    assert chosen.grad is not None
    assert torch.isfinite(chosen.grad).all()
    assert chosen.grad.abs().sum() > 0
    # Every type but sft (chosen NLL only) also pushes on the rejected side.
    assert (rejected.grad is None) == (loss_type is T.sft)
    assert rejected.grad is None or torch.isfinite(rejected.grad).all()
    assert not out.chosen_reward.requires_grad
    assert not out.rejected_reward.requires_grad


def test_weights_combine_terms_and_rewards_are_beta_logratios() -> None:
    """RPO: 1.0·sigmoid + 0.5·sft on one pair, β = 1.

    Policy chosen log-prob -1 over 3 tokens, reference chosen -1 - ln 3, so s_w = ln 3; rejected both -2, s_l = 0.
    sigmoid: softplus(-ln 3) = -ln .75 = 0.287682; sft: 1/3; total 0.287682 + 0.5/3 = 0.454349.
    Rewards: β·s_w = ln 3 = 1.098612 and β·s_l = 0.
    """
    policy = pairs([-1.0], [-2.0], [3.0], [2.0])
    reference = pairs([-1.0 - LN3], [-2.0], [3.0], [2.0])
    out = dpo_loss(policy, reference, beta=1.0, loss_types=[T.sigmoid, T.sft], loss_weights=[1.0, 0.5])
    assert out.chosen_nll_weight == 0.5
    assert float(total_loss(out, policy, PairCounts.of(policy))) == pytest.approx(0.454349, abs=1e-6)
    assert float(out.chosen_reward[0]) == pytest.approx(1.098612, abs=1e-6)
    assert float(out.rejected_reward[0]) == 0.0


def test_weighted_combination_is_the_weighted_sum() -> None:
    policy, reference = pairs([0.3, -1.0], [0.2, 0.5], [2.0, 3.0], [1.0, 4.0]), pairs([0.1, 0.1], [0.0, -0.3])
    singles = [total(t, policy, reference, beta=0.2) for t in (T.sigmoid, T.ipo, T.sft)]
    both = dpo_loss(policy, reference, beta=0.2, loss_types=[T.sigmoid, T.ipo, T.sft], loss_weights=[0.5, 2.0, 3.0])
    combined = total_loss(both, policy, PairCounts.of(policy))
    assert float(combined) == pytest.approx(float(0.5 * singles[0] + 2.0 * singles[1] + 3.0 * singles[2]))


# --- config ----------------------------------------------------------------------------------------------------------


def test_registered_and_composes_with_the_cli_example(compose: Any) -> None:
    assert METHODS["dpo"].schema is DpoConfig
    cfg = to_run_config(compose(["method=dpo", "method.loss_type=[sigmoid,sft]", "method.loss_weights=[1.0,0.5]"]))
    assert isinstance(cfg.method, DpoConfig)
    assert cfg.method.loss_type == [T.sigmoid, T.sft]
    assert cfg.method.loss_weights == [1.0, 0.5]
    assert (cfg.method.beta, cfg.method.learning_rate) == (0.1, 1e-6)


def test_wrong_loss_type_fails_at_compose_time_listing_the_allowed_ones(compose: Any) -> None:
    with pytest.raises(Exception, match="sigmod") as raised:
        compose(["method=dpo", "method.loss_type=[sigmoid,sigmod]"])
    message = str(raised.value) + str(raised.value.__cause__)
    assert all(t.value in message for t in DpoLossType), message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": [T.sigmoid], "loss_weights": [1.0, 0.5]}, "2 values for 1 loss types"),
        ({"loss_type": []}, "at least one"),
        ({"loss_type": [T.exo_pair]}, "label_smoothing > 0"),
        ({"loss_type": [T.robust], "label_smoothing": 0.5}, r"< 0.5"),
        ({"loss_type": [T.sigmoid, T.sft], "label_smoothing": 0.1}, "would ignore it"),
    ],
)
def test_inconsistent_settings_fail_at_config_time(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DpoConfig(**kwargs)


# --- equality with TRL 1.16's DPOTrainer -----------------------------------------------------------------------------

EQUALITY_CASES = [([t.value], None, 0.1 if t in dpo.SMOOTHED else 0.0) for t in DpoLossType] + [
    (["sigmoid", "sft"], [1.0, 0.5], 0.0),
    (["robust"], None, 0.3),
    (["aot", "ipo", "sft"], [0.5, 2.0, 0.1], 0.2),
]


@pytest.fixture(scope="module")
def trl_models(tiny_random_path: str) -> tuple[Any, Any, Any]:
    """Tokenizer, policy and a reference that differs from it (a noised copy), all fp32.

    Identical policy and reference would give zero log-ratios, so every loss would be a constant (ln 2, 1, ...)
    and the comparison would check almost nothing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_random_path)
    policy = AutoModelForCausalLM.from_pretrained(tiny_random_path, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_random_path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    return tokenizer, policy, reference


def _demo_pairs(n: int) -> list[dict[str, Any]]:
    from alignment.data.demo import DEMO_DIR

    path = DEMO_DIR / "train.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:n]]


def _packed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TRL's right-padded ``[chosen..., rejected...]`` rows as one packed row, the way PairCollator builds it."""
    ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    rows = []
    for r in range(ids.size(0)):
        n = int(attention[r].sum())
        labels = ids[r, :n].masked_fill(completion[r, :n] == 0, -100)
        rows.append((ids[r, :n], labels))
    return {
        "input_ids": torch.cat([i for i, _ in rows])[None],
        "labels": torch.cat([lab for _, lab in rows])[None],
        "position_ids": torch.cat([torch.arange(len(i)) for i, _ in rows])[None],
        "sequence_ids": torch.cat([torch.full((len(i),), k) for k, (i, _) in enumerate(rows)])[None],
    }


def _trl_logps(model: Any, batch: dict[str, torch.Tensor]) -> PairLogps:
    """TRL's own per-sequence log-probs (its fused LM head on the padded batch), as ``_compute_loss`` takes them."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=labels,
            fused_lm_head=True,
            use_cache=False,
        )
    chosen, rejected = out.log_probs.sum(1).chunk(2)
    chosen_tokens, rejected_tokens = batch["completion_mask"].sum(1).float().chunk(2)
    return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)


@pytest.mark.parametrize(("loss_types", "weights", "smoothing"), EQUALITY_CASES, ids=lambda v: str(v))
def test_loss_equals_trl_dpo_trainer(
    trl_models: tuple[Any, Any, Any],
    tmp_path: Path,
    loss_types: list[str],
    weights: list[float] | None,
    smoothing: float,
) -> None:
    """On one TRL-collated batch of 4 demo pairs: TRL's ``compute_loss`` == our packed forward + ``dpo_loss``.

    Two comparisons: our loss on TRL's own log-probs (the formulas alone, ~1e-7), and our loss on our packed,
    padding-free forward (end to end). The second differs only by fp32 rounding of the summed log-probs
    (~1e-5 per sequence: TRL's tiled LM head vs our full logits), scaled by the loss's slope.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer, policy, reference = trl_models
    args = DPOConfig(
        output_dir=str(tmp_path),
        loss_type=loss_types,
        loss_weights=weights,
        beta=0.5,
        label_smoothing=smoothing,
        per_device_train_batch_size=4,
        bf16=False,
        use_cpu=True,
        report_to="none",
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(_demo_pairs(4)),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
    kwargs: dict[str, Any] = {
        "beta": 0.5,
        "loss_types": [DpoLossType(t) for t in loss_types],
        "loss_weights": weights,
        "label_smoothing": smoothing,
    }

    trl_policy, trl_reference = _trl_logps(trainer.model, batch), _trl_logps(trainer.ref_model, batch)
    on_trl_logps = total_loss(dpo_loss(trl_policy, trl_reference, **kwargs), trl_policy, PairCounts.of(trl_policy))
    torch.testing.assert_close(on_trl_logps, trl_loss, rtol=1e-6, atol=1e-6)

    packed = _packed(batch)
    with torch.no_grad():
        ours_policy = sequence_logps(trainer.model, packed)
        ours_reference = sequence_logps(trainer.ref_model, packed)
    torch.testing.assert_close(ours_policy.chosen, trl_policy.chosen, rtol=0, atol=5e-5)
    torch.testing.assert_close(ours_reference.rejected, trl_reference.rejected, rtol=0, atol=5e-5)
    torch.testing.assert_close(ours_policy.chosen_tokens, trl_policy.chosen_tokens)
    assert (ours_policy.chosen - ours_reference.chosen).abs().min() > 1e-3  # the log-ratios are not trivial
    ours = total_loss(dpo_loss(ours_policy, ours_reference, **kwargs), ours_policy, PairCounts.of(ours_policy))
    torch.testing.assert_close(ours, trl_loss, rtol=2e-5, atol=1e-5)


# --- runs on the tiny random Llama -----------------------------------------------------------------------------------


# Completions of very different lengths, so a per-micro-batch token mean (sft) would weigh them wrongly.
PAIRS = [
    pair_row("Hi", "Hello there! How can I help you today? " * 2, "Go away."),
    pair_row("What is 2+2?", "4", "2 + 2 is 5, as everybody knows."),
    pair_row("Name a colour.", "Blue, like the sky on a clear summer day.", "Car"),
    pair_row("Say yes.", "Yes.", "No, I will not say that."),
]


def _run(compose: Any, out: Path, overrides: list[str]) -> dict[str, float]:
    return run_method(dpo.run, compose, out, overrides)


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)


def _one_step(compose: Any, out: Path, data: Path, overrides: list[str]) -> dict[str, Any]:
    _run(
        compose, out, ["method=dpo", *ONE_SGD_STEP, "method.beta=0.5", f"data.sources=[{{path:'{data}'}}]", *overrides]
    )
    (logged,) = [e for e in read_logs(out) if "loss" in e]
    return logged


def test_grad_accumulation_1x4_equals_4x1(compose: Any, tmp_path: Path, pairs_file: Path, loaded: Loaded) -> None:
    """One SGD step of RPO (sigmoid + 0.5·sft): four micro-batches of one pair ≡ one micro-batch of four.

    The sft term's token mean must span the whole step (the chosen completions have 1 to 20 tokens), and so must
    the pair mean; SGD without clipping moves each parameter by exactly ``lr * grad``.
    """
    rpo = ["method.loss_type=[sigmoid,sft]", "method.loss_weights=[1.0,0.5]"]
    micro = _one_step(
        compose,
        tmp_path / "1x4",
        pairs_file,
        [*rpo, "method.per_device_train_batch_size=1", "method.gradient_accumulation_steps=4"],
    )
    assert len(loaded.models) == 2  # policy and its frozen reference copy
    whole = _one_step(
        compose,
        tmp_path / "4x1",
        pairs_file,
        [*rpo, "method.per_device_train_batch_size=4", "method.gradient_accumulation_steps=1"],
    )
    (micro_model, _, whole_model, _), (start, _, whole_start, _) = loaded.models, loaded.initials
    assert all(torch.equal(start[n], whole_start[n]) for n in start)  # same starting point
    assert micro["loss"] == pytest.approx(whole["loss"], abs=1e-5)
    assert micro["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
    final_micro, final_whole = trainable(micro_model), trainable(whole_model)
    worst = max(final_micro, key=lambda n: (final_micro[n] - final_whole[n]).abs().max().item())
    assert torch.allclose(final_micro[worst], final_whole[worst], rtol=0, atol=1e-5), worst
    assert any(not torch.equal(final_whole[n], start[n]) for n in final_whole)  # the step did move them


@pytest.mark.parametrize("reference", ["adapters", "copy"])
def test_lora_run_trains_adapters_and_logs_preference_metrics(
    compose: Any, tmp_path: Path, pairs_file: Path, loaded: Loaded, reference: str
) -> None:
    """LoRA for 2 steps with the reference as the adapter-free policy, or as a frozen copy: only adapters move."""
    out = tmp_path / "run"
    overrides = [
        "model=tiny_random",
        "method=dpo",
        "logger=none",
        f"data.sources=[{{path:'{pairs_file}', eval_path:'{pairs_file}'}}]",
        "model.lora.enabled=true",
        f"method.reference={reference}",
        "method.max_steps=2",
        "method.per_device_train_batch_size=2",
        "method.per_device_eval_batch_size=4",
        "method.learning_rate=1e-3",
        "method.logging_steps=1",
        "method.save_strategy=no",
    ]
    metrics = _run(compose, out, overrides)
    policy = loaded.models[0]
    assert len(loaded.models) == (2 if reference == "copy" else 1)
    final = trainable(policy)
    assert final
    assert all("lora_" in n for n in final)
    assert all(not torch.equal(final[n], loaded.initials[0][n]) for n in final)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert math.isfinite(metrics[f"eval_{key}"]), key
    first_eval = next(e for e in read_logs(out) if "eval_loss" in e)
    assert first_eval["step"] == 0
    assert first_eval["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert first_eval["eval_loss"] == pytest.approx(LN2, abs=1e-5)
    assert (out / "model" / "adapter_config.json").is_file()


# --- learning check on the real model ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_dpo_raises_held_out_preference_accuracy(compose: Any, tmp_path: Path) -> None:
    """4 full fine-tuning steps of 4 demo pairs: the held-out implicit reward starts to prefer the right answers.

    At step 0 the policy is the reference, so every held-out margin is 0 (accuracy 0, loss ln 2). Recorded on
    2 shared CPU cores (8 held-out pairs): lr 5e-5 for 4 steps gave accuracy 0 -> 0.75, mean margin 0 -> 0.227,
    loss 0.6931 -> 0.5942; lr 1e-5 for 8 steps (twice the training time) gave 0 -> 0.625, 0 -> 0.052 and
    0.6931 -> 0.6742.
    """
    out = tmp_path / "run"
    overrides = [
        "model=smollm2_135m",
        "method=dpo",
        "logger=none",
        "data.sources=[{path: 'embedded:train.jsonl', eval_path: 'embedded:test.jsonl'}]",
        "data.max_eval_samples=8",
        "method.max_steps=4",
        "method.per_device_train_batch_size=4",
        "method.per_device_eval_batch_size=8",
        "method.learning_rate=5e-5",
        "method.logging_steps=1",
        "method.eval_steps=4",
        "method.save_strategy=no",
        "method.max_length=128",
    ]
    _run(compose, out, overrides)
    evals = [e for e in read_logs(out) if "eval_loss" in e]
    before, after = evals[0], evals[-1]
    assert (before["step"], after["step"]) == (0, 4)
    print({k: (before[k], after[k]) for k in ("eval_rewards/accuracies", "eval_rewards/margins", "eval_loss")})
    assert before["eval_rewards/accuracies"] == 0.0
    assert after["eval_rewards/accuracies"] > before["eval_rewards/accuracies"]
    assert after["eval_rewards/margins"] > 0.1
    assert after["eval_loss"] < before["eval_loss"]
    losses = [e["loss"] for e in read_logs(out) if "loss" in e]
    assert len(losses) == 4
    assert all(math.isfinite(v) for v in losses)
