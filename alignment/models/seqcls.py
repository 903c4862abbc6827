"""Sequence-classification models (reward models, classifiers): the one path to load, tokenise and score them.

Training (``method=reward``, ``method=classification``), evaluation, and the RM-scoring and rejection-sampling
tools all go through the functions here, so a saved model scores the same text the same way everywhere:

* **Tokenising.** A message list is rendered with the tokenizer's chat template (no generation prompt) and
  tokenised without adding special tokens (the template writes them); plain text is tokenised with the
  tokenizer's special tokens. Sequences longer than ``max_length`` lose their start (``left``, the default for
  reward models: the end of the conversation is what is judged) or their end (``right``).
* **Pooling.** A decoder's sequence score is the head's output at the last *attended* token, found from the
  attention mask. HF's own pooling takes the last token that differs from ``pad_token_id``, which picks the wrong
  token whenever pad == eos and a sequence ends in eos (SmolLM2's ``<|im_end|>``); so the head's per-token
  output is taken with a forward hook and pooled here.
* **Saving/loading.** ``method=reward`` saves a full model (``config.json`` with ``num_labels=1``) or a LoRA
  ``SEQ_CLS`` adapter (``adapter_config.json``, the trained head in ``modules_to_save``, plus the labelled
  ``config.json``); :func:`load_sequence_classifier` loads either, merging adapters into the base.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.models.config import ProblemType, TruncationSide

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from alignment.models.config import ModelConfig

log = logging.getLogger(__name__)

HEAD_NAMES = ("score", "classifier")
"""Attribute names of a sequence-classification head (decoders use ``score``)."""


def encode(
    tokenizer: PreTrainedTokenizerBase,
    content: str | Sequence[dict[str, str]],
    *,
    max_length: int,
    truncation_side: TruncationSide | str = TruncationSide.left,
) -> tuple[list[int], bool]:
    """Token ids of plain text or a rendered conversation, cut to ``max_length``; and whether it was cut."""
    if isinstance(content, str):
        ids: list[int] = tokenizer(content, add_special_tokens=True)["input_ids"]
    else:
        text = tokenizer.apply_chat_template(list(content), tokenize=False, add_generation_prompt=False)
        assert isinstance(text, str)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_length:
        return ids, False
    keep_end = TruncationSide(truncation_side) is TruncationSide.left
    return (ids[len(ids) - max_length :] if keep_end else ids[:max_length]), True


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask``, both ``(batch, longest)``."""
    import torch

    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def padded_batches(lengths: Sequence[int], max_tokens_per_batch: int) -> list[list[int]]:
    """Indices grouped longest first so each padded batch (rows x longest) stays within the token budget.

    A sequence longer than the budget forms a batch alone; every index appears exactly once.
    """
    if max_tokens_per_batch < 1:
        raise ValueError(f"max_tokens_per_batch must be >= 1, got {max_tokens_per_batch}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        # Longest first: the batch's first (longest) sequence sets its padded width.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens_per_batch:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


# --- the forward ------------------------------------------------------------------------------------------------


def head_module(model: torch.nn.Module) -> torch.nn.Module:
    """The classification head (``score``/``classifier``), outermost wrapper included (a peft copy of it).

    Raises:
        ValueError: the model has no module with one of :data:`HEAD_NAMES` as its last name segment.
    """
    found = [(name, module) for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in HEAD_NAMES]
    if not found:
        raise ValueError(f"{type(model).__name__} has no classification head named one of {HEAD_NAMES}")
    head: torch.nn.Module = min(found, key=lambda item: item[0].count("."))[1]
    return head


def sequence_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor,
    **inputs: torch.Tensor,
) -> torch.Tensor:
    """Head output at each sequence's last attended token, ``(batch, num_labels)``; gradients flow through it.

    ``input_ids`` and ``attention_mask`` are ``(batch, seq)``, padded on either side. ``input_ids`` may be None
    with ``inputs_embeds`` in ``inputs`` (and ``position_ids``): the pooling reads the mask, so it is right where
    HF's own pooling (which cannot see padding in embeddings) takes the last position.
    """
    import torch

    captured: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        captured.append(output)

    handle = head_module(model).register_forward_hook(keep)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs)
    finally:
        handle.remove()
    per_token = captured[-1]
    if per_token.dim() == 2:  # an encoder head that pools by itself (BERT-style ``classifier``)
        return per_token
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    last = (positions * attention_mask.to(positions.dtype)).argmax(-1).to(per_token.device)
    return per_token[torch.arange(per_token.size(0), device=per_token.device), last]


# --- loading --------------------------------------------------------------------------------------------------------


def _resolve_device(device: str | None) -> torch.device:
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _set_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # HF's forward refuses batches > 1 without a pad id (our pooling does not use it, see the module docstring).
    model.config.pad_token_id = tokenizer.pad_token_id


