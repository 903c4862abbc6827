r"""Loss masks of ``tokenize_conversation`` under three chat templates, pinned to exact token positions.

SmolLM2's tokenizer splits digits and the space before them, so ``2 + 3 = 5`` is 7 tokens (``2`` `` +`` `` ``
``3`` `` =`` `` `` ``5``) and ``4 * 5 = 20`` is 8; each trained span is those tokens plus the end-of-turn token.
The Llama-3 and Gemma templates are built on the same tokenizer by adding their special tokens, so the
positions below are counted by hand from the rendered text (role words: ``ass``+``istant``, ``user``, ``model``;
``\n`` is one token, ``\n\n`` two).
"""

from __future__ import annotations

from typing import Any

import pytest
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer

from alignment.data.chat_template import (
    IGNORE_INDEX,
    ChatTemplateError,
    Message,
    prepare_messages,
    render,
    tokenize_conversation,
)

LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ '<|begin_of_text|>' }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}

DIALOGUE: list[Message] = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5"},
    {"role": "user", "content": "And 4 * 5?"},
    {"role": "assistant", "content": "4 * 5 = 20"},
]
WITH_SYSTEM: list[Message] = [{"role": "system", "content": "Answer tersely."}, *DIALOGUE]
ANSWERS = ["2 + 3 = 5", "4 * 5 = 20"]


@pytest.fixture(scope="module")
def chatml(smollm2_tokenizer: Any) -> Any:
    return smollm2_tokenizer


def _with_template(path: str, special_tokens: list[str], template: str) -> Any:
    # A fresh copy: the session's SmolLM2 tokenizer must stay untouched.
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.add_special_tokens({"additional_special_tokens": special_tokens}) == len(special_tokens)
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def llama3(smollm2_path: str) -> Any:
    tokens = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return _with_template(smollm2_path, tokens, LLAMA3_TEMPLATE)


@pytest.fixture(scope="module")
def gemma(smollm2_path: str) -> Any:
    return _with_template(smollm2_path, ["<start_of_turn>", "<end_of_turn>"], GEMMA_TEMPLATE)


def _trained_positions(labels: list[int]) -> list[int]:
    return [i for i, label in enumerate(labels) if label != IGNORE_INDEX]


def _trained_runs(tokenizer: Any, input_ids: list[int], labels: list[int]) -> list[str]:
    """Decode each maximal run of consecutive trained tokens."""
    runs: list[list[int]] = []
    previous = -2
    for i in _trained_positions(labels):
        if i != previous + 1:
            runs.append([])
        runs[-1].append(input_ids[i])
        previous = i
    return [tokenizer.decode(run) for run in runs]


def _check_labels(input_ids: list[int], labels: list[int]) -> None:
    assert len(labels) == len(input_ids)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(input_ids, labels, strict=True))


def _prepare(messages: list[Message], name: str) -> list[Message]:
    return prepare_messages(messages, system_prompt=None, model_support_system_role=name != "gemma")


# (template, dialogue) -> (trained positions, rendered text)
CASES: dict[tuple[str, str], tuple[list[int], str]] = {
    # Default system prompt 0-20, user turn 21-33, assistant header 34-37 ("<|im_start|>", "ass", "istant", "\n").
    ("chatml", "plain"): (
        [*range(38, 46), *range(63, 72)],
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n2 + 3 = 5<|im_end|>\n"
        "<|im_start|>user\nAnd 4 * 5?<|im_end|>\n<|im_start|>assistant\n4 * 5 = 20<|im_end|>\n",
    ),
    # The dialogue's own system turn replaces the default one: 0-9 instead of 0-20, so everything moves by 11.
    ("chatml", "system"): (
        [*range(27, 35), *range(52, 61)],
        "<|im_start|>system\nAnswer tersely.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n2 + 3 = 5<|im_end|>\n"
        "<|im_start|>user\nAnd 4 * 5?<|im_end|>\n<|im_start|>assistant\n4 * 5 = 20<|im_end|>\n",
    ),
    # <|begin_of_text|> 0, user turn 1-14, assistant header 15-20 (start, ass, istant, end, \n, \n).
    ("llama3", "plain"): (
        [*range(21, 29), *range(48, 57)],
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n2 + 3 = 5<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 4 * 5?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4 * 5 = 20<|eot_id|>",
    ),
    # The system turn adds 11 tokens (1-11: header 5, "Answer tersely." 5, <|eot_id|>).
    ("llama3", "system"): (
        [*range(32, 40), *range(59, 68)],
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer tersely.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n2 + 3 = 5<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 4 * 5?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4 * 5 = 20<|eot_id|>",
    ),
    # user turn 0-12, model header 13-15 ("<start_of_turn>", "model", "\n").
    ("gemma", "plain"): (
        [*range(16, 24), *range(40, 49)],
        "<start_of_turn>user\nWhat is 2 + 3?<end_of_turn>\n<start_of_turn>model\n2 + 3 = 5<end_of_turn>\n"
        "<start_of_turn>user\nAnd 4 * 5?<end_of_turn>\n<start_of_turn>model\n4 * 5 = 20<end_of_turn>\n",
    ),
    # The system text is folded into the first user turn: "Answer tersely.\n\n" adds 7 tokens.
    ("gemma", "system"): (
        [*range(23, 31), *range(47, 56)],
        "<start_of_turn>user\nAnswer tersely.\n\nWhat is 2 + 3?<end_of_turn>\n"
        "<start_of_turn>model\n2 + 3 = 5<end_of_turn>\n"
        "<start_of_turn>user\nAnd 4 * 5?<end_of_turn>\n<start_of_turn>model\n4 * 5 = 20<end_of_turn>\n",
    ),
}


