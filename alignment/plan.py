"""``python launch.py ... plan=true``: check what a run needs and print the plan, without training or submitting.

The plan (1) has already validated the whole config (composition and conversion run the schema checks), then
(2) runs the same distributed checks a real run runs before it starts ranks, (3) reads and validates the first
:data:`PLAN_ROWS` rows of every data source (converted from its format) with the method's own row validator, (4)
loads the tokenizer and the model *config* (no weights; the parameter count comes from a meta-device model), (5)
estimates parameter, gradient and optimizer memory per device for the backend and precision, and (6) prints the
sbatch script the selected SLURM launcher would submit (or, for a local run, the equivalent torchrun line). Errors
are the ones a real run raises. Activations are not estimated: they depend on sequence length, batch size and
checkpointing.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.distributed import DistributedBackend, DistributedConfig, OffloadDevice

if TYPE_CHECKING:
    import torch

    from alignment.config import RunConfig
    from alignment.context import RunContext
    from alignment.data.config import SourceConfig
    from alignment.models.config import ModelConfig

log = logging.getLogger(__name__)

PLAN_ROWS = 16
"""Rows read and validated from the start of every data source (and eval file/split)."""
GIB = 1024**3
UNREACHABLE = "unreachable:"
"""Marks the plan's model part when the model config could not be read; the plan then exits non-zero."""
# --- data ------------------------------------------------------------------------------------------------------


