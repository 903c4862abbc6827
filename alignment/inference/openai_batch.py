"""Batched generation against any OpenAI-compatible server (vLLM, OpenAI, Azure, the local server) with resume.

Retries are the ``openai`` client's own (``max_retries``): exponential backoff from 0.5 s to 8 s with jitter on
connection errors, timeouts, 408, 409, 429 and 5xx, honouring ``Retry-After``/``retry-after-ms`` up to 60 s. It
does that well, so nothing here re-implements it. What is ours: a row that still fails after the retries goes to
an errors file with the reason (never dropped silently), and the output is resumable by id:

* each finished row is appended as one complete line, flushed, in a single ``write`` loop on an ``O_APPEND``
  descriptor, so a killed process loses at most its in-flight rows and never duplicates one;
* on start, ids already in the output are skipped; a torn last line (no trailing newline: the process died
  mid-write) is cut off first, and any other unreadable line is an error naming ``file:line``.

API keys are read from the environment variable named in :class:`ClientConfig` and never written anywhere; error
text is scrubbed of the key and of credential-looking strings before it reaches the errors file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from alignment.data.basket import BasketRow
from alignment.data.validate import DataError
from alignment.ranges import bounded, check_fields
from alignment.task import TaskFailedError

log = logging.getLogger(__name__)

_DROPPED_MESSAGE_KEYS = ("function_call", "tool_calls", "refusal", "audio", "annotations")
PLACEHOLDER_KEY = "EMPTY"


class ApiType(StrEnum):
    """Which client class talks to the server."""

    openai = "openai"
    azure = "azure"


@dataclass
class ClientConfig:
    """Where to send requests and how hard to try."""

    base_url: str = "http://localhost:8000/v1"
    """Server URL up to ``/v1`` (``vllm serve`` and the local server listen on port 8000); Azure: the endpoint."""
    api_type: ApiType = ApiType.openai
    """``openai`` for any OpenAI-compatible server, ``azure`` for Azure OpenAI."""
    key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key (the key itself never goes in a config); unset sends
    the placeholder ``EMPTY``, which vLLM and the local server accept."""
    azure_api_version: str = "2024-08-01-preview"
    """Azure OpenAI API version (``api_type=azure`` only)."""
    max_retries: int = bounded(6, ge=0)
    """Retries per request on connection errors, timeouts, 408/409/429 and 5xx (the openai client's backoff)."""
    timeout_s: float = bounded(600.0, gt=0)
    """Seconds before one request times out (then it is retried)."""
    concurrency: int = bounded(8, ge=1)
    """Rows in flight at once."""

    def __post_init__(self) -> None:
        check_fields(self, "client")


@dataclass
class SamplingConfig:
    """What each request asks for."""

    num_completions: int = bounded(1, ge=1)
    """Completions of the last generated turn (OpenAI ``n``); a follow-up's first turn is always one."""
    temperature: float = bounded(0.0, ge=0)
    """Sampling temperature (0: greedy)."""
    max_completion_tokens: int = bounded(3072, ge=1)
    """Cap on generated tokens per completion (sent as ``max_tokens``)."""
    top_p: float | None = bounded(None, gt=0, le=1)
    """Nucleus sampling mass; None leaves the server default."""
    seed: int | None = None
    """Sampling seed, for servers that honour it; None leaves it unset."""
    stop: list[str] = field(default_factory=list)
    """Stop strings."""
    extra_body: dict[str, Any] = field(default_factory=dict)
    """Server-specific request fields, e.g. vLLM's ``top_k`` or ``repetition_penalty``."""
    split_n: bool = False
    """Send ``num_completions`` requests of n=1 instead of one with ``n`` (for servers without ``n``)."""

    def __post_init__(self) -> None:
        check_fields(self, "sampling")


class ResponseError(RuntimeError):
    """The server answered, but not with what was asked (no choices, too few, no content)."""


class RowsFailedError(TaskFailedError):
    """More rows ended in the errors file than ``method.allow_failures`` lets through; carries the run's metrics."""


