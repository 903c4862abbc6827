"""Environment report: ``python -m alignment.env`` (``--json`` for machines), like ``trl env``.

Prints three tables: the versions of the training stack (``not installed`` where a package is absent), the CUDA
devices torch sees (name, memory, compute capability, bf16), and each optional path with whether it will work on
this machine and, if not, why:

* ``bf16``: mixed precision needs a CUDA device of compute capability 8.0 or newer (``method.bf16`` is on only
  there; CPUs train in fp32);
* ``liger_kernel``: Liger's Triton kernels need CUDA and the ``liger-kernel`` package;
* ``flash_attn``: ``model.attn_implementation=flash_attention_2`` needs CUDA, compute capability 8.0+ and a
  ``flash-attn`` build that imports against this torch;
* ``vllm``: the vLLM engine (``method.backend=vllm``, ``vllm serve``) needs CUDA and the ``vllm`` package;
* ``deepspeed_cpu_adam``: ``distributed=deepspeed_*_offload``'s CPU Adam needs ``deepspeed`` whose op is
  compatible here, prebuilt or built on first use with a C++ compiler and ninja;
* ``bitsandbytes``: 4/8-bit loading (``model.quantization``) and 8-bit optimizers need CUDA and ``bitsandbytes``.

Only package metadata is read for the versions; torch is imported for the devices, and ``flash_attn`` and
DeepSpeed's op builder only where the checks need them. ``--json`` prints one object with the keys ``python``,
``platform``, ``cpu_count``, ``packages`` (name -> version or null), ``cuda`` and ``features`` (name -> ``ok`` and
``reason``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

PACKAGES: dict[str, tuple[str, ...]] = {
    "effective-alignment": ("effective-alignment",),
    "torch": ("torch",),
    "transformers": ("transformers",),
    "trl": ("trl",),
    "peft": ("peft",),
    "accelerate": ("accelerate",),
    "datasets": ("datasets",),
    "deepspeed": ("deepspeed",),
    "hydra-core": ("hydra-core",),
    "submitit": ("submitit",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss"),
    "openai": ("openai",),
    "liger-kernel": ("liger-kernel", "liger-kernel-nightly"),
    "flash-attn": ("flash-attn", "flash_attn"),
    "vllm": ("vllm",),
    "bitsandbytes": ("bitsandbytes",),
}
"""Package shown -> the distributions that provide it (the first one installed gives the version)."""
INSTALL = {
    "flash-attn": "pip install flash-attn --no-build-isolation",
    "deepspeed": "pip install 'effective-alignment[deepspeed]'",
}
"""How to install a package, where it is more than ``pip install <name>``."""
NOT_INSTALLED = "not installed"
AMPERE = (8, 0)
"""Compute capability of the first GPUs with bf16 and FlashAttention-2 (A100, RTX 30xx)."""


@dataclass(frozen=True)
class Device:
    """One CUDA device as torch sees it."""

    index: int
    """``cuda:<index>``."""
    name: str
    """Product name."""
    memory_gib: float
    """Total memory."""
    compute_capability: str
    """``major.minor``."""
    bf16: bool
    """Whether it computes in bf16 (compute capability 8.0 or newer)."""


@dataclass(frozen=True)
class Feature:
    """Whether an optional path works here, and why (or why not)."""

    ok: bool
    """It will work on this machine."""
    reason: str
    """What it runs on, or what it needs that is missing."""


def package_versions() -> dict[str, str | None]:
    """Installed version of every package in :data:`PACKAGES` (None when absent), from package metadata."""
    versions: dict[str, str | None] = {}
    for shown, distributions in PACKAGES.items():
        versions[shown] = None
        for distribution in distributions:
            try:
                versions[shown] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def cuda_devices() -> list[Device]:
    """The CUDA devices torch sees; empty without CUDA (a CPU build, no driver, no GPU)."""
    import torch

    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        capability = (props.major, props.minor)
        devices.append(
            Device(
                index,
                props.name,
                round(props.total_memory / 1024**3, 1),
                f"{props.major}.{props.minor}",
                capability >= AMPERE,
            )
        )
    return devices


def cuda_summary(devices: list[Device]) -> dict[str, Any]:
    """The CUDA and cuDNN versions torch was built with, and the devices (``available`` false without one)."""
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None  # type: ignore[no-untyped-call]
    return {
        "available": bool(devices),
        "torch_cuda": torch.version.cuda,
        "cudnn": cudnn,
        "devices": [asdict(d) for d in devices],
    }


# --- the optional paths -------------------------------------------------------------------------------------------


def _needs(devices: list[Device], versions: dict[str, str | None], package: str) -> list[str]:
    """What a CUDA-only path lacks here: a CUDA device and the package."""
    missing = [] if devices else ["needs CUDA (torch sees no CUDA device)"]
    if versions[package] is None:
        missing.append(f"needs {package} ({INSTALL.get(package, f'pip install {package}')})")
    return missing


def _feature(missing: list[str], ok: str) -> Feature:
    return Feature(False, "; ".join(missing)) if missing else Feature(True, ok)


def bf16_feature(devices: list[Device]) -> Feature:
    """bf16 mixed precision: on a CUDA device of compute capability 8.0+."""
    if not devices:
        return Feature(False, "needs CUDA (torch sees no CUDA device); CPU runs train in fp32")
    old = [d for d in devices if not d.bf16]
    if old:
        names = ", ".join(f"cuda:{d.index} {d.name} ({d.compute_capability})" for d in old)
        return Feature(False, f"needs compute capability 8.0+, {names} has less: use method.fp16=true")
    return Feature(True, "every device computes in bf16 (method.bf16 turns on by itself)")


def liger_feature(devices: list[Device], versions: dict[str, str | None]) -> Feature:
    """Liger kernels: Triton on CUDA."""
    missing = _needs(devices, versions, "liger-kernel")
    if not missing and importlib.util.find_spec("triton") is None:
        missing.append("needs triton (installed with a CUDA build of torch)")
    return _feature(missing, f"liger-kernel {versions['liger-kernel']} on CUDA")


def flash_attn_feature(devices: list[Device], versions: dict[str, str | None]) -> Feature:
    """FlashAttention-2: CUDA, compute capability 8.0+, and an importable ``flash_attn``."""
    missing = _needs(devices, versions, "flash-attn")
    if devices and not all(d.bf16 for d in devices):
        missing.append("needs compute capability 8.0+ on every device")
    if not missing:
        try:
            importlib.import_module("flash_attn")
        except Exception as error:  # a build for another torch or CUDA fails here with an ImportError/OSError
            missing.append(f"flash_attn does not import: {type(error).__name__}: {error}")
    return _feature(missing, f"flash-attn {versions['flash-attn']} (model.attn_implementation=flash_attention_2)")


def vllm_feature(devices: list[Device], versions: dict[str, str | None]) -> Feature:
    """The vLLM engine: CUDA and the ``vllm`` package."""
    return _feature(_needs(devices, versions, "vllm"), f"vllm {versions['vllm']} (method.backend=vllm, vllm serve)")


def bitsandbytes_feature(devices: list[Device], versions: dict[str, str | None]) -> Feature:
    """4/8-bit loading and 8-bit optimizers: CUDA and ``bitsandbytes``."""
    version = versions["bitsandbytes"]
    return _feature(
        _needs(devices, versions, "bitsandbytes"), f"bitsandbytes {version} (model.quantization, adamw_8bit)"
    )


def deepspeed_cpu_adam_feature(versions: dict[str, str | None]) -> Feature:
    """DeepSpeed's CPU Adam (optimizer offload): a compatible op, prebuilt or JIT-built with c++ and ninja."""
    if versions["deepspeed"] is None:
        return Feature(False, f"needs deepspeed ({INSTALL['deepspeed']})")
    try:
        # DeepSpeed's logger writes to stdout (its accelerator probe warns on a CPU machine): keep --json clean.
        with contextlib.redirect_stdout(io.StringIO()):
            installed_ops = importlib.import_module("deepspeed.git_version_info").installed_ops
            builder = importlib.import_module("deepspeed.ops.op_builder").CPUAdamBuilder()
            compatible = builder.is_compatible(verbose=False)
    except Exception as error:  # DeepSpeed probes the accelerator on import, which can fail in many ways
        return Feature(False, f"deepspeed's op builder does not load: {type(error).__name__}: {error}")
    if not compatible:
        return Feature(False, "deepspeed reports the cpu_adam op incompatible with this machine")
    if installed_ops.get("cpu_adam"):
        return Feature(True, f"deepspeed {versions['deepspeed']}, cpu_adam prebuilt")
    tools = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
    if tools:
        return Feature(False, f"cpu_adam is not prebuilt and its first-use build needs {' and '.join(tools)}")
    return Feature(True, f"deepspeed {versions['deepspeed']}, cpu_adam builds on first use (c++ and ninja found)")


