"""Logged metrics over the union of all ranks' items: the combination by hand, and a real 2-rank gloo gather."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alignment.training.metrics import MetricSums, gather_from_ranks, real_items, union_means


def test_union_means_weigh_each_rank_by_its_items() -> None:
    """Rank 0 saw 1 item of value 4, rank 1 saw 3 items summing to 0: the union's mean is 4 / 4 = 1.

    The mean of the rank means would be (4 + 0) / 2 = 2. A key only one rank has is that rank's mean; a key
    without items is left out.
    """
    ranks = [{"a": (4.0, 1.0), "b": (3.0, 2.0), "none": (0.0, 0.0)}, {"a": (0.0, 3.0)}]
    assert union_means(ranks) == {"a": 1.0, "b": 1.5}


@pytest.mark.parametrize(
    ("items", "rank", "remainder", "last_batch", "kept"),
    [
        (2, 0, 1, True, 1),  # 5 items, batch 2, 2 ranks: the last round is [4, 0'] + [1', 2'], 1 real item
        (2, 1, 1, True, 0),
        (2, 0, 3, True, 2),  # 7 items: [4, 5] + [6, 0'], 3 real items
        (2, 1, 3, True, 1),
        (2, 1, 0, True, 2),  # no remainder: every item is real
        (2, 1, -1, True, 2),  # a loader without a length (token budgets): nothing to drop
        (2, 1, 1, False, 2),  # not the last batch
    ],
)
def test_real_items_of_the_last_evaluation_batch(
    items: int, rank: int, remainder: int, last_batch: bool, kept: int
) -> None:
    assert real_items(items, rank=rank, remainder=remainder, last_batch=last_batch) == kept


def test_metric_sums_add_up_per_mode_and_forget_on_pop() -> None:
    sums = MetricSums()
    sums.add("train", "x", 3.0, 1.0)
    sums.add("train", "x", 1.0, 3.0)
    sums.add("eval", "x", 10.0, 2.0)
    assert sums.pop("train") == {"x": 1.0}  # 4 / 4, not (3 + 1/3) / 2
    assert sums.pop("train") == {}
    assert sums.pop("eval") == {"x": 5.0}


def _rank(rank: int, port: int, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        sums = MetricSums()
        if rank == 0:  # one item of 4
            sums.add("eval", "a", 4.0, 1.0)
        else:  # three items summing to 0, and a key rank 0 does not have
            sums.add("eval", "a", 0.0, 3.0)
            sums.add("eval", "only_rank_1", 6.0, 3.0)
        # Different numbers of items per rank: gather_from_ranks must not need equal shapes.
        tensors = gather_from_ranks(torch.arange(1 + 2 * rank, dtype=torch.float32))
        results.put((rank, sums.pop("eval"), [t.tolist() for t in tensors]))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_log_the_mean_over_the_union_of_their_items() -> None:
    """Two real processes (gloo), 1 and 3 items: both get mean 1 (not 2, the mean of the rank means)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("fork")  # the children reuse these imports (spawn: seconds of imports per rank)
    results = context.Queue()
    processes = [context.Process(target=_rank, args=(rank, port, results)) for rank in range(2)]
    for process in processes:
        process.start()
    out = sorted(results.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    expected = {"a": 1.0, "only_rank_1": 2.0}
    assert out == [(0, expected, [[0.0], [0.0, 1.0, 2.0]]), (1, expected, [[0.0], [0.0, 1.0, 2.0]])]


def test_one_process_gathers_only_itself() -> None:
    assert gather_from_ranks({"a": 1}) == [{"a": 1}]
