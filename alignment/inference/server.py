"""A small OpenAI-compatible chat-completions server over a transformers model, batching concurrent requests.

``python -m alignment.inference.server --model embedded:smollm2-135m-instruct --port 8000`` serves
``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /health``. It is for laptops and tests; on a GPU use
``vllm serve <model>`` (paged attention, continuous batching, guided decoding), which the generation tools talk
to the same way.

Why not ``transformers serve``: in transformers 5.24 it rejects ``n`` and ``response_format`` (both in its
``UNUSED_CHAT_COMPLETION_FIELDS``), runs requests one at a time unless continuous batching is on, and continuous
batching has one generation config for all requests (a TODO in its ``chat_completion.py``) and targets CUDA.

Batching: requests go to a queue; one inference thread takes the first, waits up to ``--batch-wait-ms`` for
more (up to ``--max-batch-size`` sequences, ``n`` counting ``n`` times), groups them by sampling settings, and
runs one left-padded ``model.generate`` per group. Each sequence is cut at its own ``max_tokens``, at the first
end-of-turn token (``finish_reason="stop"``) or at a stop string. ``response_format`` is accepted but not
enforced (no guided decoding here). A ``seed`` seeds the whole batch it lands in, so it is reproducible only for
a batch of one.

A client that disconnects before its answer is ready cancels its request: a queued one is dropped, and a
generating one stops at the next token (each sequence of a batch also stops at its own ``max_tokens``), so the
batch ends as soon as every sequence still wanted is done. ``GET /health`` counts batches, the requests in the
running ``generate`` call (``generating``) and the cancelled requests (``cancelled``).

Embedding: :func:`build_app` returns the FastAPI app over a :class:`Batcher`; :func:`main` takes an ``app_wrapper``
(ASGI middleware put around that app before it is served), and :func:`running_server` takes the ``command`` that
serves, so a program of one's own (say a test's, wrapping the app in middleware) can call :func:`main` and be
started, health-checked and stopped like this module.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class SamplingKey:
    """Settings that must be equal for requests to share one ``generate`` call."""

    temperature: float
    """0 is greedy."""
    top_p: float | None
    """Nucleus mass, None for the model default."""
    seed: int | None
    """Seed applied before the batch's ``generate``."""


@dataclass
class Completion:
    """One generated sequence."""

    text: str
    """Decoded text (special tokens skipped)."""
    tokens: int
    """Generated tokens, the end-of-turn token included."""
    finish_reason: str
    """``stop`` (end of turn or stop string) or ``length``."""


@dataclass
class Job:
    """One request waiting in the batch queue."""

    prompt_ids: list[int]
    """The rendered, tokenised conversation."""
    n: int
    """Completions asked for."""
    max_tokens: int
    """Per-completion token cap."""
    key: SamplingKey
    """Sampling settings."""
    stop: list[str]
    """Stop strings."""
    done: Callable[[list[Completion] | BaseException], None]
    """Called from the inference thread with the completions or the error."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when the client went away: the job is skipped, or its sequences stop at the next token."""


class Engine:
    """A causal LM and its tokenizer; renders chats and generates a batch."""

    def __init__(self, model: str, dtype: str = "auto") -> None:
        from alignment.models.config import Dtype, ModelConfig
        from alignment.models.load import load_model, load_tokenizer

        cfg = ModelConfig(name_or_path=model, dtype=Dtype(dtype))
        self.tokenizer = load_tokenizer(cfg)
        self.model = load_model(cfg, self.tokenizer)
        self.model.train(False)
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.stop_ids = {int(i) for i in [*eos_ids, self.tokenizer.eos_token_id] if i is not None}

    def render(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of the chat with the generation prompt appended."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)

    def generate(self, jobs: Sequence[Job]) -> list[list[Completion]]:
        """One left-padded ``generate`` for jobs with the same :class:`SamplingKey`."""
        import torch

        key = jobs[0].key
        rows = [job.prompt_ids for job in jobs for _ in range(job.n)]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.model.device)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.model.device)
        sampling: dict[str, Any] = {"do_sample": False}
        if key.temperature > 0:
            sampling = {"do_sample": True, "temperature": key.temperature, "top_p": key.top_p or 1.0, "top_k": 0}
        if key.seed is not None:
            torch.manual_seed(key.seed)
        with torch.no_grad():
            out = self.model.generate(  # type: ignore[operator]
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=max(job.max_tokens for job in jobs),
                pad_token_id=pad,
                stopping_criteria=[_row_stopper(jobs, width)],
                **sampling,
            )
        sequences = iter(out[:, width:].tolist())
        return [[self._finish(next(sequences), job) for _ in range(job.n)] for job in jobs]

    def _finish(self, tokens: list[int], job: Job) -> Completion:
        tokens = tokens[: job.max_tokens]
        end = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
        kept = tokens if end is None else tokens[:end]
        text = str(self.tokenizer.decode(kept, skip_special_tokens=True))
        finish = "length" if end is None else "stop"
        cuts = [text.find(s) for s in job.stop if s and s in text]
        if cuts:
            text, finish = text[: min(cuts)], "stop"
        return Completion(text=text, tokens=len(kept) + (end is not None), finish_reason=finish)


def _row_stopper(jobs: Sequence[Job], width: int) -> Any:
    """A ``StoppingCriteria`` marking each sequence done once its job is cancelled or has its ``max_tokens``.

    ``generate`` stops when every sequence is done (at its end-of-turn token, or here), instead of running all of
    them to the batch's largest ``max_tokens``. ``width``: the padded prompt length.
    """
    import torch
    from transformers import StoppingCriteria

    rows = [job for job in jobs for _ in range(job.n)]
    caps = torch.tensor([job.max_tokens for job in rows])

    class RowStop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            cancelled = torch.tensor([job.cancelled.is_set() for job in rows])
            done = cancelled | (caps <= input_ids.shape[1] - width)
            return done.to(input_ids.device)

    return RowStop()


