"""SMPO: hand-computed values per variant, limits, the margin schedule, NLL weights, gradients, trainer invariants.

Loss inputs are :class:`PairLogps` whose mean log-probs are chosen by hand (sums over 4 chosen and 2 rejected
tokens); Δ = mean chosen - mean rejected, z = beta (Δ - m). With beta = 1.2 and m = 0.35:
Δ = 0.1 -> z = -0.3;  Δ = 0.35 -> z = 0;  Δ = -0.65 -> z = -1.2;  Δ = 0.6 -> z = 0.3.

Trainer tests call ``smpo.run`` in-process on the tiny random Llama, wrapping ``load_model`` to see the trained
model (as tests/methods/test_sft.py does), with one step of plain SGD so a wrong gradient scale shows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from alignment.methods.pairwise import smpo
from alignment.methods.pairwise.core import PairCounts, PairLogps, Progress, total_loss
from alignment.methods.pairwise.smpo import (
    SMPO_LOSSES,
    SmpoConfig,
    SmpoVariant,
    margin_at,
    row_quantiles,
    shape_token_logps,
    smpo_loss,
    token_shaper,
)
from tests.methods.helpers import ONE_SGD_STEP, Loaded, mean_logps, pair_row, read_logs, run_method, write_jsonl


def means(chosen: list[float], rejected: list[float]) -> PairLogps:
    """Pairs whose mean log-probs are the given values: sums over 4 chosen and 2 rejected tokens."""
    return mean_logps(chosen, rejected, chosen_tokens=4, rejected_tokens=2)


# Δ = 0.1, 0.35, -0.65 and 0.6.
POLICY_DELTAS = ([-0.5, -1.0, -1.0, -0.4], [-0.6, -1.35, -0.35, -1.0])


def per_pair(variant: SmpoVariant, **kwargs: Any) -> list[float]:
    hyper = {"beta": 1.2, "margin": 0.35, "chosen_sft_ratio": 0.8, **kwargs}
    return smpo_loss(means(*POLICY_DELTAS), loss_type=variant, **hyper).per_pair_loss.detach().tolist()


# --- hand-computed values ---------------------------------------------------------------------------------------


def test_smooth_lower_bound_values_and_limit() -> None:
    # max(0, -z)^2: z = -0.3 -> 0.09; z = 0 -> 0 (limit: zero once Δ >= m); z = -1.2 -> 1.44; z = 0.3 -> 0.
    assert per_pair(SmpoVariant.smooth_lower_bound) == pytest.approx([0.09, 0.0, 1.44, 0.0])
    # And no gradient once the margin is reached.
    policy = means([-0.4], [-1.0])
    smpo_loss(policy, beta=1.2, margin=0.35, chosen_sft_ratio=0.8).per_pair_loss.sum().backward()
    assert policy.chosen.grad is not None
    assert policy.chosen.grad.tolist() == [0.0]


def test_sigmoid_values_and_limit() -> None:
    # -log sigmoid(z) = softplus(-z): z = -0.3 -> 0.8543552; z = 0 -> log 2 = 0.6931472; z = -1.2 -> 1.4632824;
    # z = 0.3 -> 0.5543552.
    assert per_pair(SmpoVariant.sigmoid) == pytest.approx([0.8543552, 0.6931472, 1.4632824, 0.5543552], abs=1e-6)
    # Limit: z -> +inf gives 0 (Δ = 100: z ~ 119.6, softplus(-119.6) ~ 1e-52).
    far = means([0.0], [-100.0])
    limit = smpo_loss(far, beta=1.2, margin=0.35, chosen_sft_ratio=0.8, loss_type=SmpoVariant.sigmoid)
    assert limit.per_pair_loss.detach().tolist() == pytest.approx([0.0], abs=1e-12)


def test_hinge_values_and_limit() -> None:
    # max(0, -z), no offset of 1: 0.3, 0 (limit: zero from Δ = m on), 1.2, 0.
    assert per_pair(SmpoVariant.hinge) == pytest.approx([0.3, 0.0, 1.2, 0.0])


def test_ipo_values_and_limit() -> None:
    # z^2: 0.09, 0 (limit: zero exactly at Δ = m), 1.44, 0.09 (symmetric: overshooting the margin costs too).
    assert per_pair(SmpoVariant.ipo) == pytest.approx([0.09, 0.0, 1.44, 0.09])


def test_zero_margin_limit_is_the_plain_difference() -> None:
    # m = 0: z = beta * Δ; for Δ = 0.1, hinge gives max(0, -0.12) = 0 and ipo gives 0.0144.
    assert per_pair(SmpoVariant.ipo, margin=0.0)[0] == pytest.approx(0.0144)
    assert per_pair(SmpoVariant.hinge, margin=0.0)[0] == 0.0


def test_total_weights_chosen_and_rejected_nll_and_logs_metrics() -> None:
    # One pair, Δ = 0.1: f = 0.09; chosen NLL = 2.0 / 4 = 0.5, rejected NLL = 1.2 / 2 = 0.6 (token means);
    # total = 0.09 + 0.8 * 0.5 + 0.2 * 0.6 = 0.61.
    policy = means([-0.5], [-0.6])
    out = smpo_loss(policy, beta=1.2, margin=0.35, chosen_sft_ratio=0.8)
    assert (out.chosen_nll_weight, out.rejected_nll_weight) == pytest.approx((0.8, 0.2))
    assert float(total_loss(out, policy, PairCounts.of(policy)).detach()) == pytest.approx(0.61)
    assert out.metrics == pytest.approx({"target_margin": 0.35, "chosen_sft_loss": 0.5, "rejected_sft_loss": 0.6})
    # Rewards are beta times the mean log-probs, so rewards/accuracies counts mean chosen > mean rejected.
    assert out.chosen_reward.tolist() == pytest.approx([-0.6])
    assert out.rejected_reward.tolist() == pytest.approx([-0.72])
    # r = 1 drops the rejected NLL; r = 0 the chosen one.
    assert smpo_loss(policy, beta=1.2, margin=0.35, chosen_sft_ratio=1.0).rejected_nll_weight == 0.0
    assert smpo_loss(policy, beta=1.2, margin=0.35, chosen_sft_ratio=0.0).chosen_nll_weight == 0.0


@pytest.mark.parametrize("variant", list(SMPO_LOSSES))
def test_every_variant_has_finite_gradients(variant: SmpoVariant) -> None:
    policy = means([-3.0, -0.01, -20.0], [-0.2, -5.0, -20.0])
    out = smpo_loss(policy, beta=1.2, margin=0.2, chosen_sft_ratio=0.8, loss_type=variant)
    assert out.per_pair_loss.shape == (3,)
    total_loss(out, policy, PairCounts.of(policy)).backward()
    for grad in (policy.chosen.grad, policy.rejected.grad):
        assert grad is not None
        assert torch.isfinite(grad).all()


# --- token log-prob shaping (seed spec §3.5, row-wise) -------------------------------------------------------------

EOS = 2
# One packed pair, flat over shifted positions: a prompt position (masked, log-prob 0) then the completion of each
# side. Chosen (sequence 0): -0.5, -1.0, -3.0 (EOS), -0.2. Rejected (sequence 1): -2.0, -0.1, -4.0, -1.0, -0.7 (EOS).
TOKEN_LOGPS = [0.0, -0.5, -1.0, -3.0, -0.2, 0.0, -2.0, -0.1, -4.0, -1.0, -0.7]
TARGETS = [-100, 5, 6, EOS, 7, -100, 8, 9, 10, 11, EOS]
SEQUENCE_IDS = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]


def shaped(values: list[float] = TOKEN_LOGPS, **options: Any) -> torch.Tensor:
    targets = torch.tensor(TARGETS)
    logps = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    return shape_token_logps(logps, targets, torch.tensor(SEQUENCE_IDS), targets != -100, 1, **options)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # Only the rejected EOS flips sign; the chosen EOS (-3.0) stays.
        ({"invert_rejected_eos": True, "eos_token_id": EOS}, [-0.5, -1.0, -3.0, -0.2, -2.0, -0.1, -4.0, -1.0, 0.7]),
        # Rejected sorted -4, -2, -1, -0.7, -0.1: the 0.25 quantile is at index 0.25 * 4 = 1, -2.0; -4.0 -> -2.0.
        ({"lower_clip_percentile": 0.25}, [-0.5, -1.0, -3.0, -0.2, -2.0, -0.1, -2.0, -1.0, -0.7]),
        # Chosen sorted -3, -1, -0.5, -0.2: the 0.75 quantile at index 2.25 is -0.5 + 0.25 * 0.3 = -0.425.
        ({"upper_clip_percentile": 0.75}, [-0.5, -1.0, -3.0, -0.425, -2.0, -0.1, -4.0, -1.0, -0.7]),
        # The floor acts on rejected tokens only (the chosen -3.0 stays).
        ({"min_log_prob": -1.5}, [-0.5, -1.0, -3.0, -0.2, -1.5, -0.1, -1.5, -1.0, -0.7]),
        # All, in order: EOS -0.7 -> 0.7; rejected now -4, -2, -1, -0.1, 0.7 with 0.25 quantile -2.0; chosen -0.2 ->
        # -0.425; then the floor lifts -2.0 and -2.0 (was -4.0) to -1.5.
        (
            {
                "invert_rejected_eos": True,
                "eos_token_id": EOS,
                "lower_clip_percentile": 0.25,
                "upper_clip_percentile": 0.75,
                "min_log_prob": -1.5,
            },
            [-0.5, -1.0, -3.0, -0.425, -1.5, -0.1, -1.5, -1.0, 0.7],
        ),
    ],
)
def test_shape_token_logps_hand_computed(options: dict[str, Any], expected: list[float]) -> None:
    out = shaped(**options).detach()
    completion = torch.tensor(TARGETS) != -100
    torch.testing.assert_close(out[completion], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)
    assert out[~completion].tolist() == [0.0, 0.0]  # prompt positions untouched


def test_shaping_gradients_clamped_tokens_get_none_and_the_inverted_eos_is_negated() -> None:
    logps = torch.tensor(TOKEN_LOGPS, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor(TARGETS)
    mask = targets != -100
    out = shape_token_logps(
        logps,
        targets,
        torch.tensor(SEQUENCE_IDS),
        mask,
        1,
        eos_token_id=EOS,
        invert_rejected_eos=True,
        lower_clip_percentile=0.25,
        upper_clip_percentile=0.75,
        min_log_prob=-1.5,
    )
    (grad,) = torch.autograd.grad((out * mask).sum(), [logps])
    # Chosen: -0.2 clamped to the quantile. Rejected: -2.0 and -4.0 floored, the EOS inverted.
    assert grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, -1.0]


def test_shaping_is_row_wise_so_a_pair_does_not_depend_on_its_micro_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 3, 7, 4]  # chosen 0, chosen 1, rejected 0, rejected 1
    values = [-torch.rand(n, generator=generator, dtype=torch.float64) * 5 for n in lengths]
    targets = [torch.randint(0, 4, (n,), generator=generator) for n in lengths]
    options: dict[str, Any] = {
        "eos_token_id": EOS,
        "invert_rejected_eos": True,
        "lower_clip_percentile": 0.3,
        "upper_clip_percentile": 0.6,
        "min_log_prob": -4.0,
    }

    def shape(order: list[int]) -> torch.Tensor:
        ids = torch.cat([torch.full((lengths[i],), k) for k, i in enumerate(order)])
        target = torch.cat([targets[i] for i in order])
        pairs = len(order) // 2
        return shape_token_logps(torch.cat([values[i] for i in order]), target, ids, target >= 0, pairs, **options)

    together = shape([0, 1, 2, 3])
    alone = [shape([0, 2]), shape([1, 3])]
    expected = torch.cat([alone[0][:5], alone[1][:3], alone[0][5:], alone[1][3:]])
    torch.testing.assert_close(together, expected, rtol=0, atol=0)
    assert not torch.equal(together, torch.cat(values))  # the options did act


def test_row_quantiles_per_sequence_in_any_order() -> None:
    values = torch.tensor([4.0, 1.0, 10.0, 2.0, 3.0])
    ids = torch.tensor([1, 0, 2, 0, 1])
    # Row 0: {1, 2} -> 1.5; row 1: {4, 3} -> 3.5; row 2: {10}; row 3: nothing -> NaN.
    out = row_quantiles(values, ids, 4, 0.5)
    assert out[:3].tolist() == [1.5, 3.5, 10.0]
    assert out[3].isnan()


def test_all_shaping_off_means_no_shaper_and_no_change() -> None:
    assert token_shaper(SmpoConfig(), EOS) is None
    assert not SmpoConfig().shapes_tokens
    assert torch.equal(shaped().detach(), torch.tensor(TOKEN_LOGPS, dtype=torch.float64))
    with pytest.raises(ValueError, match="eos"):
        token_shaper(SmpoConfig(invert_rejected_eos=True), None)
    assert token_shaper(SmpoConfig(min_log_prob=-2.3), None) is not None


def test_shaped_sums_drive_the_preference_term_and_rewards_but_never_the_nll() -> None:
    plain = means([-0.5], [-0.6])  # Δ = 0.1: smooth_lower_bound 0.09
    plain.shaped = means([-0.5], [-1.0])  # Δ = 0.5 >= m: 0
    out = smpo_loss(plain, beta=1.2, margin=0.35, chosen_sft_ratio=0.8)
    assert out.per_pair_loss.tolist() == [0.0]
    assert out.rejected_reward.tolist() == pytest.approx([-1.2])
    # NLLs from the plain sums: 0.5 and 0.6; total = 0 + 0.8 * 0.5 + 0.2 * 0.6 = 0.52.
    assert out.metrics == pytest.approx({"target_margin": 0.35, "chosen_sft_loss": 0.5, "rejected_sft_loss": 0.6})
    assert float(total_loss(out, plain, PairCounts.of(plain)).detach()) == pytest.approx(0.52)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lower_clip_percentile", 0.0),
        ("lower_clip_percentile", 0.6),
        ("upper_clip_percentile", 0.4),
        ("upper_clip_percentile", 1.0),
        ("min_log_prob", 0.0),
    ],
)
def test_shaping_option_checks(field: str, value: float) -> None:
    options: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=field):
        SmpoConfig(**options)


# --- the margin schedule ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.01),  # the initial margin
        (50, 0.18),  # 0.01 + (0.35 - 0.01) * 0.5
        (100, 0.35),  # the target at max_steps
        (150, 0.35),  # and held there beyond
    ],
)
def test_margin_schedule(step: int, expected: float) -> None:
    assert margin_at(Progress(step, 100), target_margin=0.35, scheduled=True) == pytest.approx(expected)
    assert margin_at(Progress(step, 100), target_margin=0.35, scheduled=False) == 0.35


def test_loss_fn_uses_the_scheduled_margin() -> None:
    policy = means([-0.5], [-0.6])
    out = smpo.smpo_loss_fn(policy, None, Progress(50, 100), cfg=SmpoConfig())
    # Δ = 0.1, m = 0.18: z = 1.2 * -0.08 = -0.096 -> 0.009216.
    assert out.metrics["target_margin"] == pytest.approx(0.18)
    assert out.per_pair_loss.tolist() == pytest.approx([0.009216])


def test_config_defaults_and_checks() -> None:
    cfg = SmpoConfig()
    assert (cfg.beta, cfg.target_margin, cfg.chosen_sft_ratio, cfg.use_margin_schedule) == (1.2, 0.35, 0.8, True)
    assert cfg.loss_type is SmpoVariant.smooth_lower_bound
    assert (cfg.invert_rejected_eos, cfg.lower_clip_percentile, cfg.upper_clip_percentile, cfg.min_log_prob) == (
        False,
        None,
        None,
        None,
    )
    with pytest.raises(ValueError, match="target_margin"):
        SmpoConfig(target_margin=-0.1)
    with pytest.raises(ValueError, match="chosen_sft_ratio"):
        SmpoConfig(chosen_sft_ratio=1.5)


# --- trainer invariants on the tiny random Llama -------------------------------------------------------------------

# Four pairs whose completions differ in length (so per-micro-batch token means would not add up).
PAIRS = [
    ("Hi", "Hello there! How can I help you today? " * 2, "Go away."),
    ("What is 2+2?", "4", "The answer is five, as everyone surely knows by now."),
    ("Name a colour.", "Blue, like the sky on a clear summer day.", "Seven"),
    ("Say yes.", "Yes.", "No, I will not say that, and I will explain why at length."),
]


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", [pair_row(*p) for p in PAIRS])


def _run(compose: Any, out: Path, overrides: list[str]) -> dict[str, float]:
    return run_method(smpo.run, compose, out, overrides)


def _one_step(compose: Any, out: Path, pairs_file: Path, box: Loaded, overrides: list[str]) -> dict[str, Any]:
    _run(compose, out, ["method=smpo", *ONE_SGD_STEP, f"data.sources=[{{path:'{pairs_file}'}}]", *overrides])
    (logged,) = [e for e in read_logs(out) if "loss" in e]
    return {"params": box.trainable(), "loss": logged["loss"], "grad_norm": logged["grad_norm"], "log": logged}


ALL_SHAPING = [
    "method.invert_rejected_eos=true",
    "method.lower_clip_percentile=0.1",
    "method.upper_clip_percentile=0.9",
    "method.min_log_prob=-10.9",
]


@pytest.mark.parametrize("shaping", [[], [*ALL_SHAPING, "method.loss_type=sigmoid"]], ids=["plain", "shaped"])
def test_grad_accumulation_1x4_equals_4x1(
    compose: Any, tmp_path: Path, pairs_file: Path, loaded: Loaded, shaping: list[str]
) -> None:
    """One SGD step: four micro-batches of one pair ≡ one micro-batch of four pairs (loss, grad norm, weights).

    Also with every token shaping option on: its quantiles are per sequence, so micro-batching cannot change them.
    """
    micro = _one_step(
        compose,
        tmp_path / "1x4",
        pairs_file,
        loaded,
        ["method.per_device_train_batch_size=1", "method.gradient_accumulation_steps=4", *shaping],
    )
    initial = loaded.initial
    whole = _one_step(
        compose,
        tmp_path / "4x1",
        pairs_file,
        loaded,
        ["method.per_device_train_batch_size=4", "method.gradient_accumulation_steps=1", *shaping],
    )
    assert all(torch.equal(initial[n], loaded.initial[n]) for n in initial)  # same starting point
    assert micro["loss"] == pytest.approx(whole["loss"], abs=1e-5)
    assert micro["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
    worst = max(initial, key=lambda n: (micro["params"][n] - whole["params"][n]).abs().max().item())
    assert torch.allclose(micro["params"][worst], whole["params"][worst], rtol=0, atol=1e-5), worst
    assert any(not torch.equal(whole["params"][n], initial[n]) for n in initial)  # the step did move them
    assert whole["log"]["target_margin"] == pytest.approx(0.01)  # step 0 of the schedule
    for key in ("rewards/accuracies", "logps/chosen", "chosen_sft_loss", "rejected_sft_loss"):
        assert key in whole["log"], key


def test_run_trains_every_parameter_and_evaluates(compose: Any, tmp_path: Path, loaded: Loaded) -> None:
    overrides = [
        "model=tiny_random",
        "logger=none",
        "method=smpo",
        "data=demo",
        "data.num_train_samples=8",
        "data.max_eval_samples=4",
        "method.max_steps=2",
        "method.per_device_train_batch_size=2",
        "method.per_device_eval_batch_size=4",
        "method.logging_steps=1",
        "method.learning_rate=1e-3",
        "method.save_strategy=no",
        "method.max_length=128",
    ]
    metrics = _run(compose, tmp_path, overrides)
    assert math.isfinite(metrics["train_loss"])
    assert math.isfinite(metrics["eval_loss"])
    final = loaded.trainable()
    unchanged = [n for n in final if torch.equal(final[n], loaded.initial[n])]
    assert not unchanged, unchanged
    margins = [e["target_margin"] for e in read_logs(tmp_path) if "loss" in e]
    assert margins == pytest.approx([0.01, 0.18])  # steps 0 and 1 of 2


def test_shaping_flags_change_the_loss_but_not_the_nll_in_a_run(compose: Any, tmp_path: Path) -> None:
    """Two steps on the demo pairs with and without shaping: same start, so step 1's plain metrics agree."""
    overrides = [
        "model=tiny_random",
        "logger=none",
        "method=smpo",
        "data=demo",
        "data.num_train_samples=4",
        "data.eval_fraction=0",
        "method.max_steps=2",
        "method.per_device_train_batch_size=2",
        "method.logging_steps=1",
        "method.learning_rate=1e-3",
        "method.save_strategy=no",
        "method.eval_strategy=no",
        "method.max_length=128",
    ]
    _run(compose, tmp_path / "plain", overrides)
    _run(compose, tmp_path / "shaped", [*overrides, *ALL_SHAPING])
    plain, shaped_logs = ([e for e in read_logs(tmp_path / n) if "loss" in e] for n in ("plain", "shaped"))
    assert len(plain) == len(shaped_logs) == 2
    first, other = plain[0], shaped_logs[0]
    assert other["loss"] != pytest.approx(first["loss"], rel=1e-3)
    assert other["rewards/rejected"] != pytest.approx(first["rewards/rejected"], rel=1e-3)
    for key in ("chosen_sft_loss", "rejected_sft_loss", "logps/chosen", "logps/rejected"):
        assert other[key] == pytest.approx(first[key], rel=1e-5), key
    assert all(math.isfinite(e["loss"]) for e in shaped_logs)


