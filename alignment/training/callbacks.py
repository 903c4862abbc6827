"""Trainer callbacks shared by the methods."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from transformers import (
    EarlyStoppingCallback,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from alignment.context import RunContext
from alignment.data.chat_template import EvalPrompt
from alignment.inference.hf_generate import generate
from alignment.loggers import LoggerConfig, log_samples


def _world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_share(count: int, rank: int, world: int) -> list[int]:
    """Indices ``rank, rank + world, ...`` below ``count``, padded with index 0 to ``ceil(count / world)`` entries.

    Every rank gets the same number of prompts, so every rank runs the same number of ``generate`` calls: under
    ZeRO-3/FSDP each forward gathers parameter shards from all ranks, and a rank that stopped early would leave
    the others waiting forever. The padding entries are generated and dropped.
    """
    share = list(range(rank, count, world))
    return share + [0] * (-(-count // world) - len(share))


class SampleGenerationCallback(TrainerCallback):
    """At each evaluation, generate greedily for fixed eval prompts and record them.

    Writes ``generations/step_<N>.jsonl`` in the run directory, logs ``eval_exact_match`` (generation equals
    the reference after stripping whitespace) through ``trainer.log`` so every tracker receives it, and sends
    the samples to the active tracker as a table. The same prompts are used at every evaluation, so the files
    show how answers change over training.

    With several ranks every rank generates an equal share of the prompts in lock-step (ZeRO-3 and FSDP need all
    ranks in every forward; transformers' ``generate`` then runs with ``synced_gpus`` so ranks whose sequences
    ended keep stepping until all have), the shares are gathered, and rank 0 alone writes and logs them.
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

    def _generate_all(self, model: Any) -> list[str]:
        """Completions of every prompt: this rank's share, gathered from all ranks when there are several."""
        rank, world = _world()
        share = rank_share(len(self.prompts), rank, world)
        texts = generate(
            model,
            self.tokenizer,
            [self.prompts[i].prompt for i in share],
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
        )
        if world == 1:
            return texts
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, texts)
        completions: dict[int, str] = {}
        for other, other_texts in enumerate(gathered):
            for index, text in zip(range(other, len(self.prompts), world), other_texts, strict=False):
                completions[index] = text
        return [completions[i] for i in range(len(self.prompts))]

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Generate (all ranks), then write the JSONL file, log exact match and the sample table (rank 0)."""
        if not self.prompts or state.global_step in self.history:
            return
        texts = self._generate_all(kwargs["model"])
        rows = [
            {"origin": p.origin, "prompt": p.prompt, "reference": p.reference, "generation": text}
            for p, text in zip(self.prompts, texts, strict=True)
        ]
        exact = sum(r["generation"].strip() == r["reference"].strip() for r in rows) / len(rows)
        self.history[state.global_step] = exact
        if state.is_world_process_zero:
            folder = self.ctx.output_dir / "generations"
            folder.mkdir(exist_ok=True)
            path: Path = folder / f"step_{state.global_step:06d}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            log_samples(self.logger, self.ctx, rows, state.global_step)
        if self.trainer is not None:
            self.trainer.log({"eval_exact_match": exact})  # on every rank, so their log histories stay equal
        if kwargs.get("metrics") is not None:  # the evaluation's own metrics: early stopping and best model see it
            kwargs["metrics"]["eval_exact_match"] = exact


def metric_key(name: str) -> str:
    """An eval metric's key in an evaluation's metrics: ``loss`` and ``eval_loss`` are both ``eval_loss``."""
    return name if name.startswith("eval_") else f"eval_{name}"


class EarlyStopping(EarlyStoppingCallback):
    """HF's early stopping (patience and threshold on ``metric_for_best_model``), strict and resumable.

    * An evaluation without the metric is an error that lists the metrics it has (HF's callback warns and never
      stops, so a misspelt name would silently train to the end).
    * The count of evaluations without improvement is read back from the checkpoint on resume (HF restores
      callback states only with ``restore_callback_states_from_checkpoint``), so a resumed run stops where an
      uninterrupted one would.
    * Stopping before the last step logs ``early_stopping/stopped: 1`` at that step (``metrics.jsonl`` and the
      trackers), and :attr:`stopped_at` keeps the step.

    The best value so far is HF's ``state.best_metric``, updated after every evaluation during training: the
    evaluation on start compares with nothing and counts as no failure.
    """

    def __init__(self, trainer: Any, patience: int, threshold: float) -> None:
        super().__init__(early_stopping_patience=patience, early_stopping_threshold=threshold)
        self.trainer = trainer
        self.stopped_at: int | None = None
        """The step at which the patience ran out before the last step; None while training goes on."""

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """HF's checks, then, on resume, the checkpoint's count of evaluations without improvement."""
        super().on_train_begin(args, state, control, **kw)  # type: ignore[no-untyped-call]
        stored = cast(dict[str, Any], state.stateful_callbacks)  # a dict once the state is built
        saved = stored.get(type(self).__name__)
        if state.global_step > 0 and isinstance(saved, dict):
            self.early_stopping_patience_counter = int(saved["attributes"]["early_stopping_patience_counter"])
        stored[type(self).__name__] = self.state()  # HF's save updates only the entries a loaded state already has

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Count an evaluation without improvement; stop training when the patience is used up."""
        name = str(args.metric_for_best_model)
        if metrics is None or metric_key(name) not in metrics:
            have = ", ".join(sorted(metrics or {}))
            raise ValueError(
                f"method.metric_for_best_model={name!r}: this evaluation has no {metric_key(name)!r} (it has {have})"
            )
        super().on_evaluate(args, state, control, metrics, **kwargs)  # type: ignore[no-untyped-call]
        exhausted = self.early_stopping_patience_counter >= self.early_stopping_patience
        if exhausted and self.stopped_at is None and state.global_step < state.max_steps:
            self.stopped_at = state.global_step
            control.should_training_stop = True
            self.trainer.log({"early_stopping/stopped": 1.0})


class MetricsJsonlCallback(TrainerCallback):
    """Append every logged metrics dict, with step and epoch, to ``metrics.jsonl`` (main process only).

    At the start of training the file is rewritten from the Trainer's log history: empty for a fresh run, the
    checkpoint's records for a resumed one. Records an interrupted attempt wrote after its checkpoint (steps that
    are trained again) and those of an attempt that never reached a checkpoint go, so the file of a resumed run
    equals an uninterrupted run's.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Start the file from the log history (atomically: a kill now leaves the old file or the new one)."""
        if not state.is_world_process_zero:
            return
        records = (_record(int(entry["step"]), entry.get("epoch"), entry) for entry in state.log_history)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        temporary.replace(self.path)

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
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(_record(state.global_step, state.epoch, logs)) + "\n")


def _record(step: int, epoch: float | None, logs: dict[str, Any]) -> dict[str, Any]:
    """One line of ``metrics.jsonl``; a log-history entry (which holds ``step`` too) gives the same line."""
    return {"step": step, "epoch": epoch, **{k: v for k, v in logs.items() if k != "step"}}


class LogLinePrinter(TrainerCallback):
    """Each logged metrics dict as one printed line: HF's ``PrinterCallback`` without its side effect.

    HF uses its printer when ``disable_tqdm`` is set (no terminal). It pops ``total_flos`` from the dict it is
    given, and at the end of training that dict is the train summary the run returns: ``results.json`` would lose
    ``total_flos``.
    """

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Print the dict (floats to 4 significant digits, ``total_flos`` left out) on the local main process."""
        if state.is_local_process_zero and logs:
            print({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in logs.items() if k != "total_flos"})
