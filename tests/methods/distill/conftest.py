"""What the distillation tests share: a few conversations of different lengths and a one-step SGD run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from alignment.methods.distill import distill
from tests.methods.helpers import ONE_SGD_STEP, Loaded, run_method, trainable

ROWS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, of course."}],
    [
        {"role": "user", "content": "Name a colour"},
        {"role": "assistant", "content": "Blue, like the sky on a clear summer day."},
    ],
    [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "y"},
        {"role": "user", "content": "z"},
        {"role": "assistant", "content": "a second turn with several more tokens"},
    ],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}],
]


@pytest.fixture
def rows_file(tmp_path: Path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in ROWS), encoding="utf-8")
    return path


def data(path: Path) -> list[str]:
    return [f"data.sources=[{{path:'{path}'}}]"]


def one_step(compose: Any, out: Path, rows_file: Path, loaded: Loaded, overrides: list[str]) -> dict[str, Any]:
    """One SGD step of ``method=distill``: its metrics, first logged step, and the student's weights after/before.

    The student is the run's first loaded model (a teacher in memory is loaded after it).
    """
    start = len(loaded.models)
    metrics = run_method(distill.run, compose, out, [*ONE_SGD_STEP, "method=distill", *data(rows_file), *overrides])
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    step = next(e for e in logs if "loss" in e)
    student, initial = loaded.models[start], loaded.initials[start]
    return {"metrics": metrics, "step": step, "params": trainable(student), "initial": initial}


def assert_params_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(a, key=lambda n: (a[n] - b[n]).abs().max().item())
    assert torch.allclose(a[worst], b[worst], rtol=0, atol=atol), (worst, (a[worst] - b[worst]).abs().max().item())
