"""Dedup algorithms: hand-checkable clusters, agreement with a brute-force reference, the baseline's misses.

The reference is written independently of the library: a full cosine matrix in numpy and a plain Python loop
implementing "a row is removed iff an earlier kept row has cosine >= threshold; it maps to the first such row".
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from alignment.data.dedup_index import (
    Algorithm,
    DedupParams,
    SearchBackend,
    SearchTask,
    balance,
    deduplicate,
    evaluate,
    exact_tasks,
    greedy_keep_first,
    inline_map,
    route_tasks,
    save_embeddings,
    search_pairs,
    search_pairs_file,
)

faiss = pytest.importorskip("faiss")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """One OpenMP thread: the sets are small and the CI machine is shared (spinning threads only slow it down)."""
    faiss.omp_set_num_threads(1)


def brute_force(x: np.ndarray, threshold: float) -> np.ndarray:
    """Reference representatives from the full similarity matrix."""
    sim = x.astype(np.float64) @ x.astype(np.float64).T
    representative = np.arange(len(x))
    kept = np.zeros(len(x), dtype=bool)
    for i in range(len(x)):
        earlier = np.flatnonzero(kept[:i] & (sim[i, :i] >= threshold))
        if len(earlier):
            representative[i] = earlier[0]
        else:
            kept[i] = True
    return representative


def angles(degrees: list[float], dim: int = 8, plane: int = 0) -> np.ndarray:
    """Unit vectors in the (2 plane, 2 plane + 1) coordinate plane at the given angles."""
    x = np.zeros((len(degrees), dim), dtype=np.float32)
    for i, deg in enumerate(degrees):
        x[i, 2 * plane] = math.cos(math.radians(deg))
        x[i, 2 * plane + 1] = math.sin(math.radians(deg))
    return x


def hand_set() -> tuple[np.ndarray, np.ndarray]:
    """Three groups in orthogonal planes, interleaved, with the representatives worked out by hand.

    Plane 0, rows 0, 3, 6: angles 0, 10, 5 (cosines 0.985, 0.996, 0.996) -> 3 and 6 map to 0.
    Plane 1, rows 1, 4, 7: a chain at 0, 18, 36 (cos 18 = 0.951, cos 36 = 0.809) -> 4 maps to 1, 7 is kept.
    Plane 2, rows 2, 5: angles 0 and 30 (cos 0.866 < 0.9) -> both kept.
    """
    x = np.zeros((8, 8), dtype=np.float32)
    x[[0, 3, 6]] = angles([0, 10, 5], plane=0)
    x[[1, 4, 7]] = angles([0, 18, 36], plane=1)
    x[[2, 5]] = angles([0, 30], plane=2)
    return x, np.array([0, 1, 2, 0, 1, 5, 0, 7])


def planted(n: int, dim: int, copies: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random unit rows with ``copies`` near-duplicates (cosine ~0.95) of random rows at random positions."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    source = rng.choice(n, copies, replace=False)
    target = rng.choice(np.setdiff1d(np.arange(n), source), copies, replace=False)
    noisy = x[source] + 0.3 * rng.standard_normal((copies, dim)).astype(np.float32) / math.sqrt(dim)
    x[target] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return x, np.stack([source, target], axis=1)


ALL = [
    DedupParams(algorithm=Algorithm.exact),
    DedupParams(algorithm=Algorithm.routed),
    DedupParams(algorithm=Algorithm.routed, num_cells=4, num_probes=4),
    DedupParams(algorithm=Algorithm.sharded, shard_size=100, num_rounds=1),
]


def test_greedy_keep_first_by_hand() -> None:
    """Pairs 0-1, 1-2, 3-4, 0-4: 1 and 4 go to 0; 2 stays (its only neighbour 1 was removed); 3 stays."""
    pairs = np.array([[0, 1], [1, 2], [3, 4], [0, 4]])
    assert greedy_keep_first(5, pairs).tolist() == [0, 0, 2, 3, 0]
    assert greedy_keep_first(3, np.zeros((0, 2), dtype=np.int64)).tolist() == [0, 1, 2]
    # Order of the pair list and (j, i) spellings do not matter.
    assert greedy_keep_first(5, pairs[::-1, ::-1]).tolist() == [0, 0, 2, 3, 0]


@pytest.mark.parametrize("params", ALL, ids=lambda p: f"{p.algorithm}-{p.num_cells}-{p.num_rounds}")
def test_hand_checkable_clusters(params: DedupParams) -> None:
    """Every algorithm gives the hand-worked result when the whole set fits one shard / few cells."""
    x, expected = hand_set()
    assert brute_force(x, 0.9).tolist() == expected.tolist()
    assert deduplicate(x, params).representative.tolist() == expected.tolist()


@pytest.mark.parametrize("backend", list(SearchBackend))
def test_threshold_is_inclusive(backend: SearchBackend) -> None:
    """Cosine exactly at the threshold counts as a duplicate (FAISS itself keeps only > radius)."""
    x = np.array([[1.0, 0.0], [0.5, math.sqrt(0.75)], [-1.0, 0.0]], dtype=np.float32)
    task = [SearchTask(np.arange(3), np.arange(3))]
    assert search_pairs(x, task, 0.5, backend).tolist() == [[0, 1]]
    assert np.array_equal(search_pairs(x, task, 0.5, backend), search_pairs(x, task, 0.5, SearchBackend.faiss))


@pytest.mark.parametrize("params", ALL[:3], ids=["exact", "routed-default", "routed-all-cells"])
def test_global_algorithms_equal_brute_force(params: DedupParams) -> None:
    """Exact and routed give brute force's representatives on 2000 random rows with 200 planted duplicates."""
    x, _ = planted(2000, 32, 200, seed=1)
    expected = brute_force(x, 0.9)
    assert (expected != np.arange(len(x))).sum() >= 200
    assert np.array_equal(deduplicate(x, params).representative, expected)


