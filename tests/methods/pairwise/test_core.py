"""The shared pairwise core: pair validation, tokenisation, the packed forward, step normalisation, the reference.

Trainer tests (STYLE rule 11) run :class:`PairwiseTrainer` or :func:`run_pairwise` in-process on the tiny random
Llama with a sigmoid-DPO-like loss written here, so they do not depend on any method module. One-step
invariants use plain SGD with lr 1 and no clipping, so a parameter moves by exactly its gradient.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from datasets import Dataset
from transformers import AutoTokenizer, TrainingArguments

import alignment.models.load as model_loading
from alignment.config import RunConfig, to_run_config
from alignment.context import RunContext
from alignment.data.chat_template import IGNORE_INDEX
from alignment.data.config import DataConfig, SourceConfig
from alignment.data.mix import build_splits
from alignment.data.validate import DataError
from alignment.methods.pairwise.core import (
    COLUMNS,
    PairCollator,
    PairCounts,
    PairLogps,
    PairwiseConfig,
    PreferenceLoss,
    Progress,
    batch_counts,
    reference_logps,
    row_problems,
    run_pairwise,
    sequence_logps,
    split_implicit_prompt,
    tokenize_pairs,
    total_loss,
)
from alignment.methods.pairwise.trainer import PairwiseTrainer
from alignment.models.config import ReferenceKind
from alignment.models.frozen import FrozenModel
from alignment.task import IntervalStrategy, MethodConfig, SchedulerType
from tests.methods.helpers import sgd_step_args, tiny_model

USER = {"role": "user", "content": "What is 2 + 3?"}
GOOD = {"role": "assistant", "content": "2 + 3 = 5"}
BAD = {"role": "assistant", "content": "2 + 3 = 6"}
# Pairs of different prompt and completion lengths; the second is in the implicit-prompt form.
PAIRS: list[dict[str, Any]] = [
    {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD], "margin": 0.5},
    {
        "prompt": None,
        "chosen": [{"role": "system", "content": "Be brief."}, USER, GOOD],
        "rejected": [{"role": "system", "content": "Be brief."}, USER, {"role": "assistant", "content": "six " * 9}],
        "margin": None,
    },
    {
        "prompt": [{"role": "user", "content": "Name a colour, then explain at some length why you like it."}],
        "chosen": [{"role": "assistant", "content": "Blue, because it is the colour of the sea and of the sky."}],
        "rejected": [{"role": "assistant", "content": "Ok"}],
        "margin": 1.0,
    },
    {
        "prompt": [USER, GOOD, {"role": "user", "content": "And 3 + 4?"}],
        "chosen": [{"role": "assistant", "content": "7"}],
        "rejected": [{"role": "assistant", "content": "8, I think"}],
        "margin": None,
    },
]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _load(path: Path) -> Dataset:
    splits = build_splits(DataConfig(sources=[SourceConfig(path=str(path))], eval_fraction=0), row_problems, COLUMNS)
    return splits.train


def dpo_like(policy: PairLogps, reference: PairLogps | None, progress: Progress) -> PreferenceLoss:
    """Sigmoid DPO (beta 0.5) plus chosen and rejected NLL terms, so both normalisations are exercised."""
    assert reference is not None
    chosen = 0.5 * (policy.chosen - reference.chosen)
    rejected = 0.5 * (policy.rejected - reference.rejected)
    per_pair = -F.logsigmoid(chosen - rejected)
    return PreferenceLoss(per_pair, chosen.detach(), rejected.detach(), chosen_nll_weight=0.3, rejected_nll_weight=0.1)


# --- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "column", "reason"),
    [
        ({"prompt": [USER], "chosen": [GOOD]}, "'rejected'", "missing column"),
        ({"prompt": [USER], "chosen": [GOOD], "rejected": []}, "'rejected'", "non-empty list"),
        (
            {"prompt": [USER], "chosen": [{"role": "assistant", "content": "  "}], "rejected": [BAD]},
            "'chosen'",
            "empty completion",
        ),
        ({"prompt": [USER], "chosen": [GOOD], "rejected": [USER]}, "'rejected'", "must all be assistant turns"),
        ({"prompt": [USER, GOOD], "chosen": [GOOD], "rejected": [BAD]}, "'prompt'", "ends on an assistant turn"),
        ({"chosen": [USER, GOOD], "rejected": [{**USER, "content": "Hi"}, BAD]}, "'chosen'/'rejected'", "no shared"),
        ({"chosen": [USER, GOOD, USER, GOOD], "rejected": [USER, GOOD, BAD]}, "'chosen'/'rejected'", "assistant"),
        ({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD], "margin": "high"}, "'margin'", "expected a number"),
        ({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD], "margin": True}, "'margin'", "expected a number"),
        ({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD], "margin": float("nan")}, "'margin'", "finite"),
    ],
)
def test_bad_pairs_fail_with_file_line_and_column(
    tmp_path: Path, row: dict[str, Any], column: str, reason: str
) -> None:
    good = {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}
    path = _write(tmp_path / "pairs.jsonl", [good, row])
    with pytest.raises(DataError) as err:
        _load(path)
    line = next(entry for entry in str(err.value).splitlines() if f"{path}:2:" in entry)
    assert column in line
    assert reason in line
    assert f"{path}:1:" not in str(err.value)


def test_implicit_prompt_rows_are_split_at_the_shared_prefix(tmp_path: Path) -> None:
    system = {"role": "system", "content": "Be brief."}
    rows = [
        {"chosen": [system, USER, GOOD], "rejected": [system, USER, BAD]},
        {"chosen": [USER, GOOD, USER, GOOD], "rejected": [USER, GOOD, USER, BAD]},
    ]
    dataset = _load(_write(tmp_path / "implicit.jsonl", rows))
    assert dataset["prompt"] == [None, None]
    assert dataset["margin"] == [None, None]
    assert split_implicit_prompt(dataset[0]["chosen"], dataset[0]["rejected"]) == ([system, USER], [GOOD], [BAD])
    assert split_implicit_prompt(dataset[1]["chosen"], dataset[1]["rejected"]) == ([USER, GOOD, USER], [GOOD], [BAD])


def test_optional_columns_absent_from_some_rows_load_as_null(tmp_path: Path) -> None:
    rows = [
        {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD], "margin": 0.5},
        {"chosen": [USER, GOOD], "rejected": [USER, BAD]},
    ]
    dataset = _load(_write(tmp_path / "mixed.jsonl", rows))
    assert dataset["margin"] == [0.5, None]
    assert dataset["prompt"] == [[USER], None]


# --- tokenisation ------------------------------------------------------------------------------------------


def _trained(ids: list[int], labels: list[int]) -> list[int]:
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))
    return [label for label in labels if label != IGNORE_INDEX]


def _completion_text(row: dict[str, Any], side: str) -> str:
    completion = row[side]
    if row["prompt"] is None:
        _, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"])
        completion = chosen if side == "chosen" else rejected
    return "".join(m["content"].lstrip() for m in completion)  # as rendered, from its first character


def test_labels_cover_exactly_the_completion_and_end_of_turn(smollm2_tokenizer: Any) -> None:
    tokenized = tokenize_pairs(Dataset.from_list(PAIRS), smollm2_tokenizer, max_length=512)
    assert len(tokenized) == len(PAIRS)
    for row, out in zip(PAIRS, tokenized, strict=True):
        for side in ("chosen", "rejected"):
            trained = _trained(out[f"{side}_input_ids"], out[f"{side}_labels"])
            assert smollm2_tokenizer.decode(trained) == _completion_text(row, side) + "<|im_end|>"
        first_chosen = next(i for i, t in enumerate(out["chosen_labels"]) if t != IGNORE_INDEX)
        first_rejected = next(i for i, t in enumerate(out["rejected_labels"]) if t != IGNORE_INDEX)
        assert first_chosen == first_rejected
        assert out["chosen_input_ids"][:first_chosen] == out["rejected_input_ids"][:first_rejected]
        assert smollm2_tokenizer.decode(out["chosen_input_ids"][:first_chosen]).endswith("<|im_start|>assistant\n")
    assert tokenized["margin"] == [0.5, 0.0, 1.0, 0.0]


def test_long_pairs_are_cut_at_the_end_and_counted(smollm2_tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    long = {"prompt": [USER], "chosen": [{"role": "assistant", "content": "five " * 40}], "rejected": [BAD]}
    full = tokenize_pairs(Dataset.from_list([long]), smollm2_tokenizer, max_length=512)[0]
    prompt_tokens = full["chosen_labels"].index(next(t for t in full["chosen_labels"] if t != IGNORE_INDEX))
    max_length = prompt_tokens + 5
    with caplog.at_level(logging.WARNING, logger="alignment.methods.pairwise.core"):
        cut = tokenize_pairs(Dataset.from_list([long]), smollm2_tokenizer, max_length=max_length)[0]
    assert cut["chosen_input_ids"] == full["chosen_input_ids"][:max_length]
    assert cut["chosen_labels"] == full["chosen_labels"][:max_length]
    assert len(_trained(cut["chosen_input_ids"], cut["chosen_labels"])) == 5
    assert cut["rejected_input_ids"] == full["rejected_input_ids"][:max_length]
    assert f"1 of 1 cut to max_length={max_length}; 0 dropped" in caplog.text


def test_pairs_without_completion_tokens_or_identical_sides_are_dropped_and_counted(
    smollm2_tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    long_prompt = {"prompt": [{"role": "user", "content": "word " * 300}], "chosen": [GOOD], "rejected": [BAD]}
    identical = {"prompt": [USER], "chosen": [GOOD], "rejected": [GOOD]}
    implicit_identical = {"prompt": None, "chosen": [USER, GOOD], "rejected": [USER, GOOD]}
    same_start = {
        "prompt": [USER],
        "chosen": [{"role": "assistant", "content": "five " * 150 + "right"}],
        "rejected": [{"role": "assistant", "content": "five " * 150 + "wrong"}],
    }
    rows = [PAIRS[0], long_prompt, identical, {**PAIRS[0], "margin": None}, implicit_identical, same_start]
    with caplog.at_level(logging.WARNING, logger="alignment.methods.pairwise.core"):
        kept = tokenize_pairs(Dataset.from_list(rows), smollm2_tokenizer, max_length=128)
    assert len(kept) == 2
    assert "2 of 6 cut to max_length=128; 4 dropped (3 with chosen == rejected" in caplog.text


def test_nothing_is_logged_when_no_pair_is_cut_or_dropped(
    smollm2_tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="alignment.methods.pairwise.core"):
        tokenize_pairs(Dataset.from_list(PAIRS), smollm2_tokenizer, max_length=512)
    assert not caplog.records


# --- the packed forward ------------------------------------------------------------------------------------


def _unpacked(model: Any, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Summed completion log-prob and completion tokens of one sequence, forwarded alone without any mask."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    targets = torch.tensor(labels[1:])
    mask = targets != IGNORE_INDEX
    logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    return float((logps * mask).sum()), int(mask.sum())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logps_equal_per_sequence_forwards(tiny_random_path: str, attn: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_random_path)
    rows = list(tokenize_pairs(Dataset.from_list(PAIRS), tokenizer, max_length=512))
    lengths = {len(r[f"{s}_input_ids"]) for r in rows for s in ("chosen", "rejected")}
    assert len(lengths) >= 6  # sequences of many different lengths share the row
    model = tiny_model(tiny_random_path, attn)
    batch = PairCollator()(rows)
    with torch.no_grad():
        packed = sequence_logps(model, batch)
    for side, sums, tokens in (
        ("chosen", packed.chosen, packed.chosen_tokens),
        ("rejected", packed.rejected, packed.rejected_tokens),
    ):
        expected = [_unpacked(model, r[f"{side}_input_ids"], r[f"{side}_labels"]) for r in rows]
        # fp32 sums of ~170 nats: an absolute 1e-5 is at float32 rounding, so 1e-6 relative on top of it.
        torch.testing.assert_close(sums, torch.tensor([e[0] for e in expected]), rtol=1e-6, atol=1e-5)
        assert tokens.tolist() == [float(e[1]) for e in expected]
    window = batch_counts(batch)
    assert window == PairCounts(len(rows), float(packed.chosen_tokens.sum()), float(packed.rejected_tokens.sum()))


class Wrapped(torch.nn.Module):
    """Like DDP or a DeepSpeed engine: the model is ``.module`` and nothing else is forwarded."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, **kwargs: Any) -> Any:
        return self.module(**kwargs)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_through_a_data_parallel_wrapper(tiny_random_path: str, tiny_pairs: Dataset, attn: str) -> None:
    model = tiny_model(tiny_random_path, attn)
    batch = PairCollator()(list(tiny_pairs))
    with torch.no_grad():
        direct, wrapped = sequence_logps(model, batch), sequence_logps(Wrapped(model), batch)  # type: ignore[arg-type]
    torch.testing.assert_close(wrapped.chosen, direct.chosen)
    torch.testing.assert_close(wrapped.rejected, direct.rejected)


