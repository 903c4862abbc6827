"""Near-duplicate removal over L2-normalised embeddings (cosine = inner product), as map-reduce.

Semantics, shared by every algorithm here: rows are visited in input order; a row is **removed iff some kept row
earlier in that order has cosine >= threshold** with it, and it maps to the first such kept row (its
representative). Kept rows map to themselves. Chains A~B~C with A!~C keep A and C. The result depends only on the
set of pairs with cosine >= threshold, so each algorithm is a *map* (find pairs inside independent search tasks)
and a *reduce* (:func:`greedy_keep_first` over the union of the pairs); an algorithm is exact iff its map finds
every pair.

Algorithms (:class:`Algorithm`):

* ``exact``: every pair, by blocks of queries against the rows after them (upper triangle, flat inner product).
  O(n^2 d); the ground truth.
* ``sharded``: the original's ``faiss_deduplicate_mr_multistep`` (seed spec §13). Each round shuffles the
  surviving rows, cuts them into contiguous shards of ``shard_size`` and finds pairs inside each shard only;
  the survivors go to the next round. A duplicate pair is found only when both rows land in the same shard, so
  with s shards a pair is missed by one round with probability ~(1 - 1/s). Deviations from the original: keep-first
  follows input order (not the shuffled order), pairs at exactly the threshold count (FAISS returns ``> radius``),
  and a row whose representative is removed in a later round is remapped to that row's representative; this
  chain is why the baseline can remove a row whose cosine to every kept row is below the threshold.
* ``routed`` (the default): a coarse quantiser (k-means, ``num_cells`` centroids, trained on a sample) stores
  each row in its nearest cell and sends it as a query to its ``num_probes`` nearest cells: an inverted-file
  range search cut into per-cell tasks. Near vectors meet because they are routed by where they are, not by
  luck; a pair is missed only when neither row probes the other's cell. ``num_probes = num_cells`` is exact.

Definitions used by :func:`evaluate` (and the benchmark): *recall* is the fraction of planted duplicate pairs of
which at least one row was removed; a *false removal* is a removed row that the exact result keeps, or whose best
cosine to any kept row is below the threshold.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

Floats = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]
QUERY_BLOCK = 4096
"""Queries per FAISS call: bounds the range-search result buffers."""
KMEANS_ROWS_PER_CELL = 64
"""Training rows per k-means centroid for ``routed``."""


class Algorithm(StrEnum):
    """How the map step splits the search (see the module docstring)."""

    routed = "routed"
    sharded = "sharded"
    exact = "exact"


class SearchBackend(StrEnum):
    """What computes inner products inside a task."""

    faiss = "faiss"
    """FAISS flat inner-product range search on the CPU (OpenMP threads)."""
    torch = "torch"
    """Blocked matrix products with torch, on CUDA when available (FAISS GPU indexes have no range search)."""


@dataclass(frozen=True)
class SearchTask:
    """Find every pair (q, d), q in ``query_ids``, d in ``db_ids``, q != d, with cosine >= threshold."""

    query_ids: Ints
    """Row ids searched for, shape (q,)."""
    db_ids: Ints
    """Row ids searched in, shape (d,)."""

    @property
    def cost(self) -> int:
        """Inner products this task computes."""
        return len(self.query_ids) * len(self.db_ids)


MapTask = list[SearchTask]
"""One unit of parallel work (a thread, a process, a SLURM array element)."""
MapFn = Callable[[list[MapTask]], list[Ints]]
"""Runs map tasks (anywhere) and returns each task's pairs, shape (m, 2)."""


