"""Merge a LoRA adapter into its base model and export it: ``method=export``.

The original toolkit's ``merge_peft_adapters.py``; LLaMA-Factory's ``export`` and axolotl's ``merge-lora`` do
the same. ``method.source`` is a run directory (its ``model/`` is exported) or a folder that holds a LoRA adapter
(``adapter_config.json``) or a full model (``config.json`` and weights). Which one it is, the base model an
adapter names and the tokenizer are checked before any weights load.

* **An adapter** is applied to its base (``base_model_name_or_path`` in ``adapter_config.json``, or
  ``method.base_model``), loaded in fp32 so that the merge adds the LoRA deltas at full precision: a causal LM, or
  for a ``SEQ_CLS`` adapter (``method=reward``/``classification``) a sequence classifier built with the adapter
  folder's labelled ``config.json``. The embeddings are resized to the saved tokenizer first (added tokens), then
  peft's ``merge_and_unload`` folds ``W + (alpha/r) B A`` into every adapted layer and puts the trained
  ``modules_to_save`` copies (a reward model's ``score`` head, a resized ``embed_tokens``) in place of the
  originals. The adapter folder is copied unchanged to ``<run dir>/adapter/``.
* **A full model** is loaded as its ``config.json``'s ``architectures`` says (causal LM or sequence classifier) and
  saved as is.

The weights are then cast to ``method.dtype`` (default: the checkpoint's own dtype; an adapter's is its base's) and
written to ``<run dir>/model/`` as safetensors, with ``config.json`` (and ``generation_config.json`` for a causal
LM) and the tokenizer with its chat template: the layout a training run leaves, so the export's run directory can
be used wherever a trained one can (``model.name_or_path=<run dir>/model``, ``method.reward_model.path``…).
``method.push_to_hub`` then uploads ``model/`` to the hub repo ``method.hub_repo_id`` (created if missing, private
by default; credentials from ``huggingface-cli login`` or ``$HF_TOKEN``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.task import TaskConfig

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from alignment.config import RunConfig
    from alignment.context import RunContext

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_DIR = "adapter"
"""Folder of the run directory that receives a copy of the merged adapter."""
# A hub repo id, ``<user or org>/<name>``.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Not part of an adapter: the Trainer's pickled arguments (the runner deletes them from model/ too).
_NOT_COPIED = ("training_args.bin",)


class SaveDtype(StrEnum):
    """Dtype of the exported weights."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class ExportConfig(TaskConfig):
    """Merge a LoRA adapter into its base (or take a full model) and save it in safetensors with its tokenizer."""

    name: str = "export"
    """Registry key."""
    source: str | None = None
    """Run directory (its ``model/`` is exported), or a folder with a LoRA adapter or a full model; required."""
    base_model: str | None = None
    """An adapter's base model instead of the one its ``adapter_config.json`` names (a moved folder, a hub id,
    ``embedded:<name>``)."""
    dtype: SaveDtype | None = None
    """Dtype of the saved weights; None keeps the checkpoint's (an adapter's: its base model's)."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the model."""
    push_to_hub: bool = False
    """Upload the exported ``model/`` to the hub repo ``hub_repo_id`` after saving it."""
    hub_repo_id: str | None = None
    """``<user or org>/<name>`` of the hub model repo; required with ``push_to_hub``."""
    hub_private: bool = True
    """Create the hub repo private (an existing repo keeps its visibility)."""

    def __post_init__(self) -> None:
        if self.push_to_hub and not self.hub_repo_id:
            raise ValueError("method.push_to_hub=true needs method.hub_repo_id=<user or org>/<name>")
        if self.hub_repo_id is not None and not _REPO_ID.match(self.hub_repo_id):
            raise ValueError(f"method.hub_repo_id={self.hub_repo_id!r}: expected <user or org>/<name>")


