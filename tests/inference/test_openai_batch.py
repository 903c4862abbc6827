"""Batched generation: conversation shapes (fake client), resume and torn lines, retries against injected faults."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import pytest

from alignment.data.basket import BasketRow
from alignment.data.validate import DataError
from alignment.inference.openai_batch import (
    ApiType,
    ClientConfig,
    LineAppender,
    ResponseError,
    SamplingConfig,
    candidate_conversations,
    generate_row,
    make_client,
    process_rows,
    resume_ids,
)
from tests.inference.conftest import FAIL_MARKER, get

USER = [{"role": "user", "content": "What is 2 + 2?"}]
FOLLOW_UP = [{"role": "user", "content": "Are you sure?"}]


def basket_row(row_id: str | int = "r1", **kwargs: Any) -> BasketRow:
    values: dict[str, Any] = {
        "prompt": USER,
        "system_prompt": None,
        "follow_up_prompt": None,
        "response_format": None,
        "correct_answer": None,
        **kwargs,
    }
    passthrough = {"id": row_id, "category": "math"}
    return BasketRow(id=row_id, passthrough=passthrough, origin="basket.jsonl:1", **values)


class FakeClient:
    """``client.chat.completions.create`` that records each request and answers ``answer<call>.<choice>``."""

    def __init__(self, *, choices_short_by: int = 0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.short = choices_short_by
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    async def create(self, **request: Any) -> Any:
        self.requests.append(request)
        call = len(self.requests)
        n = request.get("n", 1) - self.short
        choices = [
            SimpleNamespace(
                index=i,
                finish_reason="stop",
                message=openai.types.chat.ChatCompletionMessage(
                    role="assistant", content=f"answer{call}.{i}", refusal=None
                ),
            )
            for i in reversed(range(n))  # out of order: the client sorts by index
        ]
        return SimpleNamespace(choices=choices, usage=SimpleNamespace(prompt_tokens=10, completion_tokens=3 * n))


def generate(row: BasketRow, client: FakeClient, global_system_prompt: str | None = None, **sampling: Any) -> Any:
    return asyncio.run(
        generate_row(
            client,
            row,
            model="m",
            sampling=SamplingConfig(**sampling),
            global_system_prompt=global_system_prompt,
        )
    )


@pytest.mark.parametrize(
    ("row_system", "global_system", "expected"),
    [("Row.", "Global.", "Row."), (None, "Global.", "Global."), (None, None, None), ("", "Global.", "")],
)
def test_system_prompt_precedence_row_then_global_then_none(
    row_system: str | None, global_system: str | None, expected: str | None
) -> None:
    client = FakeClient()
    record = generate(basket_row(system_prompt=row_system), client, global_system)
    sent = client.requests[0]["messages"]
    if expected is None:
        assert sent == USER
    else:
        assert sent == [{"role": "system", "content": expected}, *USER]
    assert record["conversation"][:-1] == sent


def test_single_turn_record_schema_and_request() -> None:
    client = FakeClient()
    record = generate(basket_row(response_format={"type": "json_object"}), client, max_completion_tokens=7)
    assert record == {
        "id": "r1",
        "category": "math",
        "model": "m",
        "conversation": [*USER, {"role": "assistant", "content": "answer1.0"}],
        "generated_message_indices": [1],
        "finish_reason": ["stop"],
        "candidates": [{"role": "assistant", "content": "answer1.0"}],
        "candidate_finish_reasons": ["stop"],
        "prompt_tokens": 10,
        "completion_tokens": 3,
    }
    (request,) = client.requests
    assert request == {
        "model": "m",
        "messages": USER,
        "temperature": 0.0,
        "max_tokens": 7,
        "response_format": {"type": "json_object"},
    }


def test_follow_up_turn_then_n_candidates() -> None:
    client = FakeClient()
    row = basket_row(system_prompt="Sys.", follow_up_prompt=FOLLOW_UP)
    record = generate(
        row, client, num_completions=3, temperature=0.7, top_p=0.9, stop=["\n\n"], extra_body={"top_k": 5}
    )
    first, second = client.requests
    assert "n" not in first
    assert second["n"] == 3
    assert (second["top_p"], second["stop"], second["extra_body"]) == (0.9, ["\n\n"], {"top_k": 5})
    system = {"role": "system", "content": "Sys."}
    answer1 = {"role": "assistant", "content": "answer1.0"}
    assert second["messages"] == [system, *USER, answer1, *FOLLOW_UP]
    assert record["conversation"] == [system, *USER, answer1, *FOLLOW_UP, {"role": "assistant", "content": "answer2.0"}]
    assert record["generated_message_indices"] == [2, 4]
    assert record["finish_reason"] == ["stop", "stop"]
    assert [c["content"] for c in record["candidates"]] == ["answer2.0", "answer2.1", "answer2.2"]
    assert (record["prompt_tokens"], record["completion_tokens"]) == (20, 3 + 9)
    conversations = candidate_conversations(record)
    assert [c[-1]["content"] for c in conversations] == ["answer2.0", "answer2.1", "answer2.2"]
    assert all(c[:-1] == [system, *USER, answer1, *FOLLOW_UP] for c in conversations)


def test_split_n_sends_n_single_requests() -> None:
    client = FakeClient()
    record = generate(basket_row(), client, num_completions=3, split_n=True)
    assert len(client.requests) == 3
    assert all("n" not in r for r in client.requests)
    assert len(record["candidates"]) == 3
    assert record["completion_tokens"] == 9


def test_too_few_choices_is_a_response_error() -> None:
    with pytest.raises(ResponseError, match="asked for 3 completion"):
        generate(basket_row(), FakeClient(choices_short_by=1), num_completions=3)


def test_resume_ids_repairs_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a", "x": 1}\n{"id": 2}\n{"id": "c", "conversa', encoding="utf-8")
    assert resume_ids(path, "id") == {'"a"', "2"}
    assert path.read_text(encoding="utf-8") == '{"id": "a", "x": 1}\n{"id": 2}\n'
    assert resume_ids(path, "id") == {'"a"', "2"}  # idempotent
    assert resume_ids(tmp_path / "missing.jsonl", "id") == set()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"id": "a"}\nnot json\n{"id": "b"}\n', r"out\.jsonl:2: unreadable output line"),
        ('{"id": "a"}\n{"other": 1}\n', r"out\.jsonl:2: output line has no 'id' key"),
        ('{"id": "a"}\n{"id": "a"}\n', r"out\.jsonl:2: id \"a\" already written at line 1"),
    ],
)
def test_resume_ids_rejects_a_corrupt_output(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        resume_ids(path, "id")


def test_line_appender_writes_whole_utf8_lines(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.jsonl"
    writer = LineAppender(path)
    writer.write({"id": "ж", "text": "x" * 200_000})
    writer.write({"id": 2})
    writer.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["ж", 2]


def test_azure_client_and_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "sk-from-env-0123456789abcdef")
    azure = make_client(ClientConfig(api_type=ApiType.azure, key_env="MY_KEY", base_url="https://x.azure.com"))
    assert isinstance(azure, openai.AsyncAzureOpenAI)
    assert azure.api_key == "sk-from-env-0123456789abcdef"
    monkeypatch.delenv("MY_KEY")
    plain = make_client(ClientConfig(key_env="MY_KEY", max_retries=3, timeout_s=5))
    assert (plain.api_key, plain.max_retries, plain.timeout) == ("EMPTY", 3, 5)


def test_retries_under_injected_faults_lose_no_row(faulty_server: str, tmp_path: Path) -> None:
    """429 (Retry-After), 500 and dropped connections hit ~35% of requests; every row still arrives once.

    The row that is always rate-limited lands in the errors file with its reason after its retries.
    """
    rows = [basket_row(f"q{i}", prompt=[{"role": "user", "content": f"What is {i} + 1?"}]) for i in range(30)]
    poisoned = basket_row("poisoned", prompt=[{"role": "user", "content": f"{FAIL_MARKER} What is 1 + 1?"}])
    output, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    key = "sk-test-secret-0123456789abcdefghij"

    async def go() -> Any:
        async with openai.AsyncOpenAI(base_url=faulty_server, api_key=key, max_retries=10, timeout=30) as client:

            async def handle(row: BasketRow) -> dict[str, Any]:
                sampling = SamplingConfig(max_completion_tokens=4)
                return await generate_row(
                    client, row, model="embedded:tiny-random-llama", sampling=sampling, global_system_prompt=None
                )

            return await process_rows(
                [*rows[:15], poisoned, *rows[15:]],
                handle,
                output_path=output,
                errors_path=errors,
                id_field="id",
                concurrency=8,
                secrets=[key],
            )

    before = Counter(get(faulty_server, "/faults"))  # the server is shared: count this test's faults only
    summary = asyncio.run(go())
    written = [json.loads(line)["id"] for line in output.read_text(encoding="utf-8").splitlines()]
    assert sorted(written) == sorted(r.id for r in rows)  # none lost, none duplicated
    (failure,) = [json.loads(line) for line in errors.read_text(encoding="utf-8").splitlines()]
    assert failure["id"] == "poisoned"
    assert failure["origin"] == "basket.jsonl:1"
    assert (failure["error_type"], failure["status_code"]) == ("RateLimitError", 429)
    assert "injected marker" in failure["error"]
    assert (summary.rows_written, summary.rows_failed, summary.rows_resumed) == (30, 1, 0)
    assert summary.completion_tokens > 0
    assert key not in output.read_text(encoding="utf-8") + errors.read_text(encoding="utf-8")
    faults = Counter(get(faulty_server, "/faults")) - before
    assert faults["marker"] == 11, faults  # the first try and ten retries
    assert all(faults.get(kind, 0) > 0 for kind in ("429", "500", "drop")), faults

    # A rerun skips the 30 written rows and retries only the failed one (the errors file is rewritten).
    summary = asyncio.run(go())
    assert (summary.rows_resumed, summary.rows_written, summary.rows_failed) == (30, 0, 1)
    assert len(output.read_text(encoding="utf-8").splitlines()) == 30
    assert len(errors.read_text(encoding="utf-8").splitlines()) == 1


def test_a_bug_in_the_handler_stops_the_run_and_no_worker_writes_after(tmp_path: Path) -> None:
    """Only API and response errors become error rows; anything else is a bug that stops every worker."""
    output = tmp_path / "out.jsonl"
    rows = [basket_row(f"r{i}") for i in range(12)]

    async def handle(row: BasketRow) -> dict[str, Any]:
        if row.id == "r5":
            raise KeyError("a bug")
        await asyncio.sleep(0.05 if row.id != "r4" else 0.3)
        return {"id": row.id}

    async def go() -> int:
        with pytest.raises(KeyError, match="a bug"):
            await process_rows(
                rows, handle, output_path=output, errors_path=tmp_path / "e.jsonl", id_field="id", concurrency=4
            )
        written = len(output.read_text(encoding="utf-8").splitlines())
        await asyncio.sleep(0.5)  # a worker left running would append r4 now
        assert len(output.read_text(encoding="utf-8").splitlines()) == written
        return written

    assert asyncio.run(go()) < len(rows)
    assert (tmp_path / "e.jsonl").read_text(encoding="utf-8") == ""
