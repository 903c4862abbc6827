"""Frozen models next to the trained one: which kind runs, no-grad runs, and the on-disk cache of their outputs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from alignment.models.config import Dtype, ModelConfig, QuantizationConfig, ReferenceKind
from alignment.models.frozen import (
    FrozenModel,
    cached_outputs,
    fingerprint,
    load_frozen_copy,
    move_to_device,
    resolve_kind,
)

# --- which kind ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "lora", "expected"),
    [
        (ReferenceKind.auto, True, ReferenceKind.adapters),
        (ReferenceKind.auto, False, ReferenceKind.copy),
        (ReferenceKind.adapters, True, ReferenceKind.adapters),
        (ReferenceKind.copy, True, ReferenceKind.copy),
        (ReferenceKind.copy, False, ReferenceKind.copy),
        (ReferenceKind.precomputed, True, ReferenceKind.precomputed),
        (ReferenceKind.precomputed, False, ReferenceKind.precomputed),
    ],
)
def test_resolve_kind(kind: ReferenceKind, lora: bool, expected: ReferenceKind) -> None:
    assert resolve_kind(kind, lora) is expected


def test_adapters_without_lora_fail_with_the_setting_to_change() -> None:
    with pytest.raises(ValueError, match=r"method\.reference=adapters needs model\.lora\.enabled=true"):
        resolve_kind(ReferenceKind.adapters, False)


# --- running without gradient ----------------------------------------------------------------------------------


def test_run_uses_the_frozen_copy_without_gradient() -> None:
    torch.manual_seed(0)
    frozen = torch.nn.Linear(2, 1)  # its parameters require grad: only no_grad keeps the output out of the graph
    policy = torch.nn.Linear(2, 1)
    seen: list[tuple[Any, bool]] = []

    def compute(model: Any) -> torch.Tensor:
        seen.append((model, torch.is_grad_enabled()))
        return model(torch.ones(1, 2))

    out = FrozenModel(frozen).run(policy, compute)
    assert seen == [(frozen, False)]
    assert out.requires_grad is False
    torch.testing.assert_close(out, frozen(torch.ones(1, 2)).detach())
    assert torch.is_grad_enabled()  # restored afterwards


class FakePolicy:
    """A PEFT model stand-in that records when its adapters are disabled and what runs meanwhile."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.weight = torch.nn.Parameter(torch.tensor(2.0))

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        self.events.append("disable")
        try:
            yield
        finally:
            self.events.append("enable")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.events.append("forward")
        return self.weight * x


@pytest.mark.parametrize("through_wrapper", [False, True])
def test_run_without_a_copy_uses_the_policy_with_adapters_disabled(through_wrapper: bool) -> None:
    policy = FakePolicy()
    given = SimpleNamespace(module=policy) if through_wrapper else policy  # a DDP wrapper has no disable_adapter
    grad_enabled: list[bool] = []

    def compute(model: Any) -> torch.Tensor:
        assert model is policy
        grad_enabled.append(torch.is_grad_enabled())
        return model(torch.tensor(3.0))

    out = FrozenModel(None).run(given, compute)
    assert policy.events == ["disable", "forward", "enable"]
    assert grad_enabled == [False]
    assert out.item() == 6.0
    assert out.requires_grad is False


def test_adapters_come_back_when_the_computation_fails() -> None:
    policy = FakePolicy()

    def compute(model: Any) -> None:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        FrozenModel(None).run(policy, compute)
    assert policy.events == ["disable", "enable"]


def test_move_to_device_moves_a_plain_model_and_leaves_a_quantised_one(monkeypatch: pytest.MonkeyPatch) -> None:
    moved: list[tuple[Any, torch.device]] = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, device: moved.append((self, device)) or self)
    plain, quantised = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    quantised.hf_quantizer = object()  # bitsandbytes models are placed at load and refuse .to
    device = torch.device("cuda", 1)
    assert move_to_device(plain, device) is plain
    assert move_to_device(quantised, device) is quantised
    assert moved == [(plain, device)]


# --- the frozen copy ------------------------------------------------------------------------------------------

TINY = ModelConfig(name_or_path="embedded:tiny-random-llama", dtype=Dtype.float32)


def test_load_frozen_copy_has_no_adapters_and_nothing_trainable(tiny_random_path: str) -> None:
    from transformers import AutoTokenizer

    policy_cfg = replace(TINY, lora=replace(TINY.lora, enabled=True), unfreeze_layers_patterns=["*.mlp.*"])
    frozen = load_frozen_copy(policy_cfg, AutoTokenizer.from_pretrained(tiny_random_path))
    assert not hasattr(frozen, "peft_config")
    assert not any("lora" in name for name, _ in frozen.named_parameters())
    assert not any(p.requires_grad for p in frozen.parameters())
    assert frozen.training is False