@dataclass
class DedupResult:
    """What every algorithm returns."""

    representative: Ints
    """Shape (n,): the kept row each row maps to (itself when kept)."""
    sizes: list[int] = field(default_factory=list)
    """Rows before the first round, then after each round (one round except for ``sharded``)."""
    num_pairs: int = 0
    """Pairs with cosine >= threshold found by the map step (all rounds)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per stage (``route``, ``map``, ``reduce``)."""
    history: list[Ints] = field(default_factory=list)
    """``sharded``: the representatives after each round (the last equals ``representative``)."""

    @property
    def keep(self) -> npt.NDArray[np.bool_]:
        """Shape (n,): True for kept rows."""
        return np.asarray(self.representative == np.arange(len(self.representative)))


# Map step: pairs inside one task.


def _range_faiss(queries: Floats, database: Floats, threshold: float) -> tuple[Ints, Ints, Floats]:
    import faiss

    index = faiss.IndexFlatIP(database.shape[1])
    index.add(database)
    # FAISS keeps similarities strictly above the radius; step one float below so cosine == threshold counts.
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    rows, cols, sims = [], [], []
    for start in range(0, len(queries), QUERY_BLOCK):
        lims, dist, idx = index.range_search(np.ascontiguousarray(queries[start : start + QUERY_BLOCK]), radius)
        rows.append(np.repeat(np.arange(len(lims) - 1, dtype=np.int64), np.diff(lims).astype(np.int64)) + start)
        cols.append(idx.astype(np.int64))
        sims.append(dist)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims)


def _range_torch(queries: Floats, database: Floats, threshold: float) -> tuple[Ints, Ints, Floats]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    db = torch.from_numpy(database).to(device)
    rows, cols, sims = [], [], []
    for start in range(0, len(queries), QUERY_BLOCK):
        sim = torch.from_numpy(queries[start : start + QUERY_BLOCK]).to(device) @ db.T
        r, c = torch.nonzero(sim >= threshold, as_tuple=True)
        rows.append((r + start).cpu().numpy().astype(np.int64))
        cols.append(c.cpu().numpy().astype(np.int64))
        sims.append(sim[r, c].cpu().numpy())
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims)


def _canonical(pairs: Ints) -> Ints:
    """Unique (i, j) with i < j, sorted by i then j, shape (m, 2)."""
    pairs = np.sort(pairs, axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def search_pairs(x: Floats, tasks: MapTask, threshold: float, backend: SearchBackend = SearchBackend.faiss) -> Ints:
    """The map step of one task: global row-id pairs (i < j) with ``x[i] . x[j] >= threshold``, shape (m, 2).

    ``x`` may be a memory-mapped array: only the rows the tasks name are read.
    """
    found = [np.zeros((0, 2), dtype=np.int64)]
    for task in tasks:
        if task.cost == 0:
            continue
        queries = np.ascontiguousarray(x[task.query_ids], dtype=np.float32)
        database = np.ascontiguousarray(x[task.db_ids], dtype=np.float32)
        rows, cols, sims = _RANGE_SEARCH[backend](queries, database, threshold)
        hit = sims >= threshold
        found.append(np.stack([task.query_ids[rows[hit]], task.db_ids[cols[hit]]], axis=1))
    return _canonical(np.concatenate(found))


def search_pairs_file(
    path: str, tasks: MapTask, threshold: float, backend: SearchBackend, threads: int | None = None
) -> Ints:
    """:func:`search_pairs` on a ``.npy`` file, memory-mapped: the entry point of a worker process or SLURM task.

    ``threads`` caps FAISS's OpenMP threads to the cores the task was given (it would otherwise use every core of
    the node, oversubscribing it when several tasks share one).
    """
    if threads is not None:
        import faiss

        faiss.omp_set_num_threads(threads)
    return search_pairs(np.load(path, mmap_mode="r", allow_pickle=False), tasks, threshold, backend)


def inline_map(x: Floats, threshold: float, backend: SearchBackend = SearchBackend.faiss, workers: int = 1) -> MapFn:
    """A :data:`MapFn` running the tasks in this process, ``workers`` at a time (FAISS releases the GIL)."""

    def run(tasks: list[MapTask]) -> list[Ints]:
        if workers <= 1:
            return [search_pairs(x, task, threshold, backend) for task in tasks]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda task: search_pairs(x, task, threshold, backend), tasks))

    return run


