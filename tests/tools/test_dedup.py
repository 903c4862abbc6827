"""The dedup tool: launch.py end to end (planted duplicates, demo data), precomputed embeddings, bad input.

Hand-checked set: rows 2 and 4 restate rows 0 and 1 (punctuation/case only; MiniLM is uncased, cosine > 0.95),
the rest are unrelated, so the result is "remove 2 -> 0 and 4 -> 1" whatever the algorithm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from alignment.config import to_run_config
from alignment.context import RunContext
from alignment.data.validate import DataError
from alignment.tools import dedup
from tests.conftest import launch

pytest.importorskip("faiss")

TEXTS = [
    "The cat sits on the mat.",
    "How do I bake sourdough bread at home?",
    "The cat sits on the mat!",
    "Stock markets fell sharply today.",
    "how do I bake sourdough bread at home",
    "Quantum computers use qubits instead of bits.",
]
REMOVED = {2: 0, 4: 1}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _planted(tmp_path: Path) -> Path:
    return _write_jsonl(tmp_path / "texts.jsonl", [{"id": i, "text": t} for i, t in enumerate(TEXTS)])


def _check_outputs(out: Path, source: Path, rows: int) -> None:
    """Kept rows with all their columns in input order; removed rows mapped to their kept twin; stats match."""
    kept = _read_jsonl(out / "deduplicated.jsonl")
    assert kept == [{"id": i, "text": TEXTS[i]} for i in range(rows) if i not in REMOVED]
    removed = _read_jsonl(out / "removed.jsonl")
    assert {r["row"]: r["kept_row"] for r in removed} == REMOVED
    assert all(r["similarity"] >= 0.9 for r in removed)
    assert removed[0]["origin"] == f"{source}:3"
    assert removed[0]["kept_origin"] == f"{source}:1"
    assert np.load(out / "representative.npy").tolist() == [REMOVED.get(i, i) for i in range(rows)]
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    stats = json.loads((out / "dedup_stats.json").read_text())
    assert stats["sizes"][0] == rows
    assert stats["sizes"][-1] == rows - 2
    assert stats["dedup/rows_removed"] == 2.0
    if results is not None:
        assert results["dedup/rows_kept"] == rows - 2


def _run(compose: Any, out: Path, overrides: list[str]) -> dict[str, float]:
    cfg = to_run_config(compose(["method=dedup", *overrides]))
    return dedup.run(cfg, RunContext(out, "test", None))


def test_schema_defaults(compose: Any) -> None:
    """``method=dedup`` composes to the typed schema with the routed algorithm at cosine 0.9."""
    run = to_run_config(compose(["method=dedup"]))
    assert isinstance(run.method, dedup.DedupConfig)
    assert (run.method.algorithm.value, run.method.threshold, run.method.map_backend.value) == (
        "routed",
        0.9,
        "threads",
    )
    with pytest.raises(Exception, match="embedding_column or embeddings_path"):
        to_run_config(compose(["method=dedup", "method.embedding_column=e", "method.embeddings_path=x.npy"]))


@pytest.mark.slow
def test_launch_planted_duplicates_with_submitit_local_map(tmp_path: Path) -> None:
    """launch.py method=dedup on a JSONL: MiniLM embeddings, map step as submitit local processes."""
    source = _planted(tmp_path)
    result = launch(
        [
            "method=dedup",
            "method.text_column=text",
            "method.map_backend=local",
            "method.num_workers=2",
            "method.cpus_per_task=1",
            f"data.sources=[{{path:'{source}'}}]",
            "hydra.run.dir=run",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _check_outputs(tmp_path / "run", source, len(TEXTS))
    # Six rows make one routed cell, so one map task ran as a submitit local job.
    assert len(list((tmp_path / "run" / "dedup_work" / "submitit").glob("*_result.pkl"))) == 1


@pytest.mark.slow
def test_launch_demo_data(tmp_path: Path) -> None:
    """The default data (1000 demo conversations): every row kept or mapped to a kept row at cosine >= 0.9."""
    result = launch(["method=dedup", "method.algorithm=exact", "hydra.run.dir=run"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run"
    kept = _read_jsonl(out / "deduplicated.jsonl")
    removed = _read_jsonl(out / "removed.jsonl")
    assert len(kept) + len(removed) == 1000
    assert set(kept[0]) == {"messages", "prompt", "chosen", "rejected"}
    representative = np.load(out / "representative.npy")
    assert all(representative[r["kept_row"]] == r["kept_row"] and r["similarity"] >= 0.9 for r in removed)
    assert all(r["kept_row"] < r["row"] for r in removed)
    results = json.loads((out / "results.json").read_text())
    assert results["dedup/rows_kept"] == len(kept)


@pytest.mark.parametrize(
    "overrides",
    [["method.algorithm=exact", "method.map_backend=debug"], ["method.algorithm=sharded", "method.shard_size=3"]],
    ids=["exact-submitit-debug", "sharded"],
)
def test_precomputed_npy(compose: Any, tmp_path: Path, overrides: list[str]) -> None:
    """Embeddings from a .npy (no encoder): hand-made vectors with the same duplicate structure as the texts."""
    source = _planted(tmp_path)
    x = np.eye(6, dtype=np.float32)[[0, 1, 0, 3, 1, 5]] * 3.0  # unnormalised on purpose
    x[2, 2] = 0.3  # cosine 0.995 to row 0
    np.save(tmp_path / "x.npy", x)
    path = f"method.embeddings_path={tmp_path / 'x.npy'}"
    # Rounds of shards of 3: only one round keeps 2 and 4 apart from 0 and 1 by chance; 20 rounds meet them.
    rounds = ["method.num_rounds=20"] if "method.algorithm=sharded" in overrides else []
    metrics = _run(compose, tmp_path / "out", [*overrides, *rounds, path, f"data.sources=[{{path:'{source}'}}]"])
    _check_outputs(tmp_path / "out", source, len(TEXTS))
    assert metrics["dedup/rows_in"] == 6.0


def test_embedding_column(compose: Any, tmp_path: Path) -> None:
    """Embeddings from a column of float lists."""
    vectors = [[1, 0], [0, 1], [0.99, 0.05], [-1, 0], [0.05, 0.99], [-1, -1]]
    rows = [{"id": i, "text": t, "emb": v} for i, (t, v) in enumerate(zip(TEXTS, vectors, strict=True))]
    source = _write_jsonl(tmp_path / "emb.jsonl", rows)
    _run(compose, tmp_path / "out", ["method.embedding_column=emb", f"data.sources=[{{path:'{source}'}}]"])
    assert np.load(tmp_path / "out" / "representative.npy").tolist() == [0, 1, 0, 3, 1, 5]
    assert [r["id"] for r in _read_jsonl(tmp_path / "out" / "deduplicated.jsonl")] == [0, 1, 3, 5]


def test_missing_text_column_fails_before_embedding(compose: Any, tmp_path: Path) -> None:
    """A row without the text column is reported as file:line with the column name."""
    source = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"body": "b"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing column 'text'"):
        _run(compose, tmp_path / "out", ["method.text_column=text", f"data.sources=[{{path:'{source}'}}]"])


def test_npy_row_count_mismatch_fails_early(compose: Any, tmp_path: Path) -> None:
    """A .npy with a different row count than the data names both counts."""
    source = _planted(tmp_path)
    np.save(tmp_path / "x.npy", np.ones((4, 3), dtype=np.float32))
    overrides = [f"method.embeddings_path={tmp_path / 'x.npy'}", f"data.sources=[{{path:'{source}'}}]"]
    with pytest.raises(DataError, match=r"x\.npy: embeddings have shape \(4, 3\) but the data has 6 rows"):
        _run(compose, tmp_path / "out", overrides)
    assert not (tmp_path / "out" / "deduplicated.jsonl").exists()