# --- what the source holds (no weights loaded) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """The folder to export and what it holds."""

    folder: Path
    """The adapter's or the model's folder."""
    base_model: str | None
    """The base model an adapter is merged into (a folder or a hub id); None for a full model."""
    tokenizer: str
    """Where the tokenizer is read from: the folder itself, or an adapter's base model when the folder has none."""


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def _holds_export(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file() or ((folder / "config.json").is_file() and _has_weights(folder))


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file()


def _source_folder(source: str) -> Path:
    """The folder ``method.source`` names: itself, or a run directory's ``model/``.

    Raises:
        FileNotFoundError: no such path, or neither it nor its ``model/`` holds an adapter or a model.
    """
    from alignment.models import embedded

    given = Path(embedded.resolve(source))
    if not given.exists():
        raise FileNotFoundError(f"method.source={source!r}: no such file or folder")
    for folder in (given, given / "model"):
        if folder.is_dir() and _holds_export(folder):
            return folder
    also = f" nor does its model/ ({given / 'model'})" if (given / "model").is_dir() else ""
    raise FileNotFoundError(
        f"method.source={source!r}: {given} holds neither a LoRA adapter ({ADAPTER_CONFIG}) nor a model "
        f"(config.json and *.safetensors or pytorch_model*.bin weights){also}; expected a run directory, an adapter "
        "folder or a model folder"
    )


def _adapter_base(folder: Path, override: str | None) -> str:
    """The base model of the adapter in ``folder``: ``override``, else the one its ``adapter_config.json`` names.

    Raises:
        ValueError: the adapter names no base model and none was given.
        FileNotFoundError: the base is a local path (not shaped like a hub id) that does not exist.
    """
    from alignment.models import embedded

    named = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    base = override or named
    key = "method.base_model" if override else f"{folder / ADAPTER_CONFIG}: base_model_name_or_path"
    if not base:
        raise ValueError(f"{folder / ADAPTER_CONFIG} names no base model; set method.base_model=<folder or hub id>")
    base = embedded.resolve(base) if embedded.is_embedded(base) else base
    if not Path(base).exists() and not _REPO_ID.match(base):
        hint = "" if override else "; set method.base_model=<folder or hub id> if the base model moved"
        raise FileNotFoundError(f"{key}={base!r}: no such folder{hint}")
    return str(base)


def resolve_source(cfg: ExportConfig) -> Source:
    """Find what to export and its tokenizer, before any weights load.

    Raises:
        ValueError: no ``method.source``, or an adapter without a base model.
        FileNotFoundError: the source, its model or adapter, its base model or its tokenizer is missing.
    """
    if not cfg.source:
        raise ValueError(
            "method.source is required: a run directory (its model/ is exported), or a folder with a LoRA adapter "
            f"({ADAPTER_CONFIG}) or a full model (config.json and weights)"
        )
    folder = _source_folder(cfg.source)
    if not (folder / ADAPTER_CONFIG).is_file():
        if not _has_tokenizer(folder):
            raise FileNotFoundError(f"{folder}: the model has no tokenizer (tokenizer_config.json) to export with it")
        return Source(folder, None, str(folder))
    base = _adapter_base(folder, cfg.base_model)
    return Source(folder, base, str(folder) if _has_tokenizer(folder) else base)


# --- loading and merging --------------------------------------------------------------------------------------------


def _is_classifier(config: PretrainedConfig) -> bool:
    return any(name.endswith("ForSequenceClassification") for name in config.architectures or ())


def _torch_dtype(wanted: SaveDtype | None, config: PretrainedConfig) -> torch.dtype:
    """``wanted``, else the dtype the checkpoint's config records (fp32 when it records none)."""
    import torch

    if wanted is not None:
        dtype: torch.dtype = getattr(torch, wanted.value)
        return dtype
    recorded = config.dtype
    if isinstance(recorded, str):
        recorded = getattr(torch, recorded)
    return recorded if isinstance(recorded, torch.dtype) else torch.float32


def merge_adapter(source: Source, tokenizer: PreTrainedTokenizerBase, *, trust_remote_code: bool) -> PreTrainedModel:
    """The adapter in ``source.folder`` merged into its base, in fp32 (``modules_to_save`` copies included)."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    assert source.base_model is not None
    folder = source.folder
    labelled = (folder / "config.json").is_file()  # method=reward/classification save the labelled config beside
    config = AutoConfig.from_pretrained(
        str(folder) if labelled else source.base_model, trust_remote_code=trust_remote_code
    )
    classifier = PeftConfig.from_pretrained(str(folder)).task_type == "SEQ_CLS" or _is_classifier(config)
    auto: Any = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    extra = {"config": config} if classifier else {}
    base = auto.from_pretrained(source.base_model, dtype=torch.float32, trust_remote_code=trust_remote_code, **extra)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:  # tokens added in training
        base.resize_token_embeddings(len(tokenizer))
    merged: PreTrainedModel = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    return merged


def load_full_model(folder: Path, dtype: torch.dtype, *, trust_remote_code: bool) -> PreTrainedModel:
    """A full model in ``dtype``: a sequence classifier or a causal LM, as its config's ``architectures`` says."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    auto: Any = AutoModelForSequenceClassification if _is_classifier(config) else AutoModelForCausalLM
    model: PreTrainedModel = auto.from_pretrained(str(folder), dtype=dtype, trust_remote_code=trust_remote_code)
    return model


def _base_config(source: Source, *, trust_remote_code: bool) -> PretrainedConfig:
    from transformers import AutoConfig

    config: PretrainedConfig = AutoConfig.from_pretrained(
        source.base_model or str(source.folder), trust_remote_code=trust_remote_code
    )
    return config


# --- writing ------------------------------------------------------------------------------------------------------


def push_to_hub(folder: Path, repo_id: str, *, private: bool) -> str:
    """Upload ``folder`` to the hub model repo ``repo_id`` (created if missing); return the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message="Upload model exported by effective-alignment"
    )
    return str(commit)


def _fresh(folder: Path) -> Path:
    """``folder``, emptied of an earlier export into the same run directory."""
    if folder.exists():
        shutil.rmtree(folder)
    return folder


def run(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Check the source, merge or load, cast, save ``model/`` (and copy the adapter), push if asked.

    Raises:
        ValueError: no ``method.source``; an adapter without a base model; the source is this run's ``model/``.
        FileNotFoundError: the source, its adapter or model, its base model or its tokenizer is missing.
    """
    from transformers import AutoTokenizer

    method = cfg.method
    assert isinstance(method, ExportConfig)
    source = resolve_source(method)
    if source.folder.resolve() == ctx.model_dir.resolve():
        raise ValueError(f"method.source={method.source!r} is this run's own model/; export into another run directory")
    remote = method.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer, trust_remote_code=remote)
    dtype = _torch_dtype(method.dtype, _base_config(source, trust_remote_code=remote))
    if source.base_model is not None:
        model = merge_adapter(source, tokenizer, trust_remote_code=remote).to(dtype)  # type: ignore[arg-type]
    else:
        model = load_full_model(source.folder, dtype, trust_remote_code=remote)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # batched scoring of a classifier needs it
    model_dir = _fresh(ctx.model_dir)
    model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    if source.base_model is not None:
        shutil.copytree(
            source.folder, _fresh(ctx.output_dir / ADAPTER_DIR), ignore=shutil.ignore_patterns(*_NOT_COPIED)
        )
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    log.info(
        "exported %s%s as %s to %s (%s)",
        source.folder,
        f" merged into {source.base_model}" if source.base_model else "",
        type(model).__name__,
        model_dir,
        str(dtype).removeprefix("torch."),
    )
    if method.push_to_hub:
        assert method.hub_repo_id is not None
        log.info(
            "pushed %s: %s", method.hub_repo_id, push_to_hub(model_dir, method.hub_repo_id, private=method.hub_private)
        )
    return {
        "export/parameters": float(model.num_parameters()),
        "export/merged_adapter": float(source.base_model is not None),
        "export/safetensors_bytes": float(weights),
    }