# Reduce step.


def greedy_keep_first(n: int, pairs: Ints) -> Ints:
    """Keep-first greedy over a pair list: the representative of each of ``n`` rows, shape (n,).

    Visits rows in id order; an unremoved row is kept and removes every unremoved later neighbour, which maps to
    it. ``pairs``: shape (m, 2), i < j, sorted by i (as :func:`search_pairs` returns them).
    """
    representative = np.arange(n, dtype=np.int64)
    removed = np.zeros(n, dtype=bool)
    if len(pairs) == 0:
        return representative
    pairs = _canonical(pairs)
    heads, starts = np.unique(pairs[:, 0], return_index=True)
    ends = np.append(starts[1:], len(pairs))
    for head, start, end in zip(heads.tolist(), starts.tolist(), ends.tolist(), strict=True):
        if removed[head]:
            continue
        later = pairs[start:end, 1]
        later = later[~removed[later]]
        removed[later] = True
        representative[later] = head
    return representative


def merge_pairs(parts: Sequence[Ints]) -> Ints:
    """Union of the pair lists of all map tasks (the reduce step's input)."""
    return _canonical(np.concatenate([np.zeros((0, 2), dtype=np.int64), *parts]))


# Task builders: how each algorithm splits the search.


def balance(tasks: Sequence[SearchTask], num_groups: int) -> list[MapTask]:
    """Pack search tasks into at most ``num_groups`` map tasks of similar cost (longest first, to the lightest)."""
    groups: list[MapTask] = [[] for _ in range(max(1, min(num_groups, len(tasks))))]
    load = [0] * len(groups)
    for task in sorted(tasks, key=lambda t: -t.cost):
        lightest = load.index(min(load))
        groups[lightest].append(task)
        load[lightest] += task.cost + 1
    return [g for g in groups if g]


def exact_tasks(n: int, block: int) -> list[SearchTask]:
    """Row blocks [s, s+block) against rows [s, n): every pair once, half of all products."""
    everything = np.arange(n, dtype=np.int64)
    return [SearchTask(everything[s : s + block], everything[s:]) for s in range(0, n, block)]


def shard_tasks(ids: Ints, shard_size: int, rng: np.random.Generator) -> list[SearchTask]:
    """The baseline's round: shuffle ``ids`` and cut contiguous shards of ``shard_size``, each searched in itself."""
    shuffled = rng.permutation(ids)
    shards = [np.sort(shuffled[s : s + shard_size]) for s in range(0, len(shuffled), shard_size)]
    return [SearchTask(shard, shard) for shard in shards]


def default_num_cells(n: int) -> int:
    """About 4 sqrt(n) cells, at least 39 training rows each (FAISS's k-means floor)."""
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def route_tasks(x: Floats, num_cells: int, num_probes: int, seed: int, gpu: bool = False) -> list[SearchTask]:
    """Inverted-file routing: cell c searches the rows probing c (queries) in the rows stored in c.

    Centroids come from 10 iterations of spherical k-means on up to 64 rows per cell (routing needs coarse cells,
    not converged ones); each row is stored in its nearest centroid
    and probes its ``num_probes`` nearest ones (its own included).
    """
    import faiss

    n, dim = x.shape
    cells = max(1, min(num_cells, n))
    probes = max(1, min(num_probes, cells))
    if cells == 1:
        return [SearchTask(np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64))]
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, cells * KMEANS_ROWS_PER_CELL), replace=False))
    kmeans = faiss.Kmeans(
        dim, cells, niter=10, seed=seed, spherical=True, gpu=gpu, max_points_per_centroid=KMEANS_ROWS_PER_CELL
    )
    kmeans.train(np.ascontiguousarray(x[sample], dtype=np.float32))
    centroids = kmeans.centroids
    assert centroids is not None
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(centroids)
    probed = np.concatenate(
        [
            quantizer.search(np.ascontiguousarray(x[s : s + QUERY_BLOCK], dtype=np.float32), probes)[1]
            for s in range(0, n, QUERY_BLOCK)
        ]
    ).astype(np.int64)
    stored = probed[:, 0]
    by_stored = np.argsort(stored, kind="stable")
    stored_bounds = np.searchsorted(stored[by_stored], np.arange(cells + 1))
    flat_cells = probed.ravel()
    flat_rows = np.repeat(np.arange(n, dtype=np.int64), probes)
    by_probe = np.argsort(flat_cells, kind="stable")
    probe_bounds = np.searchsorted(flat_cells[by_probe], np.arange(cells + 1))
    return [
        SearchTask(
            flat_rows[by_probe[probe_bounds[c] : probe_bounds[c + 1]]],
            by_stored[stored_bounds[c] : stored_bounds[c + 1]].astype(np.int64),
        )
        for c in range(cells)
    ]


