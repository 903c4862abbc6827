"""Schema of the ``distributed`` config group: process layout and sharding backend.

``backend=none`` trains in the launching process. Any other backend makes ``launch.py`` spawn
``nproc_per_node`` ranks per node (torch elastic, c10d rendezvous) that all receive the resolved config as a
file (:mod:`alignment.launch.ranks`). Each backend maps to what the HF Trainer / accelerate need:

* ``ddp``: ``torch.distributed`` env + ``ddp_*`` TrainingArguments (gloo on CPU, nccl on GPU);
* ``fsdp``: ``TrainingArguments(fsdp=True, fsdp_config={"version": 2, ...})``, FSDP2 full shard, auto-wrapped by the
  model's decoder-layer class (``_no_split_modules``); needs CUDA (accelerate silently runs DDP on CPU);
* ``deepspeed``: ``TrainingArguments(deepspeed=<dict>)`` built from :class:`DeepSpeedSettings` by
  :func:`deepspeed_config` (no hand-kept JSON copy). :func:`trainer_kwargs` turns the settings into
TrainingArguments keywords; the run passes its ``distributed`` slice explicitly (no process-wide state).

Mixed precision is the method's ``bf16``/``fp16``; the DeepSpeed config follows it through HF's ``"auto"`` values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from alignment.ranges import bounded, check_fields


class DistributedBackend(StrEnum):
    """How training is spread over processes."""

    none = "none"
    ddp = "ddp"
    fsdp = "fsdp"
    deepspeed = "deepspeed"


class ProcessGroupBackend(StrEnum):
    """``torch.distributed`` communication backend."""

    auto = "auto"
    gloo = "gloo"
    nccl = "nccl"


class OffloadDevice(StrEnum):
    """Where DeepSpeed ZeRO keeps offloaded optimizer state or parameters."""

    none = "none"
    cpu = "cpu"
    nvme = "nvme"


class FsdpStateDict(StrEnum):
    """How FSDP writes checkpoints: one HF-compatible file, or one shard per rank (faster for large models)."""

    full = "full"
    sharded = "sharded"


@dataclass
class DdpSettings:
    """DistributedDataParallel tuning (HF ``ddp_*`` arguments)."""

    find_unused_parameters: bool = False
    """Search the graph for parameters without a gradient each step (needed only when some never get one)."""
    bucket_cap_mb: int = bounded(25, ge=1)
    """Gradient all-reduce bucket size in MiB (PyTorch's default)."""


@dataclass
class FsdpSettings:
    """FSDP2 (``fully_shard``) tuning; maps to the HF ``fsdp_config`` dict."""

    reshard_after_forward: bool = True
    """Free gathered parameters after the forward (full shard, ZeRO-3-like); False keeps them until the backward
    (ZeRO-2-like: less communication, more memory)."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer state in CPU RAM; the step runs on the CPU."""
    activation_checkpointing: bool = False
    """FSDP's own activation checkpointing per wrapped layer; prefer it to ``method.gradient_checkpointing``, which
    adds a redundant all-gather in the backward under FSDP."""
    layer_classes: list[str] = field(default_factory=list)
    """Module classes to shard one by one (e.g. ``LlamaDecoderLayer``); empty uses the model's
    ``_no_split_modules`` (its decoder-layer class)."""
    state_dict_type: FsdpStateDict = FsdpStateDict.full
    """Checkpoint format of ``checkpoints/``; ``model/`` is always written as a normal HF folder."""
    cpu_ram_efficient_loading: bool = True
    """Load the checkpoint on rank 0 only and broadcast it into the shards (the other ranks' copies go to the meta
    device; accelerate's FSDP2 preparation); a frozen reference or teacher beside the policy is sharded the same
    way. False: every rank reads the whole checkpoint before sharding."""


@dataclass
class DeepSpeedSettings:
    """DeepSpeed ZeRO tuning; ``None`` bucket sizes follow the model's hidden size (HF ``"auto"``)."""

    stage: int = bounded(2, ge=1, le=3)
    """ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: OffloadDevice = OffloadDevice.none
    """Keep optimizer state (and the fp32 master weights) on the CPU or NVMe; uses DeepSpeed's CPU Adam."""
    offload_param: OffloadDevice = OffloadDevice.none
    """Keep parameters on the CPU or NVMe between uses (stage 3 only)."""
    nvme_path: str | None = None
    """Folder for NVMe offload (required when an offload device is ``nvme``)."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass (more memory for buckets)."""
    contiguous_gradients: bool = True
    """Copy gradients into one contiguous buffer as they are produced (less fragmentation)."""
    reduce_scatter: bool = True
    """Reduce gradients with reduce-scatter instead of all-reduce (stages 2/3)."""
    allgather_bucket_size: int = bounded(200_000_000, ge=1)
    """Elements all-gathered at a time (stage 2)."""
    reduce_bucket_size: int | None = bounded(None, ge=1)
    """Elements reduced at a time; None: hidden_size^2."""
    stage3_prefetch_bucket_size: int | None = bounded(None, ge=0)
    """Parameter elements prefetched ahead of use (stage 3); None: 0.9 * hidden_size^2."""
    stage3_param_persistence_threshold: int | None = bounded(None, ge=0)
    """Parameters smaller than this stay unpartitioned (stage 3); None: 10 * hidden_size."""
    stage3_max_live_parameters: int = bounded(1_000_000_000, ge=0)
    """Upper bound of gathered parameter elements kept per rank (stage 3)."""
    stage3_max_reuse_distance: int = bounded(1_000_000_000, ge=0)
    """Keep a gathered parameter if it is reused within this many elements (stage 3)."""
    gather_16bit_weights_on_model_save: bool = True
    """Gather full weights on save so ``model/`` is a normal HF folder (stage 3)."""
    loss_scale: float = bounded(0.0, ge=0)
    """fp16 loss scale; 0 means dynamic scaling (only with ``method.fp16``)."""
    initial_scale_power: int = bounded(16, ge=0)
    """Dynamic fp16 loss scaling starts at 2**this."""

    def __post_init__(self) -> None:
        check_fields(self, "distributed.deepspeed")
        if self.offload_param is not OffloadDevice.none and self.stage != 3:
            raise ValueError(
                f"distributed.deepspeed.offload_param={self.offload_param} needs stage 3 (got stage {self.stage})"
            )
        nvme = OffloadDevice.nvme in (self.offload_optimizer, self.offload_param)
        if nvme and not self.nvme_path:
            raise ValueError("distributed.deepspeed: NVMe offload needs distributed.deepspeed.nvme_path")


@dataclass
class DistributedConfig:
    """Process layout and sharding backend; ``none`` trains in the launching process."""

    backend: DistributedBackend = DistributedBackend.none
    """Parallelism backend."""
    nproc_per_node: int = bounded(1, ge=1)
    """Ranks per node (one per GPU; on a CPU machine, processes sharing its cores)."""
    nnodes: int = bounded(1, ge=1)
    """Nodes (SLURM jobs get this from the launcher; a local run uses 1)."""
    process_group: ProcessGroupBackend = ProcessGroupBackend.auto
    """Communication backend; ``auto`` is nccl with CUDA, gloo without."""
    timeout_s: int = bounded(1800, ge=1)
    """Collective-operation timeout in seconds (HF ``ddp_timeout``)."""
    max_restarts: int = bounded(0, ge=0)
    """Times torch elastic restarts the whole rank group after a rank fails."""
    ddp: DdpSettings = field(default_factory=DdpSettings)
    """DDP settings (``backend=ddp``)."""
    fsdp: FsdpSettings = field(default_factory=FsdpSettings)
    """FSDP2 settings (``backend=fsdp``)."""
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    """DeepSpeed ZeRO settings (``backend=deepspeed``)."""

    def __post_init__(self) -> None:
        check_fields(self, "distributed")
        if self.backend is DistributedBackend.none and self.world_size > 1:
            raise ValueError(
                f"distributed.nproc_per_node={self.nproc_per_node} x nnodes={self.nnodes} needs a backend: pick "
                "distributed=ddp, fsdp, deepspeed_zero2 or deepspeed_zero3"
            )

    @property
    def world_size(self) -> int:
        """Ranks in total."""
        return self.nproc_per_node * self.nnodes


# --- the backend as TrainingArguments keywords (pure: the run passes its ``distributed`` slice) ------------


class DistributedSetupError(RuntimeError):
    """The distributed settings cannot run here; raised before any rank starts (and by ``plan=true``)."""


def cuda_available() -> bool:
    """Whether this process sees a CUDA device."""
    import torch

    return torch.cuda.is_available()


def process_group_backend(dist: DistributedConfig, *, cuda: bool) -> str:
    """``torch.distributed`` backend name: the configured one, or nccl with CUDA and gloo without."""
    if dist.process_group is ProcessGroupBackend.auto:
        return "nccl" if cuda else "gloo"
    return dist.process_group.value


def _auto(value: int | None) -> int | str:
    return "auto" if value is None else value


def _offload(device: OffloadDevice, ds: DeepSpeedSettings, *, cuda: bool) -> dict[str, Any]:
    section: dict[str, Any] = {"device": device.value, "pin_memory": cuda}
    if device is OffloadDevice.nvme:
        section["nvme_path"] = ds.nvme_path
    return section


def deepspeed_config(ds: DeepSpeedSettings, *, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config as a dict; ``"auto"`` values are filled by HF from TrainingArguments and the model.

    Batch sizes, accumulation, clipping and precision follow the method (``"auto"``); ZeRO settings come from
    :class:`~alignment.distributed.DeepSpeedSettings`. With optimizer offload the optimizer is DeepSpeed's AdamW
    (its CPU Adam kernel; lr/betas/eps/weight decay ``"auto"`` from the method), otherwise the Trainer's own.
    """
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_scatter": ds.reduce_scatter,
        "allgather_bucket_size": ds.allgather_bucket_size,
        "reduce_bucket_size": _auto(ds.reduce_bucket_size),
    }
    if ds.stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": _auto(ds.stage3_prefetch_bucket_size),
            "stage3_param_persistence_threshold": _auto(ds.stage3_param_persistence_threshold),
            "stage3_max_live_parameters": ds.stage3_max_live_parameters,
            "stage3_max_reuse_distance": ds.stage3_max_reuse_distance,
            "stage3_gather_16bit_weights_on_model_save": ds.gather_16bit_weights_on_model_save,
        }
    if ds.offload_optimizer is not OffloadDevice.none:
        zero["offload_optimizer"] = _offload(ds.offload_optimizer, ds, cuda=cuda)
    if ds.offload_param is not OffloadDevice.none:
        zero["offload_param"] = _offload(ds.offload_param, ds, cuda=cuda)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto", "loss_scale": ds.loss_scale, "initial_scale_power": ds.initial_scale_power},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000_000,  # the Trainer logs; DeepSpeed's own step prints would interleave
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer is not OffloadDevice.none:
        adam = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}
        config["optimizer"] = {"type": "AdamW", "params": adam}
    return config


_STATE_DICT = {FsdpStateDict.full: "FULL_STATE_DICT", FsdpStateDict.sharded: "SHARDED_STATE_DICT"}


def fsdp_config(fsdp: FsdpSettings) -> dict[str, Any]:
    """HF ``fsdp_config`` for FSDP2, wrapping each decoder layer (the model's ``_no_split_modules`` by default)."""
    config: dict[str, Any] = {
        "version": 2,
        "reshard_after_forward": fsdp.reshard_after_forward,
        "cpu_offload": fsdp.cpu_offload,
        "activation_checkpointing": fsdp.activation_checkpointing,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": _STATE_DICT[fsdp.state_dict_type],
        "cpu_ram_efficient_loading": fsdp.cpu_ram_efficient_loading,
    }
    if fsdp.layer_classes:
        config["transformer_layer_cls_to_wrap"] = list(fsdp.layer_classes)
    return config


def _process_group_kwargs(dist: DistributedConfig, *, cuda: bool) -> dict[str, Any]:
    return {"ddp_backend": process_group_backend(dist, cuda=cuda), "ddp_timeout": dist.timeout_s}


def _ddp_kwargs(dist: DistributedConfig, *, cuda: bool) -> dict[str, Any]:
    return _process_group_kwargs(dist, cuda=cuda) | {
        "ddp_find_unused_parameters": dist.ddp.find_unused_parameters,
        "ddp_bucket_cap_mb": dist.ddp.bucket_cap_mb,
    }


def _fsdp_kwargs(dist: DistributedConfig, *, cuda: bool) -> dict[str, Any]:
    return _process_group_kwargs(dist, cuda=cuda) | {"fsdp": True, "fsdp_config": fsdp_config(dist.fsdp)}


def _deepspeed_kwargs(dist: DistributedConfig, *, cuda: bool) -> dict[str, Any]:
    return _process_group_kwargs(dist, cuda=cuda) | {"deepspeed": deepspeed_config(dist.deepspeed, cuda=cuda)}


def _no_kwargs(dist: DistributedConfig, *, cuda: bool) -> dict[str, Any]:
    return {}


def trainer_kwargs(dist: DistributedConfig, *, cuda: bool | None = None) -> dict[str, Any]:
    """TrainingArguments keywords that make the HF Trainer run ``dist.backend`` (empty for ``none``).

    Raises:
        DistributedSetupError: the backend cannot run on this machine (see :func:`backend_problems`).
    """
    cuda = cuda_available() if cuda is None else cuda
    problems = backend_problems(dist, cuda=cuda)
    if problems:
        raise DistributedSetupError("; ".join(problems))
    return BACKEND_KWARGS[dist.backend](dist, cuda=cuda)


def _deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def backend_problems(dist: DistributedConfig, *, cuda: bool) -> list[str]:
    """Why ``dist`` cannot run on this machine (empty when it can); a real run and ``plan=true`` share these."""
    problems = []
    if dist.backend is DistributedBackend.fsdp and not cuda:
        problems.append(
            "distributed=fsdp needs CUDA: without a GPU accelerate only sets up DDP and the run would silently not "
            "shard; on CPU use distributed=deepspeed_zero3 (shards parameters) or distributed=ddp"
        )
    if process_group_backend(dist, cuda=cuda) == "nccl" and not cuda:
        problems.append("distributed.process_group=nccl needs CUDA; use gloo (or auto) on CPU")
    if dist.backend is DistributedBackend.deepspeed and not _deepspeed_installed():
        problems.append(
            "distributed=deepspeed_* needs the deepspeed package: pip install 'effective-alignment[deepspeed]'"
        )
    return problems


BACKEND_KWARGS: dict[DistributedBackend, Callable[..., dict[str, Any]]] = {
    DistributedBackend.none: _no_kwargs,
    DistributedBackend.ddp: _ddp_kwargs,
    DistributedBackend.fsdp: _fsdp_kwargs,
    DistributedBackend.deepspeed: _deepspeed_kwargs,
}
