"""The one loading/scoring path of reward models and classifiers: tokenising, batching, pooling, save/load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from alignment.models.config import LoraConfig, ModelConfig
from alignment.models.load import load_tokenizer
from alignment.models.seqcls import (
    ProblemType,
    encode,
    head_module,
    load_model_for_classification,
    load_reward_model,
    load_sequence_classifier,
    pad_batch,
    padded_batches,
    save_classifier,
    score_conversations,
    sequence_scores,
)

CONVERSATIONS = [
    [{"role": "user", "content": "1 + 1 = ?"}, {"role": "assistant", "content": "2"}],
    [{"role": "user", "content": "What is 12 * 7? Think twice."}, {"role": "assistant", "content": "12 * 7 = 84"}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Name three colours, please."}, {"role": "assistant", "content": "Red, green, blue."}],
]


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    """A one-output tiny random Llama with a non-trivial head, and its tokenizer (pad == eos == <|im_end|>)."""
    cfg = ModelConfig(name_or_path="embedded:tiny-random-llama")
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_model_for_classification(cfg, tokenizer, labels=["reward"], problem_type=ProblemType.regression)
    with torch.no_grad():
        head_module(model).weight.normal_()
    return model.eval(), tokenizer


def _last_position_score(model: Any, ids: list[int]) -> float:
    """The head's output at the last token of an unpadded single sequence."""
    return float(sequence_scores(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0, 0])


def test_pooling_reads_the_last_attended_token_even_when_it_is_the_pad_token(tiny: tuple[Any, Any]) -> None:
    """With pad == eos, a sequence ending in eos would make HF's own pooling skip back to an earlier token."""
    model, tokenizer = tiny
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    short = [*tokenizer("Hello there", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    long = tokenizer("A longer sentence that needs padding of the other one", add_special_tokens=False)["input_ids"]
    input_ids, attention_mask = pad_batch([short, long], tokenizer.pad_token_id)
    with torch.no_grad():
        ours = sequence_scores(model, input_ids, attention_mask)[:, 0]
        hf = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    expected = [_last_position_score(model, short), _last_position_score(model, long)]
    assert ours.tolist() == pytest.approx(expected, abs=1e-5)
    assert float(hf[0]) != pytest.approx(expected[0], abs=1e-3)  # HF pooled the token before the final eos
    assert float(hf[1]) == pytest.approx(expected[1], abs=1e-5)


def test_left_padding_pools_the_same_token() -> None:
    scores = torch.arange(12.0).reshape(2, 6)[..., None]  # what the head emits per position
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    positions = torch.arange(6)
    last = (positions * mask).argmax(-1)
    assert last.tolist() == [5, 2]
    assert scores[torch.arange(2), last, 0].tolist() == [5.0, 8.0]


def test_scores_are_in_input_order_and_independent_of_batching(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    one_by_one = [score_conversations(model, tokenizer, [c])[0] for c in CONVERSATIONS]
    assert score_conversations(model, tokenizer, CONVERSATIONS) == pytest.approx(one_by_one, abs=1e-5)
    tight = score_conversations(model, tokenizer, CONVERSATIONS, max_tokens_per_batch=1)
    assert tight == pytest.approx(one_by_one, abs=1e-5)
    assert len(set(one_by_one)) == len(one_by_one)
    assert score_conversations(model, tokenizer, []) == []


def test_padded_batches_cover_every_index_once_within_the_budget() -> None:
    lengths = [5, 30, 12, 12, 7, 100, 1]
    batches = padded_batches(lengths, 40)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert len(batch) * width <= 40 or len(batch) == 1
    assert [5] in batches  # longer than the budget: alone
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        padded_batches(lengths, 0)


def test_encode_renders_the_template_and_truncates_either_side(tiny: tuple[Any, Any]) -> None:
    _, tokenizer = tiny
    full, cut = encode(tokenizer, CONVERSATIONS[1], max_length=10_000)
    assert not cut
    rendered = tokenizer.apply_chat_template(CONVERSATIONS[1], tokenize=False)
    assert full == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    left, cut_left = encode(tokenizer, CONVERSATIONS[1], max_length=8, truncation_side="left")
    right, cut_right = encode(tokenizer, CONVERSATIONS[1], max_length=8, truncation_side="right")
    assert cut_left
    assert cut_right
    assert (left, right) == (full[-8:], full[:8])
    text_ids, _ = encode(tokenizer, "plain text", max_length=100)
    assert text_ids == tokenizer("plain text")["input_ids"]


def test_truncated_scoring_reads_the_kept_end(tiny: tuple[Any, Any]) -> None:
    """With left truncation the score is that of the conversation's last ``max_length`` tokens."""
    model, tokenizer = tiny
    ids, _ = encode(tokenizer, CONVERSATIONS[1], max_length=10_000)
    (score,) = score_conversations(model, tokenizer, [CONVERSATIONS[1]], max_length=6)
    assert score == pytest.approx(_last_position_score(model, ids[-6:]), abs=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_save_and_load_round_trip(tmp_path: Path, tiny: tuple[Any, Any], lora: bool) -> None:
    """A full model or a LoRA SEQ_CLS adapter (with its trained head) loads merged, in eval mode, same scores."""
    _, tokenizer = tiny
    cfg = ModelConfig(name_or_path="embedded:tiny-random-llama", lora=LoraConfig(enabled=lora))
    torch.manual_seed(1)
    model = load_model_for_classification(cfg, tokenizer, labels=["reward"], problem_type=ProblemType.regression)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # stand-in for training: move every trainable tensor
                param.add_(torch.randn_like(param) * 0.5)
    model.eval()
    expected = score_conversations(model, tokenizer, CONVERSATIONS)
    model.save_pretrained(tmp_path)
    save_classifier(model, tokenizer, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() == lora
    loaded, loaded_tokenizer = load_reward_model(str(tmp_path), dtype="float32", device="cpu")
    assert not loaded.training
    assert loaded.config.pad_token_id == loaded_tokenizer.pad_token_id
    assert not any("lora_" in n for n, _ in loaded.named_parameters())  # merged
    assert score_conversations(loaded, loaded_tokenizer, CONVERSATIONS) == pytest.approx(expected, abs=1e-4)


def test_reward_loading_refuses_a_multi_label_classifier(tmp_path: Path, tiny: tuple[Any, Any]) -> None:
    _, tokenizer = tiny
    cfg = ModelConfig(name_or_path="embedded:tiny-random-llama")
    model = load_model_for_classification(
        cfg, tokenizer, labels=["a", "b"], problem_type=ProblemType.single_label_classification
    )
    model.save_pretrained(tmp_path)
    save_classifier(model, tokenizer, tmp_path)
    classifier, _ = load_sequence_classifier(str(tmp_path))
    assert classifier.config.id2label == {0: "a", 1: "b"}
    with pytest.raises(ValueError, match="num_labels=2"):
        load_reward_model(str(tmp_path))
    with pytest.raises(ValueError, match="num_labels=1"):
        score_conversations(classifier, tokenizer, CONVERSATIONS)


def test_unfreeze_patterns_keep_the_head_trainable(tiny: tuple[Any, Any]) -> None:
    _, tokenizer = tiny
    cfg = ModelConfig(name_or_path="embedded:tiny-random-llama", unfreeze_layers_patterns=["*.layers.1"])
    model = load_model_for_classification(cfg, tokenizer, labels=["reward"], problem_type=ProblemType.regression)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable
    assert any(".layers.1." in n for n in trainable)
    assert not any(".layers.0." in n or "embed_tokens" in n for n in trainable)
