"""Reward-model scoring: compare generator models by the rewards and lengths of their answers (seed spec §9).

Two sources of answers (``method.answers``):

* ``generate`` (default): the data is a prompt basket (§12); every model in ``method.generators`` (default: the
  ``model`` group's name) answers each prompt once through an OpenAI-compatible server, and the answers are
  scored as they arrive. Each generator's records go to ``<run dir>/<generator>.jsonl`` (resumable by id: rerun
  with the same ``hydra.run.dir``; a resumed row's reward is read back into the statistics).
* ``data``: the data already holds the answers, as ``method=generate`` writes them: a ``conversation`` whose last
  message is the assistant's answer, and a ``model`` column naming the generator (a source without it is named
  after its file). Scores go to ``<run dir>/scored.jsonl``.

The reward of an answer is the reward model's score of the whole conversation (one loading and scoring path,
:mod:`alignment.models.seqcls`: chat template, token-budget batches, fp32 on CPU and bf16 on a GPU by default,
truncated to ``reward_model.max_length`` from the left). A row with a ``correct_answer`` is scored with a system
hint ``The correct final answer must be: <answer>`` prepended, as the original's "controllable" RM.

Statistics per generator of the reward and of the answer's length in characters and in tokens (counted with the
reward model's tokenizer, so every generator is measured with the same tokenizer): count, mean, population std,
min, max and the 3/10/25/50/75/90/97th percentiles. They are printed as one table per metric with the generators
side by side, saved as ``rm_scoring.json``, and plotted as overlaid histograms in ``rm_scoring.png``.

Deviations from the original: it scored fp16 one sequence at a time and only printed the statistics of one model;
a ``NaN`` correct answer became the text "nan" (a null now means no hint).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.data.basket import BasketFields, basket_system_prompt
from alignment.inference.openai_batch import ClientConfig, SamplingConfig
from alignment.inference.stats import Metric
from alignment.models.config import Dtype, TruncationSide
from alignment.ranges import bounded, check_fields
from alignment.task import TaskConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from alignment.config import RunConfig
    from alignment.context import RunContext
    from alignment.data.basket import BasketRow
    from alignment.data.config import DataConfig, SourceConfig
    from alignment.inference.openai_batch import RunSummary

log = logging.getLogger(__name__)

Message = dict[str, Any]
# A hub id: ``name`` or ``org/name`` of word characters, dots and dashes (no leading ``/`` or ``.``).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_UNSAFE = re.compile(r"[^\w.-]")


class AnswerSource(StrEnum):
    """Where the scored answers come from."""

    generate = "generate"
    """The data is a prompt basket; each generator answers every prompt once."""
    data = "data"
    """The data holds the answers (``method=generate`` records: ``conversation`` ending in the answer)."""


@dataclass
class RewardScorerConfig:
    """The reward model that scores conversations, and how it is run."""

    path: str | None = None
    """Folder saved by ``method=reward`` (full model or LoRA adapter) or a hub id; required."""
    dtype: Dtype = Dtype.auto
    """``auto``: bf16 on a bf16-capable GPU, fp32 otherwise; ``float16`` for older GPUs."""
    device: str | None = None
    """Torch device (``cuda:1``, ``cpu``); None: the first GPU if there is one, else the CPU."""
    max_length: int = bounded(2048, ge=1)
    """Tokens per scored conversation; longer ones are cut (``truncation_side``)."""
    max_tokens_per_batch: int = bounded(16384, ge=1)
    """Padded tokens (rows x longest) per forward pass; lower it if scoring runs out of memory."""
    truncation_side: TruncationSide = TruncationSide.left
    """Which end of an over-long conversation is cut; ``left`` keeps the answer being judged."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the reward model."""
    correct_answer_hint: str = "The correct final answer must be: {answer}"
    """System message prepended for rows with a correct answer (``{answer}`` is replaced by it)."""