def test_load_frozen_copy_of_a_qlora_policy(tiny_random_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    from alignment.models import load

    monkeypatch.setattr(load, "quantization_kwargs", lambda cfg: {})  # bitsandbytes needs CUDA; load unquantised
    qlora = replace(TINY, lora=replace(TINY.lora, enabled=True), quantization=QuantizationConfig(load_in_4bit=True))
    frozen = load_frozen_copy(qlora, AutoTokenizer.from_pretrained(tiny_random_path))
    assert not any(p.requires_grad for p in frozen.parameters())


# --- the cache key ---------------------------------------------------------------------------------------------

MODEL = ModelConfig(name_or_path="embedded:tiny-random-llama", revision="main", dtype=Dtype.float32)


def test_fingerprint_is_stable_and_short() -> None:
    key = fingerprint(MODEL, "data-abc", "512")
    same = ModelConfig(name_or_path="embedded:tiny-random-llama", revision="main", dtype=Dtype.float32)
    assert key == fingerprint(same, "data-abc", "512")
    assert len(key) == 24
    assert int(key, 16) >= 0  # hexadecimal


@pytest.mark.parametrize(
    ("model", "parts"),
    [
        (replace(MODEL, name_or_path="embedded:smollm2-135m-instruct"), ("data-abc", "512")),
        (replace(MODEL, revision="v2"), ("data-abc", "512")),
        (replace(MODEL, revision=None), ("data-abc", "512")),
        (replace(MODEL, dtype=Dtype.bfloat16), ("data-abc", "512")),
        (MODEL, ("data-abd", "512")),
        (MODEL, ("data-abc", "256")),
        (MODEL, ("512", "data-abc")),
        (MODEL, ("data-abc",)),
        (MODEL, ("data-abc", "512", "topk=8")),
    ],
)
def test_fingerprint_changes_with_each_part(model: ModelConfig, parts: tuple[str, ...]) -> None:
    assert fingerprint(model, *parts) != fingerprint(MODEL, "data-abc", "512")


def test_fingerprint_ignores_what_does_not_change_the_outputs() -> None:
    # Adapters are disabled and unfrozen layers do not matter for a frozen copy.
    trained = replace(MODEL, lora=replace(MODEL.lora, enabled=True), unfreeze_layers_patterns=["*.mlp.*"])
    assert fingerprint(trained, "data-abc") == fingerprint(MODEL, "data-abc")


def test_fingerprint_changes_with_quantisation() -> None:
    quantised = replace(MODEL, quantization=QuantizationConfig(load_in_4bit=True))
    assert fingerprint(quantised, "data-abc") != fingerprint(MODEL, "data-abc")


# --- the cache -------------------------------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The project cache in a fresh folder."""
    monkeypatch.setenv("ALIGNMENT_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_cached_outputs_compute_once_then_read_the_cache(cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def compute() -> dict[str, torch.Tensor]:
        calls.append("computed")
        return {"chosen": torch.tensor([-1.5, -2.0]), "rejected": torch.tensor([-3.25, -4.0])}

    caplog.set_level(logging.INFO, logger="alignment.models.frozen")
    first = cached_outputs("key1", compute, what="teacher logits")
    second = cached_outputs("key1", compute, what="teacher logits")
    assert calls == ["computed"]
    assert sorted(p.name for p in (cache / "reference_logps").iterdir()) == ["key1.safetensors"]  # no partial left
    for out in (first, second):
        assert set(out) == {"chosen", "rejected"}
        assert out["chosen"].tolist() == [-1.5, -2.0]
        assert out["rejected"].tolist() == [-3.25, -4.0]
    assert "teacher logits: computed, cached at" in caplog.text
    assert "teacher logits: cache hit" in caplog.text

    cached_outputs("key2", compute)  # another key computes again
    assert calls == ["computed", "computed"]


def test_cached_outputs_read_what_another_process_wrote(cache: Path) -> None:
    from safetensors.torch import save_file

    (cache / "reference_logps").mkdir()
    save_file({"chosen": torch.tensor([-7.0])}, str(cache / "reference_logps" / "shared.safetensors"))

    def compute() -> dict[str, torch.Tensor]:
        raise AssertionError("a cached key must not be computed")

    assert cached_outputs("shared", compute)["chosen"].tolist() == [-7.0]