# The algorithms.


@dataclass(frozen=True)
class DedupParams:
    """Knobs of :func:`deduplicate` (the tool's config maps onto these)."""

    threshold: float = 0.9
    """Cosine at or above which two rows are duplicates."""
    algorithm: Algorithm = Algorithm.routed
    """How the search is split (module docstring)."""
    shard_size: int = 100_000
    """``sharded``: rows per shard. ``routed``/``exact``: target rows per map task (sets the task count)."""
    num_rounds: int = 3
    """``sharded``: reshuffled rounds."""
    num_cells: int | None = None
    """``routed``: k-means cells; None: :func:`default_num_cells`."""
    num_probes: int = 8
    """``routed``: cells each row is searched in."""
    min_map_tasks: int = 1
    """At least this many map tasks (the parallelism of the map step)."""
    seed: int = 0
    """Seeds the shuffles and the k-means."""
    gpu: bool = False
    """Train the k-means on GPUs (faiss-gpu)."""


def _one_pass(n: int, tasks: list[SearchTask], params: DedupParams, map_fn: MapFn) -> tuple[Ints, int, float]:
    num_groups = max(params.min_map_tasks, math.ceil(n / params.shard_size))
    start = time.perf_counter()
    pairs = merge_pairs(map_fn(balance(tasks, num_groups)))
    return pairs, len(pairs), time.perf_counter() - start


def _sharded(x: Floats, params: DedupParams, map_fn: MapFn) -> DedupResult:
    n = len(x)
    representative = np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(params.seed)
    result = DedupResult(representative, sizes=[n], seconds={"map": 0.0, "reduce": 0.0})
    for _ in range(params.num_rounds):
        alive = np.flatnonzero(representative == np.arange(n))
        tasks = shard_tasks(alive, params.shard_size, rng)
        start = time.perf_counter()
        pairs = merge_pairs(map_fn(balance(tasks, max(params.min_map_tasks, len(tasks)))))
        result.seconds["map"] += time.perf_counter() - start
        start = time.perf_counter()
        step = greedy_keep_first(n, pairs)
        # Rows mapped to a row removed now follow it to its new representative (the original's chained mapping).
        representative = step[representative]
        result.seconds["reduce"] += time.perf_counter() - start
        result.num_pairs += len(pairs)
        result.sizes.append(int((representative == np.arange(n)).sum()))
        result.history.append(representative)
    result.representative = representative
    return result


def _single_pass(x: Floats, tasks: list[SearchTask], params: DedupParams, map_fn: MapFn) -> DedupResult:
    n = len(x)
    pairs, num_pairs, map_seconds = _one_pass(n, tasks, params, map_fn)
    start = time.perf_counter()
    representative = greedy_keep_first(n, pairs)
    reduce_seconds = time.perf_counter() - start
    kept = int((representative == np.arange(n)).sum())
    return DedupResult(representative, [n, kept], num_pairs, {"map": map_seconds, "reduce": reduce_seconds})


