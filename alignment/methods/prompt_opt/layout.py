r"""Where the prompt goes in each token sequence, and the batches that carry it.

Every conversation is rendered through the chat template with a sentinel as the content of the inserted role's
message, placed first (the data's messages of that role are removed). The text before the sentinel is the
*head* (BOS and the role's header, e.g. ``<|im_start|>system\\n``), the text after it the *tail* (the role's
end-of-turn and the rest of the conversation). The head and the tail are tokenised apart, so a training sequence
is ``head ids | L prompt slots | tail ids``; the labels of the head and the slots are ignored.

Evaluation renders each conversation again with the prompt's decoded text as that message and tokenises it as a
whole (:func:`shipped_sequence`): what a user gets by pasting the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from alignment.data.chat_template import (
    IGNORE_INDEX,
    ChatTemplateError,
    Message,
    message_spans,
    tokenize_conversation,
)
from alignment.data.validate import empty_split_error
from alignment.methods.prompt_opt.prompt_opt import Objective, PromptOptConfig

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

SENTINEL = "@@PROMPT_SLOT_7f3a@@"
"""Stands for the prompt while rendering; its position splits the text into head and tail."""


@dataclass(frozen=True)
class Placement:
    """One conversation around the prompt: the head's and the tail's tokens, and the tail's labels."""

    head: list[int]
    tail: list[int]
    tail_labels: list[int]
    dropped: int
    """Tail tokens cut to fit ``max_length``."""


def without_role(messages: Sequence[Message], role: str) -> list[Message]:
    """The messages minus those of ``role`` (the prompt replaces them)."""
    return [dict(m) for m in messages if m["role"] != role]


def place(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    role: str,
    roles: Sequence[str],
    max_length: int,
) -> Placement:
    """Split one conversation around the inserted role's message; the tail is cut so head + tail <= max_length.

    Raises:
        ChatTemplateError: the template drops or repeats the inserted message (e.g. no system role).
    """
    conversation = [{"role": role, "content": SENTINEL}, *without_role(messages, role)]
    text, spans = message_spans(tokenizer, conversation, roles, first_trained=1)
    at = text.find(SENTINEL)
    if at < 0 or text.count(SENTINEL) != 1:
        raise ChatTemplateError(
            f"the chat template does not render a {role!r} message's content once and verbatim; choose another "
            "method.inserted_chat_role or set model.chat_template"
        )
    end = at + len(SENTINEL)
    head_text, tail_text = text[:at], text[end:]
    head: list[int] = tokenizer(head_text, add_special_tokens=False)["input_ids"]
    encoded: Any = tokenizer(tail_text, add_special_tokens=False, return_offsets_mapping=True)
    tail_spans = [(s - end, e - end) for s, e in spans]
    tail: list[int] = encoded["input_ids"]
    offsets: list[tuple[int, int]] = encoded["offset_mapping"]
    labels = [
        token if any(s < span_end and e > span_start for span_start, span_end in tail_spans) else IGNORE_INDEX
        for token, (s, e) in zip(tail, offsets, strict=True)
    ]
    keep = max(0, max_length - len(head))
    dropped = max(0, len(tail) - keep)
    return Placement(head, tail[:keep], labels[:keep], dropped)


def shipped_sequence(
    tokenizer: PreTrainedTokenizerBase,
    conversation: Sequence[Message],
    *,
    role: str,
    text: str,
    roles: Sequence[str],
    dropped: int,
) -> tuple[list[int], list[int]]:
    """Ids and labels of ``conversation`` with ``text`` as the role's first message, as the template renders it.

    This is what a user gets by pasting ``text`` as the system prompt (a template that trims the content trims it
    here too). The last ``dropped`` tokens are cut, as the training sequence's tail was.
    """
    messages = [{"role": role, "content": text}, *conversation]
    out = tokenize_conversation(tokenizer, messages, roles, max_length=2**62, first_trained=1)
    keep = len(out.input_ids) - dropped
    return out.input_ids[:keep], out.labels[:keep]


# --- splits ----------------------------------------------------------------------------------------------------


def _sides(row: Mapping[str, Any], cfg: PromptOptConfig) -> list[list[Message]]:
    """The conversations of one row: ``messages`` (sft), or ``prompt + chosen`` and ``prompt + rejected``."""
    if cfg.objective is Objective.sft:
        return [list(row["messages"])]
    from alignment.methods.pairwise.core import split_implicit_prompt

    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if prompt is None:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
    return [list(prompt) + list(chosen), list(prompt) + list(rejected)]