def test_token_shaper_reshapes_only_the_shaped_sums(tiny_random_path: str, tiny_pairs: Dataset) -> None:
    model = tiny_model(tiny_random_path)
    batch = PairCollator()(list(tiny_pairs))
    seen: dict[str, Any] = {}

    def shaper(logps: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, mask: Any, pairs: int) -> torch.Tensor:
        seen.update(targets=targets, ids=ids, mask=mask, pairs=pairs, logps=logps)
        # Doubled on completion tokens, garbage (NaN) elsewhere: the forward must drop what lies outside the mask.
        return torch.where(mask, 2 * logps, float("nan"))

    with torch.no_grad():
        plain = sequence_logps(model, batch)
        both = sequence_logps(model, batch, shaper)
    assert plain.shaped is None
    assert both.shaped is not None
    torch.testing.assert_close(both.chosen, plain.chosen)  # the plain sums are untouched
    torch.testing.assert_close(both.rejected, plain.rejected)
    torch.testing.assert_close(both.shaped.chosen, 2 * plain.chosen)
    torch.testing.assert_close(both.shaped.rejected, 2 * plain.rejected)
    assert torch.equal(both.shaped.chosen_tokens, plain.chosen_tokens)
    # What the shaper sees: flat shifted positions, sequence ids, completion mask and the pair count.
    assert seen["pairs"] == len(tiny_pairs)
    assert torch.equal(seen["targets"], batch["labels"][0, 1:])
    assert torch.equal(seen["ids"], batch["sequence_ids"][0, 1:])
    assert torch.equal(seen["mask"], batch["labels"][0, 1:] != IGNORE_INDEX)
    assert bool((seen["logps"][~seen["mask"]] == 0).all())
    assert both.detach().shaped is not None


