"""A true 2-node DDP job: two slurmd, each in its own network namespace, one task and one rank per node.

``SLURM_LOCAL_NODES=2 scripts/slurm_local.sh`` runs nodes ``n1``/``n2`` at 10.231.0.101/102 on a bridge, so the
c10d rendezvous store, the gloo process group and the shared run directory go through the same paths as on a real
cluster (different network stacks, one shared filesystem). The job runs ``hydra/launcher=slurm_multinode``: each
node's task reads its node rank from ``SLURM_NODEID`` and meets the other at ``n1:<port from the job id>``. The
cluster is switched back to the single-node layout afterwards.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm.conftest import (
    START,
    TINY_SFT,
    controller_up,
    job_logs,
    run_one_job_sweep,
    squeue_ids,
    two_gloo_ranks_reduced,
    wait_for,
)


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
    sweep, job = run_one_job_sweep(
        [
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
            *TINY_SFT,
        ],
        tmp_path,
    )
    records = two_gloo_ranks_reduced(job)
    assert records[0]["config_sha256"] == records[1]["config_sha256"], "both nodes ran the head's resolved config"
    logs = job_logs(sweep) + (job / "launch.log").read_text(errors="replace")
    assert "starting 1 rank(s) on node 0 of 2" in logs
    assert "starting 1 rank(s) on node 1 of 2" in logs
    assert not (job / ".rank-config.yaml").exists()
