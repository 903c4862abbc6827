"""Grouped Policy Optimization (GPO): offline GRPO on precomputed rewards (the original toolkit's method, no paper).

Each row is a prompt with G completions and one reward per completion (reward-model scores, verifier 0/1…). No
pairs are needed and nothing is generated: the advantage of completion ``i`` is its reward normalised within its
group (computed once, at tokenisation), ``A_i = (r_i - mean_G r) / (std_G r + ε)`` with the population std
(``advantage_scale``: the group's std, the std of all rewards of the split, or none). Groups whose rewards are all
equal have ``A = 0`` everywhere and no gradient: they are counted and skipped; groups with G < 2 are dropped.

Per completion token t, with ``c_t = log π(o_t | ·)`` and ``sg`` the stop-gradient (``loss_type``):

* ``grpo`` (default): ``loss_t = -A_i · exp(c_t - sg(c_t))``, value ``-A_i``, gradient ``-A_i ∇c_t`` (REINFORCE, as
  TRL's GRPO with one update per batch, so no clipping);
* ``prob_weighted`` (the original, seed spec §4.6): ``loss_t = -A_i · exp(c_t)``, so every token's gradient is scaled
  by its current probability;

both plus ``β · KL_t`` with the k3 estimator ``KL_t = exp(rho_t) - rho_t - 1``, ``rho_t = log π_ref(o_t) - c_t``
(``kl_beta``; at 0 no reference is loaded). Tokens are aggregated (``aggregation``) as

* ``sequence_mean`` (the original): ``L = (1 / N_groups) Σ_groups (1/G) Σ_i mean_t loss_{i,t}``;
* ``token_sum`` (Dr. GRPO, https://arxiv.org/abs/2503.20783): ``L = Σ_{i,t} loss_{i,t} / N_tokens``;

with ``N`` counted over the whole optimizer step (all micro-batches and ranks), so micro-batch 1 x accumulation 4
gives the gradient of micro-batch 4 x accumulation 1.

Batching: whole groups are packed padding-free into micro-batches of at most ``max_tokens_per_batch`` tokens. With
``share_prompt`` a group is one segment ``[prompt, c_1, …, c_G]`` whose completions attend to the prompt and to
themselves only (a block mask; position ids restart after the prompt), so the prompt is computed once per group
instead of G times; without it each completion is its own ``prompt + c_i`` sequence. With sdpa each segment is
attended on its own (:mod:`alignment.methods.gpo.attention`), so attention costs ``Σ L²`` over the segments, not
``T²`` over the row. Only the positions that predict a completion token go through the LM head, a chunk of tokens
at a time, with the loss's gradient taken per chunk (:func:`alignment.methods.gpo.trainer.policy_loss`).

Deviations from the original (seed spec §4.7), each a fix: it crashed before training (four independent bugs); ids
are padded with the pad token, not -100 (we pack, so nothing is padded); a micro-batch holds several groups, not
one; the loss is normalised over the optimizer step instead of divided by the accumulation steps; the prompt is
not followed by an extra EOS and a long conversation loses its completion's tail (as the pairwise methods), not the
prompt's recent turns; the logged "mean_logps" (a mean probability) is ``policy/token_prob_mean``.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeAlias

from alignment.data.chat_template import IGNORE_INDEX, Message, tokenize_conversation
from alignment.data.validate import (
    ORIGIN,
    DataError,
    RowChecks,
    empty_split_error,
    message_list_problems,
    require_columns,
)
from alignment.models.config import ReferenceKind
from alignment.ranges import bounded, check_fields
from alignment.task import MethodConfig, TaskConfig

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from alignment.config import RunConfig
    from alignment.context import RunContext

log = logging.getLogger(__name__)

COLUMNS = ("prompt", "completions", "rewards")
"""Columns kept on load."""


class GpoLossType(StrEnum):
    """Policy-gradient term per token."""

    grpo = "grpo"
    prob_weighted = "prob_weighted"


class TokenAggregation(StrEnum):
    """How per-token losses become the step's loss."""

    sequence_mean = "sequence_mean"
    token_sum = "token_sum"


