"""Mixtures: seeded hold-out, subsampling, weighted interleaving, eval caps, and config checks at construction."""

from __future__ import annotations

import json
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset, DatasetDict
from omegaconf import OmegaConf

from alignment.data.config import DataConfig, SourceConfig
from alignment.data.load import ORIGIN
from alignment.data.mix import Splits, build_splits
from alignment.methods.sft import row_problems

COLUMNS = ("messages",)
VALIDATE = partial(row_problems, roles=["assistant"])


def write_source(path: Path, n: int) -> str:
    rows = [
        {"messages": [{"role": "user", "content": f"{path.stem} q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def build(sources: list[SourceConfig], **kwargs: Any) -> Splits:
    return build_splits(DataConfig(sources=sources, **kwargs), VALIDATE, COLUMNS)


def origins(dataset: Dataset | None) -> list[str]:
    assert dataset is not None
    return list(dataset[ORIGIN])


def test_eval_path_is_used_instead_of_a_hold_out(tmp_path: Path) -> None:
    train = write_source(tmp_path / "train.jsonl", 30)
    evaluation = write_source(tmp_path / "eval.jsonl", 7)
    splits = build([SourceConfig(path=train, eval_path=evaluation)], eval_fraction=0.2)
    assert origins(splits.train) == [f"{train}:{i}" for i in range(1, 31)]
    assert origins(splits.eval) == [f"{evaluation}:{i}" for i in range(1, 8)]
    assert splits.train.column_names == ["messages", ORIGIN]


def test_hold_out_is_seeded_and_disjoint(tmp_path: Path) -> None:
    path = write_source(tmp_path / "all.jsonl", 100)
    first = build([SourceConfig(path=path)], eval_fraction=0.2, seed=1)
    again = build([SourceConfig(path=path)], eval_fraction=0.2, seed=1)
    other = build([SourceConfig(path=path)], eval_fraction=0.2, seed=2)

    assert len(first.train) == 80
    assert len(origins(first.eval)) == 20
    assert set(origins(first.train)).isdisjoint(origins(first.eval))
    assert set(origins(first.train)) | set(origins(first.eval)) == {f"{path}:{i}" for i in range(1, 101)}
    assert origins(again.train) == origins(first.train)
    assert origins(again.eval) == origins(first.eval)
    assert set(origins(other.eval)) != set(origins(first.eval))


def test_eval_fraction_zero_disables_the_hold_out(tmp_path: Path) -> None:
    path = write_source(tmp_path / "all.jsonl", 10)
    splits = build([SourceConfig(path=path)], eval_fraction=0.0)
    assert len(splits.train) == 10
    assert splits.eval is None


@pytest.mark.parametrize(
    ("num_train", "num_eval", "fraction", "kept_train", "kept_eval"),
    [(50, 20, 0.3, 15, 6), (7, 5, 0.5, 3, 2)],  # int(), not round(): 3.5 -> 3
)
def test_sample_fraction_keeps_that_share_of_train_and_eval(
    tmp_path: Path, num_train: int, num_eval: int, fraction: float, kept_train: int, kept_eval: int
) -> None:
    train = write_source(tmp_path / "train.jsonl", num_train)
    evaluation = write_source(tmp_path / "eval.jsonl", num_eval)
    source = SourceConfig(path=train, eval_path=evaluation, sample_fraction=fraction)
    first = build([source], seed=3)
    again = build([source], seed=3)
    other = build([source], seed=4)

    assert len(first.train) == int(num_train * fraction) == kept_train
    assert len(origins(first.eval)) == int(num_eval * fraction) == kept_eval
    assert len(set(origins(first.train))) == kept_train
    assert set(origins(first.train)) <= {f"{train}:{i}" for i in range(1, num_train + 1)}
    assert set(origins(first.eval)) <= {f"{evaluation}:{i}" for i in range(1, num_eval + 1)}
    assert origins(again.train) == origins(first.train)
    assert origins(again.eval) == origins(first.eval)
    assert set(origins(other.train)) != set(origins(first.train))


def test_sample_fraction_after_the_hold_out(tmp_path: Path) -> None:
    path = write_source(tmp_path / "all.jsonl", 100)
    splits = build([SourceConfig(path=path, sample_fraction=0.5)], eval_fraction=0.1)
    assert len(splits.train) == 45
    assert len(origins(splits.eval)) == 5
    assert set(origins(splits.train)).isdisjoint(origins(splits.eval))


def test_unweighted_sources_are_concatenated(tmp_path: Path) -> None:
    a = write_source(tmp_path / "a.jsonl", 10)
    b = write_source(tmp_path / "b.jsonl", 4)
    splits = build([SourceConfig(path=a), SourceConfig(path=b, sample_fraction=0.5)], eval_fraction=0.0)
    counts = Counter(origin.split(":")[0] for origin in origins(splits.train))
    assert counts == {a: 10, b: 2}


def test_sampling_weight_interleaves_in_proportion(tmp_path: Path) -> None:
    a = write_source(tmp_path / "a.jsonl", 200)
    b = write_source(tmp_path / "b.jsonl", 200)
    sources = [SourceConfig(path=a, sampling_weight=3.0), SourceConfig(path=b, sampling_weight=1.0)]
    splits = build(sources, eval_fraction=0.0, num_train_samples=400, seed=0)
    again = build(sources, eval_fraction=0.0, num_train_samples=400, seed=0)

    assert len(splits.train) == 400
    counts = Counter(origin.split(":")[0] for origin in origins(splits.train))
    # Expected 300/100; the binomial standard deviation is about 9 rows.
    assert 260 <= counts[a] <= 340
    assert counts[a] + counts[b] == 400
    assert origins(again.train) == origins(splits.train)


def test_sampling_weight_smaller_source_repeats_to_reach_num_train_samples(tmp_path: Path) -> None:
    a = write_source(tmp_path / "a.jsonl", 60)
    b = write_source(tmp_path / "b.jsonl", 10)
    sources = [SourceConfig(path=a, sampling_weight=1.0), SourceConfig(path=b, sampling_weight=1.0)]
    splits = build(sources, eval_fraction=0.0, num_train_samples=100, seed=0)
    counts = Counter(origin.split(":")[0] for origin in origins(splits.train))
    assert len(splits.train) == 100
    assert 35 <= counts[b] <= 65
    assert len(set(origins(splits.train))) < 100


def test_sampling_weight_without_num_train_samples_stops_at_the_first_exhausted(tmp_path: Path) -> None:
    a = write_source(tmp_path / "a.jsonl", 100)
    b = write_source(tmp_path / "b.jsonl", 10)
    sources = [SourceConfig(path=a, sampling_weight=1.0), SourceConfig(path=b, sampling_weight=1.0)]
    splits = build(sources, eval_fraction=0.0)
    counts = Counter(origin.split(":")[0] for origin in origins(splits.train))
    assert counts[b] == 10
    assert len(set(origins(splits.train))) == len(splits.train)


def test_max_eval_samples_caps_the_mixed_eval_set(tmp_path: Path) -> None:
    sources = [
        SourceConfig(
            path=write_source(tmp_path / f"{n}.jsonl", 5), eval_path=write_source(tmp_path / f"{n}e.jsonl", 30)
        )
        for n in ("a", "b")
    ]
    capped = build(sources, max_eval_samples=25)
    again = build(sources, max_eval_samples=25)
    uncapped = build(sources, max_eval_samples=None)
    assert len(origins(capped.eval)) == 25
    assert len(set(origins(capped.eval))) == 25
    assert origins(again.eval) == origins(capped.eval)
    assert len(origins(uncapped.eval)) == 60
    assert len(capped.train) == 10


def test_save_to_disk_source_in_a_mixture(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(6)
    ]
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:2])}).save_to_disk(str(folder))
    jsonl = write_source(tmp_path / "j.jsonl", 4)
    sources = [SourceConfig(path=str(folder), eval_split="test"), SourceConfig(path=jsonl)]
    splits = build(sources, eval_fraction=0.25)
    evals = origins(splits.eval)
    assert [o for o in evals if o.startswith(str(folder))] == [f"{folder}[test] row 0", f"{folder}[test] row 1"]
    assert sum(o.startswith(jsonl) for o in evals) == 1
    assert len(evals) == 3
    assert len(splits.train) == 6 + 3
    assert splits.train.column_names == ["messages", ORIGIN]


