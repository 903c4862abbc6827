"""2-rank gloo DDP training jobs through SLURM, in both layouts.

``hydra/launcher=slurm_local``: one task starts both ranks (torch elastic, c10d rendezvous).
``hydra/launcher=slurm_tasks``: two tasks, each one rank (``RANK``/``WORLD_SIZE``… exported from the SLURM env).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.slurm.conftest import TINY_SFT, job_logs, run_one_job_sweep, two_gloo_ranks_reduced


@pytest.mark.slow
def test_two_rank_ddp_job_reduces_gradients(slurm_cluster: str, tmp_path: Path) -> None:
    """Both ranks see world size 2 over gloo, train on different batches, and end with identical weights."""
    _, job = run_one_job_sweep(
        [
            "hydra/launcher=slurm_local",
            f"hydra.launcher.partition={slurm_cluster}",
            "hydra.launcher.cpus_per_task=2",
            "distributed=ddp",
            "distributed.nproc_per_node=2",
            *TINY_SFT,
            "data.max_eval_samples=4",
        ],
        tmp_path,
    )
    two_gloo_ranks_reduced(job)


@pytest.mark.slow
def test_one_task_per_rank_job_trains_without_torch_elastic(slurm_cluster: str, tmp_path: Path) -> None:
    """slurm_tasks: 2 SLURM tasks become ranks 0 and 1 of one DDP run; nothing spawns further ranks."""
    sweep, job = run_one_job_sweep(
        [
            "hydra/launcher=slurm_tasks",
            f"hydra.launcher.partition={slurm_cluster}",
            "hydra.launcher.gpus_per_node=null",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2",
            "hydra.launcher.timeout_min=10",
            "distributed=ddp",
            "distributed.nproc_per_node=2",
            *TINY_SFT,
        ],
        tmp_path,
    )
    two_gloo_ranks_reduced(job)
    logs = job_logs(sweep) + (job / "launch.log").read_text(errors="replace")
    assert "torch rank exported" in logs
    assert "starting 2 rank(s)" not in logs, "a task that is a rank must not start torch elastic"
