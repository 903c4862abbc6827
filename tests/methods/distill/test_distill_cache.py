"""The teacher cache: ``method=distill_cache`` and ``teacher_source=cache`` (hidden states exact, top-k with a tail)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from alignment.methods.distill import distill_cache, trainer
from tests.methods.distill.conftest import assert_params_close, data, one_step
from tests.methods.helpers import ONE_SGD_STEP, Loaded, run_method


def test_hidden_cache_trains_exactly_like_the_in_process_teacher(
    compose: Any, tmp_path: Path, rows_file: Path, loaded: Loaded, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """``distill_cache`` writes the teacher's hidden states; training from them equals training with the teacher.

    The training run's use of the cache is a hit, and only the teacher's output head is loaded.
    """
    monkeypatch.setattr("alignment.paths.cache_dir", lambda: tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    common = ["method.loss=reverse_kl", "method.hard_label_weighting=true"]
    reference = one_step(compose, tmp_path / "model", rows_file, loaded, common)
    cache = [*common, "method.cache_format=hidden"]
    tool = run_method(
        distill_cache.run,
        compose,
        tmp_path / "tool",
        [*ONE_SGD_STEP, "method=distill_cache", *data(rows_file), *cache],
    )
    assert tool["cache_hit"] == 0.0
    assert tool["train/bytes_per_token"] == 576 * 4
    with caplog.at_level(logging.INFO):
        cached = one_step(compose, tmp_path / "cached", rows_file, loaded, [*cache, "method.teacher_source=cache"])
    assert "cache hit" in caplog.text
    assert "no teacher body loaded" in caplog.text
    assert cached["step"]["loss"] == pytest.approx(reference["step"]["loss"], rel=1e-5)
    assert_params_close(cached["params"], reference["params"], atol=1e-6)


def test_topk_cache_is_computed_on_first_use_and_logs_the_captured_mass(
    compose: Any, tmp_path: Path, rows_file: Path, loaded: Loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("alignment.paths.cache_dir", lambda: tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    overrides = ["method.teacher_source=cache", "method.cache_topk=16", "method.loss=skew_forward_kl"]
    run = one_step(compose, tmp_path / "topk", rows_file, loaded, overrides)
    assert 0.0 < run["step"]["teacher_topk_mass"] <= 1.0
    shards = list((tmp_path / "cache" / "reference_logps").glob("distill-*.safetensors"))
    assert len(shards) == 1
    from safetensors.torch import load_file

    table = load_file(str(shards[0]))
    assert table["ids"].shape[1] == 16
    assert table["offsets"][-1] == table["ids"].shape[0]
    assert trainer.cache_summary(table)["bytes_per_token"] == 16 * (4 + 2) + 4
    assert any(not torch.equal(run["params"][n], run["initial"][n]) for n in run["initial"])