def _renamed(row: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    return {columns.get(key, key): value for key, value in row.items()}


def _jsonl_rows(path_text: str, source: SourceConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    from alignment.data.load import read_jsonl, resolve_path

    path = Path(resolve_path(path_text))
    if not path.is_file():
        raise FileNotFoundError(f"data source {path_text!r}: no such file {path}")
    for where, row in itertools.islice(read_jsonl(path), PLAN_ROWS):
        yield where, _renamed(row, source.columns)


def _arrow_rows(source: SourceConfig, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(source.path)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = load_from_disk(str(path))
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise KeyError(f"data source {source.path!r}: no split {split!r} (has {', '.join(loaded)})")
            loaded = loaded[split]
        rows: Any = loaded.select(range(min(PLAN_ROWS, len(loaded))))
    else:  # a hub dataset: stream the first rows instead of downloading it
        rows = load_dataset(source.path, source.name, split=split, streaming=True).take(PLAN_ROWS)
    for i, row in enumerate(rows):
        yield f"{source.path}[{split}] row {i}", _renamed(row, source.columns)


Rows = list[tuple[str, dict[str, Any]]]


def source_rows(source: SourceConfig) -> tuple[Rows, Rows]:
    """The first rows of a source's train part and of its eval file/split, each with its location."""
    from alignment.data.config import JSON_SUFFIXES
    from alignment.data.load import resolve_path

    if resolve_path(source.path).endswith(JSON_SUFFIXES):
        rows = list(_jsonl_rows(source.path, source))
        return rows, list(_jsonl_rows(source.eval_path, source)) if source.eval_path else []
    rows = list(_arrow_rows(source, source.split))
    return rows, list(_arrow_rows(source, source.eval_split)) if source.eval_split else []


def check_data(cfg: RunConfig) -> list[str]:
    """Validate the first rows of every source; return one summary line per source.

    Raises:
        DataError: a row is malformed or fails the method's validator (same message format as a real run).
    """
    from alignment.data.config import SourceFormat
    from alignment.data.formats import resolve_format
    from alignment.data.validate import DataError, check_rows
    from alignment.registry import METHODS

    row_checks = METHODS[cfg.method.name].row_checks
    found = row_checks(cfg.method) if row_checks is not None else None
    lines = []
    for source in cfg.data.sources:
        train, evaluation = source_rows(source)
        rows = train + evaluation
        if not train:
            raise DataError(f"data source {source.path!r}: no rows")
        if found is not None:
            first = [row for _, row in train]  # the rows a run detects the format from (PLAN_ROWS >= DETECT_ROWS)
            row_format = resolve_format(source.format, first, source=source.path, keep=found.columns)
            check_rows(rows, row_format.validator(found.validate), columns=found.columns)
            converted = "" if row_format.name is SourceFormat.native else f"{row_format.name.value} format → "
            lines.append(f"{source.path}: first {len(rows)} rows valid ({converted}columns {', '.join(found.columns)})")
        else:
            lines.append(f"{source.path}: first {len(rows)} rows read ({cfg.method.name} has no row validator)")
    return lines


# --- model and memory ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the model config says, counted on a meta-device model (no weights)."""

    architecture: str
    """Model class."""
    parameters: int
    """All parameters."""
    trainable: int
    """Parameters that get gradients and optimizer state (LoRA adapters, unfrozen layers, or all)."""
    layer_classes: tuple[str, ...]
    """Decoder-layer class(es) FSDP wraps one by one (``_no_split_modules``)."""


def _lora_trainable(model: torch.nn.Module, cfg: ModelConfig) -> int:
    import torch

    lora = cfg.lora
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        targeted = "all-linear" in lora.target_modules or name.rsplit(".", 1)[-1] in lora.target_modules
        if targeted:
            total += lora.r * (module.in_features + module.out_features) + (module.out_features if lora.use_dora else 0)
    saved = sum(
        p.numel() for name, p in model.named_parameters() if any(m in name.split(".") for m in lora.modules_to_save)
    )
    return total + saved


def _trainable(model: torch.nn.Module, cfg: ModelConfig) -> int:
    from fnmatch import fnmatch

    if cfg.lora.enabled:
        return _lora_trainable(model, cfg)
    if cfg.unfreeze_layers_patterns:
        names = [n for n, _ in model.named_modules() if any(fnmatch(n, p) for p in cfg.unfreeze_layers_patterns)]
        return sum(
            p.numel() for n, p in model.named_parameters() if any(n == m or n.startswith(f"{m}.") for m in names)
        )
    return sum(p.numel() for p in model.parameters())


def model_shape(cfg: ModelConfig) -> ModelShape:
    """Read the model config (no weights) and count parameters on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignment.models import embedded

    config = AutoConfig.from_pretrained(
        embedded.resolve(cfg.name_or_path), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)  # type: ignore[no-untyped-call]
    return ModelShape(
        architecture=type(model).__name__,
        parameters=sum(p.numel() for p in model.parameters()),
        trainable=_trainable(model, cfg),
        layer_classes=tuple(getattr(model, "_no_split_modules", None) or ()),
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of parameters, gradients and optimizer state, and what is offloaded to CPU RAM."""

    weights: float
    """Parameter bytes held by one device."""
    gradients: float
    """Gradient bytes held by one device."""
    optimizer: float
    """Optimizer-state bytes (Adam moments, fp32 master weights) held by one device."""
    offloaded: float
    """Bytes per rank kept in CPU RAM instead (offload)."""
    notes: tuple[str, ...]
    """Assumptions behind the numbers."""

    @property
    def device_total(self) -> float:
        """Weights + gradients + optimizer state on one device (activations not included)."""
        return self.weights + self.gradients + self.optimizer


def _shard_divisors(dist: DistributedConfig) -> tuple[int, int, int]:
    """How many ranks share (parameters, gradients, optimizer state) under the backend."""
    n = dist.world_size
    zero = {1: (1, 1, n), 2: (1, n, n), 3: (n, n, n)}
    divisors = {
        DistributedBackend.none: (1, 1, 1),
        DistributedBackend.ddp: (1, 1, 1),
        DistributedBackend.fsdp: (n, n, n),
        DistributedBackend.deepspeed: zero[dist.deepspeed.stage],
    }
    return divisors[dist.backend]


def _offloaded(dist: DistributedConfig) -> tuple[bool, bool, bool]:
    """Whether (parameters, gradients, optimizer state) live in CPU RAM."""
    ds, fsdp = dist.deepspeed, dist.fsdp
    deepspeed = dist.backend is DistributedBackend.deepspeed
    opt = deepspeed and ds.offload_optimizer is not OffloadDevice.none
    params = deepspeed and ds.offload_param is not OffloadDevice.none
    everything = dist.backend is DistributedBackend.fsdp and fsdp.cpu_offload
    return params or everything, everything, opt or everything


def estimate_memory(shape: ModelShape, cfg: RunConfig, *, cuda: bool) -> MemoryEstimate:
    """Per-device memory of weights, gradients and optimizer state for the backend and precision.

    Weights take 2 bytes (bf16/fp16 load, or DeepSpeed mixed precision) or 4; gradients match the weights;
    optimizer state is Adam's two moments (8 bytes/param in fp32, 2 with an 8-bit optimizer) plus a 4-byte fp32
    master copy when DeepSpeed trains half-precision weights.
    """
    from alignment.models.config import Dtype

    method = cfg.method
    bf16 = getattr(method, "bf16", None)
    mixed = bool(getattr(method, "fp16", False)) or (bf16 if bf16 is not None else cuda)
    half_load = cfg.model.dtype in (Dtype.bfloat16, Dtype.float16) or (cfg.model.dtype is Dtype.auto and cuda)
    deepspeed = cfg.distributed.backend is DistributedBackend.deepspeed
    weight_bytes = 2 if half_load or (deepspeed and mixed) else 4
    moments = 2 if "8bit" in str(getattr(method, "optim", "")) else 8
    master = 4 if deepspeed and weight_bytes == 2 else 0
    divisors = _shard_divisors(cfg.distributed)
    offloaded = _offloaded(cfg.distributed)
    sizes = (
        shape.parameters * weight_bytes / divisors[0],
        shape.trainable * weight_bytes / divisors[1],
        shape.trainable * (moments + master) / divisors[2],
    )
    on_device = [0.0 if off else size for size, off in zip(sizes, offloaded, strict=True)]
    notes = (
        f"weights {weight_bytes} bytes/param ({'half precision' if weight_bytes == 2 else 'fp32'}), "
        f"optimizer {moments + master} bytes/trainable param ({'8-bit' if moments == 2 else 'Adam'} moments"
        f"{' + fp32 master' if master else ''})",
        f"sharded over {cfg.distributed.world_size} rank(s): parameters /{divisors[0]}, gradients /{divisors[1]}, "
        f"optimizer state /{divisors[2]}",
        "activations, temporary buffers and the CUDA context are not included",
    )
    weights, gradients, optimizer = on_device
    return MemoryEstimate(weights, gradients, optimizer, sum(sizes) - sum(on_device), notes)


# --- launch preview --------------------------------------------------------------------------------------------


def sbatch_preview(launcher: Mapping[str, Any]) -> str | None:
    """The sbatch script a hydra-submitit SLURM launcher config would submit; None for any other launcher."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
    from omegaconf import OmegaConf

    if "SlurmLauncher" not in str(launcher.get("_target_", "")):
        return None
    known = set(OmegaConf.structured(SlurmQueueConf).keys()) - {"_target_"}
    params = {k: v for k, v in launcher.items() if k in known}
    init = {"folder": params.pop("submitit_folder"), "slurm_max_num_timeout": params.pop("max_num_timeout", 0)}
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor = submitit.AutoExecutor(cluster="slurm", **init)
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    inner: Any = executor._executor
    return str(inner._make_submission_file_text(inner._submitit_command_str, "plan"))


def _launcher_config() -> Mapping[str, Any] | None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return None
    container = OmegaConf.to_container(HydraConfig.get().launcher, resolve=True)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f} GiB" if value >= GIB / 10 else f"{value / 1024**2:8.1f} MiB"


def plan_lines(cfg: RunConfig) -> list[str]:
    """Run every check and return the plan as printable lines.

    Raises:
        DistributedSetupError, DataError, OSError, ValueError: whatever a real run would raise first.
    """
    from alignment.distributed import DistributedSetupError, cuda_available
    from alignment.launch.ranks import runtime_problems
    from alignment.models.load import load_tokenizer

    launcher = _launcher_config()
    slurm = bool(launcher and "SlurmLauncher" in str(launcher.get("_target_", "")))
    # The job runs where the launcher puts it: a SLURM job has GPUs when it asks for them, whatever this machine has.
    cuda = bool(launcher and launcher.get("gpus_per_node")) if slurm else cuda_available()
    problems = runtime_problems(cfg, cuda=cuda)
    if problems:
        raise DistributedSetupError("; ".join(problems))
    lines = ["== config: valid", f"method {cfg.method.name}, model {cfg.model.name_or_path}"]
    lines += _layout_warnings(launcher, cfg.distributed) if slurm and launcher else []
    lines += ["== data", *check_data(cfg)]
    try:
        tokenizer = load_tokenizer(cfg.model)
        shape = model_shape(cfg.model)
    except OSError as err:  # offline without a cached copy, gated, or no such repository
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        lines += [
            f"== model {UNREACHABLE} offline / gated — set HF_TOKEN or point model.name_or_path to a local folder",
            f"  ({first})",
            "== memory per device: not estimated (no model config)",
        ]
        return lines + _launch_lines(launcher, cfg.distributed)
    lines += [
        "== model (config only, no weights)",
        f"{shape.architecture}: {shape.parameters:,} parameters, {shape.trainable:,} trainable; "
        f"tokenizer vocab {len(tokenizer):,}; decoder layer {', '.join(shape.layer_classes) or '?'}",
    ]
    return lines + _memory_lines(shape, cfg, cuda) + _launch_lines(launcher, cfg.distributed)


def _layout_warnings(launcher: Mapping[str, Any], dist: DistributedConfig) -> list[str]:
    """Where the SLURM launcher asks for fewer GPUs or nodes than ``distributed`` starts ranks on."""
    gpus = launcher.get("gpus_per_node")
    nodes = launcher.get("nodes") or 1
    lines = []
    if dist.backend is not DistributedBackend.none and isinstance(gpus, int) and gpus < dist.nproc_per_node:
        lines.append(
            f"== warning: launcher mismatch: hydra.launcher.gpus_per_node={gpus} but distributed.nproc_per_node="
            f"{dist.nproc_per_node} ranks per node (use hydra/launcher=slurm_multinode or slurm_tasks, or set "
            f"hydra.launcher.gpus_per_node={dist.nproc_per_node})"
        )
    if isinstance(nodes, int) and nodes != dist.nnodes:
        lines.append(
            f"== warning: launcher mismatch: hydra.launcher.nodes={nodes} but distributed.nnodes={dist.nnodes}"
        )
    return lines


def _memory_lines(shape: ModelShape, cfg: RunConfig, cuda: bool) -> list[str]:
    dist = cfg.distributed
    memory = estimate_memory(shape, cfg, cuda=cuda)
    return [
        f"== memory per device: backend {dist.backend}"
        f"{f' (ZeRO-{dist.deepspeed.stage})' if dist.backend is DistributedBackend.deepspeed else ''}, "
        f"world size {dist.world_size} ({dist.nnodes} node(s) x {dist.nproc_per_node}), {'GPU' if cuda else 'CPU'}",
        f"parameters {_gib(memory.weights)}",
        f"gradients  {_gib(memory.gradients)}",
        f"optimizer  {_gib(memory.optimizer)}",
        f"total      {_gib(memory.device_total)}   (+ activations)",
        f"offloaded to CPU RAM per rank {_gib(memory.offloaded)}",
        *(f"  note: {note}" for note in memory.notes),
    ]


def _launch_lines(launcher: Mapping[str, Any] | None, dist: DistributedConfig) -> list[str]:
    from alignment.launch.ranks import torchrun_command

    lines: list[str] = []
    script = sbatch_preview(launcher) if launcher else None
    if script is None:
        launch = torchrun_command(dist) if dist.backend is not DistributedBackend.none else "this process"
        lines += ["== launch", f"local run: no sbatch script; ranks: {launch}"]
    else:
        lines += ["== sbatch script (not submitted; the same command with -m submits it)", script.rstrip()]
    return lines


def print_plan(cfg: RunConfig, ctx: RunContext) -> None:
    """Print the plan and remove the run directory Hydra created, if it is still empty."""
    lines = plan_lines(cfg)
    print("\n".join(lines), flush=True)
    print("plan only: nothing was trained or submitted", flush=True)
    if ctx.output_dir.is_dir() and not any(ctx.output_dir.iterdir()):
        ctx.output_dir.rmdir()
    if any(UNREACHABLE in line for line in lines):
        raise SystemExit("plan incomplete: the model could not be read (see '== model' above)")
