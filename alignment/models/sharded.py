"""Models created sharded under the run's ZeRO-3 or FSDP2 backend, never whole on every rank first.

transformers decides how ``from_pretrained`` builds a model from process-wide switches that ``TrainingArguments``
sets when it is created:

* ZeRO-3: a live ``HfDeepSpeedConfig`` (held through a weakref) with stage 3 makes it create every module inside
  DeepSpeed's ``zero.Init``, so each parameter is partitioned as it is created; rank 0 alone reads the checkpoint
  and each module's values are scattered to the partitions one module at a time;
* FSDP2: ``ACCELERATE_USE_FSDP`` and ``FSDP_CPU_RAM_EFFICIENT_LOADING`` make accelerate's FSDP2 preparation move
  the other ranks' copies to the meta device and broadcast rank 0's weights into the shards.

The methods load their models before their own ``TrainingArguments`` exist, so a multi-rank run opens
:func:`run_sharding` with the run's settings first (:func:`alignment.training.arguments.sharded_loading`), and each
load says whether it takes the run's sharding (:func:`sharded_creation`): the trained model does, and so does a frozen
reference or teacher that runs beside it (:func:`prepare_frozen` then wraps it the way the Trainer wraps the
policy); a frozen model that one rank runs alone (precomputing reference log-probs, a teacher cache) is loaded
whole. Each load is measured (:func:`measured_load`) into :data:`LOADS`, which the rank record lists.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

_FSDP_ENV = ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING")


@dataclass
class LoadRecord:
    """What one ``from_pretrained`` left on this rank, and the resident memory it took at its peak."""

    what: str
    """Which model: ``policy``, ``frozen`` (a reference or teacher), ``classifier``."""
    sharded: bool
    """Whether it was created under the run's sharding (ZeRO-3 ``zero.Init``, FSDP2 rank-0 loading)."""
    param_numel_local: int
    """Parameter elements this rank holds right after the load (its ZeRO-3 partitions, or all of them)."""
    param_numel_full: int
    """Parameter elements of the whole model."""
    param_bytes_full: int
    """Bytes of the whole model's parameters in the dtype they were created in."""
    rss_before: int
    """Resident set size (bytes) right before the load."""
    rss_peak: int | None
    """Peak resident set size (bytes) during the load: the kernel's high-water mark, reset right before it (Linux
    ``/proc/self/clear_refs``); None where it cannot be reset. It counts file-backed pages too: the checkpoint
    pages rank 0 reads (evictable page cache) are part of rank 0's peak."""

    def as_dict(self) -> dict[str, Any]:
        """The record as JSON-ready values."""
        return asdict(self)


LOADS: list[LoadRecord] = []
"""Every model this process loaded while a :func:`run_sharding` was open, in load order."""


class _RunSharding:
    """The open run's settings (one run per process)."""

    def __init__(self) -> None:
        self.open = False
        self.deepspeed: Any = None
        """The run's ``HfDeepSpeedConfig`` with ZeRO stage 3, or None."""
        self.fsdp = False
        """Whether FSDP2 loads on rank 0 and broadcasts (``cpu_ram_efficient_loading``)."""


_RUN = _RunSharding()


@contextmanager
def run_sharding(deepspeed: Any = None, *, fsdp: bool = False) -> Iterator[None]:
    """While open, loads with ``sharded=True`` follow the run's backend and every load is recorded in :data:`LOADS`.

    Args:
        deepspeed: an ``HfDeepSpeedConfig`` with ZeRO stage 3 (kept alive here), or None.
        fsdp: FSDP2 with rank-0 loading.
    """
    LOADS.clear()
    _RUN.open, _RUN.deepspeed, _RUN.fsdp = True, deepspeed, fsdp
    try:
        yield
    finally:
        _RUN.open, _RUN.deepspeed, _RUN.fsdp = False, None, False


@contextmanager
def sharded_creation(sharded: bool) -> Iterator[None]:
    """Around one ``from_pretrained``: transformers' switches set to the run's sharding, or cleared (a whole model).

    ``sharded`` with ZeRO-3 activates the run's DeepSpeed config (or the one the method's ``TrainingArguments``
    already activated); with FSDP2 it sets accelerate's rank-0 loading flags. ``sharded=False`` clears both, so the
    model loads whole on every rank even after ZeRO-3 ``TrainingArguments`` exist. Everything is restored after.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    active = reference() if reference is not None else None
    target = (active if active is not None else _RUN.deepspeed) if sharded else None
    saved_env = {key: os.environ.get(key) for key in _FSDP_ENV}
    _activate(target)
    heap = _heap_returns_large_blocks() if target is not None else nullcontext()
    if sharded and _RUN.fsdp:
        os.environ.update(dict.fromkeys(_FSDP_ENV, "true"))
    elif not sharded:
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    try:
        with heap:
            yield
    finally:
        _activate(active)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _activate(config: Any) -> None:
    """Make ``config`` transformers' live ``HfDeepSpeedConfig`` (what ``from_pretrained`` reads), or none."""
    from transformers.integrations import deepspeed as hf_deepspeed

    if config is not None:
        hf_deepspeed.set_hf_deepspeed_config(config)  # type: ignore[no-untyped-call]
    else:
        hf_deepspeed.unset_hf_deepspeed_config()  # type: ignore[no-untyped-call]