@dataclass
class RmScoringConfig(TaskConfig):
    """Score answers with a reward model and compare generators by reward and length statistics."""

    name: str = "rm_scoring"
    """Registry key."""
    answers: AnswerSource = AnswerSource.generate
    """Generate one answer per prompt with each generator, or score the answers already in the data."""
    reward_model: RewardScorerConfig = field(default_factory=RewardScorerConfig)
    """The scoring model."""
    generators: list[str] = field(default_factory=list)
    """Served model names to compare (``answers=generate``); empty: ``model.name_or_path``."""
    client: ClientConfig = field(default_factory=ClientConfig)
    """OpenAI-compatible server (``answers=generate``)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling of the answers; one answer per prompt (``num_completions`` other than 1 is rejected)."""
    fields: BasketFields = field(default_factory=BasketFields)
    """Column names of the basket; ``fields.correct_answer`` is also read in ``answers=data``."""
    global_system_prompt: str | None = None
    """System prompt for basket rows without their own."""
    system_prompt_file: str | None = None
    """File whose text is ``global_system_prompt`` (e.g. ``<prompt_opt run>/best_prompt.txt``); not with it."""
    conversation_column: str = "conversation"
    """``answers=data``: the conversation whose last (assistant) message is the scored answer."""
    generator_column: str = "model"
    """``answers=data``: the column naming each answer's generator; a source without it is named by its file."""
    histogram_bins: int = bounded(30, ge=1)
    """Bins of each histogram, shared by all generators."""
    allow_failures: float = bounded(0.0, ge=0, le=1)
    """``answers=generate``: fraction of the basket's rows that may fail per generator (after retries, into its
    errors file) with the run still succeeding; beyond it the run fails (non-zero exit) after the report."""

    def __post_init__(self) -> None:
        check_fields(self, "method")
        basket_system_prompt(self.global_system_prompt, self.system_prompt_file)  # both set, or no such file


# --- the reward model -----------------------------------------------------------------------------------------------


def check_reward_model_path(cfg: RewardScorerConfig) -> str:
    """The reward model's path, checked before anything is loaded or generated.

    Raises:
        ValueError: no path was given.
        FileNotFoundError: a local path (anything that is not shaped like a hub id) does not exist.
    """
    if not cfg.path:
        raise ValueError(
            "method.reward_model.path is required: a folder saved by method=reward (its run's model/) or a hub id"
        )
    if not Path(cfg.path).exists() and not _HUB_ID.match(cfg.path):
        raise FileNotFoundError(f"method.reward_model.path={cfg.path!r}: no such folder")
    return cfg.path


def with_hint(conversation: Sequence[Message], correct_answer: Any, template: str) -> list[Message]:
    """The conversation with the correct-answer system hint prepended (unchanged when the answer is None)."""
    if correct_answer is None:
        return list(conversation)
    return [{"role": "system", "content": template.replace("{answer}", str(correct_answer))}, *conversation]


class RewardScorer:
    """A loaded reward model with its scoring settings; scores conversations and counts answer tokens."""

    def __init__(self, cfg: RewardScorerConfig) -> None:
        from alignment.models.seqcls import load_reward_model

        self.cfg = cfg
        self.name = check_reward_model_path(cfg)
        self.model: PreTrainedModel
        self.tokenizer: PreTrainedTokenizerBase
        self.model, self.tokenizer = load_reward_model(
            self.name, dtype=cfg.dtype.value, device=cfg.device, trust_remote_code=cfg.trust_remote_code
        )

    def score(self, conversations: Sequence[Sequence[Message]], correct_answers: Sequence[Any]) -> list[float]:
        """One reward per conversation (in order), each with its correct-answer hint if it has one."""
        from alignment.models.seqcls import score_conversations

        hinted = [
            with_hint(c, a, self.cfg.correct_answer_hint) for c, a in zip(conversations, correct_answers, strict=True)
        ]
        return score_conversations(
            self.model,
            self.tokenizer,
            hinted,
            max_length=self.cfg.max_length,
            max_tokens_per_batch=self.cfg.max_tokens_per_batch,
            truncation_side=self.cfg.truncation_side.value,
        )

    def count_tokens(self, text: str) -> int:
        """Tokens of an answer's text (no special tokens) by the reward model's tokenizer."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def content_text(message: Mapping[str, Any]) -> str:
    """A message's content as text (a null content, e.g. a refusal, is empty)."""
    content = message.get("content")
    return content if isinstance(content, str) else ""