def test_routed_with_all_cells_probed_is_exact_on_clustered_data() -> None:
    """Probing every cell is the exact search whatever the clustering; one probe may miss pairs across cells."""
    x, pairs = planted(3000, 16, 300, seed=2)
    expected = brute_force(x, 0.9)
    every = deduplicate(x, DedupParams(algorithm=Algorithm.routed, num_cells=16, num_probes=16))
    assert np.array_equal(every.representative, expected)
    one = deduplicate(x, DedupParams(algorithm=Algorithm.routed, num_cells=16, num_probes=1))
    assert one.num_pairs <= every.num_pairs
    assert 0.5 < evaluate(x, one.representative, expected, pairs, 0.9).recall < 1


def test_sharded_baseline_misses_cross_shard_duplicates_and_more_rounds_find_more() -> None:
    """20 shards: one round finds about 1/20 of the planted pairs; every later round adds some, never false ones."""
    x, pairs = planted(4000, 32, 400, seed=3)
    exact = brute_force(x, 0.9)
    params = DedupParams(algorithm=Algorithm.sharded, shard_size=200, num_rounds=6, seed=0)
    result = deduplicate(x, params)
    recalls = [evaluate(x, rep, exact, pairs, 0.9).recall for rep in result.history]
    assert recalls[0] < 0.2
    assert all(b > a for a, b in itertools.pairwise(recalls))
    assert recalls[-1] < 0.5  # six rounds of 20 shards still miss most
    assert result.sizes == sorted(result.sizes, reverse=True)
    assert len(result.sizes) == 7
    # One shard holding everything is the exact algorithm.
    whole = deduplicate(x, DedupParams(algorithm=Algorithm.sharded, shard_size=4000, num_rounds=1))
    assert np.array_equal(whole.representative, exact)


