"""Multi-process training: spawn the ranks, hand them the resolved config, and make the Trainer use the backend.

``python launch.py distributed=ddp distributed.nproc_per_node=2`` composes the config once (Hydra), writes the
*resolved* config to a private file in the run directory, and starts ``nproc_per_node`` ranks through torch elastic
(c10d rendezvous, like ``torchrun --standalone``). Every rank runs ``python -m alignment.rank <file>
<run_dir>``, which loads that file (no re-composition, so ``${now:}`` values cannot diverge and only one run
directory exists) and calls the same runner body as a single-process run; only rank 0 writes ``config.yaml``,
``results.json`` and tracker data. SLURM jobs call :func:`spawn_ranks` once per node with the head node's
rendezvous endpoint.

Inside the ranks, :func:`alignment.distributed.trainer_kwargs` (merged into every method's TrainingArguments by
:func:`alignment.training.arguments.training_args`, which receives the run's ``distributed`` slice) selects the
backend: ``ddp_backend``/``ddp_*`` for DDP,
``fsdp``/``fsdp_config`` (FSDP2) for FSDP, ``deepspeed=<dict from the schema>`` for DeepSpeed. Each rank also
records what actually ran (world size, process-group backend, accelerate's distributed type, local vs full
parameter and optimizer-state sizes) in ``ranks/rank-<r>.json``, so tests and users can check sharding instead of
trusting the config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.context import failure, read_results
from alignment.distributed import (
    DistributedBackend,
    DistributedConfig,
    DistributedSetupError,
    backend_problems,
    cuda_available,
)
from alignment.launch.slurm import rendezvous_from_env

if TYPE_CHECKING:
    import torch

    from alignment.config import RunConfig
    from alignment.context import RunContext

log = logging.getLogger(__name__)

RANK_CONFIG = ".rank-config.yaml"
"""The resolved config handed to the ranks (in the run directory, owner-only, removed after the run)."""
RANKS_DIR = "ranks"
"""Run-directory folder with one ``rank-<r>.json`` record per rank."""


class RankFailedError(RuntimeError):
    """At least one rank exited with an error."""


def runtime_problems(cfg: RunConfig, *, cuda: bool) -> list[str]:
    """Why the run cannot start here: :func:`backend_problems`, and Liger refused to a ``liger=true`` model.

    The one place for method-specific checks; the models are the run's and any a method names (a teacher).
    """
    from alignment.models.config import ModelConfig
    from alignment.models.liger import liger_errors

    models = [("model", cfg.model)]
    models += [
        (f"method.{f.name}", v) for f in fields(cfg.method) if isinstance(v := getattr(cfg.method, f.name), ModelConfig)
    ]
    liger = [error for key, model in models for error in liger_errors(model, cuda=cuda, key=key)]
    return backend_problems(cfg.distributed, cuda=cuda) + liger


def check_runtime(cfg: RunConfig) -> None:
    """Raise before any rank starts when the distributed settings cannot run here.

    Raises:
        DistributedSetupError: lists every problem found.
    """
    problems = runtime_problems(cfg, cuda=cuda_available())
    if problems:
        raise DistributedSetupError("; ".join(problems))


# --- the resolved-config hand-off -------------------------------------------------------------------------------


def resolved_yaml(cfg: RunConfig) -> str:
    """The typed run config as YAML: every interpolation already resolved, enums by name."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def write_resolved_config(cfg: RunConfig, path: Path) -> Path:
    """Write the resolved config for the ranks, readable by the owner only (it is not redacted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(resolved_yaml(cfg))
    return path


# --- spawning ---------------------------------------------------------------------------------------------------


def needs_ranks(dist: DistributedConfig) -> bool:
    """Whether launching must start rank processes: a backend is set and this process is not a rank already."""
    return dist.backend is not DistributedBackend.none and "LOCAL_RANK" not in os.environ


def spawn_ranks(
    config_file: Path,
    dist: DistributedConfig,
    *,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str = "127.0.0.1:0",
    rdzv_id: str = "local",
    local_addr: str | None = None,
    run_dir: Path | None = None,
    name: str | None = None,
    group: str | None = None,
    overrides: list[str] | None = None,
) -> None:
    """Start ``dist.nproc_per_node`` ranks on this node (torch elastic, c10d rendezvous) and wait for them.

    Each rank runs ``python -m alignment.rank config_file run_dir`` on the resolved config. For several
    nodes, every node calls this with the head node's ``host:port``, its node rank and one shared rendezvous id
    (the SLURM job id), and its own address as the others reach it (``local_addr``, default: the fully
    qualified hostname); c10d assigns the global ranks. ``run_dir`` defaults to the config file's folder; ``name``
    and ``group`` are the tracker run name and sweep group; ``overrides`` are recorded in ``environment.json``.

    Raises:
        RankFailedError: a rank exited with an error (its traceback is printed by the elastic agent).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    run_dir = config_file.parent if run_dir is None else run_dir
    args = ["-m", "alignment.rank", str(config_file), str(run_dir)]
    args += [*(["--name", name] if name else []), *(["--group", group] if group else [])]
    args += ["--", *(overrides or [])]
    # Like torchrun: one OpenMP thread per rank unless the user chose, so ranks do not oversubscribe the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rdzv_configs: dict[str, Any] = {"rank": node_rank}
    if nnodes > 1:
        # Node 0 hosts the store: torch's own guess compares host names, which fails where nodes share a hostname
        # (containers, network namespaces) or where the node list names an interface other than the hostname.
        rdzv_configs |= {"join_timeout": dist.timeout_s, "is_host": node_rank == 0}
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=dist.nproc_per_node,
        run_id=rdzv_id,
        rdzv_endpoint=rdzv_endpoint,
        rdzv_backend="c10d",
        rdzv_configs=rdzv_configs,
        max_restarts=dist.max_restarts,
        monitor_interval=0.5,
        local_addr=local_addr,
    )
    log.info("starting %d rank(s) on node %d of %d: %s", dist.nproc_per_node, node_rank, nnodes, " ".join(args))
    try:
        elastic_launch(config, entrypoint=sys.executable)(*args)
    except ChildFailedError as err:
        failed = ", ".join(f"rank {rank} (exit {f.exitcode})" for rank, f in sorted(err.failures.items()))
        raise RankFailedError(f"{failed} failed; see the traceback above. Run directory: {run_dir}") from err