class AdvantageScale(StrEnum):
    """What the group-centred rewards are divided by (plus ``advantage_epsilon``)."""

    group = "group"
    batch = "batch"
    none = "none"


@dataclass
class GpoConfig(MethodConfig):
    """Offline GRPO on groups of completions with precomputed rewards."""

    name: str = "gpo"
    """Registry key."""
    learning_rate: float = 1e-6
    """Peak learning rate (TRL's GRPO default, for full fine-tuning)."""
    loss_type: GpoLossType = GpoLossType.grpo
    """``grpo``: -A·exp(c - sg(c)) (REINFORCE); ``prob_weighted``: -A·exp(c), the original's exact form."""
    aggregation: TokenAggregation = TokenAggregation.sequence_mean
    """``sequence_mean``: token mean per completion, mean per group, mean over groups (the original);
    ``token_sum``: sum over tokens divided by the step's completion tokens (Dr. GRPO)."""
    kl_beta: float = bounded(0.0, ge=0)
    """Weight of the k3 KL estimate to the reference per token; 0 loads no reference."""
    reference: ReferenceKind = ReferenceKind.auto
    """Where reference log-probs come from when ``kl_beta`` > 0: a frozen copy, the policy without adapters, or
    precomputed per token and cached on disk."""
    advantage_scale: AdvantageScale = AdvantageScale.group
    """Divide group-centred rewards by the group's population std (GRPO), by the std of all rewards of the split
    (the offline analogue of TRL's ``scale_rewards=batch``), or by nothing (Dr. GRPO)."""
    advantage_epsilon: float = bounded(1e-4, ge=0)
    """Added to the std before dividing."""
    max_length: int = bounded(1024, ge=1)
    """Tokens per prompt + completion; a longer completion loses its tail (counted and logged)."""
    per_device_train_batch_size: int = 8
    """Groups (prompts, each with all its completions) per micro-batch when ``max_tokens_per_batch`` is None."""
    per_device_eval_batch_size: int = 8
    """Groups per evaluation batch."""
    max_tokens_per_batch: int | None = bounded(4096, ge=1)
    """Token budget per micro-batch: whole groups are packed up to this many tokens (a longer group trains alone).
    None: ``per_device_train_batch_size`` groups per micro-batch."""
    share_prompt: bool = True
    """Compute each group's prompt once for its G completions (needs ``sdpa`` or ``eager`` attention); false
    repeats it per completion (works with ``flash_attention_2``)."""

    def __post_init__(self) -> None:
        check_fields(self, "method")


# --- the loss ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupCounts:
    """Trained groups and completion tokens of a whole optimizer step (all micro-batches, all ranks)."""

    groups: float
    """Groups (prompts) trained in the step."""
    tokens: float
    """Completion tokens trained in the step."""


@dataclass
class GpoLoss:
    """What :func:`gpo_loss` returns for one micro-batch."""

    loss: torch.Tensor
    """This micro-batch's share of the step's loss (scalar); summed over the step's micro-batches it is the loss."""
    per_token_loss: torch.Tensor
    """``loss_t`` per completion token, ``(tokens,)``."""
    kl: torch.Tensor | None
    """k3 KL estimate per completion token (detached), ``(tokens,)``; None without a reference."""


PolicyTerm: TypeAlias = "Callable[[torch.Tensor, torch.Tensor], torch.Tensor]"
"""``term(token_logps, token_advantages) -> (tokens,)``, both ``(tokens,)``."""
Aggregation: TypeAlias = "Callable[[torch.Tensor, torch.Tensor, torch.Tensor, GroupCounts], torch.Tensor]"
"""``weights(sequence, lengths, group_sizes, window) -> (tokens,)``: each token's weight in the step's loss."""


