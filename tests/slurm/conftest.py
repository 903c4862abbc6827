"""A real SLURM cluster for the tests in this folder: the one already running, or one started here.

``.ci/run`` starts the cluster (``scripts/slurm_local.sh``) before ``make test``. Run alone, the first test that
asks for ``slurm_cluster`` starts it (as root, with apt to install the Debian packages) and stops it after the
session. Where no cluster can be started the tests skip and say why. ``SLURM_LOCAL_AUTOSTART=0`` never starts one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from alignment.redact import job_number
from tests.conftest import ROOT, launch

START = ROOT / "scripts" / "slurm_local.sh"
STOP = ROOT / "scripts" / "slurm_local_stop.sh"
PARTITION = os.environ.get("SLURM_LOCAL_PARTITION", "debug")


def controller_up() -> bool:
    """Whether ``scontrol ping`` reaches a SLURM controller."""
    if shutil.which("scontrol") is None:
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, check=False)
    return ping.returncode == 0 and "UP" in ping.stdout


def why_no_start() -> str | None:
    """Why this machine cannot start the local cluster, or None when it can try."""
    if os.environ.get("SLURM_LOCAL_AUTOSTART", "1") == "0":
        return "no SLURM controller answers and SLURM_LOCAL_AUTOSTART=0 (start one: sudo bash scripts/slurm_local.sh)"
    if os.geteuid() != 0:
        return "no SLURM controller answers and starting one needs root (run: sudo bash scripts/slurm_local.sh)"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "no SLURM controller answers, SLURM is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[str]:
    """The partition of a running single-machine SLURM cluster with accounting (sacct)."""
    if controller_up():
        yield PARTITION
        return
    reason = why_no_start()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    result = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=900, check=False)
    if result.returncode != 0 or not controller_up():
        pytest.skip(
            f"scripts/slurm_local.sh could not start a cluster (exit {result.returncode}): {result.stderr[-2000:]}"
        )
    print(f"\n[slurm] cluster started in {time.monotonic() - started:.1f}s")
    try:
        yield PARTITION
    finally:
        subprocess.run(["bash", str(STOP), "--purge"], capture_output=True, text=True, timeout=120, check=False)


def squeue_ids() -> list[str]:
    """Ids of this machine's queued and running jobs."""
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return out.split()


def job_dirs(sweep_root: Path) -> list[Path]:
    """``multirun/<date>/<time>/<num>_<overrides>`` job directories of a test's one sweep, by job number."""
    sweeps = sorted(p for p in sweep_root.glob("multirun/*/*") if p.is_dir())
    assert len(sweeps) == 1, sweeps
    numbered = [(num, p) for p in sweeps[0].iterdir() if p.is_dir() and (num := job_number(p.name)) is not None]
    return [p for _, p in sorted(numbered)]


def wait_for(predicate: object, timeout: float, what: str, interval: float = 0.5) -> None:
    """Poll ``predicate()`` until true; fail naming ``what`` after ``timeout`` seconds."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; queue: {squeue_ids()}")
        time.sleep(interval)


def job_logs(sweep_dir: Path) -> str:
    """The submitit stdout/stderr of every job of a sweep (for failure messages)."""
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(sweep_dir.rglob("*_log.*")))


_RESULT_WRITTEN = re.compile(
    r"^submitit (INFO|ERROR) \([^)]*\) - (Job completed successfully|Submitted job triggered an exception)$", re.M
)


def result_writes(sweep_dir: Path) -> int:
    """How many job attempts of a sweep ended by writing submitit's result file (success or error).

    An attempt that requeues itself must exit without one: the launcher takes the first result file it finds as
    the job's outcome, while the requeued attempt is still running.
    """
    logs = sorted(sweep_dir.glob(".submitit/*/*_log.out"))
    assert logs, f"no submitit logs under {sweep_dir}"
    return sum(len(_RESULT_WRITTEN.findall(p.read_text(errors="replace"))) for p in logs)


# Three SFT steps of the tiny model without evaluation or checkpoints: the training part of the DDP jobs.
TINY_SFT = [
    "model=tiny_random",
    "method=sft",
    "method.max_steps=3",
    "method.eval_strategy=no",
    "method.save_strategy=no",
    "method.per_device_train_batch_size=2",
    "logger=none",
]


def run_one_job_sweep(args: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """``launch.py -m <args>`` from ``tmp_path``; asserts it succeeded and returns ``(sweep dir, its one job dir)``."""
    result = launch(["-m", *args], cwd=tmp_path, timeout=300)
    sweep = next(tmp_path.glob("multirun/*/*"), tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:] + job_logs(sweep)
    (job,) = job_dirs(tmp_path)
    return sweep, job


def two_gloo_ranks_reduced(job: Path) -> list[dict[str, object]]:
    """Assert ranks 0 and 1 ran with world size 2 over gloo, on different data, ending with equal weights.

    Returns the two rank records (``ranks/rank-<r>.json``) for further checks.
    """
    records = [json.loads((job / "ranks" / f"rank-{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
    assert [(r["rank"], r["world_size"], r["process_group_backend"]) for r in records] == [
        (0, 2, "gloo"),
        (1, 2, "gloo"),
    ]
    # Different data on each rank, yet the same weights after 3 steps: the gradients were all-reduced.
    assert records[0]["first_batch_token_sum"] != records[1]["first_batch_token_sum"]
    assert math.isclose(records[0]["param_sum_local"], records[1]["param_sum_local"], rel_tol=1e-9)
    assert json.loads((job / "results.json").read_text(encoding="utf-8"))["world_size"] == 2
    return records
