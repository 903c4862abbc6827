"""Reward model (Bradley-Terry): hand-computed losses, bad input, the trainer's invariants, save/load, the CLI.

Values use ``softplus(x) = log(1 + e^x) = -logsigmoid(-x)``: ``softplus(-2) = 0.126928``, ``softplus(-1) =
0.313262``, ``softplus(0) = ln 2 = 0.693147``, ``softplus(1) = 1.313262``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import set_seed

from alignment.data import demo, demo_reward
from alignment.data.validate import DataError
from alignment.methods.pairwise.core import row_problems
from alignment.methods.seqcls.reward import RewardCollator, RewardConfig, RewardObjective, bt_loss
from alignment.models.config import TruncationSide
from alignment.models.seqcls import load_reward_model, score_conversations
from alignment.registry import METHODS, reward
from tests.conftest import launch
from tests.methods.helpers import pair_row, read_logs, run_method, trainable, write_jsonl

LN2 = math.log(2.0)


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- the loss ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chosen", "rejected", "kwargs", "expected"),
    [
        ([1.0], [-1.0], {}, 0.126928),  # softplus(-2)
        ([1.0], [-1.0], {"margin": t([1.0])}, 0.313262),  # softplus(-(2 - 1))
        ([1.0], [0.0], {"center_rewards_coefficient": 0.01}, 0.323262),  # softplus(-1) + 0.01 * 1²
        ([0.5], [0.5], {"margin": t([1.0]), "center_rewards_coefficient": 0.5}, 1.813262),  # softplus(1) + 0.5 * 1²
        ([0.0, 2.0], [0.0, 0.0], {}, (LN2 + 0.126928) / 2),  # per pair, then the mean
    ],
)
def test_bt_loss_hand_computed(
    chosen: list[float], rejected: list[float], kwargs: dict[str, Any], expected: float
) -> None:
    assert float(bt_loss(t(chosen), t(rejected), **kwargs).mean()) == pytest.approx(expected, abs=1e-6)


def test_margin_is_subtracted_per_pair_not_broadcast_like_trl_0_16() -> None:
    """Pairs (r_w - r_l) = (2, 2) with margins (0, 2): per pair softplus(-2) and ln 2, mean 0.410038.

    TRL 0.16 computed ``(B, 1) - (B,)``: the 2x2 matrix [[2-0, 2-2], [2-0, 2-2]] whose mean is 0.410038 here by
    coincidence only when both differences are equal; with (3, 1) and margins (0, 2) per pair gives softplus(-3) and
    softplus(1): (0.048587 + 1.313262) / 2 = 0.680924, the broadcast mean is (sp(-3) + sp(-1) + sp(-1) + sp(1)) / 4.
    """
    per_pair = bt_loss(t([3.0, 1.0]), t([0.0, 0.0]), margin=t([0.0, 2.0]))
    assert per_pair.tolist() == pytest.approx([0.048587, 1.313262], abs=1e-6)
    broadcast = -torch.nn.functional.logsigmoid(t([[3.0], [1.0]]) - t([0.0, 2.0])).mean()
    assert float(broadcast) == pytest.approx((0.048587 + 0.313262 + 0.313262 + 1.313262) / 4, abs=1e-6)
    assert float(per_pair.mean()) != pytest.approx(float(broadcast), abs=1e-3)


def test_limiting_cases() -> None:
    """Equal scores: ln 2; a large score gap: the loss vanishes; no margin equals a zero margin."""
    scores = t([0.3, -1.2])
    assert bt_loss(scores, scores).tolist() == pytest.approx([LN2, LN2])
    assert float(bt_loss(t([40.0]), t([0.0]))) == pytest.approx(0.0, abs=1e-12)
    assert torch.equal(bt_loss(t([1.0, 2.0]), t([0.5, 3.0])), bt_loss(t([1.0, 2.0]), t([0.5, 3.0]), margin=t([0, 0])))


def test_gradients_are_finite_and_push_chosen_up_rejected_down() -> None:
    chosen = torch.tensor([0.2, -3.0, 50.0], requires_grad=True)
    rejected = torch.tensor([0.1, 4.0, -50.0], requires_grad=True)
    bt_loss(chosen, rejected, margin=torch.tensor([1.0, 0.0, 0.0]), center_rewards_coefficient=0.01).mean().backward()
    assert chosen.grad is not None
    assert rejected.grad is not None
    assert torch.isfinite(chosen.grad).all()
    assert torch.isfinite(rejected.grad).all()
    no_centre_chosen = torch.tensor([0.2], requires_grad=True)
    bt_loss(no_centre_chosen, torch.tensor([0.1])).sum().backward()
    assert no_centre_chosen.grad is not None
    assert float(no_centre_chosen.grad) < 0


def test_objective_splits_chosen_then_rejected_and_summarises(tmp_path: Path) -> None:
    objective = RewardObjective(0.0, tmp_path / "hist.png")
    scores = torch.tensor([[2.0], [0.0], [1.0], [0.5]])  # chosen (2, 0), rejected (1, 0.5)
    per_pair, record = objective.loss(scores, {"margin": torch.zeros(2)})
    assert per_pair.tolist() == pytest.approx([0.313262, 0.974077], abs=1e-6)  # softplus(-1), softplus(0.5)
    summary = objective.summarize(record, mode="eval", step=3, main_process=True)
    assert summary == pytest.approx(
        {"rewards/accuracies": 0.5, "rewards/margins": 0.25, "rewards/chosen": 1.0, "rewards/rejected": 0.75}
    )
    assert (tmp_path / "hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collator_pads_right_with_chosen_rows_first() -> None:
    batch = RewardCollator(pad_token_id=0)(
        [
            {"chosen_input_ids": [5, 6, 7], "rejected_input_ids": [5, 8], "margin": 1.5},
            {"chosen_input_ids": [9], "rejected_input_ids": [9, 9, 9, 9], "margin": 0.0},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0], [5, 8, 0, 0], [9, 9, 9, 9]]
    assert batch["attention_mask"].sum(-1).tolist() == [3, 1, 2, 4]
    assert batch["margin"].tolist() == [1.5, 0.0]


def test_config_registered_and_rejects_negative_centring(compose: Any) -> None:
    assert METHODS["reward"].schema is RewardConfig
    cfg = compose(["method=reward", "model=tiny_random"])
    assert cfg.method.name == "reward"
    assert cfg.method.truncation_side == "left"
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        RewardConfig(center_rewards_coefficient=-0.1)


# --- runs on the tiny random model --------------------------------------------------------------------------------

PAIRS = [
    pair_row("Hi", "Hello there! How can I help you today? " * 2, "Go away."),
    pair_row("What is 2+2?", "4", "2 + 2 is 5, as everybody knows."),
    {**pair_row("Name a colour.", "Blue, like the sky on a clear summer day.", "Car"), "margin": 2.0},
    pair_row("Say yes.", "Yes.", "No, I will not say that."),
]
ONE_SGD_STEP = [
    "model=tiny_random",
    "method=reward",
    "logger=none",
    "data.eval_fraction=0",
    "method.max_steps=1",
    "method.logging_steps=1",
    "method.optim=sgd",
    "method.learning_rate=1.0",
    "method.max_grad_norm=0",
    "method.save_strategy=no",
    "method.eval_strategy=no",
    "method.center_rewards_coefficient=0.1",
]


def test_grad_accumulation_1x4_equals_4x1(compose: Any, tmp_path: Path, models: list[Any]) -> None:
    """One SGD step with a margin and centring: four micro-batches of one pair == one micro-batch of four."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    source = f"data.sources=[{{path:'{data}'}}]"
    shapes = {"1x4": ("1", "4"), "4x1": ("4", "1")}
    logged = {}
    for name, (batch, accumulation) in shapes.items():
        overrides = [
            *ONE_SGD_STEP,
            source,
            f"method.per_device_train_batch_size={batch}",
            f"method.gradient_accumulation_steps={accumulation}",
        ]
        torch.manual_seed(0)  # the new score head is drawn at load (the runner seeds before every run)
        run_method(reward.run, compose, tmp_path / name, overrides)
        (logged[name],) = [e for e in read_logs(tmp_path / name) if "loss" in e]
    (micro, start), (whole, whole_start) = models
    assert all(torch.equal(start[n], whole_start[n]) for n in start)
    assert logged["1x4"]["loss"] == pytest.approx(logged["4x1"]["loss"], abs=1e-5)
    assert logged["1x4"]["grad_norm"] == pytest.approx(logged["4x1"]["grad_norm"], rel=1e-5)
    final_micro, final_whole = trainable(micro), trainable(whole)
    assert all(torch.allclose(final_micro[n], final_whole[n], rtol=0, atol=1e-5) for n in final_micro)
    assert all(not torch.equal(final_whole[n], start[n]) for n in final_whole)  # every trainable tensor moved


