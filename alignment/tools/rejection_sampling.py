"""Rejection sampling: N answers per prompt, scored by a reward model, into preference pairs (seed spec §8).

For each prompt-basket row (§12) the generator (the ``model`` group's name, or ``served_model_name``) answers
``sampling.num_completions`` times (temperature 0.8 by default); with a follow-up prompt, the first turn is
answered once and the follow-up turn N times. The reward model scores each full conversation (one loading and
scoring path, :mod:`alignment.models.seqcls`; a row's ``correct_answer`` is given to it as a system hint, as in
:mod:`alignment.tools.rm_scoring`). The best answer becomes ``chosen``, the worst ``rejected``.

Generation backends (``method.backend``): ``server``, an OpenAI-compatible server (``vllm serve``, the project's
:mod:`alignment.inference.server`…), or ``vllm``, vLLM's offline engine in this process (needs the ``vllm``
package: ``pip install -e '.[vllm]'``, and a CUDA GPU); both give the same records, through the same resumable
driver.

Outputs, beside ``method.output_path`` (default ``<run dir>/pairs.jsonl``):

* ``<stem>.scored.jsonl``: every scored row, ties included; the resume record (rerun with the same output path
  and finished rows are skipped);
* ``<stem>.jsonl``: the rows whose best and worst rewards differ by more than ``tie_tolerance`` (and whose best and
  worst texts differ), rewritten at the end of each run. Columns: the id, ``prompt`` (system prompt, prompt, first
  answer and follow-up), ``chosen``/``rejected`` (one assistant message each) with ``chosen_score``/
  ``rejected_score``, ``completions`` (each answer as a one-message list) with their ``rewards``,
  ``finish_reasons``, ``gen_model``, ``rm_model`` and ``target_answer`` (when the row has a correct answer). It
  loads as DPO/SMPO data (``prompt/chosen/rejected``) and as GPO data (``prompt/completions/rewards``) as is;
* ``<stem>.errors.jsonl``: rows whose generation failed in this run (rerun to retry them); the run then fails
  (non-zero exit) unless ``method.allow_failures`` lets that fraction of rows through.

Deviations from the original: tied rows were written as pairs with chosen == rejected; they are now counted and
kept out of the pairs. Scoring is batched by a token budget instead of a fixed batch size, and fp32 on CPU.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.data.basket import BasketFields, basket_system_prompt
from alignment.inference.openai_batch import ClientConfig, SamplingConfig
from alignment.ranges import bounded, check_fields
from alignment.task import TaskConfig
from alignment.tools.rm_scoring import RewardScorer, RewardScorerConfig, check_reward_model_path, read_records

if TYPE_CHECKING:
    from alignment.config import RunConfig
    from alignment.context import RunContext
    from alignment.data.basket import BasketRow
    from alignment.inference.openai_batch import RunSummary
    from alignment.models.config import ModelConfig

log = logging.getLogger(__name__)

VLLM_MISSING = "method.backend=vllm needs the vllm package (pip install -e '.[vllm]') and a CUDA GPU"


class GenerationBackend(StrEnum):
    """What generates the answers."""

    server = "server"
    """An OpenAI-compatible server at ``method.client.base_url``."""
    vllm = "vllm"
    """vLLM's offline engine in this process, loading the ``model`` group's weights."""


@dataclass
class VllmConfig:
    """vLLM offline-engine settings (``backend=vllm``)."""

    tensor_parallel_size: int = bounded(1, ge=1)
    """GPUs the engine shards the model over."""
    gpu_memory_utilization: float = bounded(0.7, gt=0, le=1)
    """Fraction of GPU memory vLLM reserves; the rest holds the reward model."""
    max_model_len: int | None = bounded(None, ge=1)
    """Context length of the engine; None: the model's."""
    rows_in_flight: int = bounded(256, ge=1)
    """Basket rows generated together; requests that arrive together run as one engine batch."""


