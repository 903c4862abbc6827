"""A true 2-node DDP job: two slurmd, each in its own network namespace, one task and one rank per node.

``SLURM_LOCAL_NODES=2 scripts/slurm_local.sh`` runs nodes ``n1``/``n2`` at 10.231.0.101/102 on a bridge, so the
c10d rendezvous store, the gloo process group and the shared run directory go through the same paths as on a real
cluster (different network stacks, one shared filesystem). The job runs ``hydra/launcher=slurm_multinode``: each
node's task reads its node rank from ``SLURM_NODEID`` and meets the other at ``n1:<port from the job id>``. The
cluster is switched back to the single-node layout afterwards.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import launch
from tests.slurm.conftest import START, controller_up, job_dirs, job_logs, squeue_ids, wait_for


def _start(nodes: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SLURM_LOCAL_NODES": nodes}
    return subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=600, env=env, check=False)


@pytest.fixture
def two_nodes(slurm_cluster: str) -> Iterator[str]:
    """The local cluster with two namespaced nodes; restored to its own node count after the test."""
    if os.geteuid() != 0:
        pytest.skip("switching the local cluster to 2 nodes needs root (network namespaces, /etc/hosts)")
    started = _start("2")
    if started.returncode != 0 or not controller_up():
        _start(os.environ.get("SLURM_LOCAL_NODES", "1"))
        pytest.skip(f"could not start 2 namespaced nodes (exit {started.returncode}): {started.stderr[-2000:]}")
    try:
        yield slurm_cluster
    finally:
        # A job still running (a failed test) would keep its namespace's processes alive across the switch.
        ids = squeue_ids()
        if ids:
            subprocess.run(["scancel", *ids], check=False)
            wait_for(lambda: not squeue_ids(), 60, "the cancelled jobs to end")
        _start(os.environ.get("SLURM_LOCAL_NODES", "1"))


@pytest.mark.slow
def test_two_node_ddp_job_meets_at_the_head_node(two_nodes: str, tmp_path: Path) -> None:
    """Rank 0 on n1 and rank 1 on n2: one rendezvous, one resolved config, equal weights after the all-reduce."""
    result = launch(
        [
            "-m",
            "hydra/launcher=slurm_multinode",
            f"hydra.launcher.partition={two_nodes}",
            "hydra.launcher.gpus_per_node=null",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2",
            "hydra.launcher.timeout_min=10",
            "distributed=ddp",
            "distributed.nnodes=2",
            "distributed.nproc_per_node=1",
            "distributed.timeout_s=120",
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
    assert records[0]["config_sha256"] == records[1]["config_sha256"], "both nodes ran the head's resolved config"
    assert records[0]["first_batch_token_sum"] != records[1]["first_batch_token_sum"]
    assert math.isclose(records[0]["param_sum_local"], records[1]["param_sum_local"], rel_tol=1e-9)
    assert json.loads((job / "results.json").read_text(encoding="utf-8"))["world_size"] == 2
    logs = job_logs(sweep) + (job / "launch.log").read_text(errors="replace")
    assert "starting 1 rank(s) on node 0 of 2" in logs
    assert "starting 1 rank(s) on node 1 of 2" in logs
    assert not (job / ".rank-config.yaml").exists()