def load_sequence_classifier(
    path: str,
    *,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (eval mode, on ``device``) and tokenizer from a folder saved by ``method=reward``/``classification``.

    A folder with ``adapter_config.json`` is a LoRA adapter: its base model is loaded with the folder's
    ``config.json`` (labels, ``problem_type``), the embeddings are resized to the saved tokenizer, and the adapter
    (with the trained head) is merged in. ``dtype`` ``auto`` is bf16 on a bf16-capable GPU, fp32 otherwise.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from alignment.models.config import Dtype
    from alignment.models.load import resolve_dtype

    folder = Path(path)
    torch_dtype = resolve_dtype(Dtype(dtype))
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model: PreTrainedModel
    if (folder / "adapter_config.json").is_file():
        from peft import PeftConfig, PeftModel

        base_path = PeftConfig.from_pretrained(path).base_model_name_or_path
        config_source = path if (folder / "config.json").is_file() else base_path
        config = AutoConfig.from_pretrained(config_source, trust_remote_code=trust_remote_code)
        base = AutoModelForSequenceClassification.from_pretrained(
            base_path, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
        if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
            base.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(base, path).merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    _set_pad_token(model, tokenizer)
    model.to(_resolve_device(device))  # type: ignore[arg-type]
    model.train(False)
    return model, tokenizer


def load_reward_model(
    path: str,
    *,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A reward model (one output) saved by ``method=reward``: full model or LoRA ``SEQ_CLS`` adapter, merged.

    Raises:
        ValueError: the folder holds a classifier with more than one output.
    """
    model, tokenizer = load_sequence_classifier(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if model.config.num_labels != 1:
        raise ValueError(f"{path}: a reward model has one output, this model has num_labels={model.config.num_labels}")
    return model, tokenizer


def score_conversations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict[str, str]]],
    *,
    max_length: int = 2048,
    max_tokens_per_batch: int = 16384,
    truncation_side: str = "left",
) -> list[float]:
    """One reward per conversation, in input order.

    Each conversation is rendered with the chat template and tokenised by :func:`encode`; the sequences are
    sorted by length and padded into batches of at most ``max_tokens_per_batch`` tokens (rows x longest).

    Raises:
        ValueError: the model has more than one output.
    """
    import torch

    if model.config.num_labels != 1:
        raise ValueError(f"score_conversations needs a reward model (num_labels=1), got {model.config.num_labels}")
    side = TruncationSide(truncation_side)
    encoded = [encode(tokenizer, c, max_length=max_length, truncation_side=side)[0] for c in conversations]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    scores = [0.0] * len(encoded)
    with torch.no_grad():
        for batch in padded_batches([len(ids) for ids in encoded], max_tokens_per_batch):
            input_ids, attention_mask = pad_batch([encoded[i] for i in batch], pad_id)
            values = sequence_scores(model, input_ids.to(device), attention_mask.to(device))[:, 0]
            for index, value in zip(batch, values.float().cpu().tolist(), strict=True):
                scores[index] = value
    return scores


# --- the training-side model ----------------------------------------------------------------------------------------


def load_model_for_classification(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    labels: Sequence[str],
    problem_type: ProblemType,
) -> PreTrainedModel:
    """A sequence-classification model from a :class:`ModelConfig` to train, with ``len(labels)`` outputs.

    Like :func:`alignment.models.load.load_model`, but with a head named by ``labels`` (``id2label``). LoRA always
    uses peft's ``SEQ_CLS`` task (which trains the head in full); without LoRA the head trains whatever
    ``unfreeze_layers_patterns`` say, since a frozen random head could not learn anything.

    Raises:
        ValueError: quantised loading without LoRA.
    """
    from dataclasses import replace

    from transformers import AutoModelForSequenceClassification

    from alignment.models.config import LoraTaskType
    from alignment.models.load import (
        apply_lora,
        embedding_rows,
        from_pretrained,
        print_parameter_table,
        quantization_kwargs,
        unfreeze_by_patterns,
    )
    from alignment.models.sharded import measured_load, sharded_creation

    quantized = cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit
    if quantized and not cfg.lora.enabled:
        raise ValueError(
            "model.quantization needs model.lora.enabled=true: quantised weights only train through adapters"
        )
    # Created under the run's sharding (ZeRO-3 zero.Init, FSDP2 rank-0 loading), like load_model's.
    with sharded_creation(True), measured_load("classifier", sharded=True) as load:
        model = from_pretrained(
            AutoModelForSequenceClassification,
            cfg,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            problem_type=problem_type.value,
            **quantization_kwargs(cfg.quantization),
        )
        load.model = model
    # A classifier has no generation config, so only the resize and the ids of load.py's sync apply.
    if len(tokenizer) > embedding_rows(model):
        model.resize_token_embeddings(len(tokenizer))
    _set_pad_token(model, tokenizer)
    for attr in ("bos_token_id", "eos_token_id"):
        if getattr(tokenizer, attr) is not None:
            setattr(model.config, attr, getattr(tokenizer, attr))
    if cfg.lora.enabled:
        if cfg.lora.task_type is not LoraTaskType.SEQ_CLS:
            log.warning("model.lora.task_type=%s: using SEQ_CLS, which trains the head", cfg.lora.task_type.value)
        model = apply_lora(model, replace(cfg.lora, task_type=LoraTaskType.SEQ_CLS))
    elif cfg.unfreeze_layers_patterns:
        unfreeze_by_patterns(model, list(cfg.unfreeze_layers_patterns))
        head_module(model).requires_grad_(True)
    print_parameter_table(model)
    return model


def save_classifier(model: Any, tokenizer: PreTrainedTokenizerBase, model_dir: Path) -> None:
    """Write the labelled ``config.json`` beside an adapter (a full model's ``save_pretrained`` already has it).

    The trainer saves the weights or adapter and the tokenizer; this keeps ``id2label``/``label2id``,
    ``num_labels`` and ``pad_token_id`` with an adapter too, for :func:`load_sequence_classifier`.
    """
    inner = getattr(model, "module", model)
    if (model_dir / "adapter_config.json").is_file():
        inner.get_base_model().config.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
