"""Data a run cannot use fails before any weights load, and every run checks its data before its tokenizer.

A split that filtering leaves empty (pairs identical on both sides, conversations with no trained token left
within ``max_length``, groups whose rewards all tie) is named with its files, the counts and the reason, for the
train and the eval split alike, across every training method. On an empty project cache a run with bad data
writes no model weights at all (the embedded tokenizer is built alone).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset

import alignment.data.load as data_loading
import alignment.models.frozen as frozen_models
import alignment.models.load as model_loading
from alignment.data.validate import DataError
from alignment.models import seqcls as reward_models
from alignment.paths import CACHE_ENV
from alignment.registry import METHODS
from tests.methods.helpers import pair_row, run_method, write_jsonl

PAIRWISE = ["dpo", "orpo", "cpo", "simpo", "smpo"]
USER = {"role": "user", "content": "What is 2 + 2?"}
TRAINED = "nothing left to train on, nothing was trained"
EVALUATED = (
    "nothing left to evaluate, nothing was trained (fix the data, or turn evaluation off: data.eval_fraction=0 "
    "and no eval_path/eval_split)"
)


def _answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _pairs(identical: bool, count: int = 4) -> list[dict[str, Any]]:
    return [pair_row(f"What is {i} + 2?", f"{i + 2}", f"{i + 2}" if identical else f"{i + 3}") for i in range(count)]


def _groups(tied: bool, count: int = 3) -> list[dict[str, Any]]:
    return [
        {"prompt": [USER], "completions": [_answer("4"), _answer("5")], "rewards": [1.0, 1.0 if tied else 0.0]}
        for _ in range(count)
    ]


def _sources(train: Path, evaluation: Path | None = None) -> str:
    if evaluation is None:
        return f"data.sources=[{{path:'{train}'}}]"
    return f"data.sources=[{{path:'{train}', eval_path:'{evaluation}'}}]"


def _overrides(method: str, sources: str, *extra: str) -> list[str]:
    return ["model=tiny_random", "logger=none", f"method={method}", "data.eval_fraction=0", sources, *extra]


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading any model (policy, reference copy, sequence classifier) fail the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("model weights loaded before the data was checked")

    monkeypatch.setattr(model_loading, "load_model", refuse)
    monkeypatch.setattr(frozen_models, "load_frozen_copy", refuse)
    monkeypatch.setattr(reward_models, "load_model_for_classification", refuse)


def _run(compose: Any, tmp_path: Path, overrides: list[str]) -> str:
    method = next(o.removeprefix("method=") for o in overrides if o.startswith("method="))
    with pytest.raises(DataError) as failure:
        run_method(METHODS[method].run, compose, tmp_path / "run", overrides)
    return str(failure.value)


# --- a split that filtering leaves empty ------------------------------------------------------------------------


@pytest.mark.parametrize("method", [*PAIRWISE, "reward"])
def test_pairs_identical_in_every_row_fail_before_loading(
    compose: Any, tmp_path: Path, no_weights: None, method: str
) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(identical=True))
    message = _run(compose, tmp_path, _overrides(method, _sources(data)))
    assert message == f"train split of {data}: all 4 pairs dropped (chosen == rejected); {TRAINED}"


@pytest.mark.parametrize("method", ["dpo", "reward"])
def test_an_eval_file_whose_pairs_are_all_identical_fails_before_loading(
    compose: Any, tmp_path: Path, no_weights: None, method: str
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", _pairs(identical=False))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", _pairs(identical=True, count=2))
    message = _run(compose, tmp_path, _overrides(method, _sources(train, evaluation)))
    assert message == f"eval split of {evaluation}: all 2 pairs dropped (chosen == rejected); {EVALUATED}"


def test_pairs_cut_to_nothing_by_max_length_name_the_setting(compose: Any, tmp_path: Path, no_weights: None) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(identical=False, count=3))
    message = _run(compose, tmp_path, _overrides("dpo", _sources(data), "method.max_length=8"))
    expected = "all 3 pairs dropped (no completion token left within method.max_length=8)"
    assert message == f"train split of {data}: {expected}; {TRAINED}"


def test_sft_with_no_trained_token_left_within_max_length_fails_before_loading(
    compose: Any, tmp_path: Path, no_weights: None
) -> None:
    rows = [{"messages": [USER, *_answer(str(i))]} for i in range(3)]
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    message = _run(compose, tmp_path, _overrides("sft", _sources(data), "method.max_length=8"))
    expected = "all 3 conversations dropped (no trained token left within method.max_length=8)"
    assert message == f"train split of {data}: {expected}; {TRAINED}"


def test_gpo_groups_whose_rewards_all_tie_fail_before_loading(compose: Any, tmp_path: Path, no_weights: None) -> None:
    data = write_jsonl(tmp_path / "groups.jsonl", _groups(tied=True))
    message = _run(compose, tmp_path, _overrides("gpo", _sources(data)))
    assert message == f"train split of {data}: all 3 groups dropped (equal rewards: zero advantage); {TRAINED}"


def test_gpo_eval_groups_that_all_tie_fail_before_loading(compose: Any, tmp_path: Path, no_weights: None) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", _groups(tied=False))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", _groups(tied=True, count=2))
    message = _run(compose, tmp_path, _overrides("gpo", _sources(train, evaluation)))
    assert message == f"eval split of {evaluation}: all 2 groups dropped (equal rewards: zero advantage); {EVALUATED}"


def test_an_empty_eval_split_of_a_hub_dataset_fails_before_loading(
    compose: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_weights: None
) -> None:
    rows = Dataset.from_list([{"text": f"{i} + 1", "label": "even" if i % 2 else "odd"} for i in range(4)])
    splits = {"train": rows, "test": rows.select([])}
    monkeypatch.setattr(data_loading, "load_dataset", lambda path, name, split: splits[split])
    sources = "data.sources=[{path: org/sums, eval_split: test}]"
    assert _run(compose, tmp_path, _overrides("classification", sources)) == "org/sums[test]: no rows"


# --- the order of a run: config, data, tokenizer, weights ----------------------------------------------------------

BAD_ROW = {"unrelated": 1}
GOOD_ROWS: dict[str, Callable[[], list[dict[str, Any]]]] = {
    **{method: lambda: _pairs(identical=False) for method in [*PAIRWISE, "reward"]},
    "sft": lambda: [{"messages": [USER, *_answer("4")]}],
    "gpo": lambda: _groups(tied=False),
    "classification": lambda: [{"text": "1 + 1", "label": "even"}, {"text": "1 + 2", "label": "odd"}],
}


@pytest.mark.parametrize("method", sorted(GOOD_ROWS))
def test_every_method_checks_its_rows_before_loading_a_tokenizer(
    compose: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_weights: None, method: str
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("tokenizer loaded before the data was checked")

    monkeypatch.setattr(model_loading, "load_tokenizer", refuse)
    data = write_jsonl(tmp_path / "rows.jsonl", [*GOOD_ROWS[method](), BAD_ROW])
    extra = ["method.invert_rejected_eos=true"] if method == "smpo" else []
    message = _run(compose, tmp_path, _overrides(method, _sources(data), *extra))
    assert f"{data}:{len(GOOD_ROWS[method]()) + 1}: " in message


def test_a_first_run_on_an_empty_cache_writes_no_weights_before_the_data_fails(
    compose: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's case: with ``model=tiny_random`` on an empty cache, SmolLM2 was de-quantised first (28 s)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(identical=True))
    message = _run(compose, tmp_path, _overrides("dpo", _sources(data)))
    assert message.startswith(f"train split of {data}: all 4 pairs dropped (chosen == rejected)")
    written = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    assert not [name for name in written if name.endswith((".safetensors", ".bin", ".gguf"))], written
    assert not (cache / "models").exists() or not any((cache / "models").iterdir()), written
