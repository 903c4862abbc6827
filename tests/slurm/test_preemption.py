"""Save-on-signal logic without a cluster: the guard defers submitit's handler while training, then hands over."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from alignment.context import RunContext
from alignment.launch.preemption import preemption_guard, with_resume
from alignment.methods.sft import SftConfig
from alignment.training.checkpoint import (
    COMPLETE,
    CheckpointCallback,
    PreemptedError,
    PreemptionState,
    latest_checkpoint,
    preemption_requested,
)


@pytest.fixture
def submitit_job(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """A fake submitit SLURM job: its USR2 handler records calls instead of requeueing."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    calls: list[int] = []

    def submitit_handler(signum: int, frame: FrameType | None) -> None:
        calls.append(signum)

    old = signal.signal(signal.SIGUSR2, submitit_handler)
    monkeypatch.setattr(PreemptionState, "requested_signal", None)
    monkeypatch.setattr(PreemptionState, "training", False)
    yield calls
    signal.signal(signal.SIGUSR2, old)


def _args(tmp_path: Path) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])


def _train_and_get_signalled(tmp_path: Path, submitit_calls: list[int]) -> None:
    """What the Trainer does around the callback: begin, a step in which USR2 arrives, save, (raise)."""
    callback, control, state, args = CheckpointCallback(), TrainerControl(), TrainerState(), _args(tmp_path)
    state.global_step = 3
    (tmp_path / "checkpoint-3").mkdir()
    with preemption_guard():
        callback.on_train_begin(args, state, control)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert preemption_requested()
        assert submitit_calls == [], "submitit's handler ran before the checkpoint was saved"
        callback.on_step_end(args, state, control)
        assert control.should_save
        assert control.should_log, "a checkpoint step is a logging step"
        assert control.should_training_stop
        callback.on_save(args, state, control)  # the Trainer has written checkpoint-3


def test_signal_during_training_saves_then_requeues(submitit_job: list[int], tmp_path: Path) -> None:
    with pytest.raises(PreemptedError, match="checkpoint-3"):
        _train_and_get_signalled(tmp_path, submitit_job)
    assert submitit_job == [signal.SIGUSR2]
    assert (tmp_path / "checkpoint-3" / COMPLETE).is_file(), "the checkpoint is marked complete before the stop"


def test_signal_outside_training_goes_to_submitit_at_once(submitit_job: list[int]) -> None:
    with preemption_guard():
        os.kill(os.getpid(), signal.SIGUSR2)
        assert submitit_job == [signal.SIGUSR2]
        assert not preemption_requested()


def test_no_signal_no_stop(submitit_job: list[int], tmp_path: Path) -> None:
    callback, control, state, args = CheckpointCallback(), TrainerControl(), TrainerState(), _args(tmp_path)
    (tmp_path / "checkpoint-0").mkdir()
    with preemption_guard():
        callback.on_train_begin(args, state, control)
        callback.on_step_end(args, state, control)
        assert not control.should_log
        callback.on_save(args, state, control)
        callback.on_train_end(args, state, control)
    assert not control.should_training_stop
    assert submitit_job == []


def _checkpoint(root: Path, step: int, *, complete: bool = True) -> Path:
    folder = root / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    if complete:
        (folder / COMPLETE).write_text(f"{step}\n")
    return folder


def test_latest_checkpoint_is_the_highest_complete_step(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "checkpoints") is None
    _checkpoint(tmp_path, 9)
    best = _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 11, complete=False)  # killed while saving (tests/training/test_checkpoint.py: each point)
    assert latest_checkpoint(tmp_path / "checkpoints") == best


def test_with_resume(tmp_path: Path) -> None:
    ctx = RunContext(tmp_path, "run", None)
    method = SftConfig()
    assert with_resume(method, ctx) is method, "a fresh run directory starts clean"
    newest = _checkpoint(tmp_path, 4)
    assert with_resume(method, ctx).resume_from_checkpoint == str(newest)  # type: ignore[attr-defined]
    explicit = SftConfig(resume_from_checkpoint="elsewhere/checkpoint-2")
    assert with_resume(explicit, ctx) is explicit
    (tmp_path / "results.json").write_text("{}")
    assert with_resume(method, ctx) is method, "a finished run is not resumed"


def test_a_run_that_failed_after_a_checkpoint_resumes(tmp_path: Path) -> None:
    """``results.json`` of a run that raised says ``status: failed``: a rerun continues from its checkpoint."""
    newest = _checkpoint(tmp_path, 4)
    failed = '{"status": "failed", "error": {"type": "RuntimeError", "message": "CUDA out of memory"}}'
    (tmp_path / "results.json").write_text(failed)
    resumed = with_resume(SftConfig(), RunContext(tmp_path, "run", None))
    assert resumed.resume_from_checkpoint == str(newest)  # type: ignore[attr-defined]