@pytest.mark.parametrize("lora", [False, True])
def test_saved_model_loads_and_scores_like_the_trained_one(
    compose: Any, tmp_path: Path, models: list[Any], lora: bool
) -> None:
    """What ``method=reward`` saves loads through ``load_reward_model`` and gives the trained model's scores."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    overrides = [
        "model=tiny_random",
        "method=reward",
        "logger=none",
        f"data.sources=[{{path:'{data}', eval_path:'{data}'}}]",
        "method.max_steps=2",
        "method.per_device_train_batch_size=2",
        "method.learning_rate=1e-2",
        "method.save_strategy=no",
        f"model.lora.enabled={str(lora).lower()}",
    ]
    metrics = run_method(reward.run, compose, tmp_path / "run", overrides)
    assert 0.0 <= metrics["eval_rewards/accuracies"] <= 1.0
    (trained, start) = models[0]
    moved = trainable(trained)
    if lora:
        assert all("lora_" in n or ".score." in n for n in moved)
        assert any(".score.modules_to_save." in n for n in moved)  # the head trains beside the adapters
        assert (tmp_path / "run" / "model" / "adapter_config.json").is_file()
    assert all(not torch.equal(moved[n], start[n]) for n in moved)
    loaded, tokenizer = load_reward_model(str(tmp_path / "run" / "model"))
    assert loaded.config.num_labels == 1
    trained.eval()
    conversations = [p["prompt"] + p[side] for p in PAIRS for side in ("chosen", "rejected")]
    expected = score_conversations(trained, tokenizer, conversations, max_length=1024)
    got = score_conversations(loaded, tokenizer, conversations, max_length=1024)
    assert got == pytest.approx(expected, abs=1e-4)
    assert len(set(got)) > 1


def test_run_eval_logs_pairwise_metrics_before_and_after(compose: Any, tmp_path: Path) -> None:
    """Eval at steps 0, 1, 2 over all 4 pairs (an uneven last batch is not double counted); token-budget batches."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    overrides = [
        "model=tiny_random",
        "method=reward",
        "logger=none",
        f"data.sources=[{{path:'{data}', eval_path:'{data}'}}]",
        "method.max_steps=2",
        "method.eval_steps=1",
        "method.per_device_train_batch_size=2",
        "method.per_device_eval_batch_size=3",  # an uneven last eval batch
        "method.logging_steps=1",
        "method.save_strategy=no",
        "method.max_tokens_per_batch=150",  # whole pairs up to 150 tokens (both sides) per micro-batch
    ]
    run_method(reward.run, compose, tmp_path / "run", overrides)
    evals = [e for e in read_logs(tmp_path / "run") if "eval_loss" in e]
    assert [e["step"] for e in evals] == [0, 1, 2]
    for entry in evals:
        margins = entry["eval_rewards/chosen"] - entry["eval_rewards/rejected"]
        assert entry["eval_rewards/margins"] == pytest.approx(margins, abs=1e-6)
        assert entry["eval_rewards/accuracies"] in {0.0, 0.25, 0.5, 0.75, 1.0}  # 4 pairs, none repeated
    train_logs = [e for e in read_logs(tmp_path / "run") if "loss" in e]
    assert all("rewards/accuracies" in e for e in train_logs)
    assert (tmp_path / "run" / "reward_scores.png").is_file()