@pytest.mark.parametrize("params", ALL, ids=lambda p: f"{p.algorithm}-{p.num_cells}-{p.num_rounds}")
def test_deterministic_under_seed(params: DedupParams) -> None:
    """The same seed gives the same result; the mapping always points at kept rows."""
    x, _ = planted(1500, 16, 150, seed=4)
    first = deduplicate(x, params).representative
    assert np.array_equal(first, deduplicate(x, params).representative)
    assert np.all(first[first] == first)


@pytest.mark.parametrize("params", ALL[:3], ids=["exact", "routed-default", "routed-all-cells"])
def test_mapping_consistent(params: DedupParams) -> None:
    """Every removed row maps to a kept row before it with cosine >= threshold; kept rows have no kept neighbour."""
    x, _ = planted(2000, 16, 300, seed=5)
    rep = deduplicate(x, params).representative
    removed = np.flatnonzero(rep != np.arange(len(x)))
    assert len(removed) >= 290
    assert np.all(rep[rep] == rep)
    assert np.all(rep[removed] < removed)
    assert np.all(np.einsum("ij,ij->i", x[removed], x[rep[removed]]) >= 0.9)
    kept = x[rep == np.arange(len(x))]
    sim = kept @ kept.T
    np.fill_diagonal(sim, 0)
    assert sim.max() < 0.9


def test_sharded_chain_remaps_to_a_kept_row() -> None:
    """A row whose representative is removed in a later round follows it (the original's chained mapping)."""
    x, _ = planted(2000, 16, 400, seed=6)
    rep = deduplicate(x, DedupParams(algorithm=Algorithm.sharded, shard_size=100, num_rounds=4)).representative
    assert np.all(rep[rep] == rep)


def test_evaluate_by_hand() -> None:
    """Chain 0~1~2 (0!~2): the exact result removes 1; removing 2 instead is a false removal and misses pair 0-1."""
    x = angles([0, 18, 36])
    exact = np.array([0, 0, 2])
    planted_pairs = np.array([[0, 1]])
    assert evaluate(x, exact, exact, planted_pairs, 0.9).recall == 1.0
    wrong = evaluate(x, np.array([0, 1, 1]), exact, planted_pairs, 0.9)
    assert (wrong.recall, wrong.false_removals, wrong.removed) == (0.0, 1, 1)
    assert wrong.agreement == pytest.approx(1 / 3)
    # Removing 2 while 1 is also removed: 2's best kept cosine (to 0) is 0.81 < 0.9, another false removal.
    chained = evaluate(x, np.array([0, 0, 0]), exact, planted_pairs, 0.9)
    assert (chained.false_removals, chained.false_removal_rate) == (1, 0.5)


def test_tasks_cover_every_pair_once() -> None:
    """Exact tasks are the upper triangle; routed tasks with every cell probed meet every pair; balance keeps all."""
    triangle = exact_tasks(10, 4)
    assert [(t.query_ids.tolist()[0], len(t.db_ids)) for t in triangle] == [(0, 10), (4, 6), (8, 2)]
    x, _ = planted(500, 8, 50, seed=7)
    routed = route_tasks(x, num_cells=5, num_probes=5, seed=0)
    assert sorted(np.concatenate([t.db_ids for t in routed]).tolist()) == list(range(500))
    assert all(len(t.query_ids) == 500 for t in routed)
    groups = balance(routed, 2)
    assert len(groups) == 2
    assert sum(len(g) for g in groups) == 5


def test_memory_mapped_workers_and_threads_agree(tmp_path: pytest.TempPathFactory) -> None:
    """A worker reading the saved .npy (as a process or SLURM task does) and the thread pool find the same pairs."""
    x, _ = planted(1000, 16, 100, seed=8)
    tasks = [exact_tasks(1000, 256)]
    path = save_embeddings(x, tmp_path / "x.npy")  # type: ignore[operator]
    from_file = search_pairs_file(path, tasks[0], 0.9, SearchBackend.faiss)
    threaded = inline_map(x, 0.9, workers=2)([[t] for t in tasks[0]])
    assert np.array_equal(from_file, np.unique(np.concatenate(threaded), axis=0))
    assert len(from_file) >= 100
