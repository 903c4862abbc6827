"""The local server's OpenAI API through the real ``openai`` client (sync and async) and raw HTTP.

Streaming (chunks, usage, SSE framing, cancelling a stream), ``/v1/completions`` with log-probs checked against a
forward of the same model in this process, ``echo`` prompt scoring, content parts, chat log-probs, and every
parameter the server cannot honour refused by name. The tiny random model repeats its last token under greedy
decoding, so equality checks that need varied text use seeded sampling (a batch of one is reproducible).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
import torch

from tests.inference.conftest import get

MODEL = "embedded:tiny-random-llama"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny(tiny_random_path: str) -> tuple[Any, Any]:
    """The served model and tokenizer, loaded in this process for reference values."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_random_path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_random_path)


@pytest.fixture
def sync_client(local_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=local_server, api_key="sk-test", max_retries=0)


def chat(content: Any, **kwargs: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **kwargs}


def forward_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """``(len(ids) - 1, vocab)``: row i is log p(· | ids[: i + 1])."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def greedy(model: Any, ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2)
    return [int(t) for t in out[0, len(ids) :]]


def sse_events(response: httpx.Response) -> list[Any]:
    """The ``data:`` payloads of a server-sent event stream, checking its framing; ``[DONE]`` ends it."""
    raw = response.read().decode()
    assert raw.endswith("\n\n"), raw[-200:]
    events = raw[:-2].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events), raw[:500]
    assert events[-1] == "data: [DONE]"
    return [json.loads(event.removeprefix("data: ")) for event in events[:-1]]


def test_sync_and_async_chat_give_the_model_s_own_greedy_answer(
    sync_client: openai.OpenAI, local_server: str, tiny: tuple[Any, Any]
) -> None:
    model, tokenizer = tiny
    whole = sync_client.chat.completions.create(**chat("What is 2 + 2?", temperature=0))

    async def go() -> Any:
        async with openai.AsyncOpenAI(base_url=local_server, api_key="sk-test", max_retries=0) as client:
            return await client.chat.completions.create(**chat("What is 2 + 2?", temperature=0))

    assert asyncio.run(go()).choices[0].message.content == whole.choices[0].message.content
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True, return_dict=False
    )
    expected = tokenizer.decode(greedy(model, list(prompt), 8), skip_special_tokens=True)
    assert whole.choices[0].message.content == expected
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt), 8)
    assert whole.choices[0].finish_reason == "length"
    assert whole.choices[0].logprobs is None


def test_content_parts_are_joined_text(sync_client: openai.OpenAI) -> None:
    parts = [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "a story."}]
    as_parts = sync_client.chat.completions.create(**chat(parts, temperature=1.0, seed=11))
    as_text = sync_client.chat.completions.create(**chat("Tell me\na story.", temperature=1.0, seed=11))
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7, "n": 2}], ids=str)
def test_streamed_chat_is_the_whole_answer_in_pieces(sync_client: openai.OpenAI, sampling: dict[str, Any]) -> None:
    request = chat("Tell me a story.", max_tokens=12, **sampling)
    whole = sync_client.chat.completions.create(**request)
    chunks = list(sync_client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    n = sampling.get("n", 1)
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    *streamed, last = chunks
    assert last.choices == []
    assert last.usage == whole.usage
    for index in range(n):
        mine = [c.choices[0] for c in streamed if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert mine[0].delta.content == ""
        content = [choice.delta.content for choice in mine[1:-1]]
        assert all(content)
        assert mine[-1].delta.content is None
        assert [choice.finish_reason for choice in mine] == [None] * (len(mine) - 1) + ["length"]
        assert "".join(content) == whole.choices[index].message.content
        assert len(content) > 1, "the answer came in one piece: not streamed token by token"


def test_stream_framing_on_the_wire_and_no_usage_unless_asked(local_server: str) -> None:
    body = chat("Hi", max_tokens=3, stream=True)
    with httpx.stream("POST", f"{local_server}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert all("usage" not in event for event in events)
    assert events[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert events[-1]["choices"][0]["delta"] == {}
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.05)
    return value


def test_a_stream_arrives_while_generating_and_stops_when_the_client_leaves(local_server: str) -> None:
    """100k tokens take minutes: text arriving at all proves streaming, and closing the stream cancels it."""
    before = get(local_server, "/health")
    body = chat("Tell me a very long story.", max_tokens=100_000, temperature=1.0, stream=True)
    with httpx.stream("POST", f"{local_server}/chat/completions", json=body, timeout=120) as response:
        pieces = 0
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                pieces += 1
                if pieces == 3:
                    break
    health = wait_for(lambda: (h := get(local_server, "/health"))["generating"] == 0 and h, "the server went idle")
    assert health["cancelled"] == before["cancelled"] + 1


def test_completion_logprobs_are_the_model_s_log_softmax(sync_client: openai.OpenAI, tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    prompt = "The capital of France is"
    response = sync_client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=3)
    (choice,) = response.choices
    prompt_ids = tokenizer(prompt)["input_ids"]
    generated = greedy(model, prompt_ids, 5)
    reference = forward_logprobs(model, prompt_ids + generated)[len(prompt_ids) - 1 :]
    tokens = [tokenizer.decode([t]) for t in generated]
    assert choice.text == "".join(tokens) == tokenizer.decode(generated)
    assert choice.logprobs.tokens == tokens
    assert choice.logprobs.text_offset == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    for i, (token_id, token) in enumerate(zip(generated, tokens, strict=True)):
        assert math.isclose(choice.logprobs.token_logprobs[i], reference[i, token_id].item(), abs_tol=TOLERANCE)
        top = choice.logprobs.top_logprobs[i]
        assert top[token] == choice.logprobs.token_logprobs[i]
        best = reference[i].topk(3)
        assert sorted(top.values(), reverse=True) == pytest.approx(best.values.tolist(), abs=TOLERANCE)
    assert response.usage.completion_tokens == 5
    assert choice.finish_reason == "length"


def test_echo_with_no_new_tokens_scores_the_prompts(sync_client: openai.OpenAI, tiny: tuple[Any, Any]) -> None:
    """The distillation-teacher call: ``max_tokens=0, echo=true, logprobs=k`` on text and token-id prompts."""
    model, tokenizer = tiny
    text = "Hello world, how are you today?"
    ids = tokenizer(text)["input_ids"]
    other = [5, 300, 4000, 12, 77]
    response = sync_client.completions.create(
        model=MODEL, prompt=[text, other], max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    assert [c.index for c in response.choices] == [0, 1]
    assert response.choices[0].text == text
    assert response.choices[1].text == tokenizer.decode(other)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids) + len(other), 0)
    for choice, prompt_ids in zip(response.choices, [ids, other], strict=True):
        assert choice.finish_reason == "length"
        logprobs = choice.logprobs
        assert logprobs.tokens == [tokenizer.decode([t]) for t in prompt_ids]
        assert logprobs.token_logprobs[0] is None
        assert logprobs.top_logprobs[0] is None
        reference = forward_logprobs(model, prompt_ids)
        expected = [reference[i, t].item() for i, t in enumerate(prompt_ids[1:])]
        assert logprobs.token_logprobs[1:] == pytest.approx(expected, abs=TOLERANCE)
        assert all(len(top) in (2, 3) for top in logprobs.top_logprobs[1:])  # the two best, plus the token itself
    offsets = response.choices[0].logprobs.text_offset
    assert [text[a:b] for a, b in zip(offsets, [*offsets[1:], len(text)], strict=True)] == response.choices[
        0
    ].logprobs.tokens


def test_echo_then_generate_streamed_and_whole_agree(
    local_server: str, sync_client: openai.OpenAI, tiny: tuple[Any, Any]
) -> None:
    """The same completion (prompt echoed, log-probs, two prompts, n=2) as one object and as SSE chunks."""
    prompts = ["Once upon a time", "def main():"]
    request = {"model": MODEL, "prompt": prompts, "max_tokens": 4, "echo": True, "logprobs": 1, "n": 2}
    request |= {"temperature": 1.0, "seed": 3}
    whole = sync_client.completions.create(**request)
    with httpx.stream("POST", f"{local_server}/completions", json={**request, "stream": True}, timeout=60) as response:
        events = sse_events(response)
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    for choice in whole.choices:
        prompt = prompts[choice.index // 2]
        prompt_tokens = len(tiny[1](prompt)["input_ids"])
        assert choice.text.startswith(prompt)
        assert len(choice.logprobs.tokens) == prompt_tokens + 4
        assert choice.logprobs.token_logprobs[0] is None
        assert choice.logprobs.text_offset[prompt_tokens] == len(prompt)
        mine = [event["choices"][0] for event in events if event["choices"][0]["index"] == choice.index]
        assert "".join(piece["text"] for piece in mine) == choice.text
        assert mine[-1]["finish_reason"] == choice.finish_reason == "length"
        streamed = [piece["logprobs"] for piece in mine if piece["logprobs"] is not None]
        for key in ("tokens", "token_logprobs", "text_offset"):
            assert [v for part in streamed for v in part[key]] == getattr(choice.logprobs, key)


def test_chat_logprobs_and_top_logprobs(sync_client: openai.OpenAI, tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    response = sync_client.chat.completions.create(
        **chat("Write a poem", temperature=0, max_tokens=6), logprobs=True, top_logprobs=2
    )
    (choice,) = response.choices
    content = choice.logprobs.content
    prompt = list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "Write a poem"}], add_generation_prompt=True, return_dict=False
        )
    )
    generated = greedy(model, prompt, 6)
    reference = forward_logprobs(model, prompt + generated)[len(prompt) - 1 :]
    assert [entry.token for entry in content] == [tokenizer.decode([t]) for t in generated]
    assert "".join(entry.token for entry in content) == choice.message.content
    for i, (entry, token_id) in enumerate(zip(content, generated, strict=True)):
        assert entry.bytes == list(entry.token.encode())
        assert math.isclose(entry.logprob, reference[i, token_id].item(), abs_tol=TOLERANCE)
        best = reference[i].topk(2)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([t]) for t in best.indices.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=TOLERANCE)
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the chosen token is the most likely


NOT_HONOURED = [
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ("chat", {"tool_choice": "auto"}, "tool_choice"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"presence_penalty": 0.5}, "presence_penalty"),
    ("chat", {"frequency_penalty": -1.0}, "frequency_penalty"),
    ("chat", {"logit_bias": {"42": 5}}, "logit_bias"),
    ("chat", {"top_logprobs": 3}, "top_logprobs"),
    ("chat", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {"parallel_tool_calls": False}, "parallel_tool_calls"),
    ("chat", {"extra_body": {"min_p": 0.1}}, "min_p"),
    ("chat", {"extra_body": {"guided_json": {"type": "object"}}}, "guided_json"),
    ("completions", {"suffix": "the end"}, "suffix"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"presence_penalty": 1.0}, "presence_penalty"),
    ("completions", {"logit_bias": {"42": -100}}, "logit_bias"),
    ("completions", {"extra_body": {"response_format": {"type": "json_object"}}}, "response_format"),
]


@pytest.mark.parametrize(("endpoint", "extra", "param"), NOT_HONOURED, ids=[case[2] for case in NOT_HONOURED])
def test_a_parameter_the_server_cannot_honour_is_refused_by_name(
    sync_client: openai.OpenAI, endpoint: str, extra: dict[str, Any], param: str
) -> None:
    def send() -> Any:
        if endpoint == "chat":
            return sync_client.chat.completions.create(**chat("Hi", max_tokens=2), **extra)
        return sync_client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, **extra)

    with pytest.raises(openai.BadRequestError) as caught:
        send()
    error = caught.value
    assert error.status_code == 400
    assert error.body["param"] == param
    assert param in error.body["message"]
    assert error.body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("content", "param", "named"),
    [
        ([{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "x"}}], "content[1]", "image_url"),
        ([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}], "content[0]", "input_audio"),
    ],
)
def test_content_parts_other_than_text_are_refused_by_type(
    sync_client: openai.OpenAI, content: list[dict[str, Any]], param: str, named: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sync_client.chat.completions.create(**chat(content))
    assert caught.value.body["param"] == f"messages[0].{param}.type"
    assert named in caught.value.body["message"]


def test_values_that_change_nothing_are_accepted(sync_client: openai.OpenAI) -> None:
    neutral: dict[str, Any] = {
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "response_format": {"type": "text"},
        "user": "tester",
    }
    a = sync_client.chat.completions.create(**chat("Hi", temperature=1.0, seed=9), **neutral)
    b = sync_client.chat.completions.create(**chat("Hi", temperature=1.0, seed=9))
    assert a.choices[0].message.content == b.choices[0].message.content