class Batcher:
    """Collects jobs from many requests into ``generate`` calls on one inference thread."""

    def __init__(self, engine: Engine, *, max_batch_size: int, batch_wait_s: float) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.batches = 0
        self.generating = 0
        """Jobs in the ``generate`` call running now (0 when idle)."""
        self.cancelled = 0
        """Jobs whose client went away before the answer."""
        self.thread = threading.Thread(target=self._loop, name="generate", daemon=True)
        self.thread.start()

    async def submit(
        self, prompt_ids: list[int], *, n: int, max_tokens: int, key: SamplingKey, stop: list[str]
    ) -> list[Completion]:
        """Queue one request and wait for its completions."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Completion]] = loop.create_future()

        def done(result: list[Completion] | BaseException) -> None:
            def resolve() -> None:
                if future.cancelled():
                    return
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

            loop.call_soon_threadsafe(resolve)

        job = Job(prompt_ids, n, max_tokens, key, stop, done)
        self.jobs.put(job)
        try:
            return await future
        except asyncio.CancelledError:
            job.cancelled.set()
            self.cancelled += 1
            raise

    def close(self) -> None:
        """Stop the inference thread after the jobs already queued."""
        self.jobs.put(None)

    def _collect(self, first: Job) -> list[Job]:
        jobs, size = [first], first.n
        deadline = time.monotonic() + self.batch_wait_s
        while size < self.max_batch_size:
            try:
                job = self.jobs.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)
                break
            jobs.append(job)
            size += job.n
        return jobs

    def _loop(self) -> None:
        while (first := self.jobs.get()) is not None:
            groups: dict[SamplingKey, list[Job]] = {}
            for job in self._collect(first):
                groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                self._run(group)

    def _run(self, jobs: list[Job]) -> None:
        self.batches += 1
        jobs = [job for job in jobs if not job.cancelled.is_set()]
        if not jobs:
            return
        self.generating = len(jobs)
        try:
            results = self.engine.generate(jobs)
        except Exception as err:  # reported to each waiting request as a 500, the server keeps serving
            log.exception("generation failed for a batch of %d request(s)", len(jobs))
            for job in jobs:
                job.done(err)
            return
        finally:
            self.generating = 0
        for job, completions in zip(jobs, results, strict=True):
            job.done(completions)


async def _disconnected(request: Request) -> None:
    """Return when the client has disconnected (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[list[Completion]]) -> list[Completion] | None:
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


def _error_body(message: str, kind: str, code: int) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


def _sampling_key(body: dict[str, Any]) -> SamplingKey:
    temperature = body.get("temperature")
    return SamplingKey(float(1.0 if temperature is None else temperature), body.get("top_p"), body.get("seed"))


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    return [stop] if isinstance(stop, str) else list(stop or [])


def _max_tokens(body: dict[str, Any]) -> Any:
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            return body[key]
    return DEFAULT_MAX_TOKENS


def _problems(body: Any, served: str) -> tuple[int, str] | None:
    if not isinstance(body, dict):
        return 400, "the request body must be a JSON object"
    if body.get("model") != served:
        return 404, f"model {body.get('model')!r} is not served here; this server serves {served!r}"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return 400, "'messages' must be a non-empty list of {role, content} objects"
    if body.get("stream"):
        return 400, "streaming is not supported by this server"
    n = 1 if body.get("n") is None else body["n"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return 400, f"'n' must be a positive integer, got {n!r}"
    tokens = _max_tokens(body)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        return 400, f"'max_tokens' must be a positive integer, got {tokens!r}"
    return None


def _response(served: str, prompt_tokens: int, completions: list[Completion]) -> dict[str, Any]:
    generated = sum(c.tokens for c in completions)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            for i, c in enumerate(completions)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": generated,
            "total_tokens": prompt_tokens + generated,
        },
    }


def build_app(batcher: Batcher, served: str) -> FastAPI:
    """The FastAPI app serving ``served`` from ``batcher``: chat completions, ``/v1/models`` and ``/health``.

    Args:
        batcher: The batch queue in front of the model; its inference thread must be running.
        served: The model name clients send as ``model`` (any other name gets a 404).

    Returns:
        The app, an ASGI application (wrap it in middleware as :func:`main`'s ``app_wrapper`` does).
    """
    # FastAPI resolves the handlers' string annotations (``Request``) from this module's globals.
    app = FastAPI(title="effective-alignment local server")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse(json.loads(_error_body(message, "invalid_request_error", status)), status_code=status)

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
    async def chat(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the request body is not valid JSON")
        problem = _problems(body, served)
        if problem is not None:
            return error(*problem)
        try:
            prompt_ids = batcher.engine.render(body["messages"])
        except Exception as err:  # a template error is the client's request, not a server fault
            return error(400, f"the chat template rejected the messages: {err}")
        generation = batcher.submit(
            prompt_ids,
            n=1 if body.get("n") is None else body["n"],
            max_tokens=_max_tokens(body),
            key=_sampling_key(body),
            stop=_stops(body),
        )
        completions = await _unless_disconnected(request, generation)
        if completions is None:  # nobody reads this answer; 499 is nginx's "client closed request"
            return error(499, "the client disconnected before the answer was ready")
        return JSONResponse(_response(served, len(prompt_ids), completions))

    return app


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m alignment.inference.server", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct", help="HF folder, hub id or embedded:")
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
    batcher = Batcher(
        Engine(args.model, args.dtype), max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000
    )
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