@pytest.mark.parametrize(("name", "dialogue"), list(CASES))
def test_assistant_loss_positions(name: str, dialogue: str, request: pytest.FixtureRequest) -> None:
    tokenizer = request.getfixturevalue(name)
    messages = _prepare(WITH_SYSTEM if dialogue == "system" else DIALOGUE, name)
    expected_positions, expected_text = CASES[name, dialogue]

    out = tokenize_conversation(tokenizer, messages, ["assistant"], max_length=1024)

    assert render(tokenizer, messages) == expected_text
    assert tokenizer.decode(out.input_ids) == expected_text
    assert _trained_positions(out.labels) == expected_positions
    assert _trained_runs(tokenizer, out.input_ids, out.labels) == [answer + EOT[name] for answer in ANSWERS]
    _check_labels(out.input_ids, out.labels)
    assert not out.truncated


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma"])
def test_generation_prompt_is_the_prefix_before_the_answer(name: str, request: pytest.FixtureRequest) -> None:
    """Sample generation prompts with ``messages[:last]`` + generation prompt; the answer must follow it verbatim."""
    tokenizer = request.getfixturevalue(name)
    messages = _prepare(WITH_SYSTEM, name)
    full = render(tokenizer, messages)
    prompt = render(tokenizer, messages[:-1], generation_prompt=True)
    without = render(tokenizer, messages[:-1])

    assert prompt != without
    assert full.startswith(prompt)
    assert full[len(prompt) :].startswith(ANSWERS[-1] + EOT[name])


def test_llama3_generation_prompt_header(llama3: Any) -> None:
    prompt = render(llama3, DIALOGUE[:1], generation_prompt=True)
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_chatml_injects_its_default_system_prompt_untrained(chatml: Any) -> None:
    out = tokenize_conversation(chatml, DIALOGUE, ["system", "user", "assistant"], max_length=1024)
    # The template's default system prompt is not a message of the dialogue, so it never carries loss.
    assert _trained_runs(chatml, out.input_ids, out.labels) == [
        "What is 2 + 3?<|im_end|>",
        "2 + 3 = 5<|im_end|>",
        "And 4 * 5?<|im_end|>",
        "4 * 5 = 20<|im_end|>",
    ]
    assert _trained_positions(out.labels)[0] == 24


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma"])
def test_train_on_user_and_assistant(name: str, request: pytest.FixtureRequest) -> None:
    tokenizer = request.getfixturevalue(name)
    messages = _prepare(WITH_SYSTEM, name)
    out = tokenize_conversation(tokenizer, messages, ["user", "assistant"], max_length=1024)
    first_user = "Answer tersely.\n\nWhat is 2 + 3?" if name == "gemma" else "What is 2 + 3?"
    expected = [first_user, ANSWERS[0], "And 4 * 5?", ANSWERS[1]]
    assert _trained_runs(tokenizer, out.input_ids, out.labels) == [text + EOT[name] for text in expected]
    _check_labels(out.input_ids, out.labels)


