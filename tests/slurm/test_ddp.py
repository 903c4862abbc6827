"""2-rank gloo DDP training jobs through SLURM, in both layouts.

``hydra/launcher=slurm_local``: one task starts both ranks (torch elastic, c10d rendezvous).
``hydra/launcher=slurm_tasks``: two tasks, each one rank (``RANK``/``WORLD_SIZE``… exported from the SLURM env).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import launch
from tests.slurm.conftest import job_dirs, job_logs


@pytest.mark.slow
def test_two_rank_ddp_job_reduces_gradients(slurm_cluster: str, tmp_path: Path) -> None:
    """Both ranks see world size 2 over gloo, train on different batches, and end with identical weights."""
    result = launch(
        [
            "-m",
            "hydra/launcher=slurm_local",
            f"hydra.launcher.partition={slurm_cluster}",
            "hydra.launcher.cpus_per_task=2",
            "distributed=ddp",
            "distributed.nproc_per_node=2",
            "model=tiny_random",
            "method=sft",
            "method.max_steps=3",
            "method.eval_strategy=no",
            "method.save_strategy=no",
            "method.per_device_train_batch_size=2",
            "logger=none",
            "data.max_eval_samples=4",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    sweep = next(tmp_path.glob("multirun/*/*"), tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:] + job_logs(sweep)
    (job,) = job_dirs(tmp_path)
    records = [json.loads((job / "ranks" / f"rank-{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
    assert [(r["rank"], r["world_size"], r["process_group_backend"]) for r in records] == [
        (0, 2, "gloo"),
        (1, 2, "gloo"),
    ]
    # Different data on each rank, yet the same weights after 3 steps: the gradients were all-reduced.
    assert records[0]["first_batch_token_sum"] != records[1]["first_batch_token_sum"]
    assert math.isclose(records[0]["param_sum_local"], records[1]["param_sum_local"], rel_tol=1e-9)
    results = json.loads((job / "results.json").read_text(encoding="utf-8"))
    assert results["world_size"] == 2


@pytest.mark.slow
def test_one_task_per_rank_job_trains_without_torch_elastic(slurm_cluster: str, tmp_path: Path) -> None:
    """slurm_tasks: 2 SLURM tasks become ranks 0 and 1 of one DDP run; nothing spawns further ranks."""
    result = launch(
        [
            "-m",
            "hydra/launcher=slurm_tasks",
            f"hydra.launcher.partition={slurm_cluster}",
            "hydra.launcher.gpus_per_node=null",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2",
            "hydra.launcher.timeout_min=10",
            "distributed=ddp",
            "distributed.nproc_per_node=2",
            "model=tiny_random",
            "method=sft",
            "method.max_steps=3",
            "method.eval_strategy=no",
            "method.save_strategy=no",
            "method.per_device_train_batch_size=2",
            "logger=none",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    sweep = next(tmp_path.glob("multirun/*/*"), tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:] + job_logs(sweep)
    (job,) = job_dirs(tmp_path)
    records = [json.loads((job / "ranks" / f"rank-{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
    assert [(r["rank"], r["world_size"], r["process_group_backend"]) for r in records] == [
        (0, 2, "gloo"),
        (1, 2, "gloo"),
    ]
    assert records[0]["first_batch_token_sum"] != records[1]["first_batch_token_sum"]
    assert math.isclose(records[0]["param_sum_local"], records[1]["param_sum_local"], rel_tol=1e-9)
    assert json.loads((job / "results.json").read_text(encoding="utf-8"))["world_size"] == 2
    logs = job_logs(sweep) + (job / "launch.log").read_text(errors="replace")
    assert "torch rank exported" in logs
    assert "starting 2 rank(s)" not in logs, "a task that is a rank must not start torch elastic"