def test_collator_packs_chosen_then_rejected_with_restarting_positions(smollm2_tokenizer: Any) -> None:
    rows = list(tokenize_pairs(Dataset.from_list(PAIRS[:2]), smollm2_tokenizer, max_length=512))
    batch = PairCollator()(rows)
    order = [rows[0]["chosen_input_ids"], rows[1]["chosen_input_ids"]]
    order += [rows[0]["rejected_input_ids"], rows[1]["rejected_input_ids"]]
    assert batch["input_ids"][0].tolist() == [t for ids in order for t in ids]
    assert batch["position_ids"][0].tolist() == [p for ids in order for p in range(len(ids))]
    assert batch["sequence_ids"][0].tolist() == [i for i, ids in enumerate(order) for _ in ids]
    assert batch["margin"].tolist() == [0.5, 0.0]


# --- normalisation over the optimizer step -----------------------------------------------------------------


def _random_logps(pairs: int) -> PairLogps:
    generator = torch.Generator().manual_seed(0)
    chosen = -torch.rand(pairs, generator=generator) * 20
    rejected = -torch.rand(pairs, generator=generator) * 20
    return PairLogps(
        chosen.requires_grad_(),
        rejected.requires_grad_(),
        torch.tensor([3.0, 11.0, 1.0, 7.0])[:pairs],
        torch.tensor([5.0, 2.0, 9.0, 4.0])[:pairs],
    )


