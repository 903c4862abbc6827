"""Trainer callbacks shared by the methods."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import (
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from alignment.context import RunContext
from alignment.data.chat_template import EvalPrompt
from alignment.inference.generate import generate
from alignment.loggers import LoggerConfig, log_samples


class SampleGenerationCallback(TrainerCallback):
    """At each evaluation, generate greedily for fixed eval prompts and record them.

    Writes ``generations/step_<N>.jsonl`` in the run directory, logs ``eval_exact_match`` (generation equals
    the reference after stripping whitespace) through ``trainer.log`` so every tracker receives it, and sends
    the samples to the active tracker as a table. The same prompts are used at every evaluation, so the files
    show how answers change over training. Runs on the main process only.
    """

    def __init__(
        self,
        prompts: list[EvalPrompt],
        tokenizer: PreTrainedTokenizerBase,
        ctx: RunContext,
        logger: LoggerConfig,
        *,
        max_new_tokens: int,
        batch_size: int,
    ) -> None:
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.ctx = ctx
        self.logger = logger
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.trainer: Trainer | None = None
        self.history: dict[int, float] = {}

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Generate, write the JSONL file, log exact match and the sample table."""
        if not state.is_world_process_zero or not self.prompts or state.global_step in self.history:
            return
        texts = generate(
            kwargs["model"],
            self.tokenizer,
            [p.prompt for p in self.prompts],
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
        )
        rows = [
            {"origin": p.origin, "prompt": p.prompt, "reference": p.reference, "generation": text}
            for p, text in zip(self.prompts, texts, strict=True)
        ]
        exact = sum(r["generation"].strip() == r["reference"].strip() for r in rows) / len(rows)
        self.history[state.global_step] = exact
        folder = self.ctx.output_dir / "generations"
        folder.mkdir(exist_ok=True)
        path: Path = folder / f"step_{state.global_step:06d}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        log_samples(self.logger, self.ctx, rows, state.global_step)
        if self.trainer is not None:
            self.trainer.log({"eval_exact_match": exact})


class MetricsJsonlCallback(TrainerCallback):
    """Append every logged metrics dict, with step and epoch, to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write one JSON line per log event."""
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