# --- answers already in the data ------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One conversation to score: its generator, the messages (answer last) and the correct answer, if any."""

    generator: str
    conversation: list[Message]
    correct_answer: Any
    origin: str


def answer_problems(row: Mapping[str, Any], column: str) -> list[str]:
    """Problems of a row in ``answers=data``: a conversation that ends in a string assistant answer."""
    from alignment.data.validate import message_list_problems

    if row.get(column) is None:
        return [f"missing column {column!r} (a conversation ending in the assistant's answer to score)"]
    problems = message_list_problems(row[column], column)
    if not problems and row[column][-1].get("role") != "assistant":
        problems.append(f"column {column!r}: the last message must be the assistant's answer to score")
    return problems


def _source_answers(source: SourceConfig, cfg: RmScoringConfig) -> list[Answer]:
    from alignment.data.load import load_source
    from alignment.data.validate import ORIGIN

    keep = (cfg.conversation_column, cfg.generator_column, cfg.fields.correct_answer)
    loaded = load_source(source, lambda row: answer_problems(row, cfg.conversation_column), keep)
    default_name = Path(source.path).stem
    answers = []
    for part in (loaded.train, loaded.eval):
        for row in part or []:
            generator = row[cfg.generator_column]
            answers.append(
                Answer(
                    generator=str(generator) if generator is not None else default_name,
                    conversation=[{k: v for k, v in m.items() if v is not None} for m in row[cfg.conversation_column]],
                    correct_answer=row[cfg.fields.correct_answer],
                    origin=row[ORIGIN],
                )
            )
    return answers


def load_answers(cfg: RmScoringConfig, data: DataConfig) -> list[Answer]:
    """Every answer of every source, validated (``file:line`` for a bad row) before anything is loaded."""
    return [answer for source in data.sources for answer in _source_answers(source, cfg)]


def score_answers(answers: Sequence[Answer], scorer: RewardScorer, path: Path) -> list[dict[str, Any]]:
    """Score the answers; write and return one record per answer."""
    rewards = scorer.score([a.conversation for a in answers], [a.correct_answer for a in answers])
    records = []
    for answer, reward in zip(answers, rewards, strict=True):
        response = content_text(answer.conversation[-1])
        records.append(
            {
                "origin": answer.origin,
                "model": answer.generator,
                "rm_model": scorer.name,
                "response": response,
                "reward": reward,
                "length_tokens": scorer.count_tokens(response),
            }
        )
    with path.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return records


# --- generated answers ----------------------------------------------------------------------------------------------


def generator_file(output_dir: Path, generator: str) -> Path:
    """``<run dir>/<generator>.jsonl``, ``/`` written as ``__`` and other unsafe characters as ``_``."""
    return output_dir / f"{_UNSAFE.sub('_', generator.replace('/', '__'))}.jsonl"


async def _generate_and_score(
    cfg: RmScoringConfig, rows: Sequence[BasketRow], generator: str, scorer: RewardScorer, path: Path
) -> RunSummary:
    from concurrent.futures import ThreadPoolExecutor

    from alignment.inference.openai_batch import api_key, generate_row, make_client, process_rows

    client = make_client(cfg.client)
    loop = asyncio.get_running_loop()
    # One scoring thread: the event loop keeps sending requests while the reward model runs.
    with ThreadPoolExecutor(max_workers=1) as executor:
        system = basket_system_prompt(cfg.global_system_prompt, cfg.system_prompt_file)

        async def handle(row: BasketRow) -> dict[str, Any]:
            record = await generate_row(
                client,
                row,
                model=generator,
                sampling=cfg.sampling,
                global_system_prompt=system,
            )
            response = content_text(record["conversation"][-1])
            (reward,) = await loop.run_in_executor(
                executor, scorer.score, [record["conversation"]], [row.correct_answer]
            )
            length = await loop.run_in_executor(executor, scorer.count_tokens, response)
            return {**record, "rm_model": scorer.name, "response": response, "reward": reward, "length_tokens": length}

        summary = await process_rows(
            rows,
            handle,
            output_path=path,
            errors_path=path.with_suffix(".errors.jsonl"),
            id_field=cfg.fields.id,
            concurrency=cfg.client.concurrency,
            desc=f"rm_scoring {generator}",
            secrets=(api_key(cfg.client),),
        )
    await client.close()
    return summary


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a finished output file."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# --- the tool -------------------------------------------------------------------------------------------------------