# Config checks happen when the dataclasses are built (directly or by OmegaConf.to_object), before any loading.


def test_weight_and_fraction_on_one_source_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="set sample_fraction or sampling_weight, not both"):
        SourceConfig(path="a.jsonl", sample_fraction=0.5, sampling_weight=1.0)


def test_weights_on_only_some_sources_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="set sampling_weight on every source or on none"):
        DataConfig(sources=[SourceConfig(path="a.jsonl", sampling_weight=1.0), SourceConfig(path="b.jsonl")])


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ([{"path": "a.jsonl", "sampling_weight": 1.0}, {"path": "b.jsonl"}], "on every source or on none"),
        ([{"path": "a.jsonl", "sampling_weight": 1.0, "sample_fraction": 0.5}], "not both"),
        ([{"path": "a.jsonl", "sample_fraction": 1.5}], r"sample_fraction must be in \(0, 1\]"),
        ([{"path": "a.jsonl", "sample_fraction": 0.0}], r"sample_fraction must be in \(0, 1\]"),
        ([{"path": "a.jsonl", "sampling_weight": 0.0}], "sampling_weight must be > 0"),
    ],
)
def test_bad_mixture_fails_when_the_config_is_converted(sources: list[dict[str, Any]], message: str) -> None:
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"sources": sources})
    with pytest.raises(ValueError, match=message):
        OmegaConf.to_object(cfg)


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_eval_fraction_range(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"eval_fraction must be in \[0, 1\)"):
        DataConfig(sources=[SourceConfig(path="a.jsonl")], eval_fraction=fraction)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": "org/dataset", "eval_path": "x.jsonl"}, "eval_path is for JSONL sources"),
        ({"path": "train.jsonl", "eval_split": "test"}, "eval_split is for hub/save_to_disk sources"),
    ],
)
def test_eval_setting_of_the_wrong_source_kind_is_rejected(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SourceConfig(**kwargs)
