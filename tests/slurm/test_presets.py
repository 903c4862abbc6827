"""The launcher presets compose over hydra-submitit-launcher's schema, and the SLURM helpers map the job env.

No cluster needed. (tests/test_configs.py skips the ``hydra`` group, so the presets are composed here.)
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from alignment.launch.slurm import Rendezvous, register_launcher_configs, rendezvous_from_env, write_submitted
from tests.conftest import ROOT

PRESETS = sorted(p.stem for p in (ROOT / "conf" / "hydra" / "launcher").glob("*.yaml"))
TARGET = "hydra_plugins.effective_alignment_launcher.slurm_launcher.SlurmLauncher"


@pytest.fixture
def launcher_cfg() -> Any:
    """``launcher_cfg(preset, *overrides)`` -> the composed ``hydra.launcher`` node."""
    from hydra import compose, initialize_config_dir

    from alignment.registry import register_configs

    register_configs()
    register_launcher_configs()

    def _compose(preset: str, *overrides: str) -> Any:
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            cfg = compose("config", overrides=[f"hydra/launcher={preset}", *overrides], return_hydra_config=True)
        return cfg.hydra.launcher

    return _compose


def test_all_presets_are_listed() -> None:
    assert PRESETS == ["slurm", "slurm_local", "slurm_multinode", "slurm_tasks"]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_over_the_plugin_schema(launcher_cfg: Any, preset: str) -> None:
    node = launcher_cfg(preset)
    assert node._target_ == TARGET
    assert node.wait is True
    assert node.max_num_timeout >= 1, "requeue-safe runs should be allowed to requeue"
    assert node.signal_delay_s > 0
    plain = OmegaConf.to_container(node, resolve=False)
    assert isinstance(plain, dict)
    assert {"partition", "nodes", "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min", "setup"} <= set(plain)


def test_slurm_preset_fields(launcher_cfg: Any) -> None:
    node = launcher_cfg("slurm", "hydra.launcher.partition=gpu", "hydra.launcher.wait=false")
    assert (node.partition, node.wait, node.nodes, node.tasks_per_node, node.gpus_per_node) == ("gpu", False, 1, 1, 1)
    assert node.setup[0] == f"export OMP_NUM_THREADS={node.cpus_per_task}"


def test_layout_presets(launcher_cfg: Any) -> None:
    local = launcher_cfg("slurm_local")
    # One task per node, torch elastic inside: nodes and GPUs per node follow the distributed config.
    multinode = launcher_cfg(
        "slurm_multinode", "distributed=ddp", "distributed.nnodes=2", "distributed.nproc_per_node=8"
    )
    assert (multinode.nodes, multinode.tasks_per_node, multinode.gpus_per_node) == (2, 1, 8)
    # One task (and GPU) per rank: the task layout follows the distributed config.
    tasks = launcher_cfg("slurm_tasks", "distributed=ddp", "distributed.nproc_per_node=8", "distributed.nnodes=2")
    assert (tasks.nodes, tasks.tasks_per_node, tasks.gpus_per_node) == (2, 8, 8)
    assert (local.partition, local.gpus_per_node, local.cpus_per_task) == ("debug", None, 1)


def test_unknown_launcher_key_fails(launcher_cfg: Any) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="partitionn"):
        launcher_cfg("slurm", "hydra.launcher.partitionn=gpu")


def test_launcher_pops_wait_before_submitit_sees_it() -> None:
    from hydra_plugins.effective_alignment_launcher.slurm_launcher import SlurmLauncher

    launcher = SlurmLauncher(wait=False, partition="debug", submitit_folder="x/%j", max_num_timeout=1)
    assert launcher.wait is False
    assert "wait" not in launcher.params


SLURM_ENV = {
    "SLURM_JOB_ID": "118",
    "SLURM_ARRAY_JOB_ID": "117",
    "SLURM_ARRAY_TASK_ID": "1",
    "SLURM_JOB_NUM_NODES": "3",
    "SLURM_NTASKS": "3",
    "SLURM_NODEID": "2",
    "SLURM_JOB_NODELIST": "gpu[07-08],cpu01",
}


def test_rendezvous_from_slurm_env() -> None:
    rdzv = rendezvous_from_env({**SLURM_ENV, "MASTER_PORT": "29400"})
    assert rdzv == Rendezvous(nnodes=3, node_rank=2, endpoint="gpu07:29400", rdzv_id="117_1", local_addr="cpu01")
    named = rendezvous_from_env({**SLURM_ENV, "SLURMD_NODENAME": "cpu01-ib"})
    assert named is not None
    assert named.local_addr == "cpu01-ib"


def test_rendezvous_port_is_the_same_on_every_node_and_differs_between_jobs() -> None:
    ports = {rendezvous_from_env({**SLURM_ENV, "SLURM_NODEID": str(n)}).endpoint for n in range(3)}  # type: ignore[union-attr]
    assert len(ports) == 1
    other = rendezvous_from_env({**SLURM_ENV, "SLURM_ARRAY_TASK_ID": "2"})
    assert other is not None
    assert other.endpoint != ports.pop()
    assert 20000 <= int(other.endpoint.rsplit(":", 1)[1]) <= 60000


def test_rendezvous_outside_slurm_and_with_several_tasks_per_node() -> None:
    assert rendezvous_from_env({}) is None
    with pytest.raises(ValueError, match="tasks_per_node=1"):
        rendezvous_from_env({**SLURM_ENV, "SLURM_NTASKS": "6"})


def test_write_submitted_appends(tmp_path: Path) -> None:
    write_submitted(tmp_path, ["5_0", "5_1"], [["a=1"], ["a=2"]], 0)
    path = write_submitted(tmp_path, ["6_0"], [["a=3"]], 2)
    import json

    assert [(e["job_id"], e["num"]) for e in json.loads(path.read_text())] == [("5_0", 0), ("5_1", 1), ("6_0", 2)]


def test_preemption_signal_is_untouched_outside_submitit(monkeypatch: pytest.MonkeyPatch) -> None:
    from alignment.launch.preemption import preemption_guard

    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    before = signal.getsignal(signal.SIGUSR2)
    with preemption_guard():
        assert signal.getsignal(signal.SIGUSR2) is before