@dataclass
class RunSummary:
    """Counts and rates of one pass over a basket."""

    rows_total: int
    """Rows in the basket."""
    rows_resumed: int
    """Rows already in the output before this run (skipped)."""
    rows_written: int
    """Rows written by this run."""
    rows_failed: int
    """Rows that failed after retries (listed in the errors file)."""
    prompt_tokens: int
    """Prompt tokens of this run's rows, summed over their calls."""
    completion_tokens: int
    """Generated tokens of this run's rows."""
    elapsed_s: float
    """Wall time of this run's requests."""

    def metrics(self, prefix: str) -> dict[str, float]:
        """The summary as ``prefix/name`` metrics, with rows/s and completion tokens/s."""
        elapsed = max(self.elapsed_s, 1e-9)
        values = {
            "rows_total": self.rows_total,
            "rows_resumed": self.rows_resumed,
            "rows_written": self.rows_written,
            "rows_failed": self.rows_failed,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "elapsed_s": self.elapsed_s,
            "rows_per_s": self.rows_written / elapsed,
            "tokens_per_s": self.completion_tokens / elapsed,
        }
        return {f"{prefix}/{key}": float(value) for key, value in values.items()}


def _first_error(errors_path: Path) -> str:
    with errors_path.open(encoding="utf-8") as handle:
        line = handle.readline()
    try:
        record = json.loads(line)
        return f"{record['error_type']}: {record['error']}"[:300]
    except (json.JSONDecodeError, KeyError, TypeError):
        return line.strip()[:300]


def raise_if_rows_failed(
    passes: Mapping[Path, RunSummary], *, allow_failures: float, metrics: Mapping[str, float]
) -> None:
    """Fail a tool's run when a pass over a basket lost more than ``allow_failures`` of its rows.

    Each pass is keyed by its errors file. A pass fails when ``rows_failed > allow_failures * rows_total``: the
    rows missing from its output (the failed ones are retried by a rerun into the same output) exceed the allowed
    fraction of the basket.

    Raises:
        RowsFailedError: names each failing pass's count, errors file and first reason; carries ``metrics``.
    """
    problems = [
        f"{summary.rows_failed} of {summary.rows_total} rows failed (method.allow_failures={allow_failures} allows "
        f"{math.floor(allow_failures * summary.rows_total)}); reasons in {path} (first: {_first_error(path)})"
        for path, summary in passes.items()
        if summary.rows_failed > allow_failures * summary.rows_total
    ]
    if problems:
        raise RowsFailedError(
            "; ".join(problems) + ". A rerun into the same output retries only the failed rows.", metrics
        )


def api_key(cfg: ClientConfig) -> str:
    """The key from ``cfg.key_env``, or the placeholder when it is unset (never logged)."""
    key = os.environ.get(cfg.key_env)
    if not key:
        log.warning("%s is not set; sending the placeholder key %r", cfg.key_env, PLACEHOLDER_KEY)
        return PLACEHOLDER_KEY
    return key


def make_client(cfg: ClientConfig) -> Any:
    """An ``openai.AsyncOpenAI`` (or ``AsyncAzureOpenAI``) with the configured retries and timeout.

    The HTTP library's one-INFO-line-per-request logging is turned down to warnings; the client's own retry
    messages (logger ``openai``) stay.
    """
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return _CLIENTS[cfg.api_type](cfg)


def _openai_client(cfg: ClientConfig) -> Any:
    import openai

    return openai.AsyncOpenAI(
        base_url=cfg.base_url, api_key=api_key(cfg), max_retries=cfg.max_retries, timeout=cfg.timeout_s
    )


def _azure_client(cfg: ClientConfig) -> Any:
    import openai

    return openai.AsyncAzureOpenAI(
        azure_endpoint=cfg.base_url,
        api_version=cfg.azure_api_version,
        api_key=api_key(cfg),
        max_retries=cfg.max_retries,
        timeout=cfg.timeout_s,
    )


# --- one row ------------------------------------------------------------------------------------------------


@dataclass
class _Turn:
    messages: list[dict[str, Any]]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int


def _message(choice: Any) -> dict[str, Any]:
    dumped: dict[str, Any] = choice.message.model_dump(exclude_none=True)
    for key in _DROPPED_MESSAGE_KEYS:
        dumped.pop(key, None)
    if not isinstance(dumped.get("content"), str):
        raise ResponseError(f"choice {choice.index} has no text content (finish_reason={choice.finish_reason!r})")
    return {"role": dumped.pop("role", "assistant"), "content": dumped.pop("content"), **dumped}


