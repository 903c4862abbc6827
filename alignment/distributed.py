"""Schema of the ``distributed`` config group (process layout and sharding backend)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class DistributedBackend(StrEnum):
    """How training is spread over processes."""

    none = "none"


@dataclass
class DistributedConfig:
    """One process; multi-process backends (DDP, FSDP, DeepSpeed) plug in here."""

    backend: DistributedBackend = DistributedBackend.none
    """Parallelism backend."""
    nproc_per_node: int = 1
    """Processes per node."""
    nnodes: int = 1
    """Nodes."""
