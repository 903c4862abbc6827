"""Dedup benchmark: planted near-duplicates in a clustered synthetic embedding set, every algorithm vs exact.

Data (seeded): ``--topics`` random unit directions; each background row is ``normalise(0.7 u_topic + 0.71 g)``
with g ~ N(0, I/d) (cosine ~0.5 inside a topic, ~0 across topics, like sentence embeddings of a mixed corpus).
Planted duplicates: ``--groups`` background rows each get 1-3 copies ``normalise(x + s g)`` at cosine ~U(0.92,
0.99) to their source; near misses: ``--near-misses`` pairs at cosine ~U(0.80, 0.88), which must be kept. Rows are
shuffled, so copies land anywhere.

Ground truth: the ``exact`` algorithm (every pair above the threshold, flat inner product, upper triangle in
blocks). Recall: planted (source, copy) pairs with a row removed / planted pairs. False removal: a removed row the
exact result keeps, or whose best cosine to a kept row is below the threshold (rate: / removed rows).

    .venv/bin/python bench/dedup_bench.py --rows 200000 --dim 384 --threads 2

prints a markdown table (wall and CPU seconds of the whole algorithm, map step in this process, FAISS CPU with
``--threads`` OpenMP threads).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from alignment.data.dedup_index import (
    Algorithm,
    DedupParams,
    DedupResult,
    Ints,
    deduplicate,
    default_num_cells,
    evaluate,
)


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def near(x: np.ndarray, cosine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit rows at about ``cosine`` (shape (m,)) to the unit rows ``x`` (shape (m, d))."""
    spread = np.sqrt(1 / cosine**2 - 1)[:, None]
    noise = rng.standard_normal(x.shape, dtype=np.float32) / np.sqrt(x.shape[1])
    return unit(x + spread * noise)


def synthetic(args: argparse.Namespace) -> tuple[np.ndarray, Ints]:
    """The shuffled rows (n, d) and the planted (source, copy) pairs (p, 2) in shuffled row ids."""
    rng = np.random.default_rng(args.seed)
    n, d = args.rows, args.dim
    copies = rng.integers(1, 4, size=args.groups)
    num_planted, num_misses = int(copies.sum()), args.near_misses
    base = n - num_planted - num_misses
    topics = unit(rng.standard_normal((args.topics, d), dtype=np.float32))
    noise = rng.standard_normal((base, d), dtype=np.float32) / np.sqrt(d)
    background = unit(0.7 * topics[rng.integers(0, args.topics, base)] + np.sqrt(1 - 0.49) * noise)
    sources = np.repeat(rng.choice(base, size=args.groups, replace=False), copies)
    planted = near(background[sources], rng.uniform(0.92, 0.99, num_planted), rng)
    miss_sources = rng.choice(base, size=num_misses, replace=False)
    misses = near(background[miss_sources], rng.uniform(0.80, 0.88, num_misses), rng)
    rows = np.concatenate([background, planted, misses])
    order = rng.permutation(n)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    pairs = np.stack([position[sources], position[base + np.arange(num_planted)]], axis=1)
    return np.ascontiguousarray(rows[order]), pairs


def row(name: str, result: Ints, seconds: str, pairs: int | str, truth: tuple[np.ndarray, Ints, Ints]) -> str:
    """One markdown table row; ``truth`` is (rows, exact representatives, planted pairs)."""
    x, exact, planted = truth
    ev = evaluate(x, result, exact, planted, threshold=0.9)
    return (
        f"| {name} | {len(result) - ev.removed} | {ev.removed} | {ev.recall:.4f} | "
        f"{ev.false_removals} ({ev.false_removal_rate:.2%}) | {ev.agreement:.5f} | {pairs} | {seconds} |"
    )


def timed(x: np.ndarray, params: DedupParams) -> tuple[DedupResult, str]:
    """Run one algorithm; its wall time and CPU time (the machine may be shared, so both are shown)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = deduplicate(x, params)
    return result, f"{time.perf_counter() - wall:.1f} / {time.process_time() - cpu:.1f}"


def main() -> None:
    """Build the set, run exact, routed (several probe counts) and sharded (per round), print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--topics", type=int, default=512)
    parser.add_argument("--groups", type=int, default=10_000)
    parser.add_argument("--near-misses", type=int, default=5_000)
    parser.add_argument("--shard-size", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--probes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import faiss

    faiss.omp_set_num_threads(args.threads)
    start = time.perf_counter()
    x, planted = synthetic(args)
    print(f"data: {x.shape[0]} x {x.shape[1]}, {len(planted)} planted pairs, {time.perf_counter() - start:.1f} s")
    exact, seconds = timed(x, DedupParams(algorithm=Algorithm.exact, seed=args.seed))
    truth = (x, exact.representative, planted)
    lines = [row("exact (ground truth)", exact.representative, seconds, exact.num_pairs, truth)]
    cells = default_num_cells(len(x))
    for probes in args.probes:
        routed, seconds = timed(x, DedupParams(algorithm=Algorithm.routed, num_probes=probes, seed=args.seed))
        name = f"routed, {probes} of {cells} cells probed"
        lines.append(row(name, routed.representative, seconds, routed.num_pairs, truth))
    sharded, seconds = timed(
        x, DedupParams(algorithm=Algorithm.sharded, shard_size=args.shard_size, num_rounds=args.rounds, seed=args.seed)
    )
    for i, representative in enumerate(sharded.history, start=1):
        name = f"sharded (original), shards of {args.shard_size}, after round {i}"
        shown = f"{seconds} (all rounds)" if i == len(sharded.history) else ""
        lines.append(row(name, representative, shown, sharded.num_pairs if shown else "", truth))
    print(f"\nmachine: {platform.processor() or platform.machine()}, FAISS threads {args.threads}\n")
    print(
        "| algorithm | kept | removed | planted recall | false removals | agreement with exact | pairs | wall / CPU s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
