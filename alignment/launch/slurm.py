"""SLURM through submitit: the Hydra launcher our presets use, and the job environment → torch rendezvous mapping.

``python launch.py -m hydra/launcher=slurm method=dpo,smpo`` submits one job array through
hydra-submitit-launcher; every array task runs one Hydra job in its own ``<sweep dir>/<job num>``. Our launcher
(:class:`SlurmLauncher`) adds one field to the plugin's schema: ``wait``. With ``hydra.launcher.wait=false`` the
command returns as soon as the array is queued (the plugin itself blocks until every job ends), writing the job ids
to ``<sweep dir>/submitted.json``; ``python -m alignment.report <sweep dir>`` shows progress and results later.

Two multi-process layouts (see README "SLURM"):

* **one task per node** (default, ``hydra/launcher=slurm_multinode``): each node's task starts
  ``distributed.nproc_per_node`` ranks with torch elastic; :func:`rendezvous_from_env` gives the c10d rendezvous
  (head = first host of the node list, node rank = ``SLURM_NODEID``, rendezvous id = the job id, this node's
  address = ``SLURMD_NODENAME``), used by :func:`alignment.launch.ranks.run_ranks`;
* **one task per GPU** (``hydra/launcher=slurm_tasks``): every task is one rank; the runner calls
  :func:`prepare_task_ranks`, which checks the task count against ``distributed`` and has
  :func:`export_task_ranks` export ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``… through submitit's
  ``TorchDistributedEnvironment`` with ``set_cuda_visible_devices=False`` (each task still sees every GPU of its
  node, so ``LOCAL_RANK`` picks the device).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _PluginSlurmLauncher

from alignment.distributed import DistributedBackend, DistributedConfig, DistributedSetupError

log = logging.getLogger(__name__)

# submitit's own port range for TorchDistributedEnvironment: every task of a job derives the same port from its id.
_PORT_RANGE = (20000, 60000)


@dataclass
class AlignmentSlurmConf(SlurmQueueConf):  # type: ignore[misc]
    """hydra-submitit-launcher's ``submitit_slurm`` schema plus a submit-and-return switch."""

    _target_: str = "hydra_plugins.effective_alignment_launcher.slurm_launcher.SlurmLauncher"
    """The launcher class Hydra instantiates (Hydra accepts launchers only from the ``hydra_plugins`` package)."""
    wait: bool = True
    """Block until every job of the array ends (the plugin's behaviour); false returns once the array is queued."""


def register_launcher_configs() -> None:
    """Store ``hydra/launcher/alignment_slurm``, the schema ``conf/hydra/launcher/*.yaml`` extend (idempotent)."""
    ConfigStore.instance().store(
        group="hydra/launcher", name="alignment_slurm", node=AlignmentSlurmConf, provider="effective-alignment"
    )


class SlurmLauncher(_PluginSlurmLauncher):  # type: ignore[misc]
    """hydra-submitit-launcher's SLURM launcher that can return right after submitting the array.

    The job side is the plugin's: each array task re-composes its overrides and runs the Hydra job, and on
    ``SIGUSR2`` submitit calls :meth:`checkpoint`, which requeues the same pickled launcher with the same job
    number, so the requeued job writes into the same job directory.
    """

    def __init__(self, **params: Any) -> None:
        self.wait = bool(params.pop("wait", True))
        super().__init__(**params)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        """Submit the sweep as one job array; wait for it unless ``wait`` is false."""
        if self.wait:
            return list(super().launch(job_overrides, initial_job_idx))
        from hydra.core.utils import JobReturn, JobStatus

        jobs = self._submit(job_overrides, initial_job_idx)
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        ids = [j.job_id for j in jobs]
        write_submitted(sweep_dir, ids, [list(o) for o in job_overrides], initial_job_idx)
        log.info(
            "queued %d jobs (%s), not waiting; later: python -m alignment.report %s", len(ids), " ".join(ids), sweep_dir
        )
        return [JobReturn(overrides=list(o), status=JobStatus.COMPLETED, _return_value=None) for o in job_overrides]

    def _submit(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
        """The plugin's ``launch`` up to ``map_array``: same executor parameters, same per-job arguments."""
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        assert self.config is not None
        params = dict(self.params)
        executor = submitit.AutoExecutor(
            cluster="slurm", folder=params.pop("submitit_folder"), slurm_max_num_timeout=params.pop("max_num_timeout")
        )
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Submitit 'slurm' sweep output dir : %s", sweep_dir)
        args = []
        for num, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
            args.append((list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state()))
        return list(executor.map_array(self, *zip(*args, strict=True)))


def write_submitted(sweep_dir: Path, job_ids: list[str], overrides: list[list[str]], first_num: int) -> Path:
    """Append the queued jobs (SLURM id, job number, overrides) to ``<sweep_dir>/submitted.json``."""
    path = sweep_dir / "submitted.json"
    entries: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    for offset, (job_id, job_overrides) in enumerate(zip(job_ids, overrides, strict=True)):
        entries.append({"job_id": job_id, "num": first_num + offset, "overrides": job_overrides})
    path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    return path


@dataclass(frozen=True)
class Rendezvous:
    """Where the torch elastic agents of one multi-node job meet (c10d backend)."""

    nnodes: int
    """Nodes in the job (``SLURM_JOB_NUM_NODES``)."""
    node_rank: int
    """This node's index (``SLURM_NODEID``)."""
    endpoint: str
    """``host:port`` of the rendezvous store: the job's first host, a port derived from the job id."""
    rdzv_id: str
    """Rendezvous id: the job id (``<array id>_<task>`` inside an array), unique per job."""
    local_addr: str
    """This node's name as the other nodes reach it (``SLURMD_NODENAME``, else its entry in the node list).

    torch elastic advertises the rank-0 node's bootstrap store under this address; its default, the fully
    qualified hostname, is wrong where nodes share a hostname or it resolves to loopback."""


def job_id(env: Mapping[str, str]) -> str:
    """The SLURM job id as submitit names it: ``<array job id>_<task id>`` in an array, else ``SLURM_JOB_ID``."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def job_hosts(env: Mapping[str, str]) -> list[str]:
    """Host names of the job, in SLURM's order (``SLURM_JOB_NODELIST`` such as ``gpu[01-03,07]``)."""
    from submitit.slurm.slurm import _parse_node_list

    hosts: list[str] = _parse_node_list(env.get("SLURM_JOB_NODELIST", ""))
    if not hosts:
        raise ValueError("SLURM_JOB_NODELIST is empty or missing: not inside a SLURM allocation?")
    return hosts


def master_port(env: Mapping[str, str]) -> int:
    """``MASTER_PORT`` when set, else the port every task of the job derives from the job id (as submitit)."""
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])
    return random.Random(job_id(env)).randint(*_PORT_RANGE)