@dataclass
class RejectionSamplingConfig(TaskConfig):
    """Generate N answers per prompt, score them with a reward model, keep the best and worst as a pair."""

    name: str = "rejection_sampling"
    """Registry key."""
    backend: GenerationBackend = GenerationBackend.server
    """OpenAI-compatible server, or vLLM's offline engine."""
    reward_model: RewardScorerConfig = field(default_factory=RewardScorerConfig)
    """The scoring model."""
    client: ClientConfig = field(default_factory=ClientConfig)
    """OpenAI-compatible server (``backend=server``)."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(num_completions=5, temperature=0.8))
    """Answers per prompt (``num_completions``, at least 2) and how they are sampled."""
    fields: BasketFields = field(default_factory=BasketFields)
    """Column names of the prompt basket."""
    global_system_prompt: str | None = None
    """System prompt for basket rows without their own."""
    system_prompt_file: str | None = None
    """File whose text is ``global_system_prompt`` (e.g. ``<prompt_opt run>/best_prompt.txt``); not with it."""
    served_model_name: str | None = None
    """Model name sent to the server and recorded as ``gen_model``; None: ``model.name_or_path``."""
    vllm: VllmConfig = field(default_factory=VllmConfig)
    """Offline-engine settings (``backend=vllm``)."""
    tie_tolerance: float = bounded(0.0, ge=0)
    """A row whose best and worst rewards differ by at most this is a tie: counted, not emitted as a pair."""
    output_path: str | None = None
    """Pairs JSONL; None: ``<run dir>/pairs.jsonl``. Reuse it to resume (``<stem>.scored.jsonl`` beside it)."""
    allow_failures: float = bounded(0.0, ge=0, le=1)
    """Fraction of the basket's rows that may fail (after retries, into the errors file) with the run still
    succeeding; beyond it the run fails (non-zero exit), after writing the pairs of the rows that succeeded."""

    def __post_init__(self) -> None:
        check_fields(self, "method")
        basket_system_prompt(self.global_system_prompt, self.system_prompt_file)  # both set, or no such file


# --- one row --------------------------------------------------------------------------------------------------------


def is_tie(record: Mapping[str, Any], tolerance: float) -> bool:
    """Whether a scored row gives no pair: best and worst rewards within ``tolerance``, or the same text."""
    chosen, rejected = record["chosen"][0], record["rejected"][0]
    return bool(record["chosen_score"] - record["rejected_score"] <= tolerance or chosen == rejected)


def scored_record(
    generation: Mapping[str, Any], rewards: Sequence[float], *, id_field: str, rm_model: str, correct_answer: Any
) -> dict[str, Any]:
    """The output row of one generated record (``openai_batch.generate_row`` schema) and its candidates' rewards.

    ``chosen`` is the first best-scored candidate, ``rejected`` the first worst-scored one.
    """
    candidates = generation["candidates"]
    best = max(range(len(rewards)), key=lambda i: rewards[i])
    worst = min(range(len(rewards)), key=lambda i: rewards[i])
    record = {
        id_field: generation[id_field],
        "prompt": generation["conversation"][: generation["generated_message_indices"][-1]],
        "chosen": [candidates[best]],
        "chosen_score": rewards[best],
        "rejected": [candidates[worst]],
        "rejected_score": rewards[worst],
        "completions": [[candidate] for candidate in candidates],
        "rewards": list(rewards),
        "finish_reasons": generation["candidate_finish_reasons"],
        "gen_model": generation["model"],
        "rm_model": rm_model,
        "prompt_tokens": generation["prompt_tokens"],
        "completion_tokens": generation["completion_tokens"],
    }
    if correct_answer is not None:
        record["target_answer"] = correct_answer
    return record


# --- the vLLM backend -----------------------------------------------------------------------------------------------


class BatchingChat:
    """The OpenAI client's ``chat.completions.create`` over a synchronous batch ``chat(conversations, params)``.

    With vLLM's ``LLM.chat`` as ``chat``, :func:`~alignment.inference.openai_batch.generate_row` runs unchanged on
    an offline engine. Requests that arrive while the engine is busy are collected and run as the next batch (in a
    worker thread, so the event loop keeps scheduling). Each result is an ``openai`` ``ChatCompletion``.
    """

    def __init__(self, chat: Callable[[list[Any], list[Any]], list[Any]], make_params: Callable[..., Any]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._chat = chat
        self._make_params = make_params
        self._waiting: list[tuple[dict[str, Any], asyncio.Future[Any]]] = []
        self._busy = False
        self._executor = ThreadPoolExecutor(max_workers=1)
        self.batches: list[int] = []
        """Requests per engine batch, in order (for logs and tests)."""
        self.chat = self
        self.completions = self

    async def create(self, **request: Any) -> Any:
        """Queue one chat-completion request and wait for its batch."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if not self._busy:
            self._busy = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                await asyncio.sleep(0)  # let every ready coroutine queue its request first
                batch, self._waiting = self._waiting, []
                self.batches.append(len(batch))
                try:
                    outputs = await loop.run_in_executor(
                        self._executor,
                        self._chat,
                        [request["messages"] for request, _ in batch],
                        [self._make_params(request) for request, _ in batch],
                    )
                except Exception as err:  # every waiting request fails with it
                    for _, future in batch:
                        future.set_exception(err)
                    continue
                for (request, future), output in zip(batch, outputs, strict=True):
                    future.set_result(chat_completion(request["model"], output, n=request.get("n", 1)))
        finally:
            self._busy = False

    async def close(self) -> None:
        """Stop the worker thread."""
        self._executor.shutdown(wait=False)


