"""Sharded loading switches (transformers' ZeRO-3 and FSDP flags around one load) and the load records.

The sharded loads themselves run on 2 ranks in ``tests/test_distributed.py`` (ZeRO-3 SFT and distillation).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from transformers.integrations import deepspeed as hf_deepspeed

from alignment.models.config import Dtype, ModelConfig
from alignment.models.sharded import LOADS, fsdp_loading, run_sharding, sharded_creation

FLAGS = ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING")


class _Zero3:
    """Stands in for an ``HfDeepSpeedConfig`` with stage 3 (transformers keeps a weakref and asks ``is_zero3``)."""

    def is_zero3(self) -> bool:
        return True


def _live() -> Any:
    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    return reference() if reference is not None else None


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in FLAGS:
        monkeypatch.delenv(key, raising=False)
    hf_deepspeed.unset_hf_deepspeed_config()
    yield
    hf_deepspeed.unset_hf_deepspeed_config()


def test_sharded_loads_take_the_runs_zero3_config_and_whole_loads_clear_it() -> None:
    run = _Zero3()
    with run_sharding(run):
        assert _live() is None  # only the loads that ask for it see it
        with sharded_creation(True):
            assert _live() is run
            assert hf_deepspeed.is_deepspeed_zero3_enabled()
        assert _live() is None
        # Once the method's TrainingArguments activate their own config, a whole load clears it for its duration.
        method = _Zero3()
        hf_deepspeed.set_hf_deepspeed_config(method)
        with sharded_creation(True):
            assert _live() is method
        with sharded_creation(False):
            assert not hf_deepspeed.is_deepspeed_zero3_enabled()
        assert _live() is method
    with sharded_creation(True):  # no run open (one process, DDP): nothing to shard with
        assert _live() is method


def test_fsdp_rank0_loading_flags_are_set_for_sharded_loads_only() -> None:
    with run_sharding(None, fsdp=True):
        assert fsdp_loading()
        with sharded_creation(True):
            assert [os.environ.get(key) for key in FLAGS] == ["true", "true"]
        assert [os.environ.get(key) for key in FLAGS] == [None, None]
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"  # what the method's TrainingArguments set
        with sharded_creation(False):
            assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"
        assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    assert not fsdp_loading()


def test_loads_are_recorded_only_while_a_run_is_open(tiny_random_path: str) -> None:
    from transformers import AutoTokenizer

    from alignment.models.load import load_model

    cfg = ModelConfig(name_or_path="embedded:tiny-random-llama", dtype=Dtype.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_random_path)
    LOADS.clear()
    load_model(cfg, tokenizer)
    assert LOADS == []
    with run_sharding(None):
        model = load_model(cfg, tokenizer, frozen=True, sharded=False)
    numel = sum(p.numel() for p in model.parameters())
    [record] = LOADS
    assert (record.what, record.sharded) == ("frozen", False)
    assert record.param_numel_local == record.param_numel_full == numel  # without ZeRO-3 a load is whole
    assert record.param_bytes_full == 4 * numel  # fp32
    if sys.platform == "linux":
        assert record.rss_peak is not None
        assert record.rss_peak >= record.rss_before