def grpo_term(logps: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """``-A · exp(c - sg(c))``: value ``-A``, gradient ``-A ∇c``."""
    import torch

    return -advantages * torch.exp(logps - logps.detach())


def prob_weighted_term(logps: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """``-A · exp(c)``: the original's form, value and gradient scaled by the token probability."""
    return -advantages * logps.exp()


def k3_kl(logps: torch.Tensor, reference_logps: torch.Tensor) -> torch.Tensor:
    """``exp(rho) - rho - 1`` with ``rho = log π_ref - log π`` per token (>= 0, 0 where the two agree)."""
    rho = reference_logps - logps
    return rho.exp() - rho - 1


def sequence_mean_weights(
    sequence: torch.Tensor, lengths: torch.Tensor, group_sizes: torch.Tensor, window: GroupCounts
) -> torch.Tensor:
    """``1 / (|o_i| · G_i · N_groups)`` for each token of completion i (``|o_i|`` = ``lengths[i]``)."""
    return 1.0 / (lengths[sequence] * group_sizes[sequence] * window.groups)


def token_sum_weights(
    sequence: torch.Tensor, lengths: torch.Tensor, group_sizes: torch.Tensor, window: GroupCounts
) -> torch.Tensor:
    """``1 / N_tokens`` for every token."""
    import torch

    return torch.full(sequence.shape, 1.0 / max(window.tokens, 1.0), dtype=group_sizes.dtype, device=sequence.device)


def gpo_loss(
    policy: torch.Tensor,
    reference: torch.Tensor | None,
    advantages: torch.Tensor,
    sequence: torch.Tensor,
    group_sizes: torch.Tensor,
    window: GroupCounts,
    *,
    loss_type: GpoLossType,
    aggregation: TokenAggregation,
    kl_beta: float,
    lengths: torch.Tensor | None = None,
) -> GpoLoss:
    """The GPO loss of one packed micro-batch, or its share from some of its tokens (``lengths`` given).

    Args:
        policy: policy log-prob of each completion token, ``(tokens,)``.
        reference: reference log-prob of the same tokens, ``(tokens,)``; None (or ``kl_beta`` 0) for no KL.
        advantages: advantage of each completion, ``(sequences,)``.
        sequence: which completion each token belongs to, ``(tokens,)`` in ``[0, sequences)``.
        group_sizes: G of each completion's group, ``(sequences,)`` (float).
        window: trained groups and tokens of the optimizer step.
        loss_type: the policy-gradient term.
        aggregation: how tokens are weighted.
        kl_beta: KL weight β.
        lengths: tokens of each completion in the micro-batch, ``(sequences,)``; None: counted from ``sequence``
            (which must then hold all of them). Given, ``policy`` may be any subset of the tokens (a chunk), and the
            losses of disjoint subsets add up to the micro-batch's.
    """
    import torch

    per_token = GPO_TERMS[loss_type](policy, advantages[sequence])
    kl = None
    if reference is not None and kl_beta:
        kl_full = k3_kl(policy, reference)
        per_token = per_token + kl_beta * kl_full
        kl = kl_full.detach()
    sizes = group_sizes.to(policy.dtype)
    if lengths is None:
        lengths = torch.zeros_like(sizes).index_add(0, sequence, torch.ones_like(sequence, dtype=sizes.dtype))
    weights = AGGREGATIONS[aggregation](sequence, lengths.to(policy.dtype), sizes, window)
    return GpoLoss((per_token * weights).sum(), per_token, kl)


# --- data --------------------------------------------------------------------------------------------------------


def _number_problems(values: Any, column: str) -> list[str]:
    if not isinstance(values, list):
        return [f"column {column!r}: expected a list of numbers, got {type(values).__name__}"]
    problems = []
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"column {column!r}[{i}]: expected a number, got {type(value).__name__} {value!r}")
        elif not math.isfinite(value):
            problems.append(f"column {column!r}[{i}]: expected a finite number, got {value}")
    return problems


def _completions_problems(completions: Any) -> list[str]:
    if not isinstance(completions, list) or not completions:
        return ["column 'completions': expected a non-empty list of completions (each a list of messages)"]
    problems = []
    for i, completion in enumerate(completions):
        column = f"completions[{i}]"
        found = message_list_problems(completion, column)
        if not found and any(m["role"] != "assistant" for m in completion):
            found = [f"column {column!r}: completion messages must all be assistant turns"]
        elif not found and all(not m["content"].strip() for m in completion):
            found = [f"column {column!r}: empty completion"]
        problems += found
    return problems


def row_problems(row: Mapping[str, Any]) -> list[str]:
    """Validation of one group row; empty when it can be trained on (a group with G < 2 is dropped later)."""
    problems = require_columns(row, COLUMNS)
    if problems:
        return problems
    problems = message_list_problems(row["prompt"], "prompt")
    if not problems and row["prompt"][-1]["role"] == "assistant":
        problems.append("column 'prompt' ends on an assistant turn; the completions must answer its last turn")
    completions, rewards = row["completions"], row["rewards"]
    problems += _completions_problems(completions) + _number_problems(rewards, "rewards")
    if isinstance(completions, list) and isinstance(rewards, list) and len(completions) != len(rewards):
        problems.append(
            f"columns 'completions'/'rewards': {len(completions)} completions but {len(rewards)} rewards (one each)"
        )
    return problems


def _group_std(rewards: Sequence[float], everything: Sequence[float]) -> float:
    return statistics.pstdev(rewards)


def _batch_std(rewards: Sequence[float], everything: Sequence[float]) -> float:
    return statistics.pstdev(everything)


def _no_scale(rewards: Sequence[float], everything: Sequence[float]) -> float:
    return 1.0


def group_advantages(
    rewards: Sequence[float], everything: Sequence[float], *, scale: AdvantageScale, epsilon: float
) -> list[float]:
    """``(r_i - mean(rewards)) / d``: ``d`` the group's population std + ε, that of ``everything`` + ε, or 1."""
    if min(rewards) == max(rewards):
        return [0.0] * len(rewards)  # exactly, where the mean would round (fmean([0.7] * 3) = 0.7000000000000001)
    mean = statistics.fmean(rewards)
    divisor = ADVANTAGE_SCALES[scale](rewards, everything) + (epsilon if scale is not AdvantageScale.none else 0.0)
    return [(r - mean) / divisor for r in rewards]


@dataclass
class GroupStats:
    """Counts reported after tokenisation (never silent)."""

    groups: int = 0
    """Rows read."""
    too_small: int = 0
    """Groups with fewer than two completions (no advantage), dropped."""
    zero_advantage: int = 0
    """Groups whose rewards are all equal (zero advantage), skipped."""
    truncated: int = 0
    """Groups with a completion cut to ``max_length``."""
    empty: int = 0
    """Groups with a completion left without any token after the cut, dropped."""

    @property
    def zero_advantage_fraction(self) -> float:
        """Of the groups with G >= 2, the fraction whose advantages are all zero."""
        return self.zero_advantage / max(self.groups - self.too_small, 1)


def _shared_prefix(sequences: Sequence[list[int]], first_trained: Sequence[int]) -> int:
    """Tokens every sequence shares, ending before the token that predicts any first completion token."""
    limit = min(first_trained) - 1
    length = 0
    while length < limit and all(s[length] == sequences[0][length] for s in sequences):
        length += 1
    return length


def encode_group(
    tokenizer: PreTrainedTokenizerBase, prompt: list[Message], completions: list[list[Message]], max_length: int
) -> dict[str, Any]:
    """Shared prompt ids, per-completion ids/labels after it, and whether any was cut or left empty.

    The shared prefix stops one token before the first completion token, so each completion segment starts with
    the token that predicts its first trained token: every prediction stays inside one segment.
    """
    encoded = [
        tokenize_conversation(tokenizer, prompt + c, ["assistant"], max_length, first_trained=len(prompt))
        for c in completions
    ]
    first = [next((j for j, t in enumerate(e.labels) if t != IGNORE_INDEX), -1) for e in encoded]
    empty = min(first) < 1
    shared = 0 if empty else _shared_prefix([e.input_ids for e in encoded], first)
    prompt_ids = encoded[0].input_ids[:shared]
    return {
        "empty": empty,
        "truncated": any(e.truncated for e in encoded),
        "prompt_ids": prompt_ids,
        "completion_ids": [e.input_ids[shared:] for e in encoded],
        "completion_labels": [e.labels[shared:] for e in encoded],
    }


def tokenize_groups(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    scale: AdvantageScale,
    epsilon: float,
    split: str = "train",
) -> tuple[Dataset, GroupStats]:
    """Advantages, token ids and labels per group; drops (G < 2, empty) and skips (equal rewards) are counted.

    Raises:
        DataError: no group of the ``split`` is left (its files, the counts and the reasons named).
    """
    stats = GroupStats(groups=len(dataset))
    rewards = [[float(r) for r in group] for group in dataset["rewards"]]
    small = [i for i, group in enumerate(rewards) if len(group) < 2]
    stats.too_small = len(small)
    if small:
        origins = dataset.select(small[:5])[ORIGIN] if ORIGIN in dataset.column_names else small[:5]
        log.warning(
            "gpo: %d group(s) with fewer than 2 completions dropped (no advantage), e.g. %s", len(small), origins
        )
    everything = [r for group in rewards if len(group) >= 2 for r in group]
    flat = [len(set(group)) == 1 and len(group) >= 2 for group in rewards]
    stats.zero_advantage = sum(flat)
    keep = [i for i, group in enumerate(rewards) if len(group) >= 2 and not flat[i]]
    if not keep:
        raise _no_groups_left(split, dataset, stats, max_length)

    def encode(row: dict[str, Any], index: int) -> dict[str, Any]:
        out = encode_group(tokenizer, row["prompt"], row["completions"], max_length)
        group = rewards[index]
        out["rewards"] = group
        out["advantages"] = group_advantages(group, everything, scale=scale, epsilon=epsilon)
        return out

    kept = dataset.select(keep).map(
        lambda row, i: encode(row, keep[i]),
        with_indices=True,
        remove_columns=list(dataset.column_names),
        desc="Tokenizing groups",
    )
    stats.truncated = sum(kept["truncated"]) if len(kept) else 0
    kept = kept.filter(lambda row: not row["empty"], desc="Dropping empty groups")
    stats.empty = len(keep) - len(kept)
    kept = kept.remove_columns(["empty", "truncated"])
    log.info(
        "gpo: %d groups; %d with equal rewards skipped (zero advantage, %.1f%%); %d with G < 2 and %d with no "
        "completion token left after max_length=%d dropped; %d cut",
        stats.groups,
        stats.zero_advantage,
        100 * stats.zero_advantage_fraction,
        stats.too_small,
        stats.empty,
        max_length,
        stats.truncated,
    )
    if len(kept) == 0:
        raise _no_groups_left(split, dataset, stats, max_length)
    return kept, stats


def _no_groups_left(split: str, dataset: Dataset, stats: GroupStats, max_length: int) -> DataError:
    reasons = {
        "equal rewards: zero advantage": stats.zero_advantage,
        "fewer than 2 completions": stats.too_small,
        f"a completion with no token left within method.max_length={max_length}": stats.empty,
    }
    return empty_split_error(split, dataset, reasons, unit="groups")


def packed_lengths(dataset: Dataset, *, share_prompt: bool) -> list[int]:
    """Tokens each group occupies in a packed row."""
    prompts = [len(p) for p in dataset["prompt_ids"]]
    completions = [[len(c) for c in group] for group in dataset["completion_ids"]]
    if share_prompt:
        return [p + sum(c) for p, c in zip(prompts, completions, strict=True)]
    return [len(c) * p + sum(c) for p, c in zip(prompts, completions, strict=True)]


# --- batching and the forward ------------------------------------------------------------------------------------


@dataclass
class GroupCollator:
    """Pack whole groups into one padding-free row; ``segment_ids`` is -1 on a shared prompt, else the completion."""

    share_prompt: bool = True
    """``[prompt, c_1, …, c_G]`` per group with a block mask; False: ``[prompt, c_i]`` per completion."""

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Concatenate ids and labels with position, segment and group ids; per-completion rewards/advantages."""
        import torch

        parts: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "segment_ids": []}
        parts["group_ids"] = []
        sizes: list[float] = []
        sequence = 0

        def add(ids: list[int], labels: list[int], start: int, segment: int, group: int) -> None:
            parts["input_ids"] += ids
            parts["labels"] += labels
            parts["position_ids"] += range(start, start + len(ids))
            parts["segment_ids"] += [segment] * len(ids)
            parts["group_ids"] += [group] * len(ids)

        for group, row in enumerate(rows):
            prompt = row["prompt_ids"]
            if self.share_prompt:
                add(prompt, [IGNORE_INDEX] * len(prompt), 0, -1, group)
            for ids, labels in zip(row["completion_ids"], row["completion_labels"], strict=True):
                if self.share_prompt:
                    add(ids, labels, len(prompt), sequence, group)
                else:
                    add(prompt + ids, [IGNORE_INDEX] * len(prompt) + labels, 0, sequence, group)
                sequence += 1
            sizes += [float(len(row["completion_ids"]))] * len(row["completion_ids"])
        batch = {key: torch.tensor([values]) for key, values in parts.items()}
        batch["rewards"] = torch.tensor([r for row in rows for r in row["rewards"]])
        batch["advantages"] = torch.tensor([a for row in rows for a in row["advantages"]])
        batch["group_sizes"] = torch.tensor(sizes)
        if "ref_logps" in rows[0]:
            batch["ref_logps"] = torch.tensor([v for row in rows for c in row["ref_logps"] for v in c])
        return batch


def _group_attention_kwargs(model: PreTrainedModel, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Completions attend to their group's shared prompt and to themselves, causally; sequences to themselves.

    sdpa attends segment by segment (:mod:`alignment.training.segments`: each group, or each sequence, on its
    own slice, so the cost is ``Σ L²`` over segments, not ``T²`` over the row); flash-attention gets varlen
    boundaries (plain sequences only); eager and other implementations a dense ``(T, T)`` mask.
    """
    from alignment.methods.gpo.attention import group_kwargs
    from alignment.training.packed import attention_implementation, attention_kwargs, mask_kwargs

    segments, groups = batch["segment_ids"][0], batch["group_ids"][0]
    implementation = attention_implementation(model)
    if implementation == "sdpa":
        return group_kwargs(segments, groups)
    if not bool((segments < 0).any()):
        return attention_kwargs(model, batch["position_ids"], batch["segment_ids"])  # plain packed sequences
    if implementation == "flash_attention_2":
        raise ValueError("method.share_prompt=true needs sdpa or eager attention; set method.share_prompt=false")
    same_group = groups[:, None] == groups[None, :]
    visible = (segments[None, :] < 0) | (segments[:, None] == segments[None, :])
    return mask_kwargs(model, (same_group & visible).tril()[None, None])


def token_logps(model: PreTrainedModel, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the packed row: ``(log-prob of every completion token, its completion index)``, ``(tokens,)``.

    Only the positions that predict a completion token go through the LM head.
    """
    from alignment.training.packed import counted_token_logps

    logps, predicting = counted_token_logps(model, batch, _group_attention_kwargs(model, batch))
    return logps, batch["segment_ids"][0, 1:][predicting]


def completion_hidden_states(
    model: PreTrainedModel, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the packed row, up to the final hidden states of the positions predicting completion tokens.

    Returns the hidden states ``(tokens, H)`` and the completion index of each ``(tokens,)``, in
    :func:`token_logps`'s order; the LM head is left to the caller (:func:`alignment.methods.gpo.trainer.policy_loss`
    applies it a chunk at a time).
    """
    from alignment.training.chunked import final_hidden_states
    from alignment.training.segments import check_used

    predicting = (batch["labels"][0, 1:] != IGNORE_INDEX).nonzero().flatten()
    attention = _group_attention_kwargs(model, batch)
    hidden = final_hidden_states(model, input_ids=batch["input_ids"], position_ids=batch["position_ids"], **attention)
    check_used(attention, model)
    return hidden[0, predicting], batch["segment_ids"][0, 1:][predicting]


def batch_counts(batch: Mapping[str, torch.Tensor]) -> GroupCounts:
    """Groups and completion tokens of one packed micro-batch."""
    tokens = float((batch["labels"][0, 1:] != IGNORE_INDEX).sum())
    return GroupCounts(float(int(batch["group_ids"].max()) + 1), tokens)


# --- the run -------------------------------------------------------------------------------------------------


def _tokenize_split(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, method: GpoConfig, split: str
) -> tuple[Any, GroupStats]:
    return tokenize_groups(
        dataset,
        tokenizer,
        max_length=method.max_length,
        scale=method.advantage_scale,
        epsilon=method.advantage_epsilon,
        split=split,
    )


def row_checks(method: TaskConfig) -> RowChecks:
    """The rows GPO trains on: a prompt with scored completions each."""
    return RowChecks(row_problems, COLUMNS)


def run(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Validate and tokenise groups, set up the reference when ``kl_beta`` > 0, train, save; final metrics."""
    from alignment.data.mix import build_splits
    from alignment.methods.gpo.trainer import build_trainer
    from alignment.models.config import AttnImplementation
    from alignment.models.frozen import resolve_kind
    from alignment.models.load import load_tokenizer
    from alignment.training.checkpoint import train_and_save

    method = cfg.method
    assert isinstance(method, GpoConfig)
    # Checked first, so a setting that cannot work fails before any data or model is loaded.
    kind = resolve_kind(method.reference, cfg.model.lora.enabled) if method.kl_beta > 0 else None
    if method.share_prompt and cfg.model.attn_implementation is AttnImplementation.flash_attention_2:
        raise ValueError("method.share_prompt=true needs sdpa or eager attention; set method.share_prompt=false")
    if method.share_prompt and cfg.model.attn_implementation is AttnImplementation.auto:
        # auto would pick flash-attention on a GPU; shared prompts need the block masks sdpa attends group by group
        cfg = replace(cfg, model=replace(cfg.model, attn_implementation=AttnImplementation.sdpa))
    checks = row_checks(method)
    splits = build_splits(cfg.data, checks.validate, checks.columns)
    tokenizer = load_tokenizer(cfg.model)
    train, train_stats = _tokenize_split(splits.train, tokenizer, method, "train")
    evaluation, eval_stats = (
        (None, None) if splits.eval is None else _tokenize_split(splits.eval, tokenizer, method, "eval")
    )
    trainer = build_trainer(cfg, ctx, tokenizer, train, evaluation, kind, (train_stats, eval_stats))
    return train_and_save(trainer, method=method, model_dir=ctx.model_dir)


GPO_TERMS: dict[GpoLossType, PolicyTerm] = {
    GpoLossType.grpo: grpo_term,
    GpoLossType.prob_weighted: prob_weighted_term,
}
"""Policy-gradient term of each loss type."""

AGGREGATIONS: dict[TokenAggregation, Aggregation] = {
    TokenAggregation.sequence_mean: sequence_mean_weights,
    TokenAggregation.token_sum: token_sum_weights,
}
"""Token weights of each aggregation."""

ADVANTAGE_SCALES: dict[AdvantageScale, Callable[[Sequence[float], Sequence[float]], float]] = {
    AdvantageScale.group: _group_std,
    AdvantageScale.batch: _batch_std,
    AdvantageScale.none: _no_scale,
}
"""``divisor(group_rewards, all_rewards_of_the_split)`` before ε of each scale."""
