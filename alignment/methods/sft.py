"""Supervised fine-tuning on conversations, loss only on the chosen roles.

Loss: token-level cross-entropy over the tokens of the messages whose role is in ``train_on_roles``
(every such turn of a multi-turn dialogue, its end-of-turn token included, its role header excluded),
normalised by the number of loss tokens in the whole gradient-accumulation window (HF ``num_items_in_batch``):

    L = -(1/N) * sum_{b,t: label[b,t] != -100} log pi(label[b,t] | x[b, <t])

Deviations from the original toolkit: a ``system_prompt`` is injected only when the dialogue has none (the
original always prepended one), and loss spans come from rendering the chat template rather than from
matching a header string, so pad == eos and BPE merges at the header cannot silently drop every span.
Training runs through TRL's ``SFTTrainer`` on our pre-tokenised ``input_ids``/``labels``, which gives packing
(best-fit decreasing) and padding-free batches; its loss comes from the hidden states of the counted positions,
through Liger's fused linear cross entropy where ``model.liger`` is on and our chunked head loss elsewhere, so no
run holds the logits of every position (:mod:`alignment.methods.sft_trainer`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from alignment.data.chat_template import (
    EvalPrompt,
    prepare_messages,
    render,
    system_prompt_text,
    tokenize_conversation,
)
from alignment.data.validate import (
    ORIGIN,
    ROLES,
    RowChecks,
    empty_split_error,
    message_list_problems,
    require_columns,
)
from alignment.ranges import bounded, check_fields
from alignment.task import MethodConfig, TaskConfig

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from alignment.config import RunConfig
    from alignment.context import RunContext

log = logging.getLogger(__name__)

COLUMN = "messages"


@dataclass
class ConversationConfig(MethodConfig):
    """What every method that trains on ``messages`` conversations shares (SFT, distillation)."""

    train_on_roles: list[str] = field(default_factory=lambda: ["assistant"])
    """Roles whose turns carry loss (every such turn, end-of-turn token included)."""
    system_prompt: str | None = None
    """System message injected into dialogues that have none."""
    system_prompt_file: str | None = None
    """File whose text is that system message (e.g. ``<prompt_opt run>/best_prompt.txt``); not with the above."""
    model_support_system_role: bool = True
    """False folds the system text into the first user turn (for templates without a system role)."""
    num_generation_samples: int = bounded(16, ge=0)
    """Eval prompts generated at every evaluation (0 disables); the same prompts each time."""
    max_new_tokens: int = bounded(64, ge=1)
    """Token budget of each sample generation."""

    def __post_init__(self) -> None:
        check_fields(self, "method")
        self.system_text()  # both set, or a missing file, fails when the config is built
        unknown = [r for r in self.train_on_roles if r not in ROLES]
        if unknown or not self.train_on_roles:
            # A typo would otherwise reject every row as having no trained turn.
            raise ValueError(f"method.train_on_roles must be a non-empty subset of {ROLES}, got {self.train_on_roles}")

    def system_text(self) -> str | None:
        """The system message to inject: ``system_prompt``, or the text of ``system_prompt_file``."""
        names = ("method.system_prompt", "method.system_prompt_file")
        return system_prompt_text(self.system_prompt, self.system_prompt_file, names=names)


@dataclass
class SftConfig(ConversationConfig):
    """Supervised fine-tuning."""

    name: str = "sft"
    """Registry key."""
    max_length: int = bounded(1024, ge=1)
    """Tokens per sequence; longer conversations are cut at the end (counted and reported)."""
    packing: bool = False
    """Pack several conversations into each ``max_length`` row (best-fit decreasing, padding-free)."""
    padding_free: bool = True
    """Concatenate each micro-batch into one row with position ids instead of padding: no padding token is
    computed; each conversation is attended on its own (flash-attention varlen, or one sdpa call each)."""


def row_problems(row: Mapping[str, Any], *, roles: list[str]) -> list[str]:
    """Validation of one SFT row: a well-formed conversation with a non-empty turn in a trained role."""
    problems = require_columns(row, [COLUMN])
    if problems:
        return problems
    problems = message_list_problems(row[COLUMN], COLUMN)
    if problems:
        return problems
    trained = [(i, m) for i, m in enumerate(row[COLUMN]) if m["role"] in roles]
    if not trained:
        return [f"column {COLUMN!r}: no message with a trained role ({', '.join(roles)}); it would carry no loss"]
    return [
        f"column {COLUMN!r}[{i}].content: empty {m['role']} turn (trained turns need text)"
        for i, m in trained
        if not m["content"].strip()
    ]


def _tokenize(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, cfg: SftConfig, split: str) -> Dataset:
    """Token ids and labels per conversation; those with no trained token left within ``max_length`` are dropped.

    Raises:
        DataError: every conversation of the split was dropped.
    """

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        messages = prepare_messages(
            row[COLUMN],
            system_prompt=cfg.system_text(),
            model_support_system_role=cfg.model_support_system_role,
        )
        out = tokenize_conversation(tokenizer, messages, cfg.train_on_roles, cfg.max_length)
        return {"input_ids": out.input_ids, "labels": out.labels, "truncated": out.truncated}

    encoded = dataset.map(encode, remove_columns=dataset.column_names, desc="Tokenizing")
    truncated = sum(encoded["truncated"])
    kept = encoded.filter(lambda row: any(label != -100 for label in row["labels"]))
    dropped = len(encoded) - len(kept)
    if truncated or dropped:
        log.warning(
            "sft: %d of %d conversations cut to max_length=%d; %d dropped because no trained token survived",
            truncated,
            len(encoded),
            cfg.max_length,
            dropped,
        )
    if len(kept) == 0:
        reason = f"no trained token left within method.max_length={cfg.max_length}"
        raise empty_split_error(split, dataset, {reason: dropped}, unit="conversations")
    return kept.remove_columns("truncated")


def eval_prompts(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, cfg: ConversationConfig) -> list[EvalPrompt]:
    """Prompts for sample generation: each eval conversation up to its last assistant turn, which is the reference."""
    prompts = []
    for row in dataset.select(range(min(cfg.num_generation_samples, len(dataset)))):
        messages = prepare_messages(
            row[COLUMN],
            system_prompt=cfg.system_text(),
            model_support_system_role=cfg.model_support_system_role,
        )
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if not last:  # no assistant turn, or nothing before it to prompt with
            continue
        prompt = render(tokenizer, messages[:last], generation_prompt=True)
        prompts.append(EvalPrompt(row[ORIGIN], prompt, messages[last]["content"]))
    return prompts


def row_checks(method: TaskConfig) -> RowChecks:
    """The rows SFT trains on: a conversation with a non-empty turn in one of ``train_on_roles``."""
    assert isinstance(method, SftConfig)
    return RowChecks(partial(row_problems, roles=list(method.train_on_roles)), (COLUMN,))


def run(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Validate and tokenise the data, load the model, train, save the model/adapter; return final metrics."""
    # Training-only imports stay here so composing a config (``--cfg job``, ``--help``) imports no ML stack.
    from trl import SFTConfig as TrlSFTConfig

    from alignment.data.mix import build_splits
    from alignment.methods.sft_trainer import ChunkedSFTTrainer
    from alignment.models.load import load_model, load_tokenizer
    from alignment.training.arguments import training_args
    from alignment.training.callbacks import MetricsJsonlCallback, SampleGenerationCallback
    from alignment.training.checkpoint import train_and_save

    method = cfg.method
    assert isinstance(method, SftConfig)
    checks = row_checks(method)
    splits = build_splits(cfg.data, checks.validate, checks.columns)
    tokenizer = load_tokenizer(cfg.model)
    train = _tokenize(splits.train, tokenizer, method, "train")
    evaluation = _tokenize(splits.eval, tokenizer, method, "eval") if splits.eval is not None else None
    prompts = eval_prompts(splits.eval, tokenizer, method) if splits.eval is not None else []

    model = load_model(cfg.model, tokenizer)
    args = training_args(
        cfg,
        ctx,
        evaluation=evaluation is not None,
        args_class=TrlSFTConfig,
        # Rows are already cut to max_length by _tokenize; TRL needs it only as the pack size, and refuses it
        # with padding_free without packing ("max_length is not enforced"), so it is passed only when packing.
        max_length=method.max_length if method.packing else None,
        packing=method.packing,
        padding_free=method.padding_free,
    )
    samples = SampleGenerationCallback(
        prompts,
        tokenizer,
        ctx,
        cfg.logger,
        max_new_tokens=method.max_new_tokens,
        batch_size=method.per_device_eval_batch_size,
    )
    trainer = ChunkedSFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        callbacks=[MetricsJsonlCallback(ctx.output_dir / "metrics.jsonl"), samples],
    )
    samples.trainer = trainer
    return train_and_save(trainer, method=method, model_dir=ctx.model_dir)
