"""The trainer of GPO, its reference log-probs, and the wiring of a run.

Kept apart from :mod:`alignment.methods.gpo.gpo` so that composing a config never imports the Trainer.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from alignment.data.chat_template import IGNORE_INDEX
from alignment.methods.gpo.gpo import (
    GpoConfig,
    GpoLoss,
    GroupCollator,
    GroupCounts,
    GroupStats,
    batch_counts,
    completion_hidden_states,
    gpo_loss,
    packed_lengths,
    token_logps,
)
from alignment.models.config import ReferenceKind
from alignment.models.frozen import FrozenModel, cached_outputs, fingerprint, load_frozen_copy
from alignment.training.chunked import chunked_head_loss, head_is_sharded, output_head
from alignment.training.trainer import StepNormalisedTrainer

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from alignment.config import RunConfig
    from alignment.context import RunContext

log = logging.getLogger(__name__)

LossFn = Callable[..., GpoLoss]
"""``loss_fn(policy, reference, advantages, sequence, group_sizes, window, lengths=None)``: :func:`gpo_loss` with its
settings."""

STATS = (
    "sequences",
    "reward_sum",
    "reward_sq",
    "advantage_sum",
    "advantage_sq",
    "positive",
    "positive_logp",
    "negative",
    "negative_logp",
    "tokens",
    "prob_sum",
    "logp_sum",
    "kl_sum",
)
"""Sums kept per micro-batch for the logged metrics (added over micro-batches and ranks, divided at log time)."""


def reference_token_logps(frozen: FrozenModel, policy_model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Reference log-prob of every completion token of the batch, ``(tokens,)`` (no gradient)."""
    if "ref_logps" in batch:
        return batch["ref_logps"]
    return frozen.run(policy_model, lambda model: token_logps(model, batch)[0])


def precompute_reference(
    dataset: Dataset, reference: PreTrainedModel, key: str, groups_per_batch: int, *, share_prompt: bool = True
) -> Dataset:
    """Add a ``ref_logps`` column (per group, per completion, per token), from the disk cache when ``key`` was seen."""

    def compute() -> dict[str, torch.Tensor]:
        collate = GroupCollator(share_prompt=share_prompt)
        parts = []
        with torch.no_grad():
            for start in range(0, len(dataset), groups_per_batch):
                rows = [dataset[i] for i in range(start, min(start + groups_per_batch, len(dataset)))]
                batch = {k: v.to(reference.device) for k, v in collate(rows).items()}
                parts.append(token_logps(reference, batch)[0].cpu())
        log.info("reference log-probs: computed %d groups", len(dataset))
        return {"logps": torch.cat(parts)}

    flat = cached_outputs(f"gpo-{key}", compute)["logps"]
    values, column, at = flat.tolist(), [], 0
    for labels in dataset["completion_labels"]:
        group = []
        for completion in labels:
            count = sum(1 for t in completion if t != IGNORE_INDEX)
            group.append(values[at : at + count])
            at += count
        column.append(group)
    return dataset.add_column("ref_logps", column)


