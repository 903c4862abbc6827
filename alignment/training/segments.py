"""Attention per segment of a packed row: a row of many sequences costs ``Σ L_s²`` instead of ``T²``.

A padding-free row (SFT's padding-free batches and packing, the pairwise methods' pairs, GPO's groups, distillation)
holds several sequences. Under sdpa, a 4-D block mask over the row makes every layer's attention quadratic in the
whole row whatever the sequences (sdpa computes every masked block; the mask itself is ``T²`` bytes). Here the row's
layout, a :class:`SegmentLayout` (where each segment starts and ends, and the mask *inside* it), is passed to the
model's forward as the keyword :data:`KEY`: HF models hand the keywords of their forward on to their attention
function (as they do flash-attention's ``cu_seq_lens``), and the ``sdpa`` function wrapped by :func:`install` runs
each segment on its own slice of the queries, keys and values. A plain sequence has no mask (causal, so sdpa's
causal kernel skips the upper triangle); GPO's shared-prompt group ``[prompt, c_1, …, c_G]`` brings its own
``L_g x L_g`` block mask.

The wrapper replaces HF's ``sdpa`` entry of its ``AttentionInterface`` once per process; a call without the keyword
(generation, a padded batch) goes to the original function unchanged. Only sdpa is wrapped: eager attention is
model-specific (soft-capping…) and keeps the dense mask; flash-attention gets varlen boundaries instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch

KEY = "packed_segments"
"""The forward keyword that carries the :class:`SegmentLayout` to the attention function."""


@dataclass
class SegmentLayout:
    """Where each segment of a packed row starts and ends, and the mask inside it."""

    spans: list[tuple[int, int]]
    """``(start, end)`` of each segment, in order, covering the row."""
    masks: list[torch.Tensor | None]
    """Per segment a boolean ``(1, 1, L, L)`` mask (True: may attend), or None for plain causal attention."""
    calls: int = field(default=0, compare=False)
    """Attention calls that used this layout (0 after a forward: the model did not pass the keyword on)."""


def spans_of(owner: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of equal values in ``owner`` ``(tokens,)``: one span per packed sequence."""
    starts = [0, *((owner[1:] != owner[:-1]).nonzero().flatten() + 1).tolist()]
    return list(zip(starts, [*starts[1:], owner.numel()], strict=True))


def sequence_layout(spans: list[tuple[int, int]]) -> SegmentLayout:
    """The layout of a row of plain causal sequences."""
    return SegmentLayout(spans, [None] * len(spans))


def segmented(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original`` (an HF attention function) run segment by segment when the call carries :data:`KEY`."""

    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        layout: SegmentLayout | None = kwargs.pop(KEY, None)
        if layout is None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)  # type: ignore[no-any-return]
        if query.size(0) != 1 or key.size(2) != query.size(2) or layout.spans[-1][1] != query.size(2):
            raise ValueError(
                f"packed segments need one row whose queries are its keys; got query {tuple(query.shape)}, key "
                f"{tuple(key.shape)} for a layout of {layout.spans[-1][1]} tokens"
            )
        layout.calls += 1
        parts = [
            original(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], mask, *args, **kwargs)[0]
            for (a, b), mask in zip(layout.spans, layout.masks, strict=True)
        ]
        return torch.cat(parts, dim=1), None  # (1, tokens, heads, head_dim), HF's layout after attention

    attention.segments_aware = True  # type: ignore[attr-defined]
    return attention


def install() -> None:
    """Wrap HF's registered ``sdpa`` attention with :func:`segmented` (once per process; idempotent)."""
    from transformers import AttentionInterface

    current: Callable[..., Any] = cast("Callable[..., Any]", AttentionInterface._global_mapping["sdpa"])
    if not getattr(current, "segments_aware", False):
        AttentionInterface.register("sdpa", segmented(current))


def segment_kwargs(layout: SegmentLayout, device: torch.device) -> dict[str, Any]:
    """Forward keywords for a row attended segment by segment (installs the wrapper on first use).

    The ``attention_mask`` is a ``(1, 1, 1, 1)`` placeholder: a 4-D mask makes HF skip building its own ``T x T``
    mask (and its packed-sequence detection from the position ids), and the wrapper ignores it.
    """
    install()
    placeholder = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
    return {"attention_mask": placeholder, KEY: layout}


def check_used(kwargs: Mapping[str, Any], model: Any) -> None:
    """Raise when a forward with :func:`segment_kwargs` never reached the wrapped attention (nothing else does)."""
    layout = kwargs.get(KEY)
    if layout is not None and layout.calls == 0:
        name = type(getattr(model, "module", model)).__name__
        raise RuntimeError(
            f"{name} did not pass the forward keyword {KEY!r} on to its sdpa attention, so the packed row was "
            "attended as one sequence; use model.attn_implementation=eager for this model"
        )