def test_micro_batch_shares_sum_to_the_full_batch_loss() -> None:
    full = _random_logps(4)
    reference = PairLogps(
        full.chosen.detach() * 0.9, full.rejected.detach() * 1.1, full.chosen_tokens, full.rejected_tokens
    )
    whole = total_loss(dpo_like(full, reference, Progress(0, 1)), full, PairCounts.of(full))
    (expected_chosen, expected_rejected) = torch.autograd.grad(whole, [full.chosen, full.rejected])

    chunks = [slice(0, 1), slice(1, 3), slice(3, 4)]
    parts = [
        PairLogps(full.chosen[c], full.rejected[c], full.chosen_tokens[c], full.rejected_tokens[c]) for c in chunks
    ]
    refs = [
        PairLogps(reference.chosen[c], reference.rejected[c], full.chosen_tokens[c], full.rejected_tokens[c])
        for c in chunks
    ]
    window = PairCounts(*(sum(c) for c in zip(*(dataclasses.astuple(PairCounts.of(p)) for p in parts), strict=True)))
    assert window == PairCounts.of(full) == PairCounts(4.0, 22.0, 20.0)
    summed = sum(total_loss(dpo_like(p, r, Progress(0, 1)), p, window) for p, r in zip(parts, refs, strict=True))
    assert isinstance(summed, torch.Tensor)
    torch.testing.assert_close(summed, whole)
    chosen_grad, rejected_grad = torch.autograd.grad(summed, [full.chosen, full.rejected])
    torch.testing.assert_close(chosen_grad, expected_chosen)
    torch.testing.assert_close(rejected_grad, expected_rejected)

    # The pieces by hand: pair mean of the DPO term, token means of the NLLs.
    per_pair = -F.logsigmoid(0.5 * ((full.chosen - reference.chosen) - (full.rejected - reference.rejected)))
    by_hand = per_pair.mean() + 0.3 * -full.chosen.sum() / 22 + 0.1 * -full.rejected.sum() / 20
    torch.testing.assert_close(whole, by_hand)


