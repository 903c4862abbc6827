"""Model + tokenizer + adapters from a :class:`ModelConfig`. No trainer logic lives here."""

from __future__ import annotations

import fnmatch
import logging
import re
from collections import defaultdict
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from alignment.models import embedded
from alignment.models.config import AttnImplementation, Dtype, LoraConfig, ModelConfig, QuantizationConfig
from alignment.models.liger import liger_patch
from alignment.models.sharded import measured_load, parameter_numel, sharded_creation

log = logging.getLogger(__name__)

_TORCH_DTYPES = {Dtype.float32: torch.float32, Dtype.bfloat16: torch.bfloat16, Dtype.float16: torch.float16}
_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token")
# A purely numeric name segment (a ModuleList index), nested ones included: experts.3.1.w -> experts.X.X.w.
_LAYER_INDEX = re.compile(r"(^|\.)\d+(?=\.)")


def resolve_dtype(dtype: Dtype) -> torch.dtype:
    """``auto`` is bf16 on a CUDA device with bf16 support, fp32 everywhere else."""
    if dtype is Dtype.auto:
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return _TORCH_DTYPES[dtype]


def flash_attention_runs(dtype: torch.dtype) -> bool:
    """Whether flash-attention 2 can run here for a model in ``dtype``: CUDA 8.0+, bf16/fp16, flash-attn imports."""
    from transformers.utils.import_utils import is_flash_attn_2_available

    if dtype not in (torch.bfloat16, torch.float16) or not torch.cuda.is_available():
        return False
    capable = all(torch.cuda.get_device_capability(i)[0] >= 8 for i in range(torch.cuda.device_count()))
    return capable and bool(is_flash_attn_2_available())


def resolve_attention(cfg: ModelConfig) -> str:
    """The ``attn_implementation`` for ``from_pretrained``; ``auto`` is flash-attention 2 where it runs, else sdpa."""
    if cfg.attn_implementation is not AttnImplementation.auto:
        return cfg.attn_implementation.value
    return "flash_attention_2" if flash_attention_runs(resolve_dtype(cfg.dtype)) else "sdpa"


def from_pretrained(model_class: Any, cfg: ModelConfig, **kwargs: Any) -> PreTrainedModel:
    """``model_class.from_pretrained`` with the config's source, dtype, attention and remote-code switch.

    Under ``attn_implementation=auto`` an architecture that transformers has no flash-attention 2 for is refused in
    the model's constructor, before any weights load; it then loads with sdpa (logged).
    """
    attention = resolve_attention(cfg)
    common = {
        "revision": cfg.revision,
        "dtype": resolve_dtype(cfg.dtype),
        "trust_remote_code": cfg.trust_remote_code,
        **kwargs,
    }
    source = embedded.resolve(cfg.name_or_path)
    try:
        return model_class.from_pretrained(source, attn_implementation=attention, **common)  # type: ignore[no-any-return]
    except (ValueError, ImportError) as error:
        if cfg.attn_implementation is not AttnImplementation.auto or attention != "flash_attention_2":
            raise
        log.warning("model.attn_implementation=auto: flash_attention_2 refused (%s); loading with sdpa", error)
        return model_class.from_pretrained(source, attn_implementation="sdpa", **common)  # type: ignore[no-any-return]


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Load the tokenizer and apply the overrides; unset overrides keep the tokenizer's own tokens.

    An embedded model's tokenizer comes without its weights (:func:`~alignment.models.embedded.resolve_tokenizer`).
    """
    tokenizer = AutoTokenizer.from_pretrained(
        embedded.resolve_tokenizer(cfg.name_or_path), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    # add_special_tokens, not setattr: a token missing from the vocabulary is added (setattr would map it to the
    # unk id), and an unset override leaves the tokenizer's own token alone.
    overrides = {attr: value for attr in _SPECIAL_TOKENS if (value := getattr(cfg, attr)) is not None}
    if overrides:
        tokenizer.add_special_tokens(overrides)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.chat_template is not None and (tokenizer.chat_template is None or cfg.force_chat_template):
        tokenizer.chat_template = cfg.chat_template
    if tokenizer.chat_template is None:
        raise ValueError(
            f"tokenizer of {cfg.name_or_path!r} has no chat template; set model.chat_template "
            "(a Jinja string) in the model config"
        )
    if cfg.added_special_tokens:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": list(cfg.added_special_tokens)},
            replace_extra_special_tokens=False,
        )
    return tokenizer


def quantization_kwargs(cfg: QuantizationConfig) -> dict[str, Any]:
    """``from_pretrained`` keywords of a 4-bit or 8-bit (bitsandbytes) load; empty without quantization."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return {}
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=cfg.load_in_4bit,
            load_in_8bit=cfg.load_in_8bit,
            bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=resolve_dtype(cfg.bnb_4bit_compute_dtype),
        )
    }


def _sync_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig) -> None:
    """Resize the embeddings to the tokenizer and copy its special-token ids into the model's configs.

    The pad id always follows the tokenizer, since that is what batches are padded with (sequence-classification
    heads find the last token through it). bos/eos follow the tokenizer only when overridden or missing: a
    checkpoint's own ids may list several stop tokens (Llama 3's ``generation_config.eos_token_id``).
    """
    if len(tokenizer) > embedding_rows(model):
        model.resize_token_embeddings(len(tokenizer))
    for attr in _SPECIAL_TOKENS:
        token_id = getattr(tokenizer, f"{attr}_id")
        overridden = attr == "pad_token" or getattr(cfg, attr) is not None
        for target in (model.config, model.generation_config):
            if target is not None and (overridden or getattr(target, f"{attr}_id", None) is None):
                setattr(target, f"{attr}_id", token_id)