def rendezvous_from_env(env: Mapping[str, str] | None = None) -> Rendezvous | None:
    """The c10d rendezvous for a one-task-per-node job; None outside SLURM.

    Raises:
        ValueError: the job runs more than one task per node (use :func:`export_task_ranks` for that layout).
    """
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env:
        return None
    nnodes = int(env.get("SLURM_JOB_NUM_NODES", "1"))
    ntasks = int(env.get("SLURM_NTASKS", str(nnodes)))
    if ntasks != nnodes:
        raise ValueError(
            f"SLURM job has {ntasks} tasks on {nnodes} nodes: torch elastic needs one task per node "
            "(hydra.launcher.tasks_per_node=1); for one task per rank use hydra/launcher=slurm_tasks"
        )
    hosts = job_hosts(env)
    node_rank = int(env.get("SLURM_NODEID", "0"))
    local = env.get("SLURMD_NODENAME") or hosts[min(node_rank, len(hosts) - 1)]
    return Rendezvous(nnodes, node_rank, f"{hosts[0]}:{master_port(env)}", job_id(env), local)


def export_task_ranks() -> dict[str, str]:
    """Inside a SLURM job with several tasks, export the torch ``env://`` variables of this task's rank.

    Uses submitit's ``TorchDistributedEnvironment`` with ``set_cuda_visible_devices=False`` (its default of True
    hides all GPUs but one from each task, and accelerate then fails with "invalid device ordinal" for
    ``LOCAL_RANK`` > 0). Returns the exported variables; nothing is exported with a single task or when ``RANK``
    is already set (a rank started by torch elastic).
    """
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "RANK" in os.environ:
        return {}
    from submitit.helpers import TorchDistributedEnvironment

    # overwrite: a MASTER_PORT from the user's environment is read (and kept) by submitit, not an error.
    dist_env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    log.info("SLURM task %s of %s: torch rank exported", dist_env.rank, dist_env.world_size)
    return {n: os.environ[n] for n in names}


def task_layout(env: Mapping[str, str] | None = None) -> bool:
    """Whether this is a one-task-per-rank SLURM job (``hydra/launcher=slurm_tasks``): several tasks per node."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env:
        return False
    return int(env.get("SLURM_NTASKS", "1")) > int(env.get("SLURM_JOB_NUM_NODES", "1"))


def prepare_task_ranks(dist: DistributedConfig) -> dict[str, str]:
    """In a one-task-per-rank job, make this task one rank of ``dist`` (before the Trainer is built).

    Called by the runner in every SLURM task. In the other layouts (one task per node, not SLURM, already a rank)
    nothing happens and ``{}`` is returned; otherwise :func:`export_task_ranks`' variables.

    Raises:
        DistributedSetupError: the job's task count disagrees with ``distributed``, or no backend is set.
    """
    if "RANK" in os.environ or not task_layout():
        return {}
    ntasks = int(os.environ["SLURM_NTASKS"])
    if dist.backend is DistributedBackend.none:
        raise DistributedSetupError(
            f"this SLURM job runs {ntasks} tasks (one rank each, hydra/launcher=slurm_tasks) but distributed=none: "
            "pick distributed=ddp, fsdp, deepspeed_zero2 or deepspeed_zero3"
        )
    if ntasks != dist.world_size:
        raise DistributedSetupError(
            f"this SLURM job runs {ntasks} tasks (one rank each) but distributed.nproc_per_node x nnodes = "
            f"{dist.nproc_per_node} x {dist.nnodes} = {dist.world_size}; make hydra.launcher.tasks_per_node x nodes "
            "match them"
        )
    return export_task_ranks()