def test_chatml_user_and_assistant_positions(chatml: Any) -> None:
    out = tokenize_conversation(chatml, DIALOGUE, ["user", "assistant"], max_length=1024)
    assert _trained_positions(out.labels) == [*range(24, 33), *range(38, 46), *range(50, 58), *range(63, 72)]


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma"])
def test_content_that_also_occurs_in_the_header_is_not_matched_there(name: str, request: pytest.FixtureRequest) -> None:
    """'a' occurs in 'assistant', 'start' and the default system prompt; 'assistant'/'model'/'user' in headers."""
    tokenizer = request.getfixturevalue(name)
    contents = ["a", "assistant", "user", "model"]
    messages: list[Message] = [
        {"role": role, "content": content}
        for role, content in zip(["user", "assistant", "user", "assistant"], contents, strict=True)
    ]
    out = tokenize_conversation(tokenizer, messages, ["user", "assistant"], max_length=1024)
    assert _trained_runs(tokenizer, out.input_ids, out.labels) == [c + EOT[name] for c in contents]


def test_system_turn_in_a_template_without_system_role_raises(gemma: Any) -> None:
    unfolded = prepare_messages(WITH_SYSTEM, system_prompt=None, model_support_system_role=True)
    with pytest.raises(TemplateError, match="System role not supported"):
        tokenize_conversation(gemma, unfolded, ["assistant"], max_length=1024)


def test_max_length_truncates_and_flags(chatml: Any) -> None:
    full = tokenize_conversation(chatml, DIALOGUE, ["assistant"], max_length=1024)
    assert len(full.input_ids) == 73

    cut = tokenize_conversation(chatml, DIALOGUE, ["assistant"], max_length=42)
    assert cut.truncated
    assert cut.input_ids == full.input_ids[:42]
    assert cut.labels == full.labels[:42]
    assert _trained_positions(cut.labels) == list(range(38, 42))

    exact = tokenize_conversation(chatml, DIALOGUE, ["assistant"], max_length=73)
    assert not exact.truncated
    assert exact.input_ids == full.input_ids


def test_template_that_rewrites_earlier_turns_raises(smollm2_path: str) -> None:
    # Marks the final turn, as templates that strip reasoning from all but the last assistant turn do.
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}{% if loop.last %}*{% endif %}: {{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match=r"renders message 1 \(assistant\) differently"):
        tokenize_conversation(tokenizer, DIALOGUE, ["assistant"], max_length=1024)


def test_template_that_alters_content_raises(smollm2_path: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    messages: list[Message] = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(ChatTemplateError, match=r"content of message 1 \(assistant\) verbatim"):
        tokenize_conversation(tokenizer, messages, ["assistant"], max_length=1024)


# prepare_messages


def test_system_prompt_injected_when_dialogue_has_none() -> None:
    out = prepare_messages(DIALOGUE, system_prompt="Be brief.", model_support_system_role=True)
    assert out == [{"role": "system", "content": "Be brief."}, *DIALOGUE]
    assert DIALOGUE[0] == {"role": "user", "content": "What is 2 + 3?"}


def test_system_prompt_not_injected_when_dialogue_has_one() -> None:
    assert prepare_messages(WITH_SYSTEM, system_prompt="Be brief.", model_support_system_role=True) == WITH_SYSTEM
    later_system: list[Message] = [DIALOGUE[0], {"role": "system", "content": "Switch to French."}, *DIALOGUE[1:]]
    assert prepare_messages(later_system, system_prompt="Be brief.", model_support_system_role=True) == later_system


def test_no_system_prompt_leaves_the_dialogue_unchanged() -> None:
    out = prepare_messages(DIALOGUE, system_prompt=None, model_support_system_role=True)
    assert out == DIALOGUE
    assert out[0] is not DIALOGUE[0]


def test_system_turn_folded_into_first_user_turn() -> None:
    out = prepare_messages(WITH_SYSTEM, system_prompt=None, model_support_system_role=False)
    assert out == [{"role": "user", "content": "Answer tersely.\n\nWhat is 2 + 3?"}, *DIALOGUE[1:]]
    assert WITH_SYSTEM[1]["content"] == "What is 2 + 3?"


def test_injected_system_prompt_is_folded_too() -> None:
    out = prepare_messages(DIALOGUE, system_prompt="Be brief.", model_support_system_role=False)
    assert out == [{"role": "user", "content": "Be brief.\n\nWhat is 2 + 3?"}, *DIALOGUE[1:]]


def test_system_turn_without_following_user_turn_becomes_user() -> None:
    messages: list[Message] = [{"role": "system", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    out = prepare_messages(messages, system_prompt=None, model_support_system_role=False)
    assert out == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
