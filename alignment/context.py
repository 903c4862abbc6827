"""Where a run writes and how it is named: derived from the Hydra job by the runner."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAILED = "failed"
"""``status`` in the ``results.json`` of a run that raised (with ``error``: its ``type`` and ``message``)."""


@dataclass(frozen=True)
class RunContext:
    """The run directory and the names trackers use; sweep jobs share a group."""

    output_dir: Path
    """Run directory (``outputs/<date>/<time>`` or ``multirun/<date>/<time>/<job>``)."""
    name: str
    """Run name: the job's overrides for a sweep job, the directory name otherwise."""
    group: str | None
    """Sweep name shared by every job of a multirun; None for a single run."""

    @property
    def results_file(self) -> Path:
        """``results.json``: the final metrics, or ``status: failed`` and the error of a run that raised."""
        return self.output_dir / "results.json"

    @property
    def checkpoint_dir(self) -> Path:
        """Trainer checkpoints (``checkpoint-<step>``), kept to resume an interrupted run."""
        return self.output_dir / "checkpoints"

    @property
    def model_dir(self) -> Path:
        """The trained model or adapter, with its tokenizer."""
        return self.output_dir / "model"


def read_results(path: Path) -> dict[str, Any] | None:
    """A run's ``results.json``; None when it is missing or unreadable (the writer was killed mid-write)."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) else None


def failure(results: dict[str, Any]) -> str | None:
    """``<Type>: <message>`` of a failed run's ``results.json`` contents; None for a finished run's."""
    if results.get("status") != FAILED:
        return None
    error = results.get("error") or {}
    return f"{error.get('type', 'Error')}: {error.get('message', '')}"