class _TokenLogps(torch.autograd.Function):
    """``log_softmax(logits)[target]`` per row with one pass of exponentials, reused by backward.

    Backward is ``g (onehot(target) - softmax)`` from the kept exponentials and their row sums: no second
    softmax, no zero-filled scatter (what autograd through ``logsumexp`` and ``gather`` costs, about 1.8x this).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        top = logits.amax(-1, keepdim=True)
        exps = (logits - top).exp_()
        totals = exps.sum(-1)
        ctx.save_for_backward(exps, totals, targets)
        return logits.gather(-1, targets[:, None]).squeeze(-1) - top.squeeze(-1) - totals.log()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        exps, totals, targets = ctx.saved_tensors
        out = exps * (-grad / totals)[:, None]
        rows = torch.arange(targets.numel(), device=targets.device)
        return out.index_put_((rows, targets), grad, accumulate=True), None


def policy_loss(
    model: Any,
    batch: Mapping[str, torch.Tensor],
    reference: torch.Tensor | None,
    loss_fn: LossFn,
    window: GroupCounts,
    *,
    chunked: bool = True,
    chunk_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch's GPO loss and its :data:`STATS` sums; the LM head runs a chunk of tokens at a time.

    The loss is a sum over tokens of weights fixed by the micro-batch's counts, so each chunk's share is computed
    (with its gradients, by :func:`~alignment.training.chunked.chunked_head_loss`) while only that chunk's logits
    exist (``chunk_size`` tokens; 0: the shared engine's default). ``chunked=False`` (a ZeRO-3/FSDP-sharded head,
    whose weight only the module's own forward gathers): the log-probs of
    :func:`~alignment.methods.gpo.gpo.token_logps` and one :func:`gpo_loss` over them.
    """
    advantages, sizes = batch["advantages"], batch["group_sizes"]
    if not chunked:
        policy, sequence = token_logps(model, batch)
        out = loss_fn(policy, reference, advantages, sequence, sizes, window)
        kl = out.kl.sum() if out.kl is not None else policy.new_zeros(())
        return out.loss, _statistics(_sequence_sums(policy.detach(), sequence, advantages.numel(), kl), sequence, batch)
    hidden, sequence = completion_hidden_states(model, batch)
    labels = batch["labels"][0, 1:]
    targets = labels[labels != IGNORE_INDEX]
    lengths = torch.bincount(sequence, minlength=advantages.numel())

    def objective(logits: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        logps: torch.Tensor = _TokenLogps.apply(logits, targets[rows])  # type: ignore[no-untyped-call]
        part = sequence[rows]
        chunk_reference = reference[rows] if reference is not None else None
        out = loss_fn(logps, chunk_reference, advantages, part, sizes, window, lengths=lengths)
        kl = out.kl.sum() if out.kl is not None else logps.new_zeros(())
        return out.loss, _sequence_sums(logps.detach(), part, advantages.numel(), kl)

    total, sums = chunked_head_loss(hidden, output_head(model)[1], objective, chunk_size=chunk_size)
    return total, _statistics(sums, sequence, batch)


def _sequence_sums(logps: torch.Tensor, sequence: torch.Tensor, count: int, kl: torch.Tensor) -> torch.Tensor:
    """``(log-prob sum of each completion (count,), probability sum, KL sum)`` of some tokens, ``(count + 2,)``."""
    sums = logps.new_zeros(count).index_add(0, sequence, logps)
    return torch.cat([sums, logps.exp().sum()[None], kl.to(logps.dtype)[None]])


def _statistics(sums: torch.Tensor, sequence: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """The :data:`STATS` sums of one micro-batch, ``(len(STATS),)``, from its :func:`_sequence_sums`."""
    rewards, advantages = batch["rewards"].float(), batch["advantages"].float()
    count = advantages.numel()
    logp_sums, prob_sum, kl = sums[:count].float(), sums[count], sums[count + 1]
    means = logp_sums / torch.bincount(sequence, minlength=count).clamp(min=1)
    positive, negative = advantages > 0, advantages < 0
    values = [
        float(rewards.numel()),
        rewards.sum(),
        (rewards**2).sum(),
        advantages.sum(),
        (advantages**2).sum(),
        positive.sum(),
        means[positive].sum(),
        negative.sum(),
        means[negative].sum(),
        float(sequence.numel()),
        prob_sum,
        logp_sums.sum(),
        kl,
    ]
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=sums.device) for v in values])


def _metrics(sums: dict[str, float], kl: bool) -> dict[str, float]:
    """Means and population stds of the logged quantities from :data:`STATS` sums."""
    n, tokens = max(sums["sequences"], 1.0), max(sums["tokens"], 1.0)
    reward_mean, advantage_mean = sums["reward_sum"] / n, sums["advantage_sum"] / n
    out = {
        "rewards/mean": reward_mean,
        "rewards/std": max(sums["reward_sq"] / n - reward_mean**2, 0.0) ** 0.5,
        "advantages/mean": advantage_mean,
        "advantages/std": max(sums["advantage_sq"] / n - advantage_mean**2, 0.0) ** 0.5,
        "policy/token_prob_mean": sums["prob_sum"] / tokens,
        "logps/token_mean": sums["logp_sum"] / tokens,
    }
    if sums["positive"]:
        out["logps/positive_advantage"] = sums["positive_logp"] / sums["positive"]
    if sums["negative"]:
        out["logps/negative_advantage"] = sums["negative_logp"] / sums["negative"]
    if sums["positive"] and sums["negative"]:
        out["logps/advantage_margin"] = out["logps/positive_advantage"] - out["logps/negative_advantage"]
    if kl:
        out["kl/token_mean"] = sums["kl_sum"] / tokens
    return out


