"""Where a run writes and how it is named: derived from the Hydra job by the runner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
    def checkpoint_dir(self) -> Path:
        """Trainer checkpoints (``checkpoint-<step>``), kept to resume an interrupted run."""
        return self.output_dir / "checkpoints"

    @property
    def model_dir(self) -> Path:
        """The trained model or adapter, with its tokenizer."""
        return self.output_dir / "model"
