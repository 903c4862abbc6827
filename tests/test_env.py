"""``python -m alignment.env``: the real versions and devices of this machine, and why each optional path works or not.

The report runs as a subprocess, as a user runs it; the rules behind the verdicts are checked on made-up devices, so
the GPU cases are covered on a CPU machine too.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from typing import Any

import pytest
import torch
import transformers

from alignment import env
from alignment.env import Device
from tests.conftest import ROOT

# Import name of each optional package the report covers.
MODULES = {"liger-kernel": "liger_kernel", "flash-attn": "flash_attn", "vllm": "vllm", "bitsandbytes": "bitsandbytes"}
H100 = Device(0, "NVIDIA H100 80GB HBM3", 79.2, "9.0", bf16=True)
V100 = Device(1, "Tesla V100-SXM2-32GB", 31.7, "7.0", bf16=False)


@pytest.fixture(scope="module")
def reported() -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "alignment.env", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_json_has_every_key_and_the_real_versions(reported: dict[str, Any]) -> None:
    assert set(reported) == {"python", "platform", "cpu_count", "packages", "cuda", "features"}
    assert list(reported["packages"]) == list(env.PACKAGES)
    assert reported["python"] == sys.version.split()[0]
    assert reported["packages"]["torch"] == torch.__version__
    assert reported["packages"]["transformers"] == transformers.__version__
    for package, module in MODULES.items():  # null exactly where the package is absent
        assert (reported["packages"][package] is None) == (importlib.util.find_spec(module) is None), package
    assert list(reported["features"]) == [
        "bf16",
        "liger_kernel",
        "flash_attn",
        "vllm",
        "deepspeed_cpu_adam",
        "bitsandbytes",
    ]
    assert all(set(f) == {"ok", "reason"} and f["reason"] for f in reported["features"].values())
    assert reported["cuda"]["available"] == torch.cuda.is_available()
    assert len(reported["cuda"]["devices"]) == torch.cuda.device_count()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU verdicts")
def test_on_a_cpu_machine_the_cuda_paths_say_they_need_cuda(reported: dict[str, Any]) -> None:
    features = reported["features"]
    for name in ("bf16", "liger_kernel", "flash_attn", "vllm", "bitsandbytes"):
        assert not features[name]["ok"], name
        assert features[name]["reason"].startswith("needs CUDA (torch sees no CUDA device)"), name
    assert reported["cuda"] == {"available": False, "torch_cuda": torch.version.cuda, "cudnn": None, "devices": []}


def test_tables_name_packages_devices_and_paths(capsys: pytest.CaptureFixture[str]) -> None:
    env.print_tables(
        {
            "python": "3.11.7",
            "platform": "Linux",
            "cpu_count": 16,
            "packages": {"torch": "2.13.0", "vllm": None},
            "cuda": {"torch_cuda": "12.8", "cudnn": 91000, "devices": [vars(H100)]},
            "features": {"flash_attn": {"ok": False, "reason": "needs flash-attn"}},
        }
    )
    printed = capsys.readouterr().out
    for text in ("Packages", "2.13.0", "not installed", "CUDA (torch built for 12.8", "H100", "79.2", "9.0"):
        assert text in printed, text
    assert "flash_attn" in printed
    assert "needs flash-attn" in printed


# --- the verdicts on made-up machines -----------------------------------------------------------------------------


def _versions(**installed: str) -> dict[str, str | None]:
    return {name: installed.get(name.replace("-", "_")) for name in env.PACKAGES}


def test_bf16_needs_an_ampere_or_newer_gpu() -> None:
    assert env.bf16_feature([H100]).ok
    old = env.bf16_feature([H100, V100])
    assert not old.ok
    assert (
        old.reason == "needs compute capability 8.0+, cuda:1 Tesla V100-SXM2-32GB (7.0) has less: use method.fp16=true"
    )


def test_cuda_paths_on_a_gpu_need_their_package() -> None:
    missing = env.vllm_feature([H100], _versions())
    assert (missing.ok, missing.reason) == (False, "needs vllm (pip install vllm)")
    assert env.vllm_feature([H100], _versions(vllm="0.11.0")) == env.Feature(
        True, "vllm 0.11.0 (method.backend=vllm, vllm serve)"
    )
    assert env.bitsandbytes_feature([H100], _versions(bitsandbytes="0.48.0")).ok
    assert not env.bitsandbytes_feature([], _versions(bitsandbytes="0.48.0")).ok


def test_flash_attention_needs_ampere_and_a_build_that_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    old = env.flash_attn_feature([V100], _versions(flash_attn="2.8.3"))
    assert (old.ok, old.reason) == (False, "needs compute capability 8.0+ on every device")

    def broken(name: str) -> Any:
        raise ImportError("undefined symbol: _ZN3c104cuda9SetDeviceEi")

    monkeypatch.setattr(env.importlib, "import_module", broken)
    mismatched = env.flash_attn_feature([H100], _versions(flash_attn="2.8.3"))
    assert not mismatched.ok
    assert mismatched.reason == "flash_attn does not import: ImportError: undefined symbol: _ZN3c104cuda9SetDeviceEi"
