"""Schema of the ``distributed`` config group: process layout and sharding backend.

``backend=none`` trains in the launching process. Any other backend makes ``launch.py`` spawn
``nproc_per_node`` ranks per node (torch elastic, c10d rendezvous) that all receive the resolved config as a
file (:mod:`alignment.launch.distributed`). Each backend maps to what the HF Trainer / accelerate need:

* ``ddp``: ``torch.distributed`` env + ``ddp_*`` TrainingArguments (gloo on CPU, nccl on GPU);
* ``fsdp``: ``TrainingArguments(fsdp=True, fsdp_config={"version": 2, ...})``, FSDP2 full shard, auto-wrapped by the
  model's decoder-layer class (``_no_split_modules``); needs CUDA (accelerate silently runs DDP on CPU);
* ``deepspeed``: ``TrainingArguments(deepspeed=<dict>)`` built from :class:`DeepSpeedSettings` by
  :func:`alignment.launch.distributed.deepspeed_config` (no hand-kept JSON copy).

Mixed precision is the method's ``bf16``/``fp16``; the DeepSpeed config follows it through HF's ``"auto"`` values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


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
    bucket_cap_mb: int = 25
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
    cpu_ram_efficient_loading: bool = False
    """Load the checkpoint on rank 0 only and broadcast it (less host RAM on big models)."""


@dataclass
class DeepSpeedSettings:
    """DeepSpeed ZeRO tuning; ``None`` bucket sizes follow the model's hidden size (HF ``"auto"``)."""

    stage: int = 2
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
    allgather_bucket_size: int = 200_000_000
    """Elements all-gathered at a time (stage 2)."""
    reduce_bucket_size: int | None = None
    """Elements reduced at a time; None: hidden_size^2."""
    stage3_prefetch_bucket_size: int | None = None
    """Parameter elements prefetched ahead of use (stage 3); None: 0.9 * hidden_size^2."""
    stage3_param_persistence_threshold: int | None = None
    """Parameters smaller than this stay unpartitioned (stage 3); None: 10 * hidden_size."""
    stage3_max_live_parameters: int = 1_000_000_000
    """Upper bound of gathered parameter elements kept per rank (stage 3)."""
    stage3_max_reuse_distance: int = 1_000_000_000
    """Keep a gathered parameter if it is reused within this many elements (stage 3)."""
    gather_16bit_weights_on_model_save: bool = True
    """Gather full weights on save so ``model/`` is a normal HF folder (stage 3)."""
    loss_scale: float = 0.0
    """fp16 loss scale; 0 means dynamic scaling (only with ``method.fp16``)."""
    initial_scale_power: int = 16
    """Dynamic fp16 loss scaling starts at 2**this."""

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ValueError(f"distributed.deepspeed.stage must be 1, 2 or 3, got {self.stage}")
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
    nproc_per_node: int = 1
    """Ranks per node (one per GPU; on a CPU machine, processes sharing its cores)."""
    nnodes: int = 1
    """Nodes (SLURM jobs get this from the launcher; a local run uses 1)."""
    process_group: ProcessGroupBackend = ProcessGroupBackend.auto
    """Communication backend; ``auto`` is nccl with CUDA, gloo without."""
    timeout_s: int = 1800
    """Collective-operation timeout in seconds (HF ``ddp_timeout``)."""
    max_restarts: int = 0
    """Times torch elastic restarts the whole rank group after a rank fails."""
    ddp: DdpSettings = field(default_factory=DdpSettings)
    """DDP settings (``backend=ddp``)."""
    fsdp: FsdpSettings = field(default_factory=FsdpSettings)
    """FSDP2 settings (``backend=fsdp``)."""
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    """DeepSpeed ZeRO settings (``backend=deepspeed``)."""

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ValueError(
                f"distributed.nproc_per_node and distributed.nnodes must be >= 1, got {self.nproc_per_node} and "
                f"{self.nnodes}"
            )
        if self.backend is DistributedBackend.none and self.world_size > 1:
            raise ValueError(
                f"distributed.nproc_per_node={self.nproc_per_node} x nnodes={self.nnodes} needs a backend: pick "
                "distributed=ddp, fsdp, deepspeed_zero2 or deepspeed_zero3"
            )

    @property
    def world_size(self) -> int:
        """Ranks in total."""
        return self.nproc_per_node * self.nnodes
