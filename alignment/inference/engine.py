"""Generation for the local server and the chat REPL: one causal LM, per-sequence streaming and log-probs, batching.

:class:`Engine` runs jobs through one left-padded ``model.generate`` per group of equal sampling settings. Two
hooks follow every sequence of the batch token by token: a logits processor keeps the step's log-softmax (when some
job asked for log-probs), and a stopping criterion hands each sequence its new token. That criterion decodes the
sequence incrementally (a window of a few tokens, as vLLM does, so a multi-byte character split over tokens is held
back until it is whole), cuts it at a stop string, its end-of-turn token or its ``max_tokens``, streams the new text
to the job (:class:`Delta`), and marks the sequence done so ``generate`` stops it. A streamed answer and a returned
one are the same text by construction: the completion is the concatenation of the deltas.

Log-probs are of the model's own distribution (log-softmax of the logits before temperature, top-p and top-k, as
vLLM's default), for the chosen token and the ``top_logprobs`` most likely ones. Scoring a prompt (``echo`` with
``logprobs`` on ``/v1/completions``) is one forward over it; its first token has no log-prob.

:class:`Batcher` feeds an engine from many requests on one inference thread: it takes the first queued job, waits
up to ``batch_wait_s`` for more (up to ``max_batch_size`` sequences, ``n`` counting ``n`` times), groups them by
:class:`SamplingKey` and runs each group as one batch. A ``seed`` seeds the whole batch it lands in, so it is
reproducible only for a batch of one. A cancelled job (its client went away) is dropped while queued and stops at
the next token while generating.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LOGPROB_FLOOR = -9999.0
"""Log-probs below this (``-inf`` included, which JSON cannot carry) are reported as this value, as OpenAI does."""

Scored = tuple[float, tuple[tuple[str, float], ...]]
"""A generated token's log-prob and its ``(token, logprob)`` alternatives."""


@dataclass(frozen=True)
class SamplingKey:
    """Settings that must be equal for requests to share one ``generate`` call."""

    temperature: float
    """0 is greedy."""
    top_p: float | None
    """Nucleus mass, None for the model default."""
    seed: int | None
    """Seed applied before the batch's ``generate``."""
    top_k: int | None = None
    """Sample among the k most likely tokens; None for no limit."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token of a sequence, with its log-probability and the most likely alternatives at its position."""

    token_id: int
    """Vocabulary id."""
    token: str
    """The token decoded on its own, special tokens kept (a piece of a multi-byte character decodes to U+FFFD)."""
    logprob: float | None
    """Log-probability of the token given everything before it; None for the first token of a prompt."""
    top: tuple[tuple[str, float], ...]
    """``(token, logprob)`` of the most likely tokens at this position, most likely first."""
    offset: int
    """Where the token's text starts in the sequence's text."""


@dataclass
class Completion:
    """One generated sequence."""

    text: str
    """Decoded text (special tokens skipped), cut at a stop string."""
    tokens: int
    """Generated tokens, the end-of-turn token included."""
    finish_reason: str
    """``stop`` (end of turn or stop string) or ``length``."""
    logprobs: list[TokenLogprob] | None = None
    """The tokens of ``text`` with their log-probs; None when not asked for."""
    prompt_logprobs: list[TokenLogprob] | None = None
    """The prompt's tokens with their log-probs (the first one's is None); None when not asked for."""


@dataclass(frozen=True)
class Delta:
    """New output of one sequence of a job, sent as it is generated."""

    index: int
    """The sequence within its job (0 to ``n - 1``)."""
    text: str
    """Text added since the last delta (may be empty on the last one)."""
    logprobs: list[TokenLogprob]
    """Tokens added since the last delta, when the job asked for log-probs."""
    finish_reason: str | None
    """Set on the sequence's last delta."""


@dataclass(frozen=True)
class PromptScored:
    """The log-probs of a job's prompt, sent before its generation starts."""

    logprobs: list[TokenLogprob]
    """One entry per prompt token; the first one's ``logprob`` is None."""


Event = Delta | PromptScored