def features(devices: list[Device], versions: dict[str, str | None]) -> dict[str, Feature]:
    """Every optional path, in the order they are printed."""
    return {
        "bf16": bf16_feature(devices),
        "liger_kernel": liger_feature(devices, versions),
        "flash_attn": flash_attn_feature(devices, versions),
        "vllm": vllm_feature(devices, versions),
        "deepspeed_cpu_adam": deepspeed_cpu_adam_feature(versions),
        "bitsandbytes": bitsandbytes_feature(devices, versions),
    }


# --- the report ---------------------------------------------------------------------------------------------------


def report() -> dict[str, Any]:
    """The whole report as plain data (what ``--json`` prints)."""
    versions = package_versions()
    devices = cuda_devices()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "packages": versions,
        "cuda": cuda_summary(devices),
        "features": {name: asdict(feature) for name, feature in features(devices, versions).items()},
    }


def print_tables(data: dict[str, Any]) -> None:
    """The report as rich tables: packages, CUDA devices, optional paths."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"Python {data['python']} on {data['platform']}, {data['cpu_count']} CPUs")
    packages = Table(title="Packages")
    packages.add_column("package")
    packages.add_column("version")
    for name, version in data["packages"].items():
        packages.add_row(name, version or f"[dim]{NOT_INSTALLED}[/dim]")
    console.print(packages)
    cuda = data["cuda"]
    devices = Table(title=f"CUDA (torch built for {cuda['torch_cuda'] or 'no CUDA'}, cuDNN {cuda['cudnn'] or '-'})")
    for column in ("device", "name", "memory GiB", "compute capability", "bf16"):
        devices.add_column(column)
    for d in cuda["devices"]:
        devices.add_row(
            f"cuda:{d['index']}",
            d["name"],
            f"{d['memory_gib']:.1f}",
            d["compute_capability"],
            "yes" if d["bf16"] else "no",
        )
    if not cuda["devices"]:
        devices.add_row("-", "no CUDA device visible to torch", "", "", "")
    console.print(devices)
    paths = Table(title="Optional paths")
    for column in ("path", "works here", "why"):
        paths.add_column(column)
    for name, feature in data["features"].items():
        paths.add_row(name, "[green]yes[/green]" if feature["ok"] else "[red]no[/red]", feature["reason"])
    console.print(paths)


def main(argv: list[str] | None = None) -> int:
    """Print the report (tables, or JSON with ``--json``)."""
    parser = argparse.ArgumentParser(prog="python -m alignment.env", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args(argv)
    data = report()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print_tables(data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