def deduplicate(x: Floats, params: DedupParams, map_fn: MapFn | None = None) -> DedupResult:
    """Deduplicate the rows of ``x`` (shape (n, d), L2-normalised) with the chosen algorithm.

    ``map_fn`` runs the map tasks (default: in this process, FAISS on the CPU); pass one built on submitit to
    spread them over processes or a SLURM job array.
    """
    if not 0 < params.threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {params.threshold}")
    map_fn = map_fn or inline_map(x, params.threshold)
    if params.algorithm is Algorithm.sharded:
        return _sharded(x, params, map_fn)
    start = time.perf_counter()
    if params.algorithm is Algorithm.routed:
        cells = params.num_cells or default_num_cells(len(x))
        tasks = route_tasks(x, cells, params.num_probes, params.seed, params.gpu)
    else:
        tasks = exact_tasks(len(x), QUERY_BLOCK)
    route_seconds = time.perf_counter() - start
    result = _single_pass(x, tasks, params, map_fn)
    result.seconds["route"] = route_seconds
    return result


# Evaluation against the exact result (tests and the benchmark).


@dataclass(frozen=True)
class Evaluation:
    """A result compared with the exact one."""

    recall: float
    """Planted duplicate pairs with at least one row removed / planted pairs."""
    false_removals: int
    """Removed rows the exact result keeps, or whose best cosine to a kept row is below the threshold."""
    false_removal_rate: float
    """``false_removals`` / removed rows."""
    removed: int
    """Rows removed."""
    agreement: float
    """Fraction of rows whose keep/remove decision equals the exact one."""


def best_kept_similarity(x: Floats, keep: npt.NDArray[np.bool_], rows: Ints, block: int = QUERY_BLOCK) -> Floats:
    """For each of ``rows``, its highest cosine to any kept row other than itself, shape (len(rows),)."""
    import faiss

    kept_ids = np.flatnonzero(keep)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(x[kept_ids], dtype=np.float32))
    best = np.full(len(rows), -np.inf, dtype=np.float32)
    for s in range(0, len(rows), block):
        sims, idx = index.search(np.ascontiguousarray(x[rows[s : s + block]], dtype=np.float32), 2)
        self_hit = kept_ids[idx] == rows[s : s + block, None]
        best[s : s + block] = np.where(self_hit[:, 0], sims[:, 1], sims[:, 0])
    return best


def evaluate(x: Floats, result: Ints, exact: Ints, planted: Ints, threshold: float) -> Evaluation:
    """Compare the representatives ``result`` with the ``exact`` ones; ``planted``: duplicate pairs, shape (p, 2)."""
    n = len(result)
    keep = result == np.arange(n)
    exact_keep = exact == np.arange(n)
    removed = np.flatnonzero(~keep)
    too_far = best_kept_similarity(x, keep, removed) < threshold if len(removed) else np.zeros(0, dtype=bool)
    false = exact_keep[removed] | too_far
    caught = ~keep[planted[:, 0]] | ~keep[planted[:, 1]]
    return Evaluation(
        recall=float(caught.mean()) if len(planted) else 1.0,
        false_removals=int(false.sum()),
        false_removal_rate=float(false.mean()) if len(removed) else 0.0,
        removed=len(removed),
        agreement=float((keep == exact_keep).mean()),
    )


def save_embeddings(x: Floats, path: Path) -> str:
    """Write ``x`` as a ``.npy`` (no pickle) for worker processes to memory-map; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
    return str(path)


_RANGE_SEARCH: dict[SearchBackend, Callable[[Floats, Floats, float], tuple[Ints, Ints, Floats]]] = {
    SearchBackend.faiss: _range_faiss,
    SearchBackend.torch: _range_torch,
}
