"""The local OpenAI-compatible server, driven by the real ``openai`` client: n, token caps, batching, errors, faults."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest

from alignment.inference.server import Completion, Engine, Job, SamplingKey
from tests.inference.conftest import FAIL_MARKER, get

MODEL = "embedded:tiny-random-llama"


def client(base_url: str, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="sk-test", **{"max_retries": 0, **kwargs})


def ask(content: str, **kwargs: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6, **kwargs}


def test_models_and_health(local_server: str) -> None:
    assert [m["id"] for m in get(local_server, "/v1/models")["data"]] == [MODEL]
    assert get(local_server, "/health")["status"] == "ok"


def test_n_completions_token_cap_and_usage(local_server: str) -> None:
    async def go() -> Any:
        async with client(local_server) as c:
            return await c.chat.completions.create(**ask("Hello there", n=3, temperature=1.0, max_tokens=5))

    response = asyncio.run(go())
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    assert all(choice.message.role == "assistant" for choice in response.choices)
    assert all(choice.finish_reason in ("stop", "length") for choice in response.choices)
    assert response.usage.prompt_tokens > 0
    assert 3 <= response.usage.completion_tokens <= 15  # at most 5 per completion, at least 1
    assert response.model == MODEL


def test_concurrent_requests_share_batches_and_match_one_at_a_time(local_server: str) -> None:
    prompts = [f"Question number {i}: what is {i} + {i}?" for i in range(8)]

    async def go() -> tuple[list[str], list[str]]:
        async with client(local_server) as c:
            alone = [
                (await c.chat.completions.create(**ask(p, temperature=0))).choices[0].message.content for p in prompts
            ]
            before = get(local_server, "/health")["batches"]
            together = await asyncio.gather(*(c.chat.completions.create(**ask(p, temperature=0)) for p in prompts))
            used = get(local_server, "/health")["batches"] - before
            assert used < len(prompts), f"8 concurrent requests took {used} batches: no batching"
            return [str(a) for a in alone], [str(r.choices[0].message.content) for r in together]

    alone, together = asyncio.run(go())
    # Greedy decoding with left padding and the attention mask gives the same text batched as alone.
    assert together == alone


@pytest.mark.parametrize(
    ("request_body", "error", "status"),
    [
        (ask("hi", model="some/other-model"), openai.NotFoundError, 404),
        (ask("hi", n=0), openai.BadRequestError, 400),
        ({"model": MODEL, "messages": []}, openai.BadRequestError, 400),
    ],
)
def test_bad_requests_are_client_errors(
    local_server: str, request_body: dict[str, Any], error: type[Exception], status: int
) -> None:
    async def go() -> None:
        async with client(local_server, max_retries=3) as c:
            await c.chat.completions.create(**request_body)

    with pytest.raises(error) as caught:
        asyncio.run(go())
    assert getattr(caught.value, "status_code", None) == status


def test_injected_faults_reach_the_client_as_openai_errors(faulty_server: str) -> None:
    async def go() -> list[Any]:
        async with client(faulty_server) as c:
            calls = [c.chat.completions.create(**ask(f"ping {i}")) for i in range(40)]
            return await asyncio.gather(*calls, return_exceptions=True)

    before = Counter(get(faulty_server, "/faults"))  # the server is shared: count this test's faults only
    outcomes = asyncio.run(go())
    kinds = Counter(type(o).__name__ for o in outcomes)
    assert kinds["ChatCompletion"] > 0, kinds
    assert set(kinds) <= {"ChatCompletion", "RateLimitError", "InternalServerError", "APIConnectionError"}, kinds
    limited = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    assert all(o.response.headers["retry-after"] == "0.05" for o in limited)
    counts = Counter(get(faulty_server, "/faults")) - before
    assert kinds["RateLimitError"] == counts["429"]
    assert kinds["InternalServerError"] == counts["500"]
    assert kinds["APIConnectionError"] == counts["drop"]


def test_marked_request_always_fails_even_after_retries(faulty_server: str) -> None:
    async def go() -> None:
        async with client(faulty_server, max_retries=2) as c:
            await c.chat.completions.create(**ask(f"please {FAIL_MARKER}"))

    before = get(faulty_server, "/faults").get("marker", 0)
    with pytest.raises(openai.RateLimitError):
        asyncio.run(go())
    assert get(faulty_server, "/faults")["marker"] == before + 3  # the first try and two retries


def test_production_help_and_app_have_no_fault_injection() -> None:
    """Fault injection is test code (``tests/inference/fault_server.py``): the user-facing server has none."""
    import alignment.inference.server as server

    result = subprocess.run(
        [sys.executable, "-m", "alignment.inference.server", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "--model" in result.stdout
    assert "--port" in result.stdout
    # "fault" as a word or an option's part ("--fault-429", "FAULT_SEED"), not inside "default".
    fault_words = re.compile(r"(?<![a-z])faults?|fail.marker|retry.after|inject", re.IGNORECASE)
    assert not fault_words.search(result.stdout), result.stdout
    assert not [name for name in vars(server) if re.match(r"_?fault", name, re.IGNORECASE)]


def test_finish_cuts_at_end_of_turn_token_cap_and_stop_string(tiny_random_path: str) -> None:
    from transformers import AutoTokenizer

    engine = Engine.__new__(Engine)
    engine.tokenizer = AutoTokenizer.from_pretrained(tiny_random_path)
    eos = engine.tokenizer.eos_token_id
    engine.stop_ids = {eos}
    words = engine.tokenizer.encode(" one two three four", add_special_tokens=False)

    def job(max_tokens: int, stop: list[str]) -> Job:
        return Job([], 1, max_tokens, SamplingKey(0.0, None, None), stop, lambda _: None)

    assert engine._finish([*words, eos, *words], job(50, [])) == Completion(
        " one two three four", len(words) + 1, "stop"
    )
    capped = engine._finish([*words, eos], job(2, []))
    assert (capped.tokens, capped.finish_reason) == (2, "length")
    assert engine._finish(words, job(50, [" three"])).text == " one two"
    assert engine._finish(words, job(50, [" three"])).finish_reason == "stop"


@pytest.fixture(scope="module")
def solo_server(tiny_random_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server of this module's own, one request per batch: a request still generating holds up the next one."""
    from alignment.inference.server import running_server

    log_path: Path = tmp_path_factory.mktemp("solo_server") / "server.log"
    args = ["--threads", "1", "--max-batch-size", "1"]
    with running_server(MODEL, extra_args=args, log_path=log_path) as base_url:
        yield base_url


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = 120.0) -> Any:
    """Poll ``condition`` until it is truthy (returned) or fail after a deadline far beyond the expected time."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.05)
    return value


def test_a_client_that_disconnects_frees_its_batch_slot(solo_server: str) -> None:
    """A client drops a request once it is generating: the server stops it and answers the next one at once.

    The dropped request asks for 100k tokens (minutes of generation); uncancelled, it would hold the only batch slot
    and the follow-up would time out.
    """
    before = get(solo_server, "/health")
    url = urlsplit(solo_server)
    body = json.dumps(ask("Tell me a very long story.", max_tokens=100_000, temperature=0)).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: get(solo_server, "/health")["batches"] > before["batches"], "the long request started")
    # The socket is closed: the client went away mid-generation.

    async def follow_up() -> Any:
        async with client(solo_server, timeout=120.0) as c:
            return await c.chat.completions.create(**ask("Hi", max_tokens=4, temperature=0))

    response = asyncio.run(follow_up())
    assert response.choices[0].finish_reason in ("stop", "length")
    health = wait_for(lambda: (h := get(solo_server, "/health"))["generating"] == 0 and h, "the server went idle")
    assert health["cancelled"] == before.get("cancelled", 0) + 1
    assert health["batches"] == before["batches"] + 2
