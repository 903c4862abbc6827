"""Requeue on the time-limit signal: the job saves, requeues itself and resumes its checkpoint to the last step.

SLURM sends ``--signal=USR2@<signal_delay_s>`` from a timer that fires about every 30 s, so a walltime-driven
signal cannot be timed against a few-second training run. The test sends the same signal to the job's step with
``scancel --signal=USR2`` once training has begun; from there on everything is the real path: submitit counts it
as a timeout (the job's limit is short), our handler saves ``checkpoint-<k>``, submitit requeues the job, and the
requeued job resumes in the same job directory. SLURM holds a requeued job for ~2 minutes (BeginTime); the test
releases it at once with ``scontrol update StartTime=now``.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.slurm.conftest import job_dirs, job_logs, result_writes, squeue_ids, wait_for

MAX_STEPS = 6
RUN = [
    "model=tiny_random",
    "method=sft",
    f"method.max_steps={MAX_STEPS}",
    "method.logging_steps=1",
    f"method.eval_steps={MAX_STEPS}",
    "method.gradient_accumulation_steps=2",
    "method.per_device_train_batch_size=2",
    "method.num_generation_samples=1",
    "method.max_new_tokens=4",
    "logger=none",
    "data.max_eval_samples=4",
]


def _train_losses(run_dir: Path) -> dict[int, list[float]]:
    losses: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses.setdefault(record["step"], []).append(record["loss"])
    return losses


def _state(job_id: str) -> tuple[str, str]:
    out = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True, check=False
    ).stdout.split()
    return (out[0], out[1]) if len(out) == 2 else ("GONE", "")


@pytest.mark.slow
def test_interrupted_job_requeues_and_resumes_to_the_last_step(slurm_cluster: str, tmp_path: Path) -> None:
    """Signal mid-training → checkpoint-k, requeue, resume from k; every step trained once, losses as uninterrupted."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "launch.py")]
    slurm = subprocess.Popen(
        [
            *cmd,
            "-m",
            "hydra/launcher=slurm_local",
            f"hydra.launcher.partition={slurm_cluster}",
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
        # While the requeued job runs: the same run, uninterrupted and without SLURM, for the reference losses.
        baseline = subprocess.run(
            [*cmd, *RUN, "hydra.run.dir=baseline"], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
        )
        assert baseline.returncode == 0, baseline.stderr[-3000:]
        out, _ = slurm.communicate(timeout=300)
    finally:
        if slurm.poll() is None:
            slurm.kill()
    sweep = next(tmp_path.glob("multirun/*/*"))
    logs = job_logs(sweep) + (job_dirs(tmp_path)[0] / "launch.log").read_text(errors="replace")
    assert slurm.returncode == 0, out[-3000:] + logs[-6000:]
    assert "Requeued job" in logs, logs[-6000:]
    assert result_writes(sweep) == 1, "the requeued attempt wrote a result file too: " + logs[-6000:]
    saved = re.findall(r"preempted: saved checkpoint-(\d+)", logs)
    resumed = re.findall(r"resuming the interrupted run from \S+/checkpoint-(\d+)", logs)
    assert len(saved) == 1, logs[-6000:]
    assert resumed == saved, logs[-6000:]
    k = int(saved[0])
    assert 1 <= k < MAX_STEPS

    (job,) = job_dirs(tmp_path)
    assert (job / "results.json").is_file()
    losses = _train_losses(job)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1)), f"steps trained: {sorted(losses)}"
    assert all(len(v) == 1 for v in losses.values()), f"a step was trained twice: {losses}"
    reference = _train_losses(tmp_path / "baseline")
    assert sorted(reference) == sorted(losses)
    for step, (value,) in losses.items():
        assert math.isclose(value, reference[step][0], rel_tol=1e-4), (step, value, reference[step])