def chat_completion(model: str, output: Any, n: int = 1) -> Any:
    """An ``openai`` ``ChatCompletion`` from a vLLM ``RequestOutput`` (``outputs[i].text/finish_reason/token_ids``).

    ``n`` choices: a greedy request was sampled once (:func:`sampling_kwargs`), and its answer is every choice, as
    a server's ``n`` greedy answers would be.
    """
    from openai.types.chat import ChatCompletion

    outputs = list(output.outputs)
    if len(outputs) == 1 and n > 1:
        outputs *= n
    completion_tokens = sum(len(o.token_ids) for o in outputs)
    return ChatCompletion.model_validate(
        {
            "id": f"vllm-{output.request_id}",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": o.text},
                    "finish_reason": o.finish_reason or "stop",
                }
                for i, o in enumerate(outputs)
            ],
            "usage": {
                "prompt_tokens": len(output.prompt_token_ids or []),
                "completion_tokens": completion_tokens,
                "total_tokens": len(output.prompt_token_ids or []) + completion_tokens,
            },
        }
    )


def sampling_kwargs(request: Mapping[str, Any]) -> dict[str, Any]:
    """The ``SamplingParams`` arguments of an OpenAI request built by ``generate_row`` (``extra_body`` passes on).

    At temperature 0 the engine samples once: vLLM refuses ``n > 1`` for greedy sampling, and the ``n`` answers
    would be the same (:func:`chat_completion` repeats it).
    """
    optional = {key: request[key] for key in ("top_p", "seed", "stop") if key in request}
    greedy = request["temperature"] == 0
    return {
        "n": 1 if greedy else request.get("n", 1),
        "temperature": request["temperature"],
        "max_tokens": request["max_tokens"],
        **optional,
        **request.get("extra_body", {}),
    }


def vllm_params(request: Mapping[str, Any]) -> Any:
    """The vLLM ``SamplingParams`` of an OpenAI request built by ``generate_row`` (:func:`sampling_kwargs`)."""
    from vllm import SamplingParams

    return SamplingParams(**sampling_kwargs(request))


def vllm_client(model: ModelConfig, cfg: VllmConfig, seed: int) -> BatchingChat:
    """The vLLM offline engine on the ``model`` group's weights, behind the OpenAI client interface.

    Raises:
        ImportError: vLLM is not installed.
    """
    try:
        from vllm import LLM
    except ImportError as err:
        raise ImportError(VLLM_MISSING) from err
    from alignment.models import embedded

    llm = LLM(
        model=embedded.resolve(model.name_or_path),
        revision=model.revision,
        dtype=model.dtype.value,
        trust_remote_code=model.trust_remote_code,
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_model_len,
        seed=seed,
    )

    def chat(conversations: list[Any], params: list[Any]) -> list[Any]:
        return llm.chat(conversations, params, use_tqdm=False)  # type: ignore[no-any-return]

    return BatchingChat(chat, vllm_params)


# --- the tool -------------------------------------------------------------------------------------------------------


def output_paths(cfg: RejectionSamplingConfig, output_dir: Path) -> tuple[Path, Path, Path]:
    """The pairs, scored-rows and errors files."""
    pairs = Path(cfg.output_path) if cfg.output_path else output_dir / "pairs.jsonl"
    return pairs, pairs.with_suffix(".scored.jsonl"), pairs.with_suffix(".errors.jsonl")