@dataclass
class Job:
    """One request: a prompt, how many sequences to generate from it and how."""

    prompt_ids: list[int]
    """The rendered, tokenised prompt."""
    n: int
    """Completions asked for."""
    max_tokens: int
    """Per-completion token cap; 0 generates nothing (scoring the prompt only)."""
    key: SamplingKey
    """Sampling settings."""
    stop: list[str]
    """Stop strings."""
    done: Callable[[list[Completion] | BaseException], None]
    """Called from the inference thread with the completions or the error."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when the client went away: the job is skipped, or its sequences stop at the next token."""
    top_logprobs: int | None = None
    """None: no log-probs; k: each token's log-prob and the k most likely tokens at its position."""
    score_prompt: bool = False
    """Also score the prompt (its tokens' log-probs, with ``top_logprobs`` alternatives)."""
    emit: Callable[[Event], None] | None = None
    """Streaming: called from the inference thread with each :class:`Delta` (and :class:`PromptScored`)."""


class _IncrementalText:
    """The text of a growing token sequence, decoding only a window of recent tokens at each step.

    ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])`` is the new text; the window keeps the context that
    a tokenizer needs for the first new token (a SentencePiece leading space), and a result ending in U+FFFD (an
    unfinished multi-byte character) waits for the next token. This is vLLM's incremental detokenisation.
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, token: int) -> str:
        """Append a token; return the text it completes (often its own, empty while a character is unfinished)."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (an unfinished character, shown as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens))


