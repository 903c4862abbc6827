"""Checkpoints of a training run: train-and-save, the newest checkpoint, and the save-on-preemption flag.

The launcher side (:mod:`alignment.launch.preemption`) turns SLURM's time-limit signal into
:func:`request_preemption`; :class:`SaveOnPreemptionCallback`, which :func:`train_and_save` adds to every trainer,
then saves ``checkpoint-<step>`` at the end of the current optimizer step and stops. A requeued run resumes from
:func:`latest_checkpoint`.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from alignment.task import IntervalStrategy

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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


def _any_rank(flag: bool, args: TrainingArguments) -> bool:
    """The flag OR-ed over ranks, so every DDP rank stops at the same step (a one-element all-reduce)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=args.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


class SaveOnPreemptionCallback(TrainerCallback):
    """At the end of the step in which the preemption flag went up, save a checkpoint and stop training."""

    def __init__(self) -> None:
        self.saving = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """From now on the signal is deferred to a step boundary."""
        PreemptionState.training = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """After training the signal requeues at once again."""
        PreemptionState.training = False

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Turn the flag into a save and a stop (the Trainer saves right after this event)."""
        if _any_rank(preemption_requested(), args):
            self.saving = True
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        """Leave training once the checkpoint is complete, skipping the final evaluation and model save."""
        if self.saving:
            PreemptionState.training = False
            raise PreemptedError(f"preempted: saved checkpoint-{state.global_step} in {args.output_dir}")


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The ``checkpoint-<step>`` folder with the highest step that holds a complete ``trainer_state.json``."""
    if not checkpoint_dir.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in checkpoint_dir.iterdir()
        if (m := _CHECKPOINT.match(p.name)) and (p / "trainer_state.json").is_file()
    ]
    return max(found)[1] if found else None


def train_and_save(trainer: Any, *, resume_from_checkpoint: str | None, model_dir: Path) -> dict[str, float]:
    """Train, evaluate once more if the last step was not evaluated, save the model; return the final metrics.

    The metrics are the train summary plus the latest value of every ``eval_*`` key logged during the run.
    """
    trainer.add_callback(SaveOnPreemptionCallback())  # saves and stops on SLURM's time-limit signal
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    metrics: dict[str, float] = dict(result.metrics)
    evaluated = {e["step"] for e in trainer.state.log_history if "eval_loss" in e}
    wants_eval = trainer.eval_dataset is not None and trainer.args.eval_strategy != IntervalStrategy.no.value
    if wants_eval and trainer.state.global_step not in evaluated:
        trainer.evaluate()
    for entry in trainer.state.log_history:
        metrics.update({k: v for k, v in entry.items() if k.startswith("eval_")})
    trainer.save_model(str(model_dir))
    return metrics
