"""Liger-kernel (https://github.com/linkedin/Liger-Kernel) on a loaded model, as ``model.liger`` asks.

``auto`` turns the kernels on where all three of CUDA, the ``liger-kernel`` package and Liger kernels for the
model's architecture (its ``config.model_type``) are present, and leaves the model alone elsewhere (CPU runs, other
architectures); ``true`` makes the missing piece an error raised before any weights load, by :func:`liger_patch`
inside ``load_model`` and, for ``plan=true`` and multi-rank launches, by the runtime checks
(:func:`alignment.launch.ranks.runtime_problems`); ``false`` never patches.

When on, Liger's RMSNorm, RoPE and SwiGLU (GeGLU for Gemma) kernels replace the model's own through Liger's
per-architecture ``apply_liger_kernel_to_<arch>(model=...)``: the instance's norm and MLP modules get Liger's
forwards, and, as Liger does it, the RoPE function and the norm/MLP classes of that architecture's modelling module
are replaced for the whole process (so a reference copy or a teacher of the same architecture loaded later gets
the same kernels). The output head and the loss are left alone (``cross_entropy`` and
``fused_linear_cross_entropy`` off): SFT calls Liger's fused linear cross entropy itself on the counted positions
(:mod:`alignment.methods.sft_trainer`), and the preference methods need per-token log-probs, which it does not give.
"""

from __future__ import annotations

import importlib.util
import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from alignment.distributed import DistributedSetupError
from alignment.models.config import Liger, ModelConfig, liger_mode

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

PACKAGE = "liger_kernel"
INSTALL = "pip install 'effective-alignment[gpu]'"
"""How to get the package (the ``gpu`` extra pins a ``liger-kernel`` that supports our transformers)."""
_PATCHED: weakref.WeakSet[Any] = weakref.WeakSet()


class LigerUnavailableError(DistributedSetupError):
    """``liger=true`` where Liger cannot run; like the distributed checks, a user error raised before any load."""


def supported_model_types() -> frozenset[str]:
    """The ``config.model_type`` values the installed liger-kernel has kernels for (imports it: CUDA machines only)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def model_type(cfg: ModelConfig) -> str:
    """The model's ``config.model_type``, read from its config file (no weights)."""
    from transformers import AutoConfig

    from alignment.models import embedded

    config = AutoConfig.from_pretrained(
        embedded.resolve(cfg.name_or_path), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    return str(config.model_type)


def liger_problems(cfg: ModelConfig, *, cuda: bool) -> list[str]:
    """What Liger lacks here for this model (empty when it can run).

    The model's config is read (to find its architecture) only when CUDA and the package are present, so a CPU
    machine reads nothing and imports no liger code.
    """
    missing = [] if cuda else ["needs CUDA (torch sees no CUDA device); Liger's kernels are Triton GPU kernels"]
    if importlib.util.find_spec(PACKAGE) is None:
        missing.append(f"needs the liger-kernel package ({INSTALL})")
    if missing:
        return missing
    try:
        supported = supported_model_types()
    except Exception as error:  # a build for another torch or Triton fails with ImportError, OSError, ...
        return [f"liger_kernel does not import: {type(error).__name__}: {error}"]
    try:
        kind = model_type(cfg)
    except OSError:  # offline or gated: loading the model reports that; Liger skips what it does not know
        return []
    if kind not in supported:
        return [f"liger-kernel has no kernels for model type {kind!r} (it has: {', '.join(sorted(supported))})"]
    return []


def liger_errors(cfg: ModelConfig, *, cuda: bool, key: str = "model") -> list[str]:
    """Why ``<key>.liger=true`` cannot run here (empty for ``auto``/``false`` or when it can)."""
    if liger_mode(cfg.liger) is not Liger.true:
        return []
    problems = liger_problems(cfg, cuda=cuda)
    if not problems:
        return []
    return [f"{key}.liger=true ({cfg.name_or_path}): {'; '.join(problems)}; use {key}.liger=auto or false"]


def liger_patch(cfg: ModelConfig) -> Callable[[PreTrainedModel], None]:
    """What to do to the model once it is loaded: :func:`apply_liger`, or nothing. Call it *before* loading.

    Raises:
        LigerUnavailableError: ``model.liger=true`` and Liger cannot run here (no CUDA, no package, an unsupported
            architecture), so that no weights load for a run that would fail.
    """
    from alignment.distributed import cuda_available

    mode = liger_mode(cfg.liger)
    if mode is Liger.false:
        return _unchanged
    cuda = cuda_available()
    if mode is Liger.true:
        errors = liger_errors(cfg, cuda=cuda)
        if errors:
            raise LigerUnavailableError(errors[0])
        return apply_liger
    problems = liger_problems(cfg, cuda=cuda)
    if problems:
        log.info("model.liger=auto: Liger kernels off for %s (%s)", cfg.name_or_path, "; ".join(problems))
        return _unchanged
    return apply_liger


def _unchanged(model: PreTrainedModel) -> None:
    """Leave the model as loaded."""


def apply_liger(model: PreTrainedModel) -> None:
    """Patch Liger's RMSNorm, RoPE and SwiGLU kernels onto ``model`` (before any adapter wraps it); not the loss."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    _PATCHED.add(model)
    log.info("Liger kernels (RMSNorm, RoPE, SwiGLU) on %s", type(model).__name__)


def is_patched(model: Any) -> bool:
    """Whether :func:`apply_liger` patched this model (the causal LM itself, not a DDP/PEFT wrapper)."""
    return model in _PATCHED
