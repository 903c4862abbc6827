"""SFT: row validation, eval prompts, and trainer invariants on the tiny random Llama.

Trainer tests (STYLE rule 11) call ``alignment.methods.sft.run`` in-process on ``model=tiny_random``; the model
that ``run`` loads is captured (``load_model`` is wrapped) so parameters can be compared before and after.
One-step invariants use plain SGD without clipping: Adam's first step is ``lr * sign(grad)``, which would hide
a wrong gradient scale, while SGD moves each parameter by ``lr * grad`` exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset

from alignment.data.chat_template import render, tokenize_conversation
from alignment.data.load import ORIGIN
from alignment.methods import sft
from alignment.methods.sft import SftConfig, eval_prompts, row_problems
from tests.methods.helpers import ONE_SGD_STEP, Loaded, read_logs, run_method

# Short, fast runs: every evaluation generates 2 short samples from a 4-row eval set.
TINY = [
    "model=tiny_random",
    "logger=none",
    "method.per_device_train_batch_size=2",
    "method.per_device_eval_batch_size=4",
    "method.logging_steps=1",
    "method.num_generation_samples=2",
    "method.max_new_tokens=4",
    "data.max_eval_samples=4",
]
ROWS = [
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there! How can I help you today? " * 2},
    ],
    [{"role": "user", "content": "What is 2+2? Answer briefly, please."}, {"role": "assistant", "content": "4"}],
    [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "y z"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "and again, a second turn"},
    ],
    [
        {"role": "system", "content": "Tell stories."},
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Once upon a time"},
    ],
]


@pytest.fixture
def rows_file(tmp_path: Path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in ROWS), encoding="utf-8")
    return path


@pytest.fixture
def loss_token_counts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record ``num_items_in_batch`` (loss tokens per optimizer step) as the trainer passes it to ``compute_loss``."""
    from alignment.methods.sft_trainer import ChunkedSFTTrainer

    seen: list[int] = []
    real = ChunkedSFTTrainer.compute_loss

    def spy(self: Any, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        if model.training:
            seen.append(int(num_items_in_batch))
        return real(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    monkeypatch.setattr(ChunkedSFTTrainer, "compute_loss", spy)
    return seen


def _run(compose: Any, out: Path, overrides: list[str]) -> dict[str, float]:
    return run_method(sft.run, compose, out, overrides)


def _data(path: Path) -> list[str]:
    return [f"data.sources=[{{path:'{path}'}}]"]


def _assert_params_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(a, key=lambda n: (a[n] - b[n]).abs().max().item())
    assert torch.allclose(a[worst], b[worst], rtol=0, atol=atol), (worst, (a[worst] - b[worst]).abs().max().item())


# --- row_problems ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("messages", ROWS)
def test_row_problems_accepts_valid_rows(messages: list[dict[str, str]]) -> None:
    assert row_problems({"messages": messages}, roles=["assistant"]) == []


@pytest.mark.parametrize(
    ("row", "roles", "expected"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, ["assistant"], "no message with a trained role"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
            ["assistant"],
            "[1].content: empty assistant",
        ),
        (
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
            ["user", "assistant"],
            "[0].content: empty user",
        ),
        ({"messages": "hi"}, ["assistant"], "expected a non-empty list"),
        ({"messages": []}, ["assistant"], "expected a non-empty list"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, ["assistant"], "[0].role: unknown role 'bot'"),
        ({"messages": [{"role": "assistant", "content": 3}]}, ["assistant"], "[0].content: expected a string"),
        ({"messages": ["hi"]}, ["assistant"], "[0]: expected an object"),
        ({"conversation": []}, ["assistant"], "missing column 'messages'"),
    ],
)
def test_row_problems_names_the_column_and_reason(row: dict[str, Any], roles: list[str], expected: str) -> None:
    problems = row_problems(row, roles=roles)
    assert problems
    assert all("'messages'" in p for p in problems), problems
    assert any(expected in p for p in problems), problems


def test_train_on_roles_typo_fails_at_config_time() -> None:
    with pytest.raises(ValueError, match="train_on_roles"):
        SftConfig(train_on_roles=["asistant"])


# --- eval_prompts ---------------------------------------------------------------------------------------------------


def _eval_set(conversations: list[list[dict[str, str]]]) -> Dataset:
    return Dataset.from_list([{"messages": m, ORIGIN: f"rows.jsonl:{i + 1}"} for i, m in enumerate(conversations)])


def test_eval_prompt_ends_with_generation_prompt_and_reference_is_last_answer(smollm2_tokenizer: Any) -> None:
    multi = ROWS[2]
    prompts = eval_prompts(_eval_set([ROWS[0], multi]), smollm2_tokenizer, SftConfig())
    assert [p.origin for p in prompts] == ["rows.jsonl:1", "rows.jsonl:2"]
    assert [p.reference for p in prompts] == [ROWS[0][1]["content"], "and again, a second turn"]
    history = multi[:3]
    suffix = render(smollm2_tokenizer, history, generation_prompt=True)[len(render(smollm2_tokenizer, history)) :]
    assert suffix.strip()  # the template has a generation prompt (``<|im_start|>assistant``)
    assert prompts[1].prompt == render(smollm2_tokenizer, history, generation_prompt=True)
    assert prompts[1].prompt.endswith(suffix)
    assert "y z" in prompts[1].prompt  # earlier answers stay in the prompt
    assert "and again" not in prompts[1].prompt


def test_eval_prompts_inject_system_prompt_only_when_absent(smollm2_tokenizer: Any) -> None:
    cfg = SftConfig(system_prompt="Answer tersely.")
    without, with_own = eval_prompts(_eval_set([ROWS[0], ROWS[3]]), smollm2_tokenizer, cfg)
    assert "Answer tersely." in without.prompt
    assert without.prompt.count("<|im_start|>system") == 1
    assert "Tell stories." in with_own.prompt
    assert "Answer tersely." not in with_own.prompt
    assert with_own.prompt.count("<|im_start|>system") == 1


def test_eval_prompts_cap_and_skip_rows_without_a_prompt(smollm2_tokenizer: Any) -> None:
    opening = [{"role": "assistant", "content": "Hi, I start."}]
    rows = _eval_set([opening, ROWS[0], ROWS[1], ROWS[2]])
    assert [p.origin for p in eval_prompts(rows, smollm2_tokenizer, SftConfig(num_generation_samples=3))] == [
        "rows.jsonl:2",
        "rows.jsonl:3",
    ]
    assert eval_prompts(rows, smollm2_tokenizer, SftConfig(num_generation_samples=0)) == []


# --- a run on the tiny random Llama ---------------------------------------------------------------------------------


def _assert_every_trainable_param_changed(box: Loaded) -> None:
    final = box.trainable()
    assert final.keys() == box.initial.keys()
    unchanged = [n for n in final if torch.equal(final[n], box.initial[n])]
    assert not unchanged, unchanged


def _assert_run_outputs(out: Path, metrics: dict[str, float]) -> None:
    assert math.isfinite(metrics["train_loss"])
    assert math.isfinite(metrics["eval_loss"])
    assert "eval_exact_match" in metrics
    logs = read_logs(out)
    assert any("loss" in e for e in logs)
    assert any("eval_loss" in e for e in logs)
    # TRL's token metrics survive the chunked loss, in training and evaluation
    assert all(0 <= e["mean_token_accuracy"] <= 1 and e["entropy"] > 0 for e in logs if "loss" in e)
    assert all(0 <= e["eval_mean_token_accuracy"] <= 1 and e["eval_entropy"] > 0 for e in logs if "eval_loss" in e)
    files = sorted((out / "generations").glob("step_*.jsonl"))
    assert files
    rows = [json.loads(line) for line in files[-1].read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert set(row) == {"origin", "prompt", "reference", "generation"}
        assert "test.jsonl:" in row["origin"]  # eval rows, with file:line
        assert row["prompt"].rstrip().endswith("assistant")


def test_run_full_fine_tune(compose: Any, tmp_path: Path, loaded: Loaded) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    metrics = _run(compose, out, [*TINY, "method.max_steps=3", "method.eval_steps=2", "method.learning_rate=1e-3"])
    _assert_run_outputs(out, metrics)
    assert {f.name for f in (out / "generations").iterdir()} == {f"step_{s:06d}.jsonl" for s in (0, 2, 3)}
    _assert_every_trainable_param_changed(loaded)
    saved = dict(AutoModelForCausalLM.from_pretrained(out / "model").named_parameters())
    for name, param in loaded.model.named_parameters():
        assert torch.equal(saved[name], param.detach()), name


def test_run_lora_trains_only_adapters(compose: Any, tmp_path: Path, loaded: Loaded) -> None:
    out = tmp_path / "run"
    overrides = [*TINY, "model.lora.enabled=true", "method.max_steps=3", "method.learning_rate=1e-3"]
    metrics = _run(compose, out, overrides)
    _assert_run_outputs(out, metrics)
    assert loaded.initial
    assert all("lora_" in n for n in loaded.initial)
    _assert_every_trainable_param_changed(loaded)
    assert loaded.frozen
    for name, param in loaded.model.named_parameters():
        if name in loaded.frozen:
            assert torch.equal(param.detach(), loaded.frozen[name]), name
    assert (out / "model" / "adapter_config.json").is_file()
    assert (out / "model" / "adapter_model.safetensors").is_file()
    assert not (out / "model" / "model.safetensors").exists()


def test_train_loss_is_finite_with_packing_and_padded_batches(compose: Any, tmp_path: Path) -> None:
    """The default (padding-free) runs everywhere else in this file; packing and padded batches run here."""
    for flag in ("method.packing=true", "method.padding_free=false"):
        out = tmp_path / flag.split(".")[1].split("=")[0]
        overrides = [*TINY, flag, "method.max_steps=2", "method.eval_on_start=false", "method.max_length=256"]
        metrics = _run(compose, out, overrides)
        assert math.isfinite(metrics["train_loss"]), flag
        assert math.isfinite(metrics["eval_loss"]), flag
        assert [e["step"] for e in read_logs(out) if "loss" in e] == [1, 2], flag


# --- invariants -----------------------------------------------------------------------------------------------------


def _one_step(compose: Any, out: Path, rows_file: Path, box: Loaded, overrides: list[str]) -> dict[str, Any]:
    _run(compose, out, [*ONE_SGD_STEP, *_data(rows_file), *overrides])
    (logged,) = [e for e in read_logs(out) if "loss" in e]
    return {"params": box.trainable(), "loss": logged["loss"], "grad_norm": logged["grad_norm"]}


def _expected_loss_tokens(tokenizer: Any) -> int:
    """Loss tokens of ROWS as the causal shift sees them: labels ``[1:]`` that are not -100.

    tiny_random carries SmolLM2's tokenizer, so the session's SmolLM2 tokenizer fixture gives the same ids.
    """
    return sum(
        sum(label != -100 for label in tokenize_conversation(tokenizer, m, ["assistant"], 512).labels[1:]) for m in ROWS
    )


def test_grad_accumulation_1x4_equals_4x1(
    compose: Any,
    tmp_path: Path,
    rows_file: Path,
    loaded: Loaded,
    loss_token_counts: list[int],
    smollm2_tokenizer: Any,
) -> None:
    """One SGD step: four micro-batches of one conversation each ≡ one micro-batch of all four.

    The rows differ in trained length, so only a loss normalised by the tokens of the whole accumulation window
    (HF ``num_items_in_batch``) makes the two agree; a per-micro-batch mean would weight the 2-token answer
    as much as the 22-token one.
    """
    micro = _one_step(
        compose,
        tmp_path / "1x4",
        rows_file,
        loaded,
        ["method.per_device_train_batch_size=1", "method.gradient_accumulation_steps=4"],
    )
    # One count per micro-batch, each the total of the whole window.
    assert loss_token_counts == [_expected_loss_tokens(smollm2_tokenizer)] * 4
    initial = loaded.initial
    whole = _one_step(
        compose,
        tmp_path / "4x1",
        rows_file,
        loaded,
        ["method.per_device_train_batch_size=4", "method.gradient_accumulation_steps=1"],
    )
    assert loaded.initial.keys() == initial.keys()
    assert all(torch.equal(initial[n], loaded.initial[n]) for n in initial)  # same starting point
    assert loss_token_counts[-1] == loss_token_counts[0]
    assert micro["loss"] == pytest.approx(whole["loss"], abs=1e-5)
    assert micro["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
    _assert_params_close(micro["params"], whole["params"], atol=1e-5)
    assert any(not torch.equal(whole["params"][n], initial[n]) for n in initial)  # the step did move them


@pytest.mark.parametrize("flag", ["method.packing=true", "method.padding_free=true"])  # the latter is the default
def test_packing_and_padding_free_keep_every_loss_token(
    compose: Any,
    tmp_path: Path,
    rows_file: Path,
    loaded: Loaded,
    loss_token_counts: list[int],
    smollm2_tokenizer: Any,
    flag: str,
) -> None:
    """One SGD step on the four rows packed (or concatenated padding-free) ≡ the same step on a padded batch.

    Same loss-token count (no label lost at sequence boundaries), same loss and same update (attention does
    not cross sequence boundaries, thanks to per-sequence position ids).
    """
    padded_batch = ["method.per_device_train_batch_size=4", "method.padding_free=false"]
    padded = _one_step(compose, tmp_path / "padded", rows_file, loaded, padded_batch)
    packed = _one_step(compose, tmp_path / "packed", rows_file, loaded, ["method.per_device_train_batch_size=4", flag])
    assert loss_token_counts == [_expected_loss_tokens(smollm2_tokenizer)] * 2
    assert packed["loss"] == pytest.approx(padded["loss"], abs=1e-5)
    _assert_params_close(packed["params"], padded["params"], atol=1e-5)


def test_resume_from_checkpoint_matches_uninterrupted_run(compose: Any, tmp_path: Path, loaded: Loaded) -> None:
    """AdamW, 4 steps, checkpoint every 2: resuming from checkpoint-2 ends at the uninterrupted run's weights."""
    overrides = [
        *TINY,
        "method.max_steps=4",
        "method.save_steps=2",
        "method.learning_rate=1e-3",
        "method.warmup_steps=1",
        "method.eval_strategy=no",
    ]
    full_dir = tmp_path / "full"
    _run(compose, full_dir, overrides)
    full = loaded.trainable()
    checkpoint = full_dir / "checkpoints" / "checkpoint-2"
    assert checkpoint.is_dir()

    resumed_dir = tmp_path / "resumed"
    _run(compose, resumed_dir, [*overrides, f"method.resume_from_checkpoint='{checkpoint}'"])
    # metrics.jsonl starts from the checkpoint's log history (steps 1-2, as written then), then steps 3-4 trained
    assert [e["step"] for e in read_logs(resumed_dir) if "loss" in e] == [1, 2, 3, 4]
    assert read_logs(resumed_dir)[:2] == read_logs(full_dir)[:2]
    assert not any(
        "eval_loss" in e for e in read_logs(full_dir)
    )  # eval_strategy=no: no evaluation, not even at the end
    full_losses = {e["step"]: e["loss"] for e in read_logs(full_dir) if "loss" in e}
    for entry in (e for e in read_logs(resumed_dir) if "loss" in e):
        assert entry["loss"] == pytest.approx(full_losses[entry["step"]], abs=1e-6)
    _assert_params_close(loaded.trainable(), full, atol=1e-6)
    assert not torch.equal(loaded.trainable()["model.norm.weight"], loaded.initial["model.norm.weight"])


# --- learning check on the real model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_training_loss_falls(compose: Any, tmp_path: Path) -> None:
    """6 steps of 4 demo conversations: the mean loss of the last 3 steps is below that of the first 3.

    Measured: 1.106, 0.900, 0.769, 0.572, 0.546, 0.461 (means 0.925 -> 0.526).
    """
    out = tmp_path / "run"
    overrides = [
        "model=smollm2_135m",
        "logger=none",
        "method.max_steps=6",
        "method.per_device_train_batch_size=4",
        "method.per_device_eval_batch_size=8",
        "method.learning_rate=1e-4",
        "method.logging_steps=1",
        "method.eval_on_start=false",
        "method.eval_steps=6",
        "method.save_strategy=no",
        "method.num_generation_samples=2",
        "method.max_new_tokens=16",
        "data.max_eval_samples=8",
    ]
    metrics = _run(compose, out, overrides)
    losses = [e["loss"] for e in read_logs(out) if "loss" in e]
    assert len(losses) == 6
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, losses
    assert math.isfinite(metrics["eval_loss"])
