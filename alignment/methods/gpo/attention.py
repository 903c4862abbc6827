"""GPO's packed-row layout for attention segment by segment (:mod:`alignment.training.segments`).

With a shared prompt a segment is a whole group ``[prompt, c_1, …, c_G]`` with its ``L_g x L_g`` block mask (each
completion sees the prompt and itself, causally); without one, each sequence is a plain causal segment.
"""

from __future__ import annotations

from typing import Any

import torch

from alignment.training.segments import SegmentLayout, segment_kwargs, sequence_layout, spans_of


def group_layout(segment_ids: torch.Tensor, group_ids: torch.Tensor) -> SegmentLayout:
    """The layout of a GPO row: one segment per group when the row has shared prompts, else one per sequence.

    Args:
        segment_ids: ``(tokens,)``; -1 on a shared prompt, else the completion (sequence) index.
        group_ids: ``(tokens,)``; the group of each token.
    """
    shared = bool((segment_ids < 0).any())
    spans = spans_of(group_ids if shared else segment_ids)
    if not shared:
        return sequence_layout(spans)
    masks: list[torch.Tensor | None] = []
    for start, end in spans:
        segment = segment_ids[start:end]
        visible = (segment[None, :] < 0) | (segment[:, None] == segment[None, :])
        masks.append(visible.tril()[None, None])
    return SegmentLayout(spans, masks)


def group_kwargs(segment_ids: torch.Tensor, group_ids: torch.Tensor) -> dict[str, Any]:
    """Forward keywords for a GPO row attended group by group (or sequence by sequence)."""
    return segment_kwargs(group_layout(segment_ids, group_ids), segment_ids.device)
