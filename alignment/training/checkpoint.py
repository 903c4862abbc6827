"""Checkpoints of a training run: train-and-save, the newest complete checkpoint, books that survive a resume.

The launcher side (:mod:`alignment.launch.preemption`) turns SLURM's time-limit signal into
:func:`request_preemption`; :class:`CheckpointCallback`, which :func:`train_and_save` adds to every trainer, then
saves ``checkpoint-<step>`` at the end of the current optimizer step and stops. It also marks every checkpoint
complete once all its files are written, and a requeued or rerun job resumes from :func:`latest_checkpoint`, the
newest complete one. :class:`RunBooksCallback` carries the run's totals (the loss sum behind ``train_loss``, the
training time, TRL's token count) through the checkpoint, and
:class:`~alignment.training.callbacks.MetricsJsonlCallback` restarts ``metrics.jsonl`` from the checkpoint's log
history, so a resumed run ends with an uninterrupted run's books.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import time
from pathlib import Path
from typing import Any, cast

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState, PrinterCallback

from alignment.task import IntervalStrategy, MethodConfig, tracks_best_model
from alignment.training.callbacks import EarlyStopping, LogLinePrinter, metric_key

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
COMPLETE = "checkpoint_complete"
"""Written into ``checkpoint-<step>`` after every rank finished writing it (its content: the step)."""


class PreemptedError(RuntimeError):
    """Training stopped on the preemption signal after saving ``checkpoint-<step>``."""


class PreemptionState:
    """Process-wide flags (a signal handler cannot receive arguments)."""

    requested_signal: int | None = None
    """The signal that asked for a save-and-stop, None while none arrived."""
    training: bool = False
    """Whether a Trainer is inside its training loop (the signal is then deferred to a step boundary)."""


def preemption_requested() -> bool:
    """Whether the preemption signal arrived while this process was training."""
    return PreemptionState.requested_signal is not None


def request_preemption(signum: int = signal.SIGUSR2) -> None:
    """Raise the flag that makes the training loop save and stop at the end of the current step."""
    PreemptionState.requested_signal = signum


def _barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _any_rank(flag: bool, args: TrainingArguments) -> bool:
    """The flag OR-ed over ranks, so every DDP rank stops at the same step (a one-element all-reduce)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=args.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


class CheckpointCallback(TrainerCallback):
    """Every checkpoint is a logging step and is marked complete; on the preemption flag, save and stop.

    * A save step always logs first, so a checkpoint never falls inside a logging window: what the Trainer and
      the methods gather between logs (the running loss, TRL's token and accuracy buffers, the metrics a method
      records since the last log) is not in ``trainer_state.json``, and a resume would lose it.
    * Once every rank has written its part of ``checkpoint-<step>``, rank 0 writes :data:`COMPLETE` in it
      (HF writes no completeness marker: a kill while it writes the weights, the optimizer or
      ``trainer_state.json``, or before another rank's files are on disk, leaves a folder that looks whole).
    * In the step the preemption flag went up (on any rank): save, then leave training.

    It must come after HF's ``DefaultFlowCallback`` (which decides the save steps): :func:`train_and_save` appends it.
    """

    def __init__(self) -> None:
        self.saving = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """From now on the signal is deferred to a step boundary."""
        PreemptionState.training = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """After training the signal requeues at once again."""
        PreemptionState.training = False

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Turn the flag into a save and a stop (the Trainer logs, evaluates and saves right after this event)."""
        if _any_rank(preemption_requested(), args):
            self.saving = True
            control.should_save = True
            control.should_training_stop = True
        if control.should_save:
            control.should_log = True

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """An epoch-end save logs first too."""
        if control.should_save:
            control.should_log = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Mark the checkpoint complete; when preempted, leave training (skipping the final evaluation and save)."""
        _barrier()  # every rank has written its files (RNG state, optimizer and weight shards)
        folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():  # elsewhere (a hyper-parameter search): not resumed
            (folder / COMPLETE).write_text(f"{state.global_step}\n", encoding="utf-8")
        if self.saving:
            PreemptionState.training = False
            raise PreemptedError(f"preempted: saved checkpoint-{state.global_step} in {args.output_dir}")