class _Sequence:
    """One sequence being generated: its text, token count, log-probs and what has been streamed of it."""

    def __init__(self, engine: Engine, job: Job, index: int) -> None:
        self.job, self.index = job, index
        self.engine = engine
        self.detokenizer = _IncrementalText(engine.tokenizer, skip_special_tokens=True)
        self.longest_stop = max((len(s) for s in job.stop), default=0)
        self.text = ""
        self.tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] | None = [] if job.top_logprobs is not None else None
        self.sent_chars = 0
        self.sent_logprobs = 0

    @property
    def open(self) -> bool:
        """Still generating."""
        return self.finish_reason is None

    def push(self, token: int, scored: Scored | None = None) -> None:
        """Take the next generated token (with its log-prob and top alternatives when asked for)."""
        self.tokens += 1
        if token in self.engine.stop_ids:
            self._end("stop")
            return
        start = len(self.text)
        if self.logprobs is not None and scored is not None:
            self.logprobs.append(TokenLogprob(token, self.engine.token_text(token), scored[0], scored[1], start))
        if self._append(self.detokenizer.add(token)):
            self._end("stop", flush=False)
        elif self.tokens >= self.job.max_tokens:
            self._end("length")
        else:
            self._send()

    def close(self) -> None:
        """End a sequence that ``generate`` stopped (its token cap, or a cancelled job)."""
        if self.open:
            self._end("length")

    def completion(self) -> Completion:
        """The finished sequence."""
        return Completion(self.text, self.tokens, self.finish_reason or "length", self.logprobs)

    def _append(self, new: str) -> bool:
        """Add decoded text; True when it completes a stop string (the text is then cut where that starts)."""
        if not new:
            return False
        start = max(0, len(self.text) - self.longest_stop + 1)
        self.text += new
        hits = [i for stop in self.job.stop if stop and (i := self.text.find(stop, start)) >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        if self.logprobs is not None:  # the tokens that start at or after the cut are not part of the answer
            self.logprobs = [entry for entry in self.logprobs if entry.offset < len(self.text)]
        return True

    def _end(self, reason: str, *, flush: bool = True) -> None:
        if flush and self._append(self.detokenizer.flush()):
            reason = "stop"
        self.finish_reason = reason
        self._send()

    def _held_back(self) -> int:
        """Length of the longest end of the text that may be the start of a stop string (not streamed yet)."""
        longest = 0
        for stop in self.job.stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _send(self) -> None:
        if self.job.emit is None:
            return
        upto = len(self.text) if not self.open else len(self.text) - self._held_back()
        text = self.text[self.sent_chars : upto]
        self.sent_chars = max(self.sent_chars, upto)
        entries: list[TokenLogprob] = []
        if self.logprobs is not None:
            ready = len(self.logprobs) if not self.open else self.sent_logprobs
            while ready < len(self.logprobs) and self.logprobs[ready].offset < upto:
                ready += 1
            entries = self.logprobs[self.sent_logprobs : ready]
            self.sent_logprobs = ready
        if text or entries or not self.open:
            self.job.emit(Delta(self.index, text, entries, self.finish_reason))


class Engine:
    """A causal LM and its tokenizer; renders chats, scores prompts and generates batches of jobs."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model.train(False)
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        """Rows of the input embedding: the valid token ids."""
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.stop_ids = {int(i) for i in [*eos_ids, self.tokenizer.eos_token_id] if i is not None}
        self._token_texts: dict[int, str] = {}

    @classmethod
    def load(cls, reference: str, dtype: str = "auto") -> Engine:
        """Load a model: a hub id, an ``embedded:`` name, a model or LoRA-adapter folder, or a run directory.

        A run directory (the output of ``launch.py``) means its ``model/`` folder. An adapter folder (with
        ``adapter_config.json``) loads its base model with the project's loading and the adapter's tokenizer (the
        one it was trained with; added tokens resize the embeddings), then the adapter, merged into the weights.

        Raises:
            FileNotFoundError: a run directory without a ``model/`` folder.
        """
        from alignment.models.config import Dtype, ModelConfig
        from alignment.models.load import load_model, load_tokenizer

        folder = resolve_model(reference)
        adapter = Path(folder) / "adapter_config.json"
        tokenizer = load_tokenizer(ModelConfig(name_or_path=folder))
        if not adapter.is_file():
            return cls(load_model(ModelConfig(name_or_path=folder, dtype=Dtype(dtype)), tokenizer), tokenizer)
        from peft import PeftModel

        base_name = json.loads(adapter.read_text(encoding="utf-8"))["base_model_name_or_path"]
        base = load_model(ModelConfig(name_or_path=base_name, dtype=Dtype(dtype)), tokenizer, frozen=True)
        model = PeftModel.from_pretrained(base, folder).merge_and_unload()
        return cls(model, tokenizer)

    def render(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of the chat with the generation prompt appended."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a raw text prompt."""
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def token_text(self, token: int) -> str:
        """A token decoded on its own, special tokens kept (cached: every step's log-probs need a few)."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = str(self.tokenizer.decode([token], skip_special_tokens=False))
        return text

    def run(self, jobs: Sequence[Job]) -> list[list[Completion]]:
        """Score the prompts that ask for it, then generate every job with ``max_tokens > 0``; jobs share a key.

        Returns:
            Each job's ``n`` completions, in the order of ``jobs``.
        """
        scored: dict[int, list[TokenLogprob]] = {}
        for job in jobs:
            if job.score_prompt:
                scored[id(job)] = self.score_prompt(job.prompt_ids, job.top_logprobs or 0)
                if job.emit is not None:
                    job.emit(PromptScored(scored[id(job)]))
        generating = [job for job in jobs if job.max_tokens > 0]
        generated = iter(self.generate(generating) if generating else [])
        results: list[list[Completion]] = []
        for job in jobs:
            completions = next(generated) if job.max_tokens > 0 else self._nothing(job)
            for completion in completions:
                completion.prompt_logprobs = scored.get(id(job))
            results.append(completions)
        return results

    def score_prompt(self, prompt_ids: list[int], top: int) -> list[TokenLogprob]:
        """Each prompt token's log-prob given the tokens before it (None for the first), with ``top`` alternatives."""
        import torch

        ids = torch.tensor([prompt_ids], device=self.model.device)
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, ids[0, 1:, None])[:, 0].tolist()
        tops = self.top_tokens(logprobs, top) if top > 0 else [()] * len(chosen)
        text = _IncrementalText(self.tokenizer, skip_special_tokens=False)
        entries, length = [], 0
        for position, token in enumerate(prompt_ids):
            logprob = None if position == 0 else max(chosen[position - 1], LOGPROB_FLOOR)
            alternatives = () if position == 0 else tops[position - 1]
            entries.append(TokenLogprob(token, self.token_text(token), logprob, alternatives, length))
            length += len(text.add(token))
        return entries

    def generate(self, jobs: Sequence[Job]) -> list[list[Completion]]:
        """One left-padded ``generate`` for jobs with the same :class:`SamplingKey` (each ``max_tokens > 0``)."""
        import torch

        key = jobs[0].key
        sequences = [_Sequence(self, job, i) for job in jobs for i in range(job.n)]
        rows = [job.prompt_ids for job in jobs for _ in range(job.n)]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.model.device)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.model.device)
        sampling: dict[str, Any] = {"do_sample": False}
        if key.temperature > 0:
            top_p, top_k = key.top_p or 1.0, key.top_k or 0
            sampling = {"do_sample": True, "temperature": key.temperature, "top_p": top_p, "top_k": top_k}
        if key.seed is not None:
            torch.manual_seed(key.seed)
        processors, criterion = _step_hooks(self, sequences)
        with torch.no_grad():
            self.model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=max(job.max_tokens for job in jobs),
                pad_token_id=pad,
                stopping_criteria=[criterion],
                logits_processor=processors,
                **sampling,
            )
        for sequence in sequences:
            sequence.close()
        done = iter(sequences)
        return [[next(done).completion() for _ in range(job.n)] for job in jobs]

    def top_tokens(self, logprobs: torch.Tensor, k: int) -> list[tuple[tuple[str, float], ...]]:
        """The ``k`` most likely ``(token, logprob)`` of each row of ``logprobs`` (rows, vocab)."""
        values, indices = logprobs.topk(k, dim=-1)
        return [
            tuple((self.token_text(i), max(v, LOGPROB_FLOOR)) for i, v in zip(row_ids, row_values, strict=True))
            for row_ids, row_values in zip(indices.tolist(), values.tolist(), strict=True)
        ]

    def _finish(self, tokens: list[int], job: Job) -> Completion:
        """The completion that ``tokens`` make for ``job`` (cut at end of turn, ``max_tokens`` or a stop string)."""
        sequence = _Sequence(self, job, 0)
        for token in tokens:
            if not sequence.open:
                break
            sequence.push(token)
        sequence.close()
        return sequence.completion()

    def _nothing(self, job: Job) -> list[Completion]:
        """``max_tokens=0``: no token generated (a prompt scored only)."""
        completions = []
        for index in range(job.n):
            completions.append(Completion("", 0, "length", [] if job.top_logprobs is not None else None))
            if job.emit is not None:
                job.emit(Delta(index, "", [], "length"))
        return completions