# --- learning check on the real model -----------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_preference_accuracy_rises(compose: Any, tmp_path: Path) -> None:
    """Held-out pairs: the fraction with mean log-prob chosen > rejected rises above its value before training.

    Measured on 16 held-out pairs: accuracy 0.5 -> 0.6875, mean margin 0.043 -> 0.143, eval loss 1.252 -> 0.507
    (on 32 pairs, for twice the evaluation time: 0.594 -> 0.75 and 1.207 -> 0.449).
    """
    overrides = [
        "model=smollm2_135m",
        "logger=none",
        "method=smpo",
        "data=demo",
        "data.max_eval_samples=16",
        "method.max_steps=6",
        "method.per_device_train_batch_size=4",
        "method.per_device_eval_batch_size=16",
        "method.learning_rate=5e-5",
        "method.use_margin_schedule=false",
        "method.logging_steps=3",
        "method.eval_steps=6",
        "method.save_strategy=no",
        "method.max_length=128",
    ]
    _run(compose, tmp_path, overrides)
    evals = [e for e in read_logs(tmp_path) if "eval_rewards/accuracies" in e]
    before, after = evals[0]["eval_rewards/accuracies"], evals[-1]["eval_rewards/accuracies"]
    print(f"SMPO held-out preference accuracy: {before:.3f} -> {after:.3f}")
    assert evals[0]["step"] == 0
    assert after > before
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
