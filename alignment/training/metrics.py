"""Logged metrics over every rank's items: per-key sums and item counts, combined across ranks once per log.

A trainer records, per micro-batch, each metric's sum over the items it saw and how many items that was
(:class:`MetricSums`). At log time every rank sends its sums to every other (one ``all_gather_object``, so ranks
may hold different keys and different item counts) and each metric becomes

    mean = Σ_ranks Σ_micro-batches sum / Σ_ranks Σ_micro-batches count,

the metric over the union of all ranks' items. That is not the mean of per-rank (or per-micro-batch) means, which
differs from it whenever ranks or micro-batches hold different numbers of items: token-budget micro-batches, the
short last batch of an evaluation. ``Trainer.log`` runs on every rank at the same points (training logs,
evaluations, the end of training), so the gather is made there, never inside ``compute_loss``.

The last batch of an evaluation on several ranks is filled up with repeated items so that every rank gets one
(accelerate's ``even_batches``); :func:`real_items` says how many of a rank's items in it are real, as accelerate's
``gather_for_metrics`` decides it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def union_means(per_rank: Iterable[Mapping[str, tuple[float, float]]]) -> dict[str, float]:
    """Each key's ``Σ sum / Σ count`` over the ranks' ``{key: (sum, count)}``; keys without items are left out."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for local in per_rank:
        for key, (total, count) in local.items():
            totals[key][0] += total
            totals[key][1] += count
    return {key: total / count for key, (total, count) in totals.items() if count > 0}


def gather_from_ranks(local: T) -> list[T]:
    """Every rank's ``local`` (picklable), in rank order; ``[local]`` without a process group of several ranks.

    A collective (``torch.distributed.all_gather_object``, what accelerate's ``gather_object`` runs): every rank
    must call it at the same point.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def real_items(items: int, *, rank: int, remainder: int, last_batch: bool) -> int:
    """How many of a rank's ``items`` in the current evaluation batch are real (the rest repeat earlier items).

    The batches of all ranks are concatenated in rank order and the last one keeps its first ``remainder`` items
    (dataset length modulo the global batch size; -1 or 0: nothing to drop), as ``gather_for_metrics`` does.
    """
    if not last_batch or remainder <= 0:
        return items
    return min(max(remainder - rank * items, 0), items)


class MetricSums:
    """Per mode (``train``/``eval``), each metric's sum and item count since the last log."""

    def __init__(self) -> None:
        self._sums: dict[str, dict[str, tuple[float, float]]] = {"train": {}, "eval": {}}

    def add(self, mode: str, key: str, total: float, count: float) -> None:
        """Add ``total`` over ``count`` items to ``key``."""
        previous = self._sums[mode].get(key, (0.0, 0.0))
        self._sums[mode][key] = (previous[0] + total, previous[1] + count)

    def pop(self, mode: str) -> dict[str, float]:
        """The means over every rank's items since the last log, then forgotten (a collective: call on all ranks)."""
        local, self._sums[mode] = self._sums[mode], {}
        return union_means(gather_from_ranks(local))