# --- the trainer -------------------------------------------------------------------------------------------


def _trainer(path: str, out: Path, train: Dataset, **overrides: Any) -> PairwiseTrainer:
    model = tiny_model(path).train()
    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    return PairwiseTrainer(
        model=model,
        args=sgd_step_args(out, **overrides),
        train_dataset=train,
        eval_dataset=train,
        data_collator=PairCollator(),
        loss_fn=dpo_like,
        reference=FrozenModel(frozen),
    )


@pytest.fixture
def tiny_pairs(tiny_random_path: str) -> Dataset:
    return tokenize_pairs(Dataset.from_list(PAIRS), AutoTokenizer.from_pretrained(tiny_random_path), max_length=512)


def _parameters(trainer: PairwiseTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_grad_accumulation_1x4_equals_4x1(tiny_random_path: str, tiny_pairs: Dataset, tmp_path: Path) -> None:
    one_batch = _trainer(tiny_random_path, tmp_path / "a", tiny_pairs)
    before = _parameters(one_batch)
    one_batch.train()
    accumulated = _trainer(
        tiny_random_path, tmp_path / "b", tiny_pairs, per_device_train_batch_size=1, gradient_accumulation_steps=4
    )
    accumulated.train()
    after_one, after_acc = _parameters(one_batch), _parameters(accumulated)
    assert all(not torch.equal(before[n], after_one[n]) for n in before)  # every parameter trains
    for name, value in after_one.items():
        torch.testing.assert_close(after_acc[name], value, rtol=0, atol=1e-5, msg=name)
    loss_one = one_batch.state.log_history[0]["loss"]
    loss_acc = accumulated.state.log_history[0]["loss"]
    assert loss_acc == pytest.approx(loss_one, abs=1e-5)
    assert accumulated.state.log_history[0]["grad_norm"] == pytest.approx(
        one_batch.state.log_history[0]["grad_norm"], rel=1e-4
    )


def test_evaluation_on_packed_pairs_gives_loss_and_preference_metrics(
    tiny_random_path: str, tiny_pairs: Dataset, tmp_path: Path
) -> None:
    trainer = _trainer(tiny_random_path, tmp_path, tiny_pairs, per_device_eval_batch_size=4)
    metrics = trainer.evaluate()
    # Before training the policy is the reference: every DPO term is log 2 and the rewards are zero.
    with torch.no_grad():
        policy = sequence_logps(trainer.model, PairCollator()(list(tiny_pairs)))
    nll_chosen = -policy.chosen.sum() / policy.chosen_tokens.sum()
    nll_rejected = -policy.rejected.sum() / policy.rejected_tokens.sum()
    expected = torch.log(torch.tensor(2.0)) + 0.3 * nll_chosen + 0.1 * nll_rejected
    assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert metrics["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["eval_rewards/accuracies"] == 0.0
    assert metrics["eval_logps/chosen"] == pytest.approx(float(policy.chosen.mean()), rel=1e-5)
    assert {"eval_logps/rejected", "eval_rewards/chosen", "eval_rewards/rejected"} <= set(metrics)


def test_evaluation_loss_is_not_scaled_like_a_training_share(
    tiny_random_path: str, tiny_pairs: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF's prediction_step passes a PairCounts too; only training shares are scaled by the data-parallel world size."""
    trainer = _trainer(tiny_random_path, tmp_path, tiny_pairs)
    batch = PairCollator()(list(tiny_pairs))
    with torch.no_grad():
        single = trainer.compute_loss(trainer.model.eval(), batch, num_items_in_batch=batch_counts(batch))
        monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
        evaluated = trainer.compute_loss(trainer.model, batch, num_items_in_batch=batch_counts(batch))
        trained = trainer.compute_loss(trainer.model.train(), batch, num_items_in_batch=batch_counts(batch))
    assert float(evaluated) == pytest.approx(float(single), rel=1e-6)
    assert float(trained) == pytest.approx(2 * float(single), rel=1e-6)


def test_resume_from_checkpoint_matches_uninterrupted_run(
    tiny_random_path: str, tiny_pairs: Dataset, tmp_path: Path
) -> None:
    settings = {
        "per_device_train_batch_size": 2,
        "max_steps": 2,
        "learning_rate": 0.1,
        "save_strategy": "steps",
        "save_steps": 1,
    }
    uninterrupted = _trainer(tiny_random_path, tmp_path / "full", tiny_pairs, **settings)
    uninterrupted.train()
    resumed = _trainer(tiny_random_path, tmp_path / "resumed", tiny_pairs, **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"))
    # Step 1's log comes back with the checkpoint's state; the resumed run itself trained step 2 only.
    assert [e["step"] for e in resumed.state.log_history if "loss" in e] == [1, 2]
    assert resumed.state.log_history[0] == uninterrupted.state.log_history[0]
    full_params, resumed_params = _parameters(uninterrupted), _parameters(resumed)
    for name, value in full_params.items():
        torch.testing.assert_close(resumed_params[name], value, rtol=0, atol=1e-6, msg=name)
    last = [e for e in uninterrupted.state.log_history if "loss" in e][-1]
    assert [e for e in resumed.state.log_history if "loss" in e][-1]["loss"] == pytest.approx(last["loss"], abs=1e-6)


# --- the reference -----------------------------------------------------------------------------------------


def test_adapters_reference_is_the_base_model(tiny_random_path: str, tiny_pairs: Dataset) -> None:
    from peft import LoraConfig, get_peft_model

    batch = PairCollator()(list(tiny_pairs))
    base = sequence_logps(tiny_model(tiny_random_path), batch)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = get_peft_model(tiny_model(tiny_random_path), lora)
    adapted = sequence_logps(policy, batch)
    reference = reference_logps(FrozenModel(None), policy, batch)
    through_wrapper = reference_logps(FrozenModel(None), Wrapped(policy), batch)  # type: ignore[arg-type]
    torch.testing.assert_close(through_wrapper.chosen, reference.chosen)
    assert not torch.allclose(adapted.chosen, base.chosen, atol=1e-3)  # the adapters do change the outputs
    torch.testing.assert_close(reference.chosen, base.chosen.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(reference.rejected, base.rejected.detach(), rtol=0, atol=1e-5)
    assert not reference.chosen.requires_grad


def test_reference_log_probs_are_never_shaped(tiny_random_path: str, tiny_pairs: Dataset, tmp_path: Path) -> None:
    seen: list[tuple[PairLogps, PairLogps | None]] = []

    def capture(policy: PairLogps, reference: PairLogps | None, progress: Progress) -> PreferenceLoss:
        seen.append((policy, reference))
        return dpo_like(policy, reference, progress)

    trainer = _trainer(tiny_random_path, tmp_path, tiny_pairs)
    trainer.loss_fn = capture
    trainer.token_shaper = lambda logps, targets, ids, mask, pairs: logps - 1.0
    batch = PairCollator()(list(tiny_pairs))
    assert trainer.reference is not None
    assert trainer.reference.model is not None
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch, num_items_in_batch=batch_counts(batch))
        unshaped = sequence_logps(trainer.reference.model, batch)
    ((policy, reference),) = seen
    assert reference is not None
    assert reference.shaped is None
    torch.testing.assert_close(reference.chosen, unshaped.chosen)
    torch.testing.assert_close(reference.rejected, unshaped.rejected)
    assert policy.shaped is not None
    torch.testing.assert_close(policy.shaped.chosen, policy.chosen - policy.chosen_tokens)


def test_precomputed_columns_are_used_as_the_reference() -> None:
    batch = {
        "labels": torch.tensor([[IGNORE_INDEX, 5, IGNORE_INDEX, 6, 7]]),
        "sequence_ids": torch.tensor([[0, 0, 1, 1, 1]]),
        "ref_chosen_logps": torch.tensor([-1.5]),
        "ref_rejected_logps": torch.tensor([-2.5]),
    }
    logps = reference_logps(FrozenModel(None), None, batch)  # type: ignore[arg-type]
    assert (logps.chosen.item(), logps.rejected.item()) == (-1.5, -2.5)
    assert (logps.chosen_tokens.item(), logps.rejected_tokens.item()) == (1.0, 2.0)


def _run_cfg(compose: Any, tiny_random_path: str, source: SourceConfig, **method: Any) -> RunConfig:
    cfg = to_run_config(compose(["model=tiny_random", "logger=none"]))
    settings: dict[str, Any] = {
        "name": "pairwise_test",
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "logging_steps": 1.0,
        "eval_steps": 1.0,
        "save_strategy": IntervalStrategy.no,
        "optim": "sgd",
        "learning_rate": 0.1,
        "lr_scheduler_type": SchedulerType.constant,
        "max_grad_norm": 0.0,
    }
    cfg.method = MethodConfig(**{**settings, **method})
    cfg.model = replace(cfg.model, name_or_path=tiny_random_path)
    cfg.data = DataConfig(sources=[source], eval_fraction=0, max_eval_samples=4)
    return cfg


def _logs(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def _pairwise(cfg: RunConfig, out: Path, kind: ReferenceKind | None) -> dict[str, float]:
    return run_pairwise(cfg, RunContext(out, out.name, None), dpo_like, max_length=256, reference_kind=kind)


@pytest.mark.slow
def test_precomputed_reference_equals_the_frozen_copy_and_is_cached(
    compose: Any,
    tiny_random_path: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("ALIGNMENT_CACHE_DIR", str(tmp_path / "cache"))
    train = _write(tmp_path / "train.jsonl", [r for r in PAIRS if r["prompt"] is not None] * 2)
    evaluation = _write(tmp_path / "eval.jsonl", [{k: v for k, v in r.items() if v is not None} for r in PAIRS[:2]])
    cfg = _run_cfg(compose, tiny_random_path, SourceConfig(path=str(train), eval_path=str(evaluation)))
    _pairwise(cfg, tmp_path / "copy", ReferenceKind.copy)
    with caplog.at_level(logging.INFO, logger="alignment.models.frozen"):
        _pairwise(cfg, tmp_path / "pre", ReferenceKind.precomputed)
        assert "cache hit" not in caplog.text
        assert len(list((tmp_path / "cache" / "reference_logps").glob("*.safetensors"))) == 2  # train and eval
        caplog.clear()
        _pairwise(cfg, tmp_path / "again", ReferenceKind.precomputed)
    assert caplog.text.count("reference log-probs: cache hit") == 2
    copy_logs, pre_logs, again_logs = (_logs(tmp_path / d) for d in ("copy", "pre", "again"))
    assert len(copy_logs) == len(pre_logs) == len(again_logs)
    keys = ("loss", "eval_loss", "rewards/margins", "eval_rewards/margins", "rewards/chosen", "logps/chosen")
    for live, pre, again in zip(copy_logs, pre_logs, again_logs, strict=True):
        for key in (k for k in keys if k in live):
            assert pre[key] == pytest.approx(live[key], rel=1e-4, abs=1e-5), key
            assert again[key] == pre[key], key


def test_adapters_reference_without_lora_fails_before_loading(
    compose: Any, tiny_random_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    cfg = _run_cfg(compose, tiny_random_path, SourceConfig(path="embedded:test.jsonl"))
    with pytest.raises(ValueError, match=r"method.reference=adapters needs model.lora.enabled=true"):
        _pairwise(cfg, tmp_path, ReferenceKind.adapters)


# --- end to end --------------------------------------------------------------------------------------------


def test_run_pairwise_on_the_demo_pairs_writes_metrics_and_model(
    compose: Any, tiny_random_path: str, tmp_path: Path
) -> None:
    source = SourceConfig(path="embedded:train.jsonl", eval_path="embedded:test.jsonl", sample_fraction=0.04)
    cfg = _run_cfg(compose, tiny_random_path, source, max_steps=3, eval_steps=3.0)
    metrics = _pairwise(cfg, tmp_path, ReferenceKind.copy)
    logs = _logs(tmp_path)
    train_logs = [e for e in logs if "loss" in e]
    eval_logs = [e for e in logs if "eval_loss" in e]
    assert [e["step"] for e in train_logs] == [1, 2, 3]
    assert [e["step"] for e in eval_logs] == [0, 3]  # eval_on_start, then the end
    names = ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
    for entry in train_logs:
        assert all(name in entry for name in names)
    for entry in eval_logs:
        assert all(f"eval_{name}" in entry for name in names)
    assert eval_logs[0]["eval_rewards/margins"] == 0.0  # policy == reference before training
    assert metrics["eval_loss"] == eval_logs[-1]["eval_loss"]
    assert (tmp_path / "model" / "config.json").exists()
    assert (tmp_path / "model" / "tokenizer_config.json").exists()


def test_token_budget_run_trains_on_every_pair_in_budgeted_micro_batches(
    compose: Any, tiny_random_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``max_tokens_per_batch`` each micro-batch holds whole pairs within the budget, and one epoch sees all."""
    source = SourceConfig(path="embedded:train.jsonl", sample_fraction=0.01)  # 10 demo pairs
    cfg = _run_cfg(compose, tiny_random_path, source, max_steps=-1, eval_strategy=IntervalStrategy.no)
    cfg.method = PairwiseConfig(**{**asdict(cfg.method), "max_tokens_per_batch": 300})
    seen: list[int] = []
    collate = PairCollator.__call__

    def record(self: PairCollator, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(self, rows)
        seen.append(int(batch["input_ids"].numel()))
        return batch

    monkeypatch.setattr(PairCollator, "__call__", record)
    metrics = _pairwise(cfg, tmp_path, ReferenceKind.copy)
    assert math.isfinite(metrics["train_loss"])
    assert all(tokens <= 300 for tokens in seen)  # demo pairs are ~90 tokens, so none trains alone over budget
    assert 1 < len(seen) < 10  # several pairs per micro-batch, more than one micro-batch
    train_logs = [e for e in _logs(tmp_path) if "loss" in e]
    assert len(train_logs) == len(seen)  # one optimizer step per micro-batch (no accumulation)