def _request(
    messages: list[dict[str, Any]], row: BasketRow, model: str, sampling: SamplingConfig, n: int
) -> dict[str, Any]:
    request: dict[str, Any] = {
        "model": model,
        "messages": list(messages),  # a snapshot: the conversation grows after the answer
        "temperature": sampling.temperature,
        "max_tokens": sampling.max_completion_tokens,
    }
    optional = {
        "n": n if n > 1 else None,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
        "stop": list(sampling.stop) or None,
        "response_format": row.response_format,
        "extra_body": dict(sampling.extra_body) or None,
    }
    request.update({key: value for key, value in optional.items() if value is not None})
    return request


async def _complete(
    client: Any, messages: list[dict[str, Any]], row: BasketRow, model: str, sampling: SamplingConfig, n: int
) -> _Turn:
    calls = [(n, 1)] if not sampling.split_n else [(1, 1)] * n
    responses = await asyncio.gather(
        *(client.chat.completions.create(**_request(messages, row, model, sampling, k)) for k, _ in calls)
    )
    choices = [choice for response in responses for choice in sorted(response.choices, key=lambda c: c.index)]
    if len(choices) < n:
        raise ResponseError(f"asked for {n} completion(s), the server returned {len(choices)}")
    usages = [response.usage for response in responses if response.usage is not None]
    return _Turn(
        messages=[_message(choice) for choice in choices[:n]],
        finish_reasons=[str(choice.finish_reason) for choice in choices[:n]],
        prompt_tokens=sum(u.prompt_tokens for u in usages),
        completion_tokens=sum(u.completion_tokens for u in usages),
    )


async def generate_row(
    client: Any, row: BasketRow, *, model: str, sampling: SamplingConfig, global_system_prompt: str | None
) -> dict[str, Any]:
    """Generate one basket row: ``[system?] + prompt + [answer₁] (+ follow_up + [answer₂])``; return its record.

    System prompt precedence: the row's, else ``global_system_prompt``, else none. With a follow-up, the first
    turn asks for one completion and the follow-up turn for ``num_completions``; otherwise the only turn does.

    Raises:
        openai.OpenAIError: the request failed after the client's retries.
        ResponseError: the server's answer was unusable.
    """
    system = row.system_prompt if row.system_prompt is not None else global_system_prompt
    conversation: list[dict[str, Any]] = [{"role": "system", "content": system}] if system is not None else []
    conversation += row.prompt
    turns: list[_Turn] = []
    indices: list[int] = []
    if row.follow_up_prompt is not None:
        first = await _complete(client, conversation, row, model, sampling, n=1)
        turns.append(first)
        conversation.append(first.messages[0])
        indices.append(len(conversation) - 1)
        conversation += row.follow_up_prompt
    last = await _complete(client, conversation, row, model, sampling, n=sampling.num_completions)
    turns.append(last)
    conversation.append(last.messages[0])
    indices.append(len(conversation) - 1)
    return {
        **row.passthrough,
        "model": model,
        "conversation": conversation,
        "generated_message_indices": indices,
        "finish_reason": [turn.finish_reasons[0] for turn in turns],
        "candidates": last.messages,
        "candidate_finish_reasons": last.finish_reasons,
        "prompt_tokens": sum(turn.prompt_tokens for turn in turns),
        "completion_tokens": sum(turn.completion_tokens for turn in turns),
    }