_MMAP_THRESHOLD_DURING_LOAD = 128 * 1024
"""glibc's initial mmap threshold: blocks at least this large are mapped on their own and unmapped when freed."""
_MMAP_THRESHOLD_AFTER_LOAD = 32 * 1024 * 1024
"""The ceiling glibc's dynamic threshold climbs to (64-bit), fixed once a load has set the threshold."""


@contextmanager
def _heap_returns_large_blocks() -> Iterator[None]:
    """Around a ZeRO-3 load on the CPU: glibc returns every large freed block to the system at once.

    ``zero.Init`` creates each module's parameters whole, copies this rank's partition out and frees the rest, one
    module after another. glibc raises its mmap threshold at the first such free, so the following whole tensors
    come from the heap, whose freed middle is never returned: the resident set then grows with the model (about its
    full size per rank, ``bench/sharded_load_bench.py``) although only partitions stay alive. Fixing the threshold
    low for the load keeps the resident set at what is alive; afterwards it is fixed at the ceiling the dynamic
    threshold would climb to anyway. No-op with CUDA (the tensors live on the GPU) and without glibc.
    """
    import torch

    mallopt = _glibc_function("mallopt")
    if mallopt is None or torch.cuda.is_available():
        yield
        return
    m_mmap_threshold = -3  # malloc.h
    mallopt(m_mmap_threshold, _MMAP_THRESHOLD_DURING_LOAD)
    try:
        yield
    finally:
        mallopt(m_mmap_threshold, _MMAP_THRESHOLD_AFTER_LOAD)
        trim = _glibc_function("malloc_trim")
        if trim is not None:
            trim(0)


def _glibc_function(name: str) -> Any:
    """A function of the C library when it is glibc (Linux), else None."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    return getattr(ctypes.CDLL(None), name, None)


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes (``VmRSS``, ``VmHWM``), None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark to the current RSS (Linux 4.0+); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def parameter_numel(param: torch.Tensor) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole parameter): a ZeRO-3 partition, an FSDP2 shard, or all."""
    if hasattr(param, "ds_numel"):  # ZeRO-3: ds_tensor is this rank's partition
        partition: Any = getattr(param, "ds_tensor")  # noqa: B009
        return int(partition.numel()), int(getattr(param, "ds_numel"))  # noqa: B009
    to_local = getattr(param, "to_local", None)
    local = to_local().numel() if callable(to_local) else param.numel()
    return int(local), int(param.numel())


class _Measure:
    """Filled by :func:`measured_load` once the model is there."""

    model: Any = None


@contextmanager
def measured_load(what: str, *, sharded: bool) -> Iterator[_Measure]:
    """Record the load inside the block (set ``.model`` on the yielded object) in :data:`LOADS` and the log.

    Only while a :func:`run_sharding` is open (a rank of a multi-process run): resetting the peak-RSS mark is a
    process-wide side effect that single-process benches, which read ``ru_maxrss``, must not see.
    """
    box = _Measure()
    if not _RUN.open:
        yield box
        return
    rss_before = _status_bytes("VmRSS") or 0
    reset = _reset_peak_rss()
    yield box
    peak = _status_bytes("VmHWM") if reset else None
    params = list(box.model.parameters())
    numels = [parameter_numel(p) for p in params]
    record = LoadRecord(
        what=what,
        sharded=sharded,
        param_numel_local=sum(local for local, _ in numels),
        param_numel_full=sum(full for _, full in numels),
        param_bytes_full=sum(full * p.element_size() for (_, full), p in zip(numels, params, strict=True)),
        rss_before=rss_before,
        rss_peak=peak,
    )
    LOADS.append(record)
    full = max(record.param_bytes_full, 1)
    log.info(
        "loaded %s (%s): %s of %s parameters on this rank (%.2f); peak RSS during the load +%s MiB (%.2f of the "
        "model's %s MiB)",
        what,
        "sharded" if sharded else "whole",
        f"{record.param_numel_local:,}",
        f"{record.param_numel_full:,}",
        record.param_numel_local / max(record.param_numel_full, 1),
        "?" if peak is None else f"{(peak - rss_before) / 2**20:.0f}",
        float("nan") if peak is None else (peak - rss_before) / full,
        f"{full / 2**20:.0f}",
    )


def fsdp_loading() -> bool:
    """Whether the open run loads FSDP2 models on rank 0 and broadcasts them (``sharded=True`` loads)."""
    return _RUN.fsdp


def is_partitioned(model: Any) -> bool:
    """Whether ``model`` holds ZeRO-3 partitioned parameters (created under ``zero.Init``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def prepare_frozen(model: Any, accelerator: Accelerator) -> Any:
    """A frozen model ready to run beside the Trainer's policy, sharded the way the policy is; in eval mode.

    A ZeRO-3 partitioned model goes into a DeepSpeed engine without optimizer (TRL's ``prepare_deepspeed``: the
    run's config, bucket sizes from the model's hidden size), whose hooks gather each module's partitions for its
    forward; under FSDP2 accelerate shards it per decoder layer as it shards the policy (rank 0's weights
    broadcast with ``cpu_ram_efficient_loading``); anything else moves to the training device.
    """
    from accelerate.utils import DistributedType  # type: ignore[import-untyped]

    if is_partitioned(model):
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model  # type: ignore[import-untyped]

        prepared = fsdp2_prepare_model(accelerator, model)
        prepared.train(False)
        return prepared
    from alignment.models.frozen import move_to_device

    return move_to_device(model, accelerator.device)
