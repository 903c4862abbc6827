"""Frozen models next to the trained one (a DPO/GPO reference now, a distillation teacher next), in one place.

A frozen model's outputs come from one of three places (:class:`~alignment.models.config.ReferenceKind`):

* ``copy``: a second copy of the starting model, loaded without adapters, in eval mode, never trained;
* ``adapters``: the policy itself with its LoRA adapters disabled (no second copy in memory);
* ``precomputed``: computed once by a frozen copy before training and cached on disk under a fingerprint of
  everything that determines them (model, revision, dtype, dataset fingerprint, settings), so later runs and the
  other jobs of a sweep reuse them.

What a method computes with the frozen model (summed pair log-probs, per-token log-probs, top-k logits) is a
function it passes in; this module only decides which weights run it and caches what it returns.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from alignment.models.config import ReferenceKind

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator  # type: ignore[import-untyped]
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from alignment.models.config import ModelConfig

log = logging.getLogger(__name__)

T = TypeVar("T")


class FrozenModel:
    """Runs a computation, without gradient, on a frozen copy or on the policy with its adapters disabled."""

    def __init__(self, model: PreTrainedModel | None) -> None:
        self.model: Any = model
        """The frozen copy (after :meth:`prepare`, in its DeepSpeed engine or FSDP shards under those backends);
        None means the policy with its adapters disabled."""

    def prepare(self, accelerator: Accelerator) -> None:
        """Place the frozen copy for training: sharded like the policy under ZeRO-3/FSDP2, else on its device.

        The Trainer prepares only the policy; a copy left on the CPU would meet GPU batches, and a ZeRO-3
        partitioned copy cannot run without an engine (:func:`~alignment.models.sharded.prepare_frozen`).
        """
        from alignment.models.sharded import prepare_frozen

        if self.model is not None:
            self.model = prepare_frozen(self.model, accelerator)

    def run(self, policy_model: Any, compute: Callable[[Any], T]) -> T:
        """``compute(model)`` under ``torch.no_grad`` on the frozen copy, or on the adapter-free policy."""
        import torch

        with torch.no_grad():
            if self.model is not None:
                return compute(self.model)
            # Under DDP the trainer hands over the wrapper, which has no ``disable_adapter``; the no-grad forward
            # needs no gradient sync, so the wrapped PEFT model runs it directly.
            peft_model: Any = getattr(policy_model, "module", policy_model)
            with peft_model.disable_adapter():
                return compute(peft_model)


def resolve_kind(kind: ReferenceKind, lora: bool) -> ReferenceKind:
    """The concrete kind: ``auto`` becomes adapters with LoRA, else a frozen copy; impossible ones fail.

    Raises:
        ValueError: ``adapters`` without LoRA adapters to disable.
    """
    if kind is ReferenceKind.auto:
        return ReferenceKind.adapters if lora else ReferenceKind.copy
    if kind is ReferenceKind.adapters and not lora:
        raise ValueError("method.reference=adapters needs model.lora.enabled=true (there are no adapters to disable)")
    return kind


def move_to_device(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    """Move a frozen model to the training device; bitsandbytes models were placed at load and refuse ``.to``."""
    import torch

    if getattr(model, "hf_quantizer", None) is None:
        torch.nn.Module.to(model, device)
    return model


def load_frozen_copy(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, *, sharded: bool = False) -> PreTrainedModel:
    """A frozen copy of the model ``cfg`` describes, without adapters or unfrozen layers, in eval mode.

    ``sharded``: created under the run's ZeRO-3/FSDP2 sharding, for a copy that runs beside the policy on every
    rank in step (a reference, a teacher), which :meth:`FrozenModel.prepare` (or
    :func:`~alignment.models.sharded.prepare_frozen`) then wraps; the default loads it whole on every rank, for a
    copy that one rank may run alone (precomputing reference log-probs or a teacher cache).
    """
    from alignment.models.load import load_model

    without_adapters = replace(cfg, lora=replace(cfg.lora, enabled=False), unfreeze_layers_patterns=[])
    frozen = load_model(without_adapters, tokenizer, frozen=True, sharded=sharded)
    frozen.requires_grad_(False)
    frozen.train(False)
    return frozen


def fingerprint(cfg: ModelConfig, *parts: str) -> str:
    """Cache key of a frozen model's outputs: the model (path, revision, dtype, quantisation) and ``parts``."""
    fields = [cfg.name_or_path, str(cfg.revision), str(cfg.dtype), *parts]
    if cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit:  # unquantised keys stay as they were
        fields.append(repr(cfg.quantization))
    return hashlib.sha256("|".join(fields).encode()).hexdigest()[:24]


def cached_outputs(
    name: str, compute: Callable[[], dict[str, torch.Tensor]], *, what: str = "reference log-probs"
) -> dict[str, torch.Tensor]:
    """Tensors cached at ``<cache>/reference_logps/<name>.safetensors``: read when present, else computed and saved.

    The write goes through a per-process temporary name, so ranks or sweep jobs computing the same key never write
    one file together. ``what`` names the outputs in the log (``reference log-probs: cache hit <path>``).
    """
    from safetensors.torch import load_file, save_file

    from alignment.paths import cache_dir

    path = cache_dir() / "reference_logps" / f"{name}.safetensors"
    if path.exists():
        log.info("%s: cache hit %s", what, path)
        return load_file(str(path))
    tensors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.partial")
    save_file(tensors, str(tmp))
    tmp.rename(path)
    log.info("%s: computed, cached at %s", what, path)
    return tensors