def node_rendezvous(dist: DistributedConfig, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The :func:`spawn_ranks` rendezvous keywords of this node: one local node, or the SLURM job's nodes.

    Outside SLURM only one node can start (``nnodes`` must be 1). Inside a SLURM job (one task per node) the
    layout comes from the job (:func:`alignment.launch.slurm.rendezvous_from_env`): node rank ``SLURM_NODEID``,
    the store on the job's first host at a port derived from the job id, the job id as rendezvous id. A
    single-node job keeps the free local port of a local run.

    Raises:
        DistributedSetupError: ``distributed.nnodes`` disagrees with the job, or asks for several nodes outside
            SLURM.
    """
    try:
        rdzv = rendezvous_from_env(env)
    except ValueError as err:
        raise DistributedSetupError(str(err)) from err
    if rdzv is None:
        if dist.nnodes > 1:
            raise DistributedSetupError(
                f"distributed.nnodes={dist.nnodes}: a local run starts one node. Launch multi-node runs as a SLURM "
                f"job with one task per node, e.g. python launch.py -m hydra/launcher=slurm_multinode "
                f"distributed.nnodes={dist.nnodes} hydra.launcher.nodes={dist.nnodes}; or start one "
                f"`torchrun --nnodes {dist.nnodes} ... -m alignment.rank` per node yourself"
            )
        return {}
    if rdzv.nnodes != dist.nnodes:
        raise DistributedSetupError(
            f"distributed.nnodes={dist.nnodes} but this SLURM job has {rdzv.nnodes} node(s) (SLURM_JOB_NUM_NODES); "
            f"set distributed.nnodes={rdzv.nnodes} or hydra.launcher.nodes={dist.nnodes}"
        )
    if rdzv.nnodes == 1:
        return {"rdzv_id": rdzv.rdzv_id}
    return {
        "nnodes": rdzv.nnodes,
        "node_rank": rdzv.node_rank,
        "rdzv_endpoint": rdzv.endpoint,
        "rdzv_id": rdzv.rdzv_id,
        "local_addr": rdzv.local_addr,
    }


def _wait_for_file(path: Path, timeout_s: float) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise DistributedSetupError(f"node rank > 0 waited {timeout_s:.0f}s for the head node to write {path}")
        time.sleep(0.2)


def run_ranks(cfg: RunConfig, ctx: RunContext, overrides: list[str]) -> dict[str, float]:
    """Start this node's ``nproc_per_node`` ranks on the resolved config; return rank 0's metrics.

    On several SLURM nodes (:func:`node_rendezvous`) only the head node writes the resolved config (the other
    nodes wait for it, so ``${now:}`` values cannot differ between nodes) and returns the metrics; the others
    return ``{}``.

    Raises:
        DistributedSetupError: the settings cannot run here (nothing was started).
        RankFailedError: a rank failed.
    """
    check_runtime(cfg)
    rendezvous = node_rendezvous(cfg.distributed)
    head = rendezvous.get("node_rank", 0) == 0
    config_file = ctx.output_dir / RANK_CONFIG
    if head:
        tmp = write_resolved_config(cfg, config_file.with_name(f"{RANK_CONFIG}.tmp"))
        tmp.replace(config_file)  # atomic: another node never reads a half-written file
    else:
        _wait_for_file(config_file, cfg.distributed.timeout_s)
    try:
        spawn_ranks(
            config_file,
            cfg.distributed,
            **rendezvous,
            run_dir=ctx.output_dir,
            name=ctx.name,
            group=ctx.group,
            overrides=overrides,
        )
    finally:
        if head:
            config_file.unlink(missing_ok=True)
    if not head:
        return {}
    results = read_results(ctx.results_file)
    if results is None:
        from alignment.training.checkpoint import PreemptedError, preemption_requested

        if preemption_requested():  # the ranks saved a checkpoint and exited cleanly; the caller requeues
            raise PreemptedError(f"the ranks stopped on the preemption signal; checkpoints in {ctx.checkpoint_dir}")
        raise RankFailedError(f"the ranks exited without writing {ctx.results_file}")
    if (error := failure(results)) is not None:
        raise RankFailedError(f"rank 0 failed: {error}")
    return results


def torchrun_command(dist: DistributedConfig) -> str:
    """The ``torchrun`` line equivalent to what :func:`spawn_ranks` starts on one node (for ``plan=true``)."""
    return (
        f"torchrun --nnodes {dist.nnodes} --nproc-per-node {dist.nproc_per_node} --rdzv-backend c10d "
        "--rdzv-endpoint 127.0.0.1:0 -m alignment.rank <run_dir>/.rank-config.yaml <run_dir>"
    )


# --- inside a rank: the active backend and the record of what ran ------------------------------------------------


def global_rank() -> int:
    """This process's global rank from the launcher's environment (0 outside a multi-process run)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Whether this process writes the run files (rank 0, or the only process)."""
    return global_rank() == 0


def _numel(param: torch.Tensor) -> tuple[int, int]:
    """(local elements held by this rank, logical elements) of a parameter: ZeRO-3, FSDP2 DTensor or plain."""
    if hasattr(param, "ds_numel"):  # a ZeRO-3 parameter: ds_tensor is this rank's partition
        partition: Any = getattr(param, "ds_tensor")  # noqa: B009
        return int(partition.numel()), int(getattr(param, "ds_numel"))  # noqa: B009
    to_local = getattr(param, "to_local", None)
    local = to_local().numel() if callable(to_local) else param.numel()
    return int(local), int(param.numel())


class _Probe:
    """Global forward/optimizer hooks that note what the Trainer actually built: wrapper, shards, optimizer state."""

    def __init__(self) -> None:
        self.root: torch.nn.Module | None = None
        self.root_numel = -1
        self.first_tokens: int | None = None
        self.optimizer: dict[str, Any] = {}
        self.distributed_type: str | None = None
        self.stepped = False
        self._depth = 0
        self._handles: list[Any] = []

    def install(self) -> None:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handles = [
            register_module_forward_pre_hook(self._enter),
            register_module_forward_hook(self._leave),
            register_optimizer_step_post_hook(self._step),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _enter(self, module: torch.nn.Module, args: Any) -> None:
        import torch

        if not self.stepped:
            if self._depth == 0:  # an outermost call: the Trainer's (wrapped) model
                # Trainable parameters only: a frozen model called beside it (reference, teacher) is never the root.
                full = sum(_numel(p)[1] for p in module.parameters() if p.requires_grad)
                # ``>=``: the training wrapper (DDP, DeepSpeed engine) counts the same parameters as the bare model
                # that an evaluation before the first step (sample generation) calls, and comes later.
                if full and full >= self.root_numel:
                    self.root, self.root_numel = module, full
            if self.first_tokens is None and isinstance(module, torch.nn.Embedding) and args:
                self.first_tokens = int(args[0].sum())
        self._depth += 1

    def _leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1

    def _step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        import torch

        if self.stepped:
            return
        self.stepped = True
        params = [p for group in optimizer.param_groups for p in group["params"]]
        states = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        self.optimizer = {
            "class": type(optimizer).__name__,
            "param_numel": sum(_numel(p)[0] for p in params),
            "state_numel": sum(t.numel() for t in states if t.dim() > 0),
        }
        from accelerate.state import AcceleratorState  # type: ignore[import-untyped]

        if AcceleratorState._shared_state:
            self.distributed_type = str(AcceleratorState().distributed_type.value)

    def record(self, cfg: RunConfig) -> dict[str, Any]:
        import torch
        import torch.distributed as torch_dist

        initialized = torch_dist.is_available() and torch_dist.is_initialized()
        root = self.root
        params = list(root.parameters()) if root is not None else []
        numels = [_numel(p) for p in params]
        zero_stage = getattr(root, "zero_optimization_stage", None)
        with torch.no_grad():
            param_sum = float(sum(p.detach().double().sum().item() for p in params if p.numel()))
        return {
            "rank": torch_dist.get_rank() if initialized else 0,
            "world_size": torch_dist.get_world_size() if initialized else 1,
            "process_group_backend": str(torch_dist.get_backend()) if initialized else None,
            "distributed_type": self.distributed_type,
            "configured_backend": cfg.distributed.backend.value,
            "zero_stage": zero_stage() if callable(zero_stage) else None,
            "model_class": type(root).__name__ if root is not None else None,
            "param_numel_local": sum(local for local, _ in numels),
            "param_numel_full": sum(full for _, full in numels),
            "param_sum_local": param_sum,
            "optimizer": self.optimizer,
            "first_batch_token_sum": self.first_tokens,
            "config_sha256": hashlib.sha256(resolved_yaml(cfg).encode()).hexdigest(),
        }


@contextmanager
def rank_session(cfg: RunConfig, ctx: RunContext) -> Iterator[dict[str, float]]:
    """Record what a rank actually ran while the method runs (the method gets ``cfg.distributed`` itself).

    With a backend set, models are created sharded under ZeRO-3 / FSDP2 (:func:`sharded_loading`), global hooks
    note what the Trainer built, and ``ranks/rank-<r>.json`` is written on success, with every model load
    (``loads``: local vs full parameters, peak RSS); the yielded dict then receives ``world_size`` for the run's
    metrics.
    """
    from alignment.models.sharded import LOADS
    from alignment.training.arguments import sharded_loading

    probe = _Probe() if cfg.distributed.backend is not DistributedBackend.none else None
    extra: dict[str, float] = {}
    try:
        if probe is not None:
            probe.install()
        with sharded_loading(cfg, ctx) if probe is not None else nullcontext():
            yield extra
        if probe is not None:
            record = probe.record(cfg) | {"loads": [load.as_dict() for load in LOADS]}
            folder = ctx.output_dir / RANKS_DIR
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"rank-{record['rank']}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
            extra["world_size"] = float(record["world_size"])
    finally:
        if probe is not None:
            probe.remove()


def finish_rank() -> None:
    """Tear the process group down at the end of a rank (quietly if it was never set up)."""
    import torch.distributed as torch_dist

    with suppress(Exception):
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
