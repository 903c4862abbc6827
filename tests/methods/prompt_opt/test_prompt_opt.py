"""method=prompt_opt: placement through the chat template, the batch layout, the step, resume, outputs, learning.

The estimator's tensor functions have their hand-computed tests in ``test_codebook.py``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from alignment.config import to_run_config
from alignment.data.chat_template import IGNORE_INDEX
from alignment.methods.prompt_opt import prompt_opt
from alignment.methods.prompt_opt.layout import SlotCollator, insert_prompts, place, shipped_sequence
from alignment.methods.prompt_opt.prompt_opt import PromptOptConfig
from alignment.methods.prompt_opt.trainer import forbidden_ids
from tests.methods.helpers import bench_module, read_logs, run_method, write_jsonl

CONVERSATION = [
    {"role": "system", "content": "Removed: the prompt replaces it."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5"},
]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def llama3_tokenizer(smollm2_tokenizer: Any) -> Any:
    """SmolLM2's tokenizer with Llama-3's special tokens, BOS and template (a Llama-3-style layout)."""
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        }
    )
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return str(tokenizer.decode(ids))


# --- placement -------------------------------------------------------------------------------------------------


def test_smollm2_placement_puts_the_prompt_inside_the_system_turn(smollm2_tokenizer: Any) -> None:
    placed = place(smollm2_tokenizer, CONVERSATION, role="system", roles=["assistant"], max_length=512)
    assert _decode(smollm2_tokenizer, placed.head) == "<|im_start|>system\n"
    tail = _decode(smollm2_tokenizer, placed.tail)
    assert tail.startswith("<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    assert "Removed" not in tail  # the data's own system message is gone
    trained = [t for t, label in zip(placed.tail, placed.tail_labels, strict=True) if label != IGNORE_INDEX]
    assert _decode(smollm2_tokenizer, trained) == "2 + 3 = 5<|im_end|>"


def test_llama3_placement_keeps_bos_first_then_the_header_then_the_prompt(llama3_tokenizer: Any) -> None:
    """The original put the prompt in front of BOS; here BOS and the role header come first."""
    tok = llama3_tokenizer
    placed = place(tok, CONVERSATION, role="system", roles=["assistant"], max_length=512)
    ids = tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    bos, start, end, eot = ids
    assert placed.head[0] == bos == tok.bos_token_id
    assert placed.head[1] == start
    assert _decode(tok, placed.head) == "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    assert placed.head[-2] == end or placed.head[-1] != start
    assert placed.tail[0] == eot  # the system turn's end comes right after the prompt slots
    assert tok.bos_token_id not in placed.tail
    trained = [t for t, label in zip(placed.tail, placed.tail_labels, strict=True) if label != IGNORE_INDEX]
    assert _decode(tok, trained) == "2 + 3 = 5<|eot_id|>"


def test_collated_batch_masks_labels_over_head_and_prompt_and_fills_slots(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    rows = []
    for i, question in enumerate(["What is 2 + 3?", "What is 10 + 20 + 30?"]):
        conversation = [{"role": "user", "content": question}, {"role": "assistant", "content": f"answer {i}"}]
        placed = place(tok, conversation, role="system", roles=["assistant"], max_length=512)
        rows.append(
            {"head": [placed.head], "tail": [placed.tail], "tail_labels": [placed.tail_labels], "margin": 0.0, "row": i}
        )
    batch = SlotCollator(pad_token_id=int(tok.pad_token_id), prompt_len=4)(rows)
    for i, row in enumerate(rows):
        start = len(row["head"][0])
        assert int(batch["slot_start"][i]) == start
        assert (batch["labels"][i, : start + 4] == IGNORE_INDEX).all()  # head and prompt slots carry no loss
        tail = torch.tensor(row["tail"][0])
        assert torch.equal(batch["input_ids"][i, start + 4 : start + 4 + len(tail)], tail)
        assert int(batch["attention_mask"][i].sum()) == start + 4 + len(tail)
    # Slot embeddings are the prompts', one copy of the batch per prompt; a pad slot is masked and skipped.
    d = 3
    token_embeds = torch.zeros(2, batch["input_ids"].size(1), d)
    prompts = torch.arange(2 * 4 * d, dtype=torch.float32).view(2, 4, d) + 1
    slot_ids = torch.tensor([[5, 6, 7, 8], [5, 0, 7, 8]])
    embeds, mask, positions = insert_prompts(token_embeds, batch, prompts, slot_ids, pad_id=0, empty_slots=True)
    assert embeds.shape == (4, batch["input_ids"].size(1), d)
    start0 = int(batch["slot_start"][0])
    assert torch.equal(embeds[0, start0 : start0 + 4], prompts[0])
    assert torch.equal(embeds[3, int(batch["slot_start"][1]) : int(batch["slot_start"][1]) + 4], prompts[1])
    assert mask[2, start0 + 1] == 0
    assert mask[0, start0 + 1] == 1
    # Position ids skip the empty slot: the model sees a 3-token prompt, exactly as if the slot were not there.
    assert positions[2, start0 + 2] == start0 + 1
    assert positions[0, start0 + 2] == start0 + 2


def test_shipped_text_is_what_the_template_renders_for_that_system_message(
    smollm2_tokenizer: Any, llama3_tokenizer: Any
) -> None:
    """The evaluated sequence is the template's rendering of the prompt text, trimmed where the template trims."""
    for tok in (smollm2_tokenizer, llama3_tokenizer):
        ids, labels = shipped_sequence(
            tok, CONVERSATION[1:], role="system", text=" Be terse. ", roles=["assistant"], dropped=0
        )
        conversation = [{"role": "system", "content": " Be terse. "}, *CONVERSATION[1:]]
        rendered = tok.apply_chat_template(conversation, tokenize=False)
        assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
        trained = _decode(tok, [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
        assert trained.startswith("2 + 3 = 5")
        cut, _ = shipped_sequence(tok, CONVERSATION[1:], role="system", text="x", roles=["assistant"], dropped=2)
        full, _ = shipped_sequence(tok, CONVERSATION[1:], role="system", text="x", roles=["assistant"], dropped=0)
        assert cut == full[:-2]
    llama_ids, _ = shipped_sequence(
        llama3_tokenizer, CONVERSATION[1:], role="system", text=" Be terse. ", roles=["assistant"], dropped=0
    )
    assert "<|end_header_id|>\n\nBe terse.<|eot_id|>" in _decode(llama3_tokenizer, llama_ids)  # trimmed


# --- config and vocabulary checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.num_prompts=0", "num_prompts"),
        ("method.prompt_len=0", "prompt_len"),
        ("method.inserted_chat_role=assistant", "also in method.train_on_roles"),
        ("method.inserted_chat_role=narrator", "inserted_chat_role must be one of"),
        ("method.gumbel_temp_end=1.0", "anneals downwards"),
        ("method.gumbel_noise_scale=0.5", "gumbel_noise_scale"),
        ("method.forbidden_token_ids=[-1]", "forbidden_token_ids"),
    ],
)
def test_impossible_settings_fail_when_the_config_is_built(compose: Any, override: str, message: str) -> None:
    with pytest.raises(Exception, match=message):
        to_run_config(compose(["method=prompt_opt", override]))