def embedding_rows(model: PreTrainedModel) -> int:
    """Rows of the input embedding matrix; a ZeRO-3 partitioned one keeps its real shape in ``ds_shape``."""
    weight: Any = model.get_input_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def _touches_tied_embeddings(model: PreTrainedModel, cfg: LoraConfig) -> bool:
    """Whether the adapter trains (a copy of) an embedding matrix that is tied to the LM head."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    tied = {model.get_input_embeddings(), model.get_output_embeddings()}  # type: ignore[no-untyped-call]
    names = [name for name, module in model.named_modules() if module in tied]
    wanted = [*cfg.modules_to_save, *(t for t in cfg.target_modules if t != "all-linear")]
    return any(name == w or name.endswith("." + w) for name in names for w in wanted)


def apply_lora(model: PreTrainedModel, cfg: LoraConfig) -> PreTrainedModel:
    """Wrap the model with peft adapters; only adapters (and ``modules_to_save``) stay trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets: str | list[str] = list(cfg.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=list(cfg.modules_to_save) or None,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        task_type=cfg.task_type.value,
        bias="none",
        # A trained copy of a tied embedding must stay tied to the LM head, or the output rows of added tokens
        # never train and merging the adapter unties the model.
        ensure_weight_tying=_touches_tied_embeddings(model, cfg),
    )
    return get_peft_model(model, peft_cfg)  # type: ignore[no-any-return]


def unfreeze_by_patterns(model: torch.nn.Module, patterns: list[str]) -> None:
    """Freeze everything, then unfreeze every module whose dotted name matches a pattern (fnmatch, ``*`` spans dots).

    Raises:
        ValueError: a pattern matches no module (a typo would otherwise freeze the whole model).
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for pattern in patterns:
        matched = [module for name, module in model.named_modules() if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(f"model.unfreeze_layers_patterns: {pattern!r} matches no module name")
        for module in matched:
            for param in module.parameters():
                param.requires_grad_(True)


def load_model(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, *, frozen: bool = False, sharded: bool = True
) -> PreTrainedModel:
    """Load the causal LM, resize for added tokens, then apply LoRA or layer unfreezing.

    ``frozen``: the model never trains (a reference or a teacher), so quantised loading needs no adapters.
    ``sharded``: created under the run's sharding (:mod:`alignment.models.sharded`: ZeRO-3 ``zero.Init``, FSDP2
    rank-0 loading); False loads it whole on every rank. Without a sharding backend both are the same.

    Raises:
        ValueError: quantised loading without LoRA for a model that trains (quantised weights cannot be trained
            in full).
    """
    quantized = cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit
    if quantized and not cfg.lora.enabled and not frozen:
        raise ValueError(
            "model.quantization needs model.lora.enabled=true: quantised weights only train through adapters"
        )
    patch_kernels = liger_patch(cfg)  # model.liger=true that cannot run here fails before any weights load
    with sharded_creation(sharded), measured_load("frozen" if frozen else "policy", sharded=sharded) as load:
        model = from_pretrained(AutoModelForCausalLM, cfg, **quantization_kwargs(cfg.quantization))
        load.model = model
    patch_kernels(model)
    _sync_special_tokens(model, tokenizer, cfg)
    if cfg.lora.enabled:
        if cfg.unfreeze_layers_patterns:
            log.warning("model.unfreeze_layers_patterns is ignored with LoRA: only adapters train")
        model = apply_lora(model, cfg.lora)
    elif cfg.unfreeze_layers_patterns:
        unfreeze_by_patterns(model, list(cfg.unfreeze_layers_patterns))
    print_parameter_table(model)
    return model


def parameter_groups(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Trainable and total parameter counts per module group, layer indices folded to ``X``."""
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, param in model.named_parameters():
        key = _LAYER_INDEX.sub(r"\1X", name)
        _, numel = parameter_numel(param)  # the whole parameter, also when ZeRO-3 holds a partition here
        groups[key][0] += numel if param.requires_grad else 0
        groups[key][1] += numel
    return {key: (trainable, total) for key, (trainable, total) in groups.items()}


def print_parameter_table(model: torch.nn.Module) -> None:
    """Print trainable vs total parameters by module group, then the totals."""
    groups = parameter_groups(model)
    table = Table(title="Parameters by module group")
    for column in ("module group", "trainable", "total", "%"):
        table.add_column(column, justify="left" if column == "module group" else "right")
    for key, (trainable, total) in sorted(groups.items()):
        table.add_row(key, f"{trainable:,}", f"{total:,}", f"{100 * trainable / max(total, 1):.1f}")
    trainable = sum(t for t, _ in groups.values())
    total = sum(n for _, n in groups.values())
    table.add_row("[bold]all[/bold]", f"{trainable:,}", f"{total:,}", f"{100 * trainable / max(total, 1):.2f}")
    Console().print(table)
