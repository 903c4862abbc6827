"""Schema of the ``model`` config group: what to load and how to make it trainable."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from omegaconf import MISSING

from alignment.ranges import RangeError, bounded


class Dtype(StrEnum):
    """Parameter dtype at load time."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class AttnImplementation(StrEnum):
    """Attention kernel passed to ``from_pretrained``."""

    auto = "auto"
    """``flash_attention_2`` where it can run (CUDA of compute capability 8.0+, a bf16/fp16 model, an importable
    ``flash-attn``, an architecture transformers supports it for), ``sdpa`` everywhere else."""
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"


class Liger(StrEnum):
    """``model.liger``: Liger-kernel's Triton kernels (RMSNorm, RoPE, SwiGLU; the fused linear cross entropy in SFT)."""

    auto = "auto"
    """On where CUDA, the ``liger-kernel`` package and Liger kernels for the architecture are all present."""
    true = "true"
    """On; a run that cannot have them fails before any weights load."""
    false = "false"
    """Off: the model's own modules (and the chunked loss in SFT)."""


class LoraTaskType(StrEnum):
    """peft task type: a causal LM head, or a sequence-classification head (reward models, classifiers)."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"


@dataclass
class LoraConfig:
    """LoRA / DoRA / rsLoRA adapters through peft."""

    enabled: bool = False
    """Train adapters instead of the full model; the run saves only the adapter."""
    r: int = bounded(16, ge=1)
    """Adapter rank."""
    alpha: int = bounded(32, ge=1)
    """Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA)."""
    dropout: float = bounded(0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names (or peft's ``all-linear``) that get adapters."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters (e.g. ``embed_tokens`` after adding tokens, ``score``)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA, https://arxiv.org/abs/2402.09353)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r) (https://arxiv.org/abs/2312.03732)."""
    task_type: LoraTaskType = LoraTaskType.CAUSAL_LM
    """peft task type; reward and classification methods need SEQ_CLS."""


@dataclass
class QuantizationConfig:
    """bitsandbytes quantisation for QLoRA; needs bitsandbytes and a CUDA device."""

    load_in_4bit: bool = False
    """Load linear weights in 4 bit (QLoRA)."""
    load_in_8bit: bool = False
    """Load linear weights in 8 bit."""
    bnb_4bit_quant_type: str = "nf4"
    """4-bit data type: ``nf4`` or ``fp4``."""
    bnb_4bit_use_double_quant: bool = True
    """Quantise the quantisation constants too (saves ~0.4 bit per parameter)."""
    bnb_4bit_compute_dtype: Dtype = Dtype.bfloat16
    """Dtype of the matmuls on de-quantised weights."""


class ReferenceKind(StrEnum):
    """Where a frozen model's outputs (a reference policy, a teacher) come from."""

    auto = "auto"
    """``adapters`` when the policy trains LoRA adapters, ``copy`` otherwise."""
    copy = "copy"
    """A frozen second copy of the starting model."""
    adapters = "adapters"
    """The policy itself with its LoRA adapters disabled (no second copy; needs ``model.lora.enabled``)."""
    precomputed = "precomputed"
    """Computed once before training (by a frozen copy), cached on disk, and reused by later runs and sweep jobs."""


class TruncationSide(StrEnum):
    """Which end of an over-long sequence is cut."""

    left = "left"
    """Cut the start, keep the end (the last turns, the answer being judged)."""
    right = "right"
    """Cut the end, keep the start."""


class ProblemType(StrEnum):
    """HF ``config.problem_type`` of a classifier (what its loss and metrics assume)."""

    regression = "regression"
    single_label_classification = "single_label_classification"
    multi_label_classification = "multi_label_classification"


# --- tokenising ---------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """A causal LM (or classifier backbone) with its tokenizer."""

    name_or_path: str = MISSING
    """HF hub id, local folder, or ``embedded:<name>`` for a model the project ships."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin."""
    dtype: Dtype = Dtype.auto
    """``auto``: bf16 on a GPU that supports it, fp32 otherwise (CPUs here have no native bf16)."""
    attn_implementation: AttnImplementation = AttnImplementation.auto
    """Attention kernel: ``auto`` (flash-attention 2 where it can run, else sdpa), ``sdpa``, ``eager`` or
    ``flash_attention_2`` (needs the flash-attn package and a GPU)."""
    liger: str = Liger.auto
    """Liger kernels patched on the loaded model: ``auto``, ``true`` or ``false`` (:class:`Liger`). A string field
    because OmegaConf refuses booleans for an Enum field, and ``model.liger=true`` parses as one."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the checkpoint. Off unless you set it."""
    chat_template: str | None = None
    """Jinja chat template, used when the tokenizer has none (or always, with ``force_chat_template``)."""
    force_chat_template: bool = False
    """Replace the tokenizer's own template with ``chat_template``."""
    pad_token: str | None = None
    """Pad token override; unset keeps the tokenizer's (eos when it has none)."""
    eos_token: str | None = None
    """End-of-sequence/turn token override; unset keeps the tokenizer's."""
    bos_token: str | None = None
    """Beginning-of-sequence token override; unset keeps the tokenizer's."""
    added_special_tokens: list[str] = field(default_factory=list)
    """Extra special tokens; the embeddings are resized (train them with LoRA via ``modules_to_save``)."""
    unfreeze_layers_patterns: list[str] = field(default_factory=list)
    """fnmatch patterns over module names to train when LoRA is off; everything else is frozen. Empty: all."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapters (``model.lora.enabled=true``)."""
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    """QLoRA / 8-bit loading."""

    def __post_init__(self) -> None:
        self.liger = liger_mode(self.liger)


def liger_mode(value: object) -> Liger:
    """``model.liger`` as a :class:`Liger`: ``auto``/``true``/``false`` in any case (YAML and overrides give ``True``).

    Raises:
        RangeError: any other value (a user error: printed without a traceback).
    """
    text = str(value).lower()
    if text not in Liger.__members__:
        raise RangeError(f"model.liger must be auto, true or false, got {value!r}")
    return Liger(text)