# --- bad input fails before anything loads -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}]},
            "'rejected'",
        ),
        ({**pair_row("q", "a", "b"), "margin": "big"}, "column 'margin': expected a number"),
        ({**pair_row("q", "a", "b"), "chosen": [{"role": "robot", "content": "a"}]}, "unknown role 'robot'"),
        # A string is one assistant turn (README "Data formats"); a number is neither that nor a message list.
        ({**pair_row("q", "a", "b"), "rejected": 5}, "column 'rejected': expected a non-empty list"),
    ],
)
def test_bad_rows_fail_with_file_line_before_loading(
    compose: Any, tmp_path: Path, models: list[Any], row: dict[str, Any], expected: str
) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], row])
    with pytest.raises(DataError) as failure:
        run_method(reward.run, compose, tmp_path / "run", [*ONE_SGD_STEP, f"data.sources=[{{path:'{data}'}}]"])
    assert f"{data}:2" in str(failure.value)
    assert expected in str(failure.value)
    assert models == []  # no model was loaded


def test_identical_and_cut_pairs_are_dropped_and_counted(
    smollm2_tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from datasets import Dataset

    rows = [pair_row("q", "same", "same"), pair_row("q " * 50, "long answer", "other"), pair_row("q", "a", "b")]
    rows = [{**r, "margin": None} for r in rows]
    with caplog.at_level("WARNING"):
        out = reward.tokenize_reward_pairs(
            Dataset.from_list(rows), smollm2_tokenizer, max_length=60, truncation_side=TruncationSide.left
        )
    assert len(out) == 2
    assert "1 of 3 cut to max_length=60 (left side); 1 dropped" in caplog.text
    assert all(len(ids) <= 60 for ids in out["chosen_input_ids"])
    # left truncation keeps the end: the answers still differ, so the cut pair survives
    assert out[0]["chosen_input_ids"][-3:] != out[0]["rejected_input_ids"][-3:]


# --- the CLI --------------------------------------------------------------------------------------------------------


def test_cli_run_writes_metrics_histogram_and_a_loadable_model(tmp_path: Path) -> None:
    result = launch(
        [
            "model=tiny_random",
            "method=reward",
            "logger=none",
            "data.num_train_samples=16",
            "data.max_eval_samples=8",
            "method.max_steps=3",
            "method.per_device_train_batch_size=4",
            "method.logging_steps=1",
            "method.save_strategy=no",
            "method.max_length=128",
            "method.center_rewards_coefficient=0.01",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [p.parent for p in (tmp_path / "outputs").rglob("results.json")]
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    assert json.dumps(results)  # plain JSON
    logged = read_logs(run_dir)
    assert any("eval_rewards/accuracies" in e for e in logged)
    assert (run_dir / "reward_scores.png").read_bytes()[:4] == b"\x89PNG"
    model, tokenizer = load_reward_model(str(run_dir / "model"))
    (score,) = score_conversations(model, tokenizer, [[{"role": "user", "content": "1 + 1 = ?"}]])
    assert math.isfinite(score)


# --- the demo reward pairs ----------------------------------------------------------------------------------------


def _true_equation(text: str) -> str:
    """``a op b`` from ``"a op b = c"``, checking that the equation is true."""
    expression, result = text.split(" = ")
    a, op, b = expression.split(" ")
    assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(result), text
    return expression


def test_shipped_demo_reward_pairs_match_the_generator_and_differ_only_in_relevance(tmp_path: Path) -> None:
    """Chosen: the question's true equation; rejected: a true equation of another problem with the same operator."""
    written = demo_reward.write(tmp_path)
    assert [p.name for p in written] == ["reward_train.jsonl", "reward_test.jsonl"]
    questions: dict[str, set[str]] = {}
    for path in written:
        assert path.read_bytes() == (demo.DEMO_DIR / path.name).read_bytes(), (
            "stale: python -m alignment.data.demo_reward"
        )
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert all(row_problems(r) == [] for r in rows)
        questions[path.name] = set()
        for row in rows:
            (question,) = row["prompt"]
            asked = re.search(r"\d+ [-+*] \d+", question["content"]).group()  # type: ignore[union-attr]
            chosen = _true_equation(row["chosen"][0]["content"])
            rejected = _true_equation(row["rejected"][0]["content"])
            assert chosen == asked
            assert rejected != asked
            assert chosen.split(" ")[1] == rejected.split(" ")[1]  # same operator: only the operands tell them apart
            questions[path.name].add(chosen)
    assert [len(questions[p.name]) for p in written] == [demo_reward.NUM_TRAIN, 100]
    assert questions["reward_train.jsonl"].isdisjoint(questions["reward_test.jsonl"])


# --- learning check on the real model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_reward_model_ranks_held_out_demo_pairs(compose: Any, tmp_path: Path) -> None:
    """SmolLM2-135M with LoRA, 4 steps of 8 ``data=demo_reward`` pairs: 50 held-out pairs ranked right.

    What the model learns is relevance, not arithmetic: both answers are true equations with the question's
    operator, and only the chosen one has the question's operands, so ranking means matching the answer's operands
    against the question. Measured (seed 42, 50 held-out pairs): 4 steps gave accuracy 0.36 -> 1.0, mean margin
    -0.06 -> 2.76, eval loss 0.728 -> 0.124; 8 steps gave 0.36 -> 1.0, -0.06 -> 3.41, 0.728 -> 0.071 for twice the
    training time. Seeds 1 and 2 gave 0.61 -> 1.0 and 0.23 -> 1.0 on 64 pairs after 4 steps. On the ``data=demo``
    pairs (is ``c`` right in ``a op b = c``?) a 135M model stays at chance within a CPU budget (full fine-tuning, 100
    steps of 8 pairs: 0.53 -> 0.56).
    """
    overrides = [
        "model=smollm2_135m",
        "model.lora.enabled=true",
        "method=reward",
        "data=demo_reward",
        "data.max_eval_samples=50",
        "logger=none",
        "method.max_steps=4",
        "method.per_device_train_batch_size=8",
        "method.per_device_eval_batch_size=50",
        "method.learning_rate=1e-3",
        "method.logging_steps=2",
        "method.eval_steps=4",
        "method.save_strategy=no",
        "method.max_length=64",
    ]
    set_seed(42)  # as the runner does
    run_method(reward.run, compose, tmp_path / "run", overrides)
    evals = [e for e in read_logs(tmp_path / "run") if "eval_loss" in e]
    before, after = evals[0], evals[-1]
    print({k: (before[k], after[k]) for k in ("eval_rewards/accuracies", "eval_rewards/margins", "eval_loss")})
    assert (before["step"], after["step"]) == (0, 4)
    assert before["eval_rewards/accuracies"] < 0.65  # an untrained head ranks at about chance
    assert after["eval_rewards/accuracies"] >= 0.9  # 45 of the 50 held-out pairs
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"] + 1.0
    assert after["eval_loss"] < 0.2 < before["eval_loss"]