def test_forbidden_ids_cover_special_and_padding_rows_and_refuse_an_empty_vocabulary(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    cfg = PromptOptConfig(forbidden_token_ids=[100])
    rows = len(tok) + 3
    mask = forbidden_ids(tok, rows, cfg)
    assert mask[100]
    assert mask[len(tok) :].all()
    assert all(mask[i] for i in tok.all_special_ids if i != tok.pad_token_id)
    assert not mask[tok.pad_token_id]  # an allowed empty slot
    assert forbidden_ids(tok, rows, PromptOptConfig(allow_empty_slots=False))[tok.pad_token_id]
    assert int((~mask).sum()) == len(tok) - 1 - len(set(tok.all_special_ids) | set(tok.added_tokens_decoder)) + 1
    with pytest.raises(ValueError, match="whole vocabulary"):
        forbidden_ids(tok, rows, PromptOptConfig(forbidden_token_ids=list(range(len(tok))), allow_empty_slots=False))
    with pytest.raises(ValueError, match="outside the model's"):
        forbidden_ids(tok, rows, PromptOptConfig(forbidden_token_ids=[rows]))


def test_reward_objective_takes_preference_pairs(compose: Any) -> None:
    cfg = to_run_config(compose(["method=prompt_opt", "method.objective=reward"]))
    assert isinstance(cfg.method, PromptOptConfig)
    checks = prompt_opt.row_checks(cfg.method)
    assert set(checks.columns) >= {"chosen", "rejected"}
    assert checks.validate({"messages": [{"role": "user", "content": "x"}]})  # problems: not a pair


# --- the reward model reads the last real token from embeddings --------------------------------------------------


def test_reward_scores_from_embeddings_pool_the_last_real_token(tiny_random_path: str) -> None:
    """HF's own pooling cannot see padding in ``inputs_embeds`` and takes the last position; ours reads the mask."""
    from transformers import AutoModelForSequenceClassification

    from alignment.models.seqcls import sequence_scores

    model = AutoModelForSequenceClassification.from_pretrained(tiny_random_path, num_labels=1).eval()
    model.config.pad_token_id = 0
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        from_ids = sequence_scores(model, ids, mask)
        from_embeds = sequence_scores(model, None, mask, inputs_embeds=embeds)
        alone = sequence_scores(model, ids[1:, :3], mask[1:, :3])
        hf_pooled = model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(from_embeds, from_ids)
    torch.testing.assert_close(from_embeds[1], alone[0])
    assert not torch.allclose(hf_pooled[1], alone[0])  # the original's reading: a pad position


# --- runs on the tiny model ------------------------------------------------------------------------------------

TINY = [
    "model=tiny_random",
    "logger=none",
    "method=prompt_opt",
    "method.num_prompts=2",
    "method.prompt_len=4",
    "method.max_length=64",
    "method.logging_steps=1",
]


@pytest.fixture
def rows_file(tmp_path: Path) -> Path:
    """Four conversations whose answers differ in length (the loss is normalised over the step's tokens)."""
    rows = [
        {
            "messages": [
                {"role": "system", "content": "dropped"},
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": " ".join(["word"] * (1 + 3 * i))},
            ]
        }
        for i in range(4)
    ]
    return write_jsonl(tmp_path / "rows.jsonl", rows)


def _codebook(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def _one_sgd_step(compose: Any, out: Path, rows_file: Path, overrides: list[str]) -> dict[str, torch.Tensor]:
    run_method(
        prompt_opt.run,
        compose,
        out,
        [
            *TINY,
            f"data.sources=[{{path: '{rows_file}'}}]",
            "data.eval_fraction=0",
            "method.max_steps=1",
            "method.optim=sgd",
            "method.learning_rate=10.0",
            "method.max_grad_norm=0",
            "method.save_strategy=no",
            "method.eval_strategy=no",
            "method.lr_scheduler_type=constant",
            *overrides,
        ],
    )
    return _codebook(out)


def _initial_codebook(compose: Any, model_path: str) -> torch.Tensor:
    """The codebook a run with :data:`TINY` starts from (same seed, same embeddings)."""
    from transformers import AutoModelForCausalLM

    from alignment.methods.prompt_opt.trainer import initial_codebook
    from alignment.models.load import load_tokenizer

    cfg = to_run_config(compose(TINY))
    assert isinstance(cfg.method, PromptOptConfig)
    embeddings = AutoModelForCausalLM.from_pretrained(model_path).get_input_embeddings().weight.detach()
    return initial_codebook(cfg.method, load_tokenizer(cfg.model), embeddings, cfg.seed)


@pytest.mark.parametrize("estimator", ["gumbel", "pez"])
def test_grad_accumulation_1x4_equals_4x1(
    compose: Any, tmp_path: Path, rows_file: Path, tiny_random_path: str, estimator: str
) -> None:
    """The step's noise is shared by its micro-batches and the loss is divided by the step's tokens.

    The 1 x 4 run also takes the loop path (one checkpointed forward per prompt), so it checks that the loop and
    the fused forward give the same step.
    """
    common = [f"method.estimator={estimator}", "method.dissim_coef=0.5", "method.gumbel_noise_scale=0.2"]
    micro = _one_sgd_step(
        compose,
        tmp_path / "1x4",
        rows_file,
        [
            *common,
            "method.per_device_train_batch_size=1",
            "method.gradient_accumulation_steps=4",
            "method.fused_forward=false",
        ],
    )
    whole = _one_sgd_step(
        compose,
        tmp_path / "4x1",
        rows_file,
        [*common, "method.per_device_train_batch_size=4", "method.gradient_accumulation_steps=1"],
    )
    torch.testing.assert_close(micro["codebook"], whole["codebook"], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(whole["codebook"], _initial_codebook(compose, tiny_random_path), atol=1e-4)
    loss = {name: [e["loss"] for e in read_logs(tmp_path / name) if "loss" in e] for name in ("1x4", "4x1")}
    assert loss["1x4"] == pytest.approx(loss["4x1"], rel=1e-5)


def test_resume_gives_the_uninterrupted_runs_prompts(compose: Any, tmp_path: Path, rows_file: Path) -> None:
    overrides = [
        *TINY,
        f"data.sources=[{{path: '{rows_file}', eval_path: '{rows_file}'}}]",
        "method.max_steps=4",
        "method.per_device_train_batch_size=2",
        "method.save_steps=2",
        "method.eval_steps=2",
        "method.learning_rate=0.05",
    ]
    full = tmp_path / "full"
    run_method(prompt_opt.run, compose, full, overrides)
    checkpoint = full / "checkpoints" / "checkpoint-2"
    assert checkpoint.is_dir()
    resumed = tmp_path / "resumed"
    run_method(prompt_opt.run, compose, resumed, [*overrides, f"method.resume_from_checkpoint='{checkpoint}'"])
    a, b = _codebook(full), _codebook(resumed)
    assert set(a) == {"codebook", "noise_scale", "best_ids", "best_loss", "best_step"}  # no frozen weights saved
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    full_prompts = json.loads((full / "prompts.json").read_text())
    resumed_prompts = json.loads((resumed / "prompts.json").read_text())
    assert resumed_prompts["best"] == full_prompts["best"]
    assert [p["text"] for p in resumed_prompts["prompts"]] == [p["text"] for p in full_prompts["prompts"]]
    taus = [e["gumbel_temp"] for e in read_logs(resumed) if "gumbel_temp" in e]
    assert taus == [e["gumbel_temp"] for e in read_logs(full) if "gumbel_temp" in e]


def test_a_run_writes_its_prompts_and_logs_what_the_issue_asks(compose: Any, tmp_path: Path, rows_file: Path) -> None:
    out = tmp_path / "run"
    metrics = run_method(
        prompt_opt.run,
        compose,
        out,
        [
            *TINY,
            f"data.sources=[{{path: '{rows_file}', eval_path: '{rows_file}'}}]",
            "method.max_steps=2",
            "method.per_device_train_batch_size=2",
            "method.eval_steps=1",
            "method.save_strategy=no",
            "method.learning_rate=0.05",
            "method.gradient_checkpointing=true",  # on the frozen model (the codebook has no activations)
        ],
    )
    saved = json.loads((out / "prompts.json").read_text())
    assert [p["index"] for p in saved["prompts"]] == [0, 1]
    assert sorted(p["rank"] for p in saved["prompts"]) == [1, 2]
    for prompt in saved["prompts"]:
        assert len(prompt["slot_ids"]) == 4
        assert prompt["held_out_loss"] == pytest.approx(metrics[f"eval_prompt_{prompt['index']}_loss"])
    assert (out / "best_prompt.txt").read_text() == saved["best"]["text"]
    assert saved["best"]["held_out_loss"] == pytest.approx(metrics["best/prompt_loss"], rel=1e-6)
    assert metrics["eval_loss"] == pytest.approx(min(p["held_out_loss"] for p in saved["prompts"]))
    for key in (
        "eval_no_prompt_loss",
        "eval_relaxed_gap",
        "eval_retokenisation_consistency",
        "eval_prompt_1_slot_loss",
    ):
        assert key in metrics
    logs = read_logs(out)
    train = [e for e in logs if "prompt_0_loss" in e]
    assert train
    assert {"gumbel_temp", "gumbel_noise_scale", "aux_loss", "diversity", "forbidden_mass"} <= set(train[0])
    assert any("flip_rate" in e for e in train)
    taus = [e["gumbel_temp"] for e in train]
    assert taus[0] == pytest.approx(0.5)  # step 0 of 2: tau_0


# --- using the learned prompt ----------------------------------------------------------------------------------


def test_best_prompt_file_is_the_system_prompt_of_sft_and_the_tools(
    compose: Any, tmp_path: Path, smollm2_tokenizer: Any
) -> None:
    from datasets import Dataset

    from alignment.data.basket import basket_system_prompt
    from alignment.methods import sft

    best = tmp_path / "best_prompt.txt"
    best.write_text(" Answer with the equation only.")
    cfg = to_run_config(compose(["method=sft", f"method.system_prompt_file='{best}'"]))
    assert isinstance(cfg.method, sft.SftConfig)
    rows = Dataset.from_list([{"messages": CONVERSATION[1:]}])
    ids = sft._tokenize(rows, smollm2_tokenizer, cfg.method, "train")[0]["input_ids"]
    assert smollm2_tokenizer.decode(ids).startswith("<|im_start|>system\n Answer with the equation only.<|im_end|>")
    tool = to_run_config(compose(["method=generate", f"method.system_prompt_file='{best}'"])).method
    assert basket_system_prompt(tool.global_system_prompt, tool.system_prompt_file) == " Answer with the equation only."
    with pytest.raises(Exception, match="both set"):
        to_run_config(compose(["method=sft", f"method.system_prompt_file='{best}'", "method.system_prompt=x"]))
    with pytest.raises(Exception, match="no such file"):
        to_run_config(compose(["method=rm_scoring", f"method.system_prompt_file='{tmp_path / 'missing.txt'}'"]))


# --- learning checks -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_planted_prompt_is_approached_from_a_neutral_start(tmp_path: Path) -> None:
    """Targets sampled under a known prompt p*: the learned prompt's text beats no prompt and the start, held out."""
    outcome = bench_module("prompt_opt_learning").planted_check(tmp_path, "gumbel", steps=30)
    print(outcome)  # the closing note's numbers: CE no prompt, p*, start, learned
    assert outcome.planted < outcome.no_prompt - 0.5  # the planted prompt matters for this model
    assert outcome.learned < outcome.start - 0.1
    assert outcome.learned < outcome.no_prompt - 0.5


@pytest.mark.slow
def test_smollm2_learns_a_system_prompt_for_the_arithmetic_demo(tmp_path: Path) -> None:
    """A 16-token prompt for the frozen SmolLM2: held-out answer loss below no prompt and below the start."""
    check = bench_module("prompt_opt_learning").arithmetic_check
    outcome = check(tmp_path, "gumbel", steps=8, batch=4, evaluations=1, with_exact_match=False)
    print(outcome)  # the closing note's numbers (bench/prompt_opt_learning.py adds exact match)
    assert outcome.learned < outcome.start - 0.05
    assert outcome.learned < outcome.no_prompt - 0.1


@pytest.mark.slow
def test_a_prompt_tells_a_controllable_reward_model_what_is_wanted(tmp_path: Path) -> None:
    """Pairs whose system message is removed: the learned prompt restores the reward model's held-out accuracy."""
    outcome = bench_module("prompt_opt_learning").reward_check(tmp_path, "gumbel", steps=10)
    print(outcome)
    assert outcome.accuracy_none < 0.5
    assert outcome.accuracy_learned > outcome.accuracy_none + 0.3
    assert outcome.loss_learned < outcome.loss_none