def tokenize_split(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, cfg: PromptOptConfig, split: str) -> Dataset:
    """Per row, for each side (one for sft, chosen and rejected for reward): head, tail, labels and texts.

    ``bare_ids``/``bare_labels`` are each side without the inserted role's message (the no-prompt baseline).

    Rows whose sft tail keeps no labelled token, or whose reward sides are identical, are dropped (counted).

    Raises:
        DataError: every row of the split was dropped.
    """
    import logging

    log = logging.getLogger(__name__)
    roles = list(cfg.train_on_roles) if cfg.objective is Objective.sft else []

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        conversations = [without_role(c, cfg.inserted_chat_role) for c in _sides(row, cfg)]
        sides = [
            place(tokenizer, conversation, role=cfg.inserted_chat_role, roles=roles, max_length=cfg.max_length)
            for conversation in conversations
        ]
        margin = row.get("margin") if cfg.objective is Objective.reward else None
        bare = [tokenize_conversation(tokenizer, c, roles, cfg.max_length) for c in conversations]
        return {
            "head": [p.head for p in sides],
            "tail": [p.tail for p in sides],
            "tail_labels": [p.tail_labels for p in sides],
            "conversation": [json.dumps(c, ensure_ascii=False) for c in conversations],
            "dropped": [p.dropped for p in sides],
            "bare_ids": [b.input_ids for b in bare],
            "bare_labels": [b.labels for b in bare],
            "margin": float(margin) if margin is not None else 0.0,
            "truncated": any(p.dropped for p in sides),
        }

    encoded = dataset.map(encode, remove_columns=dataset.column_names, desc="Placing the prompt")

    def useful(row: dict[str, Any]) -> bool:
        if cfg.objective is Objective.reward:
            return bool(row["tail"][0] != row["tail"][1])
        return any(label != IGNORE_INDEX for label in row["tail_labels"][0])

    kept = encoded.filter(useful)
    truncated, dropped = sum(encoded["truncated"]), len(encoded) - len(kept)
    if truncated or dropped:
        log.warning(
            "prompt_opt: %d of %d rows cut to max_length=%d; %d dropped (%s)",
            truncated,
            len(encoded),
            cfg.max_length,
            dropped,
            "chosen == rejected" if cfg.objective is Objective.reward else "no trained token left",
        )
    if len(kept) == 0:
        reason = "chosen == rejected" if cfg.objective is Objective.reward else "no trained token within max_length"
        raise empty_split_error(split, dataset, {reason: dropped}, unit="rows")
    kept = kept.remove_columns("truncated")
    return kept.add_column("row", list(range(len(kept))))


# --- batches ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotCollator:
    """Right-padded ``head | slots | tail`` sequences (all sides of all rows, side-major) and their slot starts.

    ``input_ids`` holds the pad id at slot positions (the prompt's embeddings replace them); ``labels`` ignore the
    head, the slots and the padding. Reward rows give ``2B`` sequences, the chosen sides first, and ``margin``.
    """

    pad_token_id: int
    prompt_len: int

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a list of tokenised rows."""
        sides = len(rows[0]["head"])
        sequences = [(row["head"][s], row["tail"][s], row["tail_labels"][s]) for s in range(sides) for row in rows]
        width = max(len(h) + self.prompt_len + len(t) for h, t, _ in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        start = torch.zeros(len(sequences), dtype=torch.long)
        for i, (head, tail, tail_labels) in enumerate(sequences):
            after = len(head) + self.prompt_len
            ids[i, : len(head)] = torch.tensor(head, dtype=torch.long)
            ids[i, after : after + len(tail)] = torch.tensor(tail, dtype=torch.long)
            labels[i, after : after + len(tail)] = torch.tensor(tail_labels, dtype=torch.long)
            mask[i, : after + len(tail)] = 1
            start[i] = len(head)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "slot_start": start,
            "margin": torch.tensor([float(r["margin"]) for r in rows]),
            "row": torch.tensor([int(r["row"]) for r in rows], dtype=torch.long),
        }


def pad_sequences(sequences: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` of ``(ids, labels)`` pairs."""
    width = max(len(ids) for ids, _ in sequences)
    out_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    out_labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (ids, labels) in enumerate(sequences):
        out_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        out_labels[i, : len(labels)] = torch.tensor(labels, dtype=torch.long)
        mask[i, : len(ids)] = 1
    return {"input_ids": out_ids, "attention_mask": mask, "labels": out_labels}


def insert_prompts(
    token_embeds: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    prompts: torch.Tensor,
    slot_ids: torch.Tensor,
    *,
    pad_id: int,
    empty_slots: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of every (prompt, sequence): embeddings, attention mask and position ids, ``(P * N, S, ...)``.

    ``token_embeds`` ``(N, S, d)`` are the batch's token embeddings, ``prompts`` ``(P, L, d)`` the prompts'
    embeddings, ``slot_ids`` ``(P, L)`` their token ids. With ``empty_slots`` a slot holding the pad id is masked
    out, and the position ids skip it, so the model sees the shorter prompt.
    """
    p, length, _ = prompts.shape
    n, width, d = token_embeds.shape
    rows = torch.arange(n, device=token_embeds.device)[:, None]
    columns = batch["slot_start"].to(token_embeds.device)[:, None] + torch.arange(length, device=token_embeds.device)
    embeds = token_embeds[None].expand(p, n, width, d).clone()
    embeds[:, rows, columns] = prompts[:, None].to(embeds.dtype).expand(p, n, length, d)
    mask = batch["attention_mask"].to(token_embeds.device)[None].expand(p, n, width).clone()
    if empty_slots:
        keep = (slot_ids != pad_id).to(mask.dtype)  # (P, L)
        mask[:, rows, columns] = keep[:, None, :].expand(p, n, length)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return embeds.reshape(p * n, width, d), mask.reshape(p * n, width), positions.reshape(p * n, width)
