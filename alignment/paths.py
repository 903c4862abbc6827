"""Where the project keeps what it builds once and reuses (the embedded models)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "ALIGNMENT_CACHE_DIR"


def cache_dir() -> Path:
    """Return the project cache folder: ``$ALIGNMENT_CACHE_DIR`` or ``~/.cache/effective-alignment``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "effective-alignment"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
