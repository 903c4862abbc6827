"""Save a checkpoint when SLURM warns of the time limit or a preemption, then let submitit requeue the job.

submitit installs a ``SIGUSR2`` handler in every job (``--signal=USR2@<signal_delay_s>``) that calls the
callable's ``checkpoint`` method, runs ``scontrol requeue`` and exits at once, in the middle of whatever the
process was doing. For a training run that would lose every step since the last periodic checkpoint, so
:func:`preemption_guard` (entered by the runner around the method) replaces that handler while a Trainer is
training: the signal only raises a flag, :class:`CheckpointCallback` saves ``checkpoint-<step>`` at the end of
the current optimizer step and stops, and the guard then hands over to submitit's handler, which requeues.
The requeued job runs the same pickled Hydra job in the same job directory, and the runner resumes from the
newest complete checkpoint there (:func:`latest_checkpoint`). Outside training (model loading, tokenising, final
save) the signal goes straight to submitit's handler. Outside a submitit SLURM job nothing is installed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from alignment.context import RunContext, failure, read_results
from alignment.task import MethodConfig, TaskConfig
from alignment.training.checkpoint import (
    PreemptedError,
    PreemptionState,
    latest_checkpoint,
    preemption_requested,
    request_preemption,
)

log = logging.getLogger(__name__)

SignalHandler = Callable[[int, FrameType | None], Any]


def _submitit_signal() -> int:
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    value = getattr(signal, name, None)
    if not isinstance(value, int):
        raise ValueError(f"SUBMITIT_PREEMPT_SIGNAL={name[3:]!r} is not a signal name (expected e.g. USR2)")
    return value


def in_submitit_slurm_job() -> bool:
    """True inside a job that submitit started on SLURM (it sets ``SUBMITIT_EXECUTOR``)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in os.environ


@contextmanager
def preemption_guard() -> Iterator[None]:
    """Defer submitit's requeue handler until the Trainer has saved; requeue when the block ends preempted.

    The block raises :class:`PreemptedError` (from the callback) when the signal stopped training; the guard then
    calls submitit's handler, which pickles the job again, requeues it and exits the process (``SystemExit``).
    """
    if not in_submitit_slurm_job():
        yield
        return
    signum = _submitit_signal()
    previous = signal.getsignal(signum)

    def handler(received: int, frame: FrameType | None) -> None:
        # A rank under torch elastic has no submitit handler: it always saves at its next step end.
        if PreemptionState.training or not callable(previous):
            log.warning("signal %d: saving a checkpoint at the end of this step, then requeueing", received)
            request_preemption(received)
        else:
            previous(received, frame)

    PreemptionState.requested_signal = None
    signal.signal(signum, handler)
    try:
        yield
    except PreemptedError as stopped:
        signal.signal(signum, previous)
        log.warning("%s; handing over to submitit to requeue the job", stopped)
        if callable(previous):
            previous(signum, None)
        raise
    finally:
        signal.signal(signum, previous)


def _elastic_signals() -> list[int]:
    """The signals whose handlers torch elastic replaces in the launching process (as it reads them)."""
    names = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT")
    found = (getattr(signal, name.strip(), None) for name in names.split(","))
    return [s for s in found if isinstance(s, int)]


def _restore(handlers: dict[int, Any]) -> None:
    for signum, handler in handlers.items():
        if handler is not None:  # None: installed outside Python, cannot be put back
            signal.signal(signum, handler)


@contextmanager
def requeue_after_ranks() -> Iterator[None]:
    """In the SLURM task that runs torch elastic: on the signal, let the ranks save and stop, then requeue.

    The ranks (same job step, so they receive the signal too) save ``checkpoint-<step>`` and stop; when the block
    then fails (no results) submitit's handler requeues the job. A block that completes is not requeued.

    torch elastic leaves its own ``SIGTERM``/``SIGINT``/``SIGHUP``/``SIGQUIT`` handlers in this process, and its
    ``SIGTERM`` handler raises ``SignalException``. ``scontrol requeue`` makes SLURM send ``SIGTERM`` while
    submitit's handler is still on its way to ``sys.exit``: that exception would end the Hydra job as failed, and
    submitit would write a result file for an attempt that was requeued (the launcher reads it, and cannot even
    unpickle it). So the handlers from before the block (submitit's, which ignore ``SIGTERM``) come back first.
    """
    if not in_submitit_slurm_job():
        yield
        return
    signum = _submitit_signal()
    previous = signal.getsignal(signum)
    before = {s: signal.getsignal(s) for s in _elastic_signals()} | {signum: previous}

    def handler(received: int, frame: FrameType | None) -> None:
        log.warning("signal %d: waiting for the ranks to save and stop, then requeueing", received)
        request_preemption(received)

    PreemptionState.requested_signal = None
    signal.signal(signum, handler)
    try:
        yield
    except Exception:
        _restore(before)
        if preemption_requested() and callable(previous):
            previous(signum, None)
        raise
    finally:
        _restore(before)


def with_resume(method: TaskConfig, ctx: RunContext) -> TaskConfig:
    """The method config resuming from the newest checkpoint of an interrupted run in the same directory.

    A run directory that holds ``checkpoints/checkpoint-<step>`` but no ``results.json`` (or one recording a
    failure) belongs to a run that stopped before the end (a requeued SLURM job, a crash): training continues from
    there. A fresh directory, a finished run, or an explicit ``method.resume_from_checkpoint`` leaves the config
    unchanged.
    """
    if not isinstance(method, MethodConfig) or method.resume_from_checkpoint is not None:
        return method
    results = read_results(ctx.results_file)
    if results is not None and failure(results) is None:
        return method
    latest = latest_checkpoint(ctx.checkpoint_dir)
    if latest is None:
        return method
    log.warning("resuming the interrupted run from %s", latest)
    return dataclasses.replace(method, resume_from_checkpoint=str(latest))