def _step_hooks(engine: Engine, sequences: list[_Sequence]) -> tuple[list[Any] | None, Any]:
    """The logits processor that keeps each step's log-probs, and the criterion that feeds and stops the sequences.

    ``generate`` calls the processor on the logits of a step (after the model's own processors, before temperature,
    top-p and top-k), picks the tokens, then calls the criterion with the sequences so far: the last column holds
    the new tokens. A sequence is done once it ended (end of turn, cap, stop string) or its job was cancelled, and
    ``generate`` stops when all are.
    """
    import torch
    from transformers import LogitsProcessor, StoppingCriteria

    top = max((s.job.top_logprobs for s in sequences if s.job.top_logprobs is not None), default=None)
    kept: list[torch.Tensor] = []

    class KeepLogprobs(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            kept[:] = [torch.log_softmax(scores.float(), dim=-1)]
            return scores

    def scored(tokens: torch.Tensor) -> list[Scored] | None:
        if top is None or not kept:
            return None
        logprobs = kept[0]
        chosen = logprobs.gather(1, tokens[:, None].to(logprobs.device))[:, 0].tolist()
        tops = engine.top_tokens(logprobs, top) if top > 0 else [()] * len(chosen)
        return [
            (max(c, LOGPROB_FLOOR), t[: s.job.top_logprobs or 0])
            for c, t, s in zip(chosen, tops, sequences, strict=True)
        ]

    class FeedSequences(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
            tokens = input_ids[:, -1]
            logprobs = scored(tokens)
            for row, (sequence, token) in enumerate(zip(sequences, tokens.tolist(), strict=True)):
                if sequence.open and not sequence.job.cancelled.is_set():
                    sequence.push(token, None if logprobs is None else logprobs[row])
            done = [not s.open or s.job.cancelled.is_set() for s in sequences]
            return torch.tensor(done, device=input_ids.device)  # type: ignore[return-value]

    return ([KeepLogprobs()] if top is not None else None), FeedSequences()


def resolve_model(reference: str) -> str:
    """The model folder of a run directory (its ``model/``); a model or adapter folder, hub id or name as it is.

    Raises:
        FileNotFoundError: a run directory without ``model/`` (a failed or a data tool's run), or a directory that
            is neither a run nor a model (no ``config.json``, ``adapter_config.json`` or ``model/``).
    """
    path = Path(reference)
    if not path.is_dir() or (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return reference
    if (path / "model").is_dir():
        return str(path / "model")
    if (path / "results.json").is_file() or (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{reference} is a run directory without a model/ folder (a failed run, a data tool's run, or one "
            "still training); give a run that trained a model, or a model folder"
        )
    raise FileNotFoundError(
        f"{reference} is neither a model folder (config.json), a LoRA adapter folder (adapter_config.json) nor a "
        "run directory (model/)"
    )


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
        """Requests whose client went away before the answer."""
        self.thread = threading.Thread(target=self._loop, name="generate", daemon=True)
        self.thread.start()

    async def submit(
        self,
        prompt_ids: list[int],
        *,
        n: int,
        max_tokens: int,
        key: SamplingKey,
        stop: list[str],
        top_logprobs: int | None = None,
        score_prompt: bool = False,
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

        job = Job(prompt_ids, n, max_tokens, key, stop, done, top_logprobs=top_logprobs, score_prompt=score_prompt)
        self.jobs.put(job)
        try:
            return await future
        except asyncio.CancelledError:
            job.cancelled.set()
            self.cancelled += 1
            raise

    async def stream(
        self,
        prompts: list[list[int]],
        *,
        n: int,
        max_tokens: int,
        key: SamplingKey,
        stop: list[str],
        top_logprobs: int | None = None,
        score_prompt: bool = False,
    ) -> AsyncGenerator[tuple[int, Event | list[Completion]], None]:
        """Queue one job per prompt; yield ``(prompt index, event)`` as they come, each job's completions last.

        Closing the iterator before the end cancels the jobs still running (the client went away).

        Raises:
            Exception: the error of a failed batch.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        def to_queue(index: int) -> Callable[[Any], None]:
            def put(item: Any) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (index, item))

            return put

        jobs = [
            Job(ids, n, max_tokens, key, stop, to_queue(i), top_logprobs=top_logprobs, score_prompt=score_prompt)
            for i, ids in enumerate(prompts)
        ]
        for i, job in enumerate(jobs):
            job.emit = to_queue(i)
            self.jobs.put(job)
        running = set(range(len(jobs)))
        try:
            while running:
                index, item = await events.get()
                if isinstance(item, BaseException | list):
                    running.discard(index)
                if isinstance(item, BaseException):
                    raise item
                yield index, item
        finally:
            if running:  # the client went away, or a batch failed: the other jobs are not wanted either
                for index in running:
                    jobs[index].cancelled.set()
                self.cancelled += 1

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
            results = self.engine.run(jobs)
        except Exception as err:  # reported to each waiting request as a 500, the server keeps serving
            log.exception("generation failed for a batch of %d request(s)", len(jobs))
            for job in jobs:
                job.done(err)
            return
        finally:
            self.generating = 0
        for job, completions in zip(jobs, results, strict=True):
            job.done(completions)