class GpoTrainer(StepNormalisedTrainer):
    """A step-normalised trainer whose loss is :func:`~alignment.methods.gpo.gpo.gpo_loss` over one packed forward."""

    def __init__(
        self,
        *args: Any,
        loss_fn: LossFn,
        reference: FrozenModel | None,
        share_prompt: bool,
        zero_advantage_fraction: dict[str, float],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn
        self.reference = reference
        self.share_prompt = share_prompt
        self.zero_advantage_fraction = zero_advantage_fraction
        """Per mode, the fraction of the split's groups skipped for equal rewards (logged with every log)."""
        if reference is not None:
            reference.prepare(self.accelerator)  # on the training device, or sharded like the policy (ZeRO-3/FSDP)
        self._sums: dict[str, dict[str, float]] = {"train": defaultdict(float), "eval": defaultdict(float)}

    def step_counts(self, batch: Mapping[str, Any]) -> Sequence[float]:
        """Groups and completion tokens of one micro-batch."""
        counts = batch_counts(batch)
        return (counts.groups, counts.tokens)

    def step_window(self, counts: Sequence[float]) -> GroupCounts:
        """The step's counts as :class:`~alignment.methods.gpo.gpo.GroupCounts`."""
        return GroupCounts(*counts)

    def train_lengths(self) -> Sequence[int]:
        """Tokens each group occupies in a packed row."""
        return packed_lengths(self.train_dataset, share_prompt=self.share_prompt)

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """Reference token log-probs, then this micro-batch's share of the step's loss (:func:`policy_loss`)."""
        reference = reference_token_logps(self.reference, model, inputs) if self.reference is not None else None
        # HF's prediction_step passes the counts too; evaluation is per batch and unscaled.
        training = model.training and isinstance(num_items_in_batch, GroupCounts)
        counts = num_items_in_batch if training else batch_counts(inputs)
        total, sums = policy_loss(model, inputs, reference, self.loss_fn, counts, chunked=not head_is_sharded(model))
        loss = self.scale_for_ranks(total, training=training)
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        mode = "train" if model.training else "eval"
        for key, value in zip(STATS, sums.tolist(), strict=True):
            self._sums[mode][key] += value
        return (loss, {}) if return_outputs else loss

    def logged_metrics(self, mode: str) -> dict[str, float]:
        """The GPO metrics gathered since the last log."""
        out: dict[str, float] = {}
        if self._sums[mode]["sequences"]:
            out = _metrics(self._sums[mode], self.reference is not None)
            out["groups/zero_advantage_fraction"] = self.zero_advantage_fraction[mode]
        self._sums[mode].clear()
        return out


def _reference(
    cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, kind: ReferenceKind | None, splits: list[Dataset | None]
) -> tuple[FrozenModel | None, list[Dataset | None]]:
    """The reference for ``kind`` (None: none); ``precomputed`` adds a ``ref_logps`` column to each split."""
    if kind is None:
        return None, splits
    if kind is not ReferenceKind.precomputed:
        copy = load_frozen_copy(cfg.model, tokenizer, sharded=True) if kind is ReferenceKind.copy else None
        return FrozenModel(copy), splits
    frozen = load_frozen_copy(cfg.model, tokenizer)
    method = cfg.method
    assert isinstance(method, GpoConfig)
    done: list[Dataset | None] = []
    for split in splits:
        if split is None:
            done.append(None)
            continue
        key = fingerprint(cfg.model, split._fingerprint, str(method.max_length))
        batch = method.per_device_eval_batch_size
        done.append(precompute_reference(split, frozen, key, batch, share_prompt=method.share_prompt))
    del frozen
    return FrozenModel(None), done


def build_trainer(
    cfg: RunConfig,
    ctx: RunContext,
    tokenizer: PreTrainedTokenizerBase,
    train: Dataset,
    evaluation: Dataset | None,
    kind: ReferenceKind | None,
    stats: tuple[GroupStats, GroupStats | None],
) -> GpoTrainer:
    """Model, training arguments, reference and the :class:`GpoTrainer` of a run."""
    from alignment.models.load import load_model
    from alignment.training.arguments import training_args
    from alignment.training.callbacks import MetricsJsonlCallback

    method = cfg.method
    assert isinstance(method, GpoConfig)
    model = load_model(cfg.model, tokenizer)
    args = training_args(
        cfg, ctx, evaluation=evaluation is not None, remove_unused_columns=False, prediction_loss_only=True
    )
    # Rank 0 precomputes first and the others read its cache; a (ZeRO-3 sharded) copy loads on all ranks together.
    precompute = kind is ReferenceKind.precomputed
    with args.main_process_first(desc="reference log-probs") if precompute else nullcontext():
        reference, (train, evaluation) = _reference(cfg, tokenizer, kind, [train, evaluation])
    assert train is not None
    loss_fn = partial(gpo_loss, loss_type=method.loss_type, aggregation=method.aggregation, kl_beta=method.kl_beta)
    train_stats, eval_stats = stats
    fractions = {"train": train_stats.zero_advantage_fraction}
    fractions["eval"] = eval_stats.zero_advantage_fraction if eval_stats is not None else 0.0
    return GpoTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=GroupCollator(share_prompt=method.share_prompt),
        processing_class=tokenizer,
        callbacks=[MetricsJsonlCallback(ctx.output_dir / "metrics.jsonl")],
        loss_fn=loss_fn,
        reference=reference,
        max_tokens_per_batch=method.max_tokens_per_batch,
        share_prompt=method.share_prompt,
        zero_advantage_fraction=fractions,
    )