def candidate_conversations(record: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The full conversation of each of a record's ``candidates`` (they share everything before the last turn)."""
    prefix = record["conversation"][: record["generated_message_indices"][-1]]
    return [[*prefix, candidate] for candidate in record["candidates"]]


# --- resumable output -----------------------------------------------------------------------------------------


def id_key(value: Any) -> str:
    """Resume key of an id: its JSON text, so ``1`` and ``"1"`` stay different ids."""
    return json.dumps(value)


def _parse_line(path: Path, number: int, line: bytes, id_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{number}: unreadable output line ({err.msg}); fix or remove it to resume") from err
    if not isinstance(record, dict) or id_field not in record:
        raise DataError(f"{path}:{number}: output line has no {id_field!r} key; is this the right output file?")
    return id_key(record[id_field])


def resume_ids(path: Path, id_field: str) -> set[str]:
    """Id keys (:func:`id_key`) already in ``path``; a torn last line is cut off first.

    Raises:
        DataError: a complete line is unreadable, lacks the id, or repeats an id (``file:line``).
    """
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete, _, tail = data.rpartition(b"\n")
    if tail:
        log.warning("%s: cutting a torn last line (%d bytes, the process died mid-write)", path, len(tail))
        with path.open("r+b") as handle:
            handle.truncate(len(data) - len(tail))
    done: dict[str, int] = {}
    for number, line in enumerate(complete.split(b"\n") if complete else [], start=1):
        if not line.strip():
            continue
        key = _parse_line(path, number, line, id_field)
        if key in done:
            raise DataError(f"{path}:{number}: id {key} already written at line {done[key]}")
        done[key] = number
    return set(done)


class LineAppender:
    """Appends whole JSON lines to a file through an ``O_APPEND`` descriptor, one write loop per line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line (UTF-8, non-ASCII kept)."""
        view = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        while view:
            view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        """Close the descriptor."""
        os.close(self._fd)


def _scrub(text: str, secrets: Sequence[str]) -> str:
    from alignment.redact import redact

    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return str(redact(text))


def _error_record(row: BasketRow, id_field: str, err: Exception, secrets: Sequence[str]) -> dict[str, Any]:
    return {
        id_field: row.id,
        "origin": row.origin,
        "error_type": type(err).__name__,
        "status_code": getattr(err, "status_code", None),
        "error": _scrub(str(err), secrets),
    }


def _failure_types() -> tuple[type[Exception], ...]:
    import openai

    return (openai.OpenAIError, ResponseError)


class _Progress:
    """tqdm bar over the basket with rows/s (tqdm's rate) and completion tokens/s in the postfix."""

    def __init__(self, total: int, resumed: int, desc: str) -> None:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        self.bar = tqdm(total=total, initial=resumed, desc=desc, unit="row", mininterval=0.5, dynamic_ncols=True)
        self.start = time.perf_counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def done(self, record: dict[str, Any] | None) -> None:
        if record is not None:
            self.prompt_tokens += int(record.get("prompt_tokens") or 0)
            self.completion_tokens += int(record.get("completion_tokens") or 0)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.completion_tokens / elapsed:.1f} tok/s", refresh=False)
        self.bar.update(1)


async def process_rows(
    rows: Sequence[BasketRow],
    handle: Callable[[BasketRow], Awaitable[dict[str, Any]]],
    *,
    output_path: Path,
    errors_path: Path,
    id_field: str,
    concurrency: int,
    desc: str = "rows",
    secrets: Sequence[str] = (),
) -> RunSummary:
    """Run ``handle`` over the rows not yet in ``output_path``, ``concurrency`` at a time; append each record.

    A row whose ``handle`` raises ``openai.OpenAIError`` or :class:`ResponseError` is appended to ``errors_path``
    (rewritten each run: it lists this run's failures; rerunning retries them). Other exceptions propagate.
    """
    done = resume_ids(output_path, id_field)
    pending = [row for row in rows if id_key(row.id) not in done]
    resumed = len(rows) - len(pending)
    if resumed:
        log.info("resuming %s: %d of %d rows already written", output_path, resumed, len(rows))
    errors_path.parent.mkdir(parents=True, exist_ok=True)
    errors_path.write_text("", encoding="utf-8")
    writer, error_writer = LineAppender(output_path), LineAppender(errors_path)
    progress = _Progress(len(rows), resumed, desc)
    failures = _failure_types()
    counts = {"written": 0, "failed": 0}
    queue = iter(pending)

    async def worker() -> None:
        for row in queue:
            try:
                record = await handle(row)
            except failures as err:
                log.warning("%s (id %r) failed: %s", row.origin, row.id, _scrub(str(err), secrets)[:300])
                error_writer.write(_error_record(row, id_field, err, secrets))
                counts["failed"] += 1
                progress.done(None)
                continue
            if id_key(record.get(id_field)) != id_key(row.id):
                raise ValueError(f"handle returned a record without {id_field}={row.id!r} for {row.origin}")
            writer.write(record)
            counts["written"] += 1
            progress.done(record)

    tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(pending)))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        # Stop the other workers before the files close, so none writes after this returns.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        progress.bar.close()
        writer.close()
        error_writer.close()
    return RunSummary(
        rows_total=len(rows),
        rows_resumed=resumed,
        rows_written=counts["written"],
        rows_failed=counts["failed"],
        prompt_tokens=progress.prompt_tokens,
        completion_tokens=progress.completion_tokens,
        elapsed_s=time.perf_counter() - progress.start,
    )


_CLIENTS: dict[ApiType, Callable[[ClientConfig], Any]] = {ApiType.openai: _openai_client, ApiType.azure: _azure_client}