async def sample_and_score(
    cfg: RejectionSamplingConfig,
    rows: Sequence[BasketRow],
    client: Any,
    scorer: RewardScorer,
    *,
    model: str,
    scored_path: Path,
    errors_path: Path,
    concurrency: int,
) -> RunSummary:
    """Generate and score every pending row, appending each scored row to ``scored_path`` as it finishes."""
    from concurrent.futures import ThreadPoolExecutor

    from alignment.inference.openai_batch import api_key, candidate_conversations, generate_row, process_rows

    loop = asyncio.get_running_loop()
    # One scoring thread: generation requests keep flowing while the reward model runs.
    with ThreadPoolExecutor(max_workers=1) as executor:
        system = basket_system_prompt(cfg.global_system_prompt, cfg.system_prompt_file)

        async def handle(row: BasketRow) -> dict[str, Any]:
            generation = await generate_row(
                client,
                row,
                model=model,
                sampling=cfg.sampling,
                global_system_prompt=system,
            )
            conversations = candidate_conversations(generation)
            rewards = await loop.run_in_executor(
                executor, scorer.score, conversations, [row.correct_answer] * len(conversations)
            )
            return scored_record(
                generation, rewards, id_field=cfg.fields.id, rm_model=scorer.name, correct_answer=row.correct_answer
            )

        secrets = (api_key(cfg.client),) if cfg.backend is GenerationBackend.server else ()
        return await process_rows(
            rows,
            handle,
            output_path=scored_path,
            errors_path=errors_path,
            id_field=cfg.fields.id,
            concurrency=concurrency,
            desc="rejection sampling",
            secrets=secrets,
        )


def write_pairs(scored_path: Path, pairs_path: Path, tolerance: float) -> dict[str, float]:
    """Rewrite the pairs file from every scored row except ties; return the counts and mean scores."""
    import json

    records = read_records(scored_path) if scored_path.exists() else []
    pairs = [r for r in records if not is_tie(r, tolerance)]
    with pairs_path.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs)
    metrics = {"rs/rows_scored": float(len(records)), "rs/pairs": float(len(pairs))}
    metrics["rs/ties"] = float(len(records) - len(pairs))
    if pairs:
        metrics["rs/chosen_score_mean"] = sum(r["chosen_score"] for r in pairs) / len(pairs)
        metrics["rs/rejected_score_mean"] = sum(r["rejected_score"] for r in pairs) / len(pairs)
    log.info("%d pairs -> %s (%d ties not emitted)", len(pairs), pairs_path, len(records) - len(pairs))
    return metrics


def _check(cfg: RejectionSamplingConfig) -> None:

    check_reward_model_path(cfg.reward_model)
    if cfg.sampling.num_completions < 2:
        raise ValueError(
            f"method.sampling.num_completions={cfg.sampling.num_completions}: rejection sampling needs at least 2 "
            "answers per prompt to pick a best and a worst"
        )
    if cfg.backend is GenerationBackend.vllm:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ImportError(VLLM_MISSING)


def run(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Validate the basket and load the reward model, then generate, score and write the pairs.

    Raises:
        ValueError: no reward-model path, fewer than 2 answers per prompt, or ``allow_failures`` outside [0, 1].
        FileNotFoundError: the reward model's folder is missing.
        ImportError: ``backend=vllm`` without vLLM installed.
        alignment.data.validate.DataError: a bad basket row (``file:line``); nothing was generated.
        alignment.inference.openai_batch.RowsFailedError: more rows failed than ``allow_failures`` lets through
            (raised after the pairs file is written).
    """
    from alignment.data.basket import load_baskets
    from alignment.inference.openai_batch import make_client, raise_if_rows_failed

    assert isinstance(cfg.method, RejectionSamplingConfig)
    method = cfg.method
    _check(method)
    rows = load_baskets(cfg.data, method.fields)
    scorer = RewardScorer(method.reward_model)
    pairs_path, scored_path, errors_path = output_paths(method, ctx.output_dir)
    model = method.served_model_name or cfg.model.name_or_path
    vllm = method.backend is GenerationBackend.vllm
    client = vllm_client(cfg.model, method.vllm, cfg.seed) if vllm else make_client(method.client)
    concurrency = method.vllm.rows_in_flight if vllm else method.client.concurrency

    async def main() -> RunSummary:
        try:
            return await sample_and_score(
                method,
                rows,
                client,
                scorer,
                model=model,
                scored_path=scored_path,
                errors_path=errors_path,
                concurrency=concurrency,
            )
        finally:
            await client.close()

    summary = asyncio.run(main())
    metrics = {**summary.metrics("generate"), **write_pairs(scored_path, pairs_path, method.tie_tolerance)}
    raise_if_rows_failed({errors_path: summary}, allow_failures=method.allow_failures, metrics=metrics)
    return metrics
