"""A small OpenAI-compatible server over a transformers model: chat and text completions, streaming, log-probs.

``python -m alignment.inference.server --model embedded:smollm2-135m-instruct --port 8000`` serves
``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` and ``GET /health``. ``--model`` is a
hub id, an ``embedded:`` name, a model or LoRA-adapter folder, or a run directory (its ``model/``). It is for
laptops, tests and small teachers; on a GPU fleet use ``vllm serve <model>`` (paged attention, continuous batching,
guided decoding), which the generation tools talk to the same way.

Why not ``transformers serve``: in transformers 5.24 it rejects ``n`` and ``response_format`` (both in its
``UNUSED_CHAT_COMPLETION_FIELDS``), runs requests one at a time unless continuous batching is on, and continuous
batching has one generation config for all requests (a TODO in its ``chat_completion.py``) and targets CUDA.

What a request may ask is checked against an allow-list per endpoint (:mod:`alignment.inference.openai_api`): a
parameter this server cannot honour (``tools``, a ``response_format`` other than text, a non-zero penalty, a
``logit_bias``, a content part other than text...) is answered 400 with the parameter named in ``error.param``,
never accepted and ignored. Both endpoints take ``n``, ``max_tokens``, ``temperature``, ``top_p``, ``top_k``,
``stop``, ``seed`` and ``stream`` (with ``stream_options.include_usage``); chat takes ``logprobs`` and
``top_logprobs``; completions take a prompt string, token ids or a list of either, ``logprobs`` (an int), ``echo``
(``max_tokens=0`` with ``echo`` and ``logprobs`` scores a prompt: each token's log-prob, the first one's null).

Batching (:class:`~alignment.inference.engine.Batcher`): requests go to a queue; one inference thread takes the
first, waits up to ``--batch-wait-ms`` for more (up to ``--max-batch-size`` sequences, ``n`` counting ``n``
times), groups them by sampling settings, and runs one left-padded ``model.generate`` per group, streamed requests
included. Each sequence is cut at its own ``max_tokens``, at its end-of-turn token (``finish_reason="stop"``) or at
a stop string, and stops generating there. A ``seed`` seeds the whole batch it lands in, so it is reproducible only
for a batch of one. Streamed responses are server-sent events in OpenAI's chunk format (``chat.completion.chunk``:
a first chunk with the role, content deltas as tokens are generated, a chunk with ``finish_reason`` per choice, a
usage chunk with no choices when asked, ``data: [DONE]``).

A client that disconnects before its answer is complete cancels its request: a queued one is dropped, and a
generating one stops at the next token, so the batch ends as soon as every sequence still wanted is done.
``GET /health`` counts batches, the requests in the running ``generate`` call (``generating``) and the cancelled
requests (``cancelled``).

Embedding: :func:`build_app` returns the FastAPI app over a :class:`Batcher`; :func:`main` takes an ``app_wrapper``
(ASGI middleware put around that app before it is served), and :func:`running_server` takes the ``command`` that
serves, so a program of one's own (say a test's, wrapping the app in middleware) can call :func:`main` and be
started, health-checked and stopped like this module.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from contextlib import aclosing, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from alignment.inference.engine import (
    Batcher,
    Completion,
    Delta,
    Engine,
    Event,
    Job,
    PromptScored,
    SamplingKey,
)
from alignment.inference.openai_api import (
    SSE_DONE,
    ChatRequest,
    CompletionRequest,
    Generation,
    RequestError,
    chat_logprobs,
    chat_response,
    completion_choice,
    completion_response,
    error_body,
    new_id,
    parse_chat,
    parse_completion,
    sse,
    usage,
)

__all__ = ["Batcher", "Completion", "Engine", "Job", "SamplingKey", "build_app", "main", "running_server"]

log = logging.getLogger(__name__)
T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    """Return when the client has disconnected (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result; None, with ``work`` cancelled, when the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if task not in done:
        log.info("client disconnected: its request is cancelled")
        return None
    return task.result()


class _EventStream(StreamingResponse):
    """Server-sent events from an async generator, closed however the response ends.

    When the client disconnects, Starlette stops the response but may leave the generator suspended at a ``yield``;
    closing it runs its ``finally`` blocks, which cancel the generation nobody reads any more.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache"})
        self.events = events

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.events.aclose()


def _engine_options(generation: Generation, top_logprobs: int | None, score_prompt: bool) -> dict[str, Any]:
    return {
        "n": generation.n,
        "max_tokens": generation.max_tokens,
        "key": generation.key,
        "stop": generation.stop,
        "top_logprobs": top_logprobs,
        "score_prompt": score_prompt,
    }


def _stream_failed(err: Exception) -> bytes:
    log.error("generation failed mid-stream: %s", err)
    return sse(error_body(f"generation failed: {err}", kind="server_error", code=500))


async def _chat_events(
    batcher: Batcher, served: str, chat: ChatRequest, prompt_ids: list[int]
) -> AsyncGenerator[bytes, None]:
    """The ``chat.completion.chunk`` events of a streamed chat completion."""
    generation = chat.generation
    head = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": int(time.time()), "model": served}
    extra = {"usage": None} if generation.include_usage else {}

    def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish_reason: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return sse({**head, "choices": [choice], **extra})

    for index in range(generation.n):
        yield chunk(index, {"role": "assistant", "content": ""})
    completions: list[Completion] = []
    try:
        options = _engine_options(generation, chat.top_logprobs, score_prompt=False)
        async with aclosing(batcher.stream([prompt_ids], **options)) as events:
            async for _, event in events:
                if isinstance(event, list):
                    completions = event
                elif isinstance(event, Delta):
                    if event.text or event.logprobs:
                        logprobs = None if chat.top_logprobs is None else chat_logprobs(event.logprobs)
                        yield chunk(event.index, {"content": event.text}, logprobs)
                    if event.finish_reason is not None:
                        yield chunk(event.index, {}, None, event.finish_reason)
    except Exception as err:  # the stream has started: the error goes in the stream, as OpenAI's does
        yield _stream_failed(err)
        return
    if generation.include_usage:
        yield sse({**head, "choices": [], "usage": usage(len(prompt_ids), completions)})
    yield SSE_DONE


def _completion_chunks(
    request: CompletionRequest, texts: list[str], prompt: int, event: Event
) -> Iterator[dict[str, Any]]:
    """The ``choices`` entries that one engine event of prompt ``prompt`` makes in a streamed completion."""
    n = request.generation.n
    if isinstance(event, PromptScored):  # echo with logprobs: the prompt and its log-probs come first
        for j in range(n):
            yield completion_choice(prompt * n + j, texts[prompt], event.logprobs, None)
        return
    index = prompt * n + event.index
    if event.text or event.logprobs:
        entries = event.logprobs if request.logprobs is not None else None
        offset = len(texts[prompt]) if request.echo else 0
        yield completion_choice(index, event.text, entries, None, offset)
    if event.finish_reason is not None:
        yield completion_choice(index, "", None, event.finish_reason)


async def _completion_events(
    batcher: Batcher, served: str, request: CompletionRequest, prompts: list[list[int]], texts: list[str]
) -> AsyncGenerator[bytes, None]:
    """The ``text_completion`` events of a streamed completion; choice ``p * n + j`` is prompt ``p``'s ``j``-th."""
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": served}
    extra = {"usage": None} if request.generation.include_usage else {}
    if request.echo and request.logprobs is None:  # nothing to wait for: the prompt is echoed at once
        for prompt, text in enumerate(texts):
            for j in range(request.generation.n):
                choice = completion_choice(prompt * request.generation.n + j, text, None, None)
                yield sse({**head, "choices": [choice], **extra})
    results: list[Completion] = []
    try:
        score = request.echo and request.logprobs is not None
        async with aclosing(
            batcher.stream(prompts, **_engine_options(request.generation, request.logprobs, score))
        ) as events:
            async for prompt, event in events:
                if isinstance(event, list):
                    results.extend(event)
                    continue
                for choice in _completion_chunks(request, texts, prompt, event):
                    yield sse({**head, "choices": [choice], **extra})
    except Exception as err:  # the stream has started: the error goes in the stream
        yield _stream_failed(err)
        return
    if request.generation.include_usage:
        yield sse({**head, "choices": [], "usage": usage(sum(len(p) for p in prompts), results)})
    yield SSE_DONE


def _prompt_ids(engine: Engine, request: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt (token prompts are decoded, special tokens kept, for ``echo``)."""
    ids, texts = [], []
    for prompt in request.prompts:
        if isinstance(prompt, str):
            ids.append(engine.encode(prompt, add_special_tokens=request.add_special_tokens))
            texts.append(prompt)
            continue
        if any(not 0 <= token < engine.vocab_size for token in prompt):
            raise RequestError(
                f"'prompt' has token ids outside the vocabulary (0 to {engine.vocab_size - 1})", "prompt"
            )
        ids.append(list(prompt))
        texts.append(str(engine.tokenizer.decode(prompt, skip_special_tokens=False)))
    if any(not p for p in ids):
        raise RequestError("'prompt' tokenises to no tokens", "prompt")
    return ids, texts


async def _read(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise RequestError("the request body is not valid JSON") from None


def _error(err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


_GONE = RequestError("the client disconnected before the answer was ready", status=499)
"""Nobody reads this answer; 499 is nginx's "client closed request"."""


async def _chat(batcher: Batcher, served: str, request: Request) -> Response:
    try:
        body = parse_chat(await _read(request), served)
    except RequestError as err:
        return _error(err)
    try:
        prompt_ids = batcher.engine.render(body.messages)
    except Exception as err:  # a template error is the client's request, not a server fault
        return _error(RequestError(f"the chat template rejected the messages: {err}", "messages"))
    if body.generation.stream:
        return _EventStream(_chat_events(batcher, served, body, prompt_ids))
    generation = batcher.submit(prompt_ids, **_engine_options(body.generation, body.top_logprobs, False))
    completions = await _unless_disconnected(request, generation)
    if completions is None:
        return _error(_GONE)
    return JSONResponse(chat_response(served, len(prompt_ids), completions))


async def _complete(batcher: Batcher, served: str, request: Request) -> Response:
    try:
        body = parse_completion(await _read(request), served)
        prompts, texts = _prompt_ids(batcher.engine, body)
    except RequestError as err:
        return _error(err)
    if body.generation.stream:
        return _EventStream(_completion_events(batcher, served, body, prompts, texts))
    options = _engine_options(body.generation, body.logprobs, body.echo and body.logprobs is not None)

    async def every_prompt() -> list[list[Completion]]:
        return list(await asyncio.gather(*(batcher.submit(ids, **options) for ids in prompts)))

    results = await _unless_disconnected(request, every_prompt())
    if results is None:
        return _error(_GONE)
    prompt_tokens = sum(len(ids) for ids in prompts)
    return JSONResponse(completion_response(served, texts, results, prompt_tokens, echo=body.echo))


def build_app(batcher: Batcher, served: str) -> FastAPI:
    """The FastAPI app serving ``served`` from ``batcher``: (chat) completions, ``/v1/models`` and ``/health``.

    Args:
        batcher: The batch queue in front of the model; its inference thread must be running.
        served: The model name clients send as ``model`` (any other name gets a 404).

    Returns:
        The app, an ASGI application (wrap it in middleware as :func:`main`'s ``app_wrapper`` does).
    """
    # FastAPI resolves the handlers' string annotations (``Request``) from this module's globals.
    app = FastAPI(title="effective-alignment local server")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": served,
            "batches": batcher.batches,
            "generating": batcher.generating,
            "cancelled": batcher.cancelled,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served, "object": "model", "created": 0, "owned_by": "local"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _chat(batcher, served, request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(batcher, served, request)

    return app


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m alignment.inference.server", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        default="embedded:smollm2-135m-instruct",
        help="hub id, embedded: name, model or LoRA-adapter folder, or run directory",
    )
    parser.add_argument("--served-model-name", default=None, help="name clients send as 'model' (default: --model)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 on a busy machine)"
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="sequences per generate call")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="wait for more requests before a batch")
    return parser


def main(argv: Sequence[str] | None = None, *, app_wrapper: Callable[[FastAPI], Any] | None = None) -> None:
    """Load the model and serve until interrupted.

    Args:
        argv: Command-line arguments (see ``--help``); None reads ``sys.argv``.
        app_wrapper: Called with the app :func:`build_app` built; what it returns (an ASGI application, such as
            middleware around the app) is served instead. None serves the app itself. The server runs uvicorn's
            ``h11`` protocol.
    """
    import uvicorn

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        engine = Engine.load(args.model, args.dtype)
    except (OSError, ValueError) as err:  # a wrong path or name: say so, without a traceback
        raise SystemExit(f"cannot load {args.model}: {err}") from None
    batcher = Batcher(engine, max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000)
    served = args.served_model_name or args.model
    log.info("serving %r on http://%s:%d/v1", served, args.host, args.port)
    app: Any = build_app(batcher, served)
    if app_wrapper is not None:
        app = app_wrapper(app)
    uvicorn.run(app, host=args.host, port=args.port, http="h11", log_level="warning")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(
    model: str,
    *,
    extra_args: Sequence[str] = (),
    timeout_s: float = 180.0,
    log_path: Path | None = None,
    command: Sequence[str] | None = None,
) -> Iterator[str]:
    """Start the server in a subprocess on a free loopback port; yield its base URL (``http://127.0.0.1:P/v1``).

    The subprocess is stopped (SIGTERM, then SIGKILL after 20 s) when the context exits.

    Args:
        model: The ``--model`` to serve.
        extra_args: More arguments, after ``--model`` and ``--port``.
        timeout_s: How long to wait for ``GET /health`` to answer.
        log_path: File for the server's stdout and stderr; None discards them.
        command: The program that serves, given ``--model M --port P`` and ``extra_args`` (default
            ``python -m alignment.inference.server``): for instance ``[sys.executable, "-m", "some.module"]`` where
            ``some.module`` calls :func:`main` with an ``app_wrapper``. The repository root is on its
            ``PYTHONPATH``.

    Yields:
        The base URL of the server's OpenAI-compatible API.

    Raises:
        RuntimeError: the server exited or did not answer ``/health`` within ``timeout_s``.
    """
    port = free_port()
    program = [sys.executable, "-m", "alignment.inference.server"] if command is None else list(command)
    argv = [*program, "--model", model, "--port", str(port), *extra_args]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    with open(log_path or os.devnull, "wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_healthy(process, f"http://127.0.0.1:{port}", timeout_s)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_healthy(process: subprocess.Popen[bytes], url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the local server exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the local server did not answer {url}/health within {timeout_s:.0f} s")


if __name__ == "__main__":
    main()