class RunBooksCallback(TrainerCallback, ExportableState):
    """Carries the run's totals through a checkpoint, so a resumed run reports what an uninterrupted one would.

    HF computes ``train_loss`` from the loss summed over the steps of this process only, and ``train_runtime``
    (with the speeds) from this process's start; TRL's SFT ``num_tokens`` restarts at 0. HF stores this
    callback's :meth:`state` in the checkpoint's ``trainer_state.json`` (``stateful_callbacks``; the log history
    and ``total_flos`` are there already), and :meth:`on_train_begin` of the resumed run puts the totals back
    into the trainer, with every step of the run counted in ``train_loss`` and the speeds. Timing: the whole run's
    training time is the earlier attempts' time up to their checkpoint plus this process's;
    ``train_samples_per_second`` and ``train_steps_per_second`` are taken over it.

    It must come first in the callback list, so the trackers and ``metrics.jsonl`` log the corrected summary:
    :func:`train_and_save` inserts it there.
    """

    def __init__(self, trainer: Any = None) -> None:
        self.trainer = trainer
        self.earlier_runtime = 0.0
        """Seconds of training before this process (the checkpoint's total)."""
        self.began = time.time()

    def state(self) -> dict[str, Any]:
        """The totals at this checkpoint (HF calls it while writing ``trainer_state.json``)."""
        trainer = self.trainer
        return {
            "args": {},
            "attributes": {
                "loss_sum": float(getattr(trainer, "_total_loss_scalar", 0.0)),
                "runtime": self.earlier_runtime + time.time() - self.began,
                "num_tokens": getattr(trainer, "_total_train_tokens", None),
            },
        }

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Resumed: restore the loss sum, the training time and the token count of the checkpoint."""
        self.began = time.time()
        name = type(self).__name__
        stored = cast(dict[str, Any], state.stateful_callbacks)  # a dict once the state is built
        saved = stored.get(name)
        stored[name] = self.state()  # HF's save updates only the entries a loaded state already has
        if state.global_step == 0:
            return
        books = saved.get("attributes") if isinstance(saved, dict) else None
        if not books or self.trainer is None:
            log.warning("the checkpoint has no run totals: train_loss and train_runtime cover the resumed steps only")
            return
        self.trainer._total_loss_scalar = float(books["loss_sum"])
        self.trainer._initial_global_step = 0  # train_loss and the speeds count every step of the run
        self.earlier_runtime = float(books["runtime"])
        if books.get("num_tokens") is not None and hasattr(self.trainer, "_total_train_tokens"):
            self.trainer._total_train_tokens = books["num_tokens"]

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        """Resumed: make the train summary's runtime and speeds cover the whole run (before anyone records it)."""
        if not logs or "train_runtime" not in logs or not self.earlier_runtime:
            return
        session = logs["train_runtime"]
        total = session + self.earlier_runtime
        whole = {"train_runtime": round(total, 4)}
        for key in ("train_samples_per_second", "train_steps_per_second"):  # the run's samples and steps / session
            if key in logs:
                whole[key] = round(logs[key] * session / total, 3)
        logs.update(whole)
        last = state.log_history[-1] if state.log_history else {}
        if last.get("train_runtime") == session:  # HF appended the entry before calling the callbacks
            last.update(whole)


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The ``checkpoint-<step>`` folder with the highest step that is marked :data:`COMPLETE`.

    HF writes a checkpoint's files in place, ``trainer_state.json`` last but with no marker of its own, so a
    folder that lacks the marker was cut short (weights, optimizer or ``trainer_state.json`` half written, another
    rank still writing): it is skipped, with a warning, for the one before it.
    """
    if not checkpoint_dir.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := _CHECKPOINT.match(p.name)))
    for _, folder in reversed(found):
        if (folder / COMPLETE).is_file():
            return folder
        log.warning("skipping %s: its write did not complete (no %s)", folder, COMPLETE)
    return None


def train_and_save(trainer: Any, *, method: MethodConfig, model_dir: Path) -> dict[str, float]:
    """Train, evaluate once more if the last step was not evaluated, save the model; return the final metrics.

    The metrics are the train summary plus the latest value of every ``eval_*`` key logged during the run. A
    resumed run (``method.resume_from_checkpoint``) skips ``eval_on_start``: the start of the run was evaluated
    before the checkpoint, and that evaluation is in the checkpoint's log history.

    With ``method.early_stopping_patience`` the run stops after that many evaluations without improvement
    (:class:`~alignment.training.callbacks.EarlyStopping`). With ``method.load_best_model_at_end`` HF loads the best
    checkpoint's weights after training; they are what is saved, and the ``eval_*`` metrics are those up to the
    best step. Either adds ``train/global_step``, ``best/global_step`` and ``best/<metric>``; early stopping adds
    ``early_stopping/stopped`` (1 when the patience ran out before the last step).
    """
    trainer.callback_handler.callbacks.insert(0, RunBooksCallback(trainer))  # first: corrects the summary for all
    trainer.add_callback(CheckpointCallback())  # after HF's flow callback: sees the steps that save
    if trainer.pop_callback(PrinterCallback) is not None:  # disable_tqdm (no terminal): HF's printer mutates logs
        trainer.add_callback(LogLinePrinter())
    stopping = None
    if method.early_stopping_patience:
        stopping = EarlyStopping(trainer, method.early_stopping_patience, method.early_stopping_threshold)
        trainer.add_callback(stopping)
    if method.resume_from_checkpoint is not None:
        trainer.args.eval_on_start = False
        _absolute_step_intervals(trainer.args, Path(method.resume_from_checkpoint))
    result = trainer.train(resume_from_checkpoint=method.resume_from_checkpoint)
    metrics: dict[str, float] = dict(result.metrics)
    state = trainer.state
    best_step = state.best_global_step if state.best_model_checkpoint is not None else None
    loaded_best = trainer.args.load_best_model_at_end and best_step is not None
    evaluated = {e["step"] for e in state.log_history if "eval_loss" in e}
    wants_eval = trainer.eval_dataset is not None and trainer.args.eval_strategy != IntervalStrategy.no.value
    if wants_eval and not loaded_best and state.global_step not in evaluated:
        trainer.evaluate()
    last = best_step if loaded_best else state.global_step
    for entry in state.log_history:
        if entry["step"] <= last:
            metrics.update({k: v for k, v in entry.items() if k.startswith("eval_")})
    if tracks_best_model(method):
        metrics.update(_best_model_metrics(state, trainer.args.metric_for_best_model, stopping))
    trainer.save_model(str(model_dir))
    return metrics


def _absolute_step_intervals(args: TrainingArguments, checkpoint: Path) -> None:
    """Fractional ``logging/eval/save_steps`` as the step counts a resumed checkpoint's state holds for them.

    HF turns a fraction (``eval_steps=0.25``) into steps of the run's ``max_steps`` in its ``TrainerState``, saves
    those, and on resume compares them with the arguments: an identical rerun warned "eval_steps: 0.25 (from args)
    != 8 (from trainer_state.json)". A fraction whose steps of the checkpoint's ``max_steps`` are the saved value is
    replaced by that value (the resumed run uses the saved one either way); a changed fraction still warns.
    """
    path = checkpoint / "trainer_state.json"
    if not path.is_file():
        return
    saved = TrainerState.load_from_json(str(path))
    for kind in ("logging_steps", "eval_steps", "save_steps"):
        value, stored = getattr(args, kind), getattr(saved, kind, None)
        if value is not None and 0 < value < 1 and saved.max_steps > 0 and math.ceil(saved.max_steps * value) == stored:
            setattr(args, kind, stored)


def _best_model_metrics(state: TrainerState, metric: str, stopping: EarlyStopping | None) -> dict[str, float]:
    """Steps run, the best evaluation's step and value, and whether early stopping ended the run."""
    metrics = {"train/global_step": float(state.global_step)}
    if state.best_global_step is not None:
        metrics["best/global_step"] = float(state.best_global_step)
    if state.best_metric is not None:
        metrics[f"best/{metric_key(metric)}"] = float(state.best_metric)
    if stopping is not None:
        metrics["early_stopping/stopped"] = float(stopping.stopped_at is not None)
    return metrics
