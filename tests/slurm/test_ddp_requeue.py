"""Save-on-signal with DDP ranks: a 2-rank job gets USR2, both ranks save the same step, the job requeues and resumes.

The signal reaches the SLURM task that runs torch elastic and both rank processes (one job step). The ranks agree on
the stop step through an all-reduce of the flag, save ``checkpoint-<k>`` and exit with code 0 (a clean stop for
torch elastic); the task then finds no results, hands over to submitit's handler, which requeues the job; the
requeued job resumes both ranks from ``checkpoint-<k>`` in the same job directory. As in test_requeue.py, the test
sends the signal with ``scancel --signal=USR2`` once training has begun and releases SLURM's requeue hold with
``scontrol update StartTime=now``.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

import pytest

from tests.conftest import ROOT
from tests.slurm.conftest import job_dirs, job_logs, result_writes, squeue_ids, wait_for
from tests.slurm.test_requeue import _state, _train_losses

MAX_STEPS = 16
RUN = [
    "distributed=ddp",
    "distributed.nproc_per_node=2",
    "model=tiny_random",
    "method=sft",
    f"method.max_steps={MAX_STEPS}",
    "method.logging_steps=1",
    "method.eval_strategy=no",
    "method.save_strategy=no",  # the only checkpoint is the one the signal asks for
    "method.per_device_train_batch_size=2",
    "logger=none",
]


@pytest.mark.slow
def test_two_rank_ddp_job_saves_on_the_signal_requeues_and_resumes(slurm_cluster: str, tmp_path: Path) -> None:
    """Both ranks save one common step k; after the requeue every step from 1 to the last is trained exactly once."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    slurm = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "launch.py"),
            "-m",
            "hydra/launcher=slurm_local",
            f"hydra.launcher.partition={slurm_cluster}",
            "hydra.launcher.cpus_per_task=2",
            "hydra.launcher.timeout_min=3",
            "hydra.launcher.max_num_timeout=1",
            *RUN,
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: list(tmp_path.glob("multirun/*/*/0_*/metrics.jsonl")), 240, "training to start", 0.05)
        (job_id,) = squeue_ids()
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        wait_for(lambda: _state(job_id)[0] == "PENDING", 120, "the job to be requeued")
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
        out, _ = slurm.communicate(timeout=300)
    finally:
        if slurm.poll() is None:
            slurm.kill()
    sweep = next(tmp_path.glob("multirun/*/*"))
    # Whole files: both attempts of the job append to the same submitit log (job_logs keeps only their tails).
    logs = "".join(p.read_text(errors="replace") for p in sorted(sweep.rglob("*_log.*")))
    assert slurm.returncode == 0, out[-3000:] + job_logs(sweep)
    assert "Requeued job" in logs, logs[-6000:]
    # The first attempt exits without a result file, and SLURM's SIGTERM on the requeue reached submitit's handler,
    # not torch elastic's (which raises SignalException, and Hydra then records the requeued attempt as failed).
    assert result_writes(sweep) == 1, "the requeued attempt wrote a result file too: " + logs[-6000:]
    assert "SignalException" not in logs, logs[-6000:]
    # Both ranks stopped cleanly at the same step, and the requeued job resumed from that checkpoint.
    saved = re.findall(r"preempted: saved checkpoint-(\d+) in \S+; exiting cleanly", logs)
    assert len(saved) == 2, logs[-6000:]
    assert len(set(saved)) == 1, f"the ranks saved different steps: {saved}"
    launch_log = (job_dirs(tmp_path)[0] / "launch.log").read_text(errors="replace")  # the task process's log, once
    resumed = re.findall(r"resuming the interrupted run from \S+/checkpoint-(\d+)", launch_log)
    assert resumed == saved[:1], launch_log[-6000:]
    assert 1 <= int(saved[0]) < MAX_STEPS
    assert "rank 0 (exit" not in logs, "torch elastic saw a failed rank"

    (job,) = job_dirs(tmp_path)
    results = json.loads((job / "results.json").read_text(encoding="utf-8"))
    assert results["world_size"] == 2
    losses = _train_losses(job)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1)), f"steps trained: {sorted(losses)}"
    assert all(len(v) == 1 for v in losses.values()), f"a step was trained twice: {losses}"
    records = [json.loads((job / "ranks" / f"rank-{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in records] == [(0, 2), (1, 2)]
    assert math.isclose(records[0]["param_sum_local"], records[1]["param_sum_local"], rel_tol=1e-9)


def _ranks_stop_with_elastic_handlers_left(requeued: list[int]) -> None:
    """The ranks' block in the SLURM task, after the time-limit signal: torch elastic ran, the ranks saved and left."""
    from torch.distributed.elastic.multiprocessing.api import _terminate_process_handler

    from alignment.launch.preemption import requeue_after_ranks

    with requeue_after_ranks():
        signal.signal(signal.SIGTERM, _terminate_process_handler)  # left behind by elastic_launch
        os.kill(os.getpid(), signal.SIGUSR2)  # the time-limit signal: here it only raises the flag
        assert requeued == [], "submitit requeued before the ranks stopped"
        raise RuntimeError("no results")  # what run_ranks raises once the ranks saved and exited


def test_sigterm_is_submitits_again_when_it_requeues(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SIGTERM handler torch elastic leaves (it raises) is gone when submitit's handler runs ``scontrol requeue``.

    No cluster: the fake submitit handler sends itself SIGTERM, as SLURM does on the requeue. Before the fix, torch
    elastic's handler raised ``SignalException`` there, and the Hydra job ended failed instead of requeued.
    """
    from alignment.training.checkpoint import PreemptionState

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setattr(PreemptionState, "requested_signal", None)
    bypassed: list[int] = []
    requeued: list[int] = []

    def submitit_bypass(signum: int, frame: FrameType | None) -> None:
        bypassed.append(signum)

    def submitit_requeue(signum: int, frame: FrameType | None) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # what `scontrol requeue` makes SLURM do to this process
        requeued.append(signum)

    old_term = signal.signal(signal.SIGTERM, submitit_bypass)
    old_usr2 = signal.signal(signal.SIGUSR2, submitit_requeue)
    try:
        with pytest.raises(RuntimeError, match="no results"):
            _ranks_stop_with_elastic_handlers_left(requeued)
        assert requeued == [signal.SIGUSR2]
        assert bypassed == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is submitit_bypass
        assert signal.getsignal(signal.SIGUSR2) is submitit_requeue
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGUSR2, old_usr2)