def collect(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[Metric, list[float]]]:
    """Per-generator reward and length values from scored records (``model``, ``reward``, ``response``…)."""
    values: dict[str, dict[Metric, list[float]]] = defaultdict(lambda: {m: [] for m in Metric})
    for record in records:
        per_model = values[str(record["model"])]
        per_model[Metric.reward].append(float(record["reward"]))
        per_model[Metric.length_chars].append(float(len(record["response"])))
        per_model[Metric.length_tokens].append(float(record["length_tokens"]))
    return dict(values)


def report(values: Mapping[str, Mapping[Metric, Sequence[float]]], output_dir: Path, bins: int) -> dict[str, float]:
    """Print the comparison tables, save ``rm_scoring.json`` and ``rm_scoring.png``; return headline metrics."""
    from alignment.inference.stats import plot_histograms, print_summary, save_summary, summarize

    summary = summarize(values)
    print_summary(summary)
    save_summary(summary, output_dir / "rm_scoring.json")
    plot_histograms(values, output_dir / "rm_scoring.png", bins=bins)
    log.info("statistics: %s, histograms: %s", output_dir / "rm_scoring.json", output_dir / "rm_scoring.png")
    return {
        f"{metric}_{statistic}/{model}": per_metric[statistic]
        for model, per_model in summary.items()
        for metric, per_metric in per_model.items()
        for statistic in ("count", "mean", "std")
        if statistic in per_metric
    }


def _check(cfg: RmScoringConfig) -> None:

    check_reward_model_path(cfg.reward_model)
    if cfg.answers is AnswerSource.generate and cfg.sampling.num_completions != 1:
        raise ValueError(
            f"method.sampling.num_completions={cfg.sampling.num_completions}: RM scoring scores one answer per prompt "
            "(use method=rejection_sampling for several)"
        )


def run(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Load and validate the data and the reward model, then score (generating first if asked) and report.

    Raises:
        ValueError: no reward-model path, more than one completion per prompt asked for, or ``allow_failures``
            outside [0, 1].
        FileNotFoundError: the reward model's folder is missing.
        alignment.data.validate.DataError: a bad data row (named by ``file:line``); nothing was generated.
        alignment.inference.openai_batch.RowsFailedError: a generator lost more rows than ``allow_failures`` lets
            through (raised after the report is written).
    """
    from alignment.data.basket import load_baskets
    from alignment.inference.openai_batch import raise_if_rows_failed

    assert isinstance(cfg.method, RmScoringConfig)
    method = cfg.method
    _check(method)
    from_data = method.answers is AnswerSource.data
    answers = load_answers(method, cfg.data) if from_data else []
    rows = [] if from_data else load_baskets(cfg.data, method.fields)
    scorer = RewardScorer(method.reward_model)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    passes: dict[Path, RunSummary] = {}
    records = score_answers(answers, scorer, ctx.output_dir / "scored.jsonl") if from_data else []
    for generator in [] if from_data else method.generators or [cfg.model.name_or_path]:
        path = generator_file(ctx.output_dir, generator)
        summary = asyncio.run(_generate_and_score(method, rows, generator, scorer, path))
        passes[path.with_suffix(".errors.jsonl")] = summary
        metrics.update(summary.metrics(f"generate/{generator}"))
        records.extend({**r, "model": generator} for r in read_records(path))
    metrics.update(report(collect(records), ctx.output_dir, method.histogram_bins))
    raise_if_rows_failed(passes, allow_failures=method.allow_failures, metrics=metrics)
    return metrics
