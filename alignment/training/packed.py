"""The padding-free packed forward that the pairwise methods, GPO and distillation share.

Several sequences are concatenated into one row with restarting ``position_ids``; a second id row says which
sequence each token belongs to. Attention must stay inside each sequence: flash-attention gets varlen boundaries
(``cu_seq_lens``), sdpa runs sequence by sequence (:mod:`alignment.training.segments`, ``Σ L²`` instead of ``T²``),
every other implementation gets an additive 4-D mask. Log-probs
are taken from the final hidden states of the positions that predict a counted (non-ignored) label, through the
output head a chunk at a time (:mod:`alignment.training.chunked`), and summed per sequence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from alignment.data.chat_template import IGNORE_INDEX
from alignment.training.chunked import final_hidden_states, head_token_logps
from alignment.training.segments import check_used, segment_kwargs, sequence_layout, spans_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def attention_implementation(model: Any) -> str | None:
    """The model's attention implementation (``sdpa``, ``eager``, ``flash_attention_2``...), through wrappers."""
    # A DDP/DeepSpeed wrapper (what the Trainer passes to compute_loss) has neither ``config`` nor ``dtype``.
    inner: PreTrainedModel = getattr(model, "module", model)
    return getattr(inner.config, "_attn_implementation", None)


def mask_kwargs(model: Any, allowed: torch.Tensor) -> dict[str, Any]:
    """A 4-D ``attention_mask`` from ``allowed`` ``(1, 1, tokens, tokens)``: boolean for sdpa, additive otherwise.

    A 4-D mask reaches the attention function as is, and eager attention *adds* it to the scores: a boolean mask
    would add 0/1 and mask nothing, so every implementation but sdpa gets the additive float form.
    """
    if attention_implementation(model) == "sdpa":
        return {"attention_mask": allowed}
    dtype = getattr(model, "module", model).dtype
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return {"attention_mask": additive.masked_fill(~allowed, torch.finfo(dtype).min)}


def attention_kwargs(model: Any, position_ids: torch.Tensor, sequence_ids: torch.Tensor) -> dict[str, Any]:
    """Keep attention inside each packed sequence.

    Varlen boundaries for flash-attention, one sdpa call per sequence for sdpa
    (:func:`~alignment.training.segments.segment_kwargs`), an additive 4-D mask otherwise.

    Args:
        model: the (possibly wrapped) model the row goes through.
        position_ids: ``(1, tokens)``, restarting at 0 for each sequence.
        sequence_ids: ``(1, tokens)``, the sequence each token belongs to.
    """
    implementation = attention_implementation(model)
    if implementation == "flash_attention_2":
        starts = (position_ids[0] == 0).nonzero().flatten()
        cu_seq_lens = torch.cat([starts, starts.new_tensor([position_ids.size(1)])]).to(torch.int32)
        longest = int(cu_seq_lens.diff().max())
        return {
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": longest,
            "max_length_k": longest,
        }
    seq = sequence_ids[0]
    if implementation == "sdpa":
        return segment_kwargs(sequence_layout(spans_of(seq)), seq.device)
    return mask_kwargs(model, (seq[:, None] == seq[None, :]).tril()[None, None])


def counted_token_logps(
    model: Any, batch: Mapping[str, torch.Tensor], attention: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the packed row; fp32 log-probs of the counted labels only, ``(counted,)``, and their positions.

    The forward goes through ``model``'s wrappers (DDP, DeepSpeed, PEFT) and stops at the final hidden states;
    only the positions that predict a counted label go through the output head, a chunk of tokens at a time
    (:func:`~alignment.training.chunked.head_token_logps`), so no ``(tokens, vocabulary)`` logits are ever held.
    The positions index the shifted row (``labels[0, 1:]``), so ``ids[0, 1:][positions]`` own the log-probs.
    """
    targets = batch["labels"][0, 1:]
    predicting = (targets != IGNORE_INDEX).nonzero().flatten()
    hidden = final_hidden_states(model, input_ids=batch["input_ids"], position_ids=batch["position_ids"], **attention)
    check_used(attention, model)
    return head_token_logps(model, hidden[0, predicting], targets[predicting]), predicting


def sum_per_sequence(values: torch.Tensor, owner: torch.Tensor, count: int) -> torch.Tensor:
    """``out[s] = sum of values[t] with owner[t] == s``, ``(count,)``; ``values`` and ``owner`` are ``(tokens,)``."""
    return torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, owner, values)
