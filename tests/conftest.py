"""Shared fixtures: offline environment, the embedded tokenizer/models, Hydra compose, and launch.py runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Tests never reach the network: hub libraries offline, trackers offline, and any non-loopback connect fails.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
_real_connect = socket.socket.connect


def _loopback_only(self: socket.socket, address: Any) -> Any:
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        if host not in ("localhost", "::1") and not str(host).startswith("127."):
            raise OSError(f"test tried to reach the network: {address!r}")
    return _real_connect(self, address)


socket.socket.connect = _loopback_only  # type: ignore[method-assign]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.gpu`` tests skip, before their fixtures, where torch sees no CUDA device."""
    if item.get_closest_marker("gpu") is not None:
        import torch  # only for GPU tests: collecting the others imports no ML stack

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device (marker gpu)")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Folder of the embedded SmolLM2-135M-Instruct (built once into the project cache)."""
    from alignment.models.embedded import resolve

    return resolve("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_random_path() -> str:
    """Folder of the 2-layer random Llama with SmolLM2's tokenizer."""
    from alignment.models.embedded import resolve

    return resolve("embedded:tiny-random-llama")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path: str) -> Any:
    """SmolLM2's tokenizer (ChatML template, fast)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture
def compose() -> Iterator[Any]:
    """``compose(overrides) -> DictConfig`` against conf/, with the schemas registered."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from alignment.registry import register_configs

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):

        def _compose(overrides: list[str] | None = None) -> Any:
            return hydra_compose("config", overrides=overrides or [])

        yield _compose


def launch(
    args: list[str], *, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real ``launch.py`` in a subprocess from ``cwd`` (so outputs/ and multirun/ land there).

    ``env``: variables set on top of this process's environment (e.g. ``HYDRA_FULL_ERROR``).
    """
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def local_server(tiny_random_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The local OpenAI-compatible server on the tiny random model, on a free loopback port.

    Yields its base URL ``http://127.0.0.1:<port>/v1``. The served name is ``embedded:tiny-random-llama``, so a
    run with ``model=tiny_random`` asks for the right model.
    """
    from alignment.inference.server import running_server

    log_path = tmp_path_factory.mktemp("local_server") / "server.log"
    # One torch thread: on a shared CPU, more threads than free cores slow generate ~10x.
    with running_server("embedded:tiny-random-llama", extra_args=["--threads", "1"], log_path=log_path) as base_url:
        yield base_url
