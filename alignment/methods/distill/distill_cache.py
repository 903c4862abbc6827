"""Precompute a distillation teacher's outputs once: ``python launch.py method=distill_cache ...``.

The settings are those of ``method=distill`` (same fields, same defaults), so a later ``method=distill
method.teacher_source=cache`` with the same teacher, data and settings finds the cache ("cache hit" in its log);
sweep jobs share it too. Per split it writes safetensors shards under ``<cache>/reference_logps/`` keyed by a
fingerprint of the teacher (path, revision, dtype), the token ids and labels, ``max_length``, ``tokens`` and the
format (plus ``cache_topk`` and ``temperature`` for ``topk``), and ``cache.json`` in the run directory with the keys,
tokens, bytes per token and (``topk``) the teacher mass the top k capture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignment.methods.distill.distill import DistillConfig, TeacherSource

if TYPE_CHECKING:
    from alignment.config import RunConfig
    from alignment.context import RunContext


@dataclass
class DistillCacheConfig(DistillConfig):
    """Precompute a teacher cache (the ``teacher_source=cache`` of ``method=distill`` with the same settings)."""

    name: str = "distill_cache"
    """Registry key."""
    teacher_source: TeacherSource = TeacherSource.cache
    """Always ``cache`` for this tool."""


def run(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Compute (or find) the teacher cache of every split and report its size; trains nothing."""
    from alignment.methods.distill.trainer import run_cache_tool

    return run_cache_tool(cfg, ctx)
