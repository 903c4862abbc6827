r"""Bradley-Terry reward modelling (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155, §3.5).

A sequence-classification model with one output scores ``prompt + chosen`` (:math:`r_w`) and ``prompt +
rejected`` (:math:`r_l`); per pair, with an optional ``margin`` column :math:`m` and centring coefficient
:math:`c` (Eisenstein et al. 2023, https://arxiv.org/abs/2312.09244):

    loss = -log sigmoid(r_w - r_l - m) + c · (r_w + r_l)²,

averaged over the pairs of the optimizer step (micro-batches and ranks counted together, so micro-batch 1 x
accumulation 4 equals 4 x 1). Data: the pairwise methods' rows (``prompt``/``chosen``/``rejected`` message lists,
or the implicit-prompt form, optional ``margin``), validated before anything loads.

Deviations from the original toolkit (TRL 0.16 ``RewardTrainer``): the margin is subtracted per pair (TRL
broadcast ``(B, 1) - (B,)`` into a ``B x B`` matrix and averaged it); sequences are rendered with the chat template
and tokenised without adding special tokens (no double BOS); over-long sequences lose their *start* by default
(``truncation_side``), since the score is read at the last token, and cut or identical pairs are counted; the score
is pooled at the last attended token, not the last non-pad one (pad == eos would pick the wrong token). Eval logs
pairwise accuracy and mean margin and writes a histogram of chosen vs rejected scores (``reward_scores.png``).
The saved model loads with :func:`alignment.models.seqcls.load_reward_model`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.data.validate import empty_split_error
from alignment.methods.pairwise.core import PairwiseConfig, split_implicit_prompt
from alignment.models.config import TruncationSide
from alignment.models.seqcls import encode, pad_batch
from alignment.ranges import bounded, check_fields

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from alignment.config import RunConfig
    from alignment.context import RunContext

log = logging.getLogger(__name__)


@dataclass
class RewardConfig(PairwiseConfig):
    """Bradley-Terry reward model on preference pairs."""

    name: str = "reward"
    """Registry key."""
    center_rewards_coefficient: float = bounded(0.0, ge=0)
    """Weight c of the centring term c·(r_w + r_l)², which keeps scores near 0 (0 disables; TRL configs use 0.01)."""
    truncation_side: TruncationSide = TruncationSide.left
    """Which end of a sequence longer than ``max_length`` is cut; ``left`` keeps the answer being judged."""

    def __post_init__(self) -> None:
        check_fields(self, "method")


def bt_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float = 0.0,
) -> torch.Tensor:
    r"""Bradley-Terry loss per pair, ``(batch,)``; the batch loss is its mean.

    ``loss_i = -log sigmoid(r_w,i - r_l,i - m_i) + c · (r_w,i + r_l,i)²`` with all inputs ``(batch,)``.

    Worked values (``softplus(x) = log(1 + e^x) = -log sigmoid(-x)``):

    * ``r_w = 1, r_l = -1``: ``-log sigmoid(2) = softplus(-2) = 0.126928``;
    * the same with ``m = 1``: ``-log sigmoid(1) = 0.313262``;
    * ``r_w = 1, r_l = 0, c = 0.01``: ``-log sigmoid(1) + 0.01 · 1² = 0.323262``.

    Equal scores without margin or centring give ``ln 2``.
    """
    import torch

    difference = chosen_scores - rejected_scores
    if margin is not None:
        difference = difference - margin
    loss = -torch.nn.functional.logsigmoid(difference)
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * (chosen_scores + rejected_scores) ** 2
    return loss


# --- data -----------------------------------------------------------------------------------------------------------


def tokenize_reward_pairs(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    truncation_side: TruncationSide,
    split: str = "train",
) -> Dataset:
    """``chosen_input_ids``/``rejected_input_ids`` (full conversations) and ``margin`` per pair.

    Each side is ``prompt + completion`` tokenised by :func:`alignment.models.seqcls.encode`, the path scoring
    uses. Pairs whose sides are the same tokens (also once cut) carry no signal and are dropped; cut and dropped
    pairs are counted and logged.

    Raises:
        DataError: every pair of the ``split`` was dropped (its files and the count named).
    """

    def encode_pair(row: dict[str, Any]) -> dict[str, Any]:
        prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
        if prompt is None:
            prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
        chosen_ids, cut_c = encode(tokenizer, prompt + chosen, max_length=max_length, truncation_side=truncation_side)
        rejected_ids, cut_r = encode(
            tokenizer, prompt + rejected, max_length=max_length, truncation_side=truncation_side
        )
        margin = row.get("margin")
        return {
            "chosen_input_ids": chosen_ids,
            "rejected_input_ids": rejected_ids,
            "margin": float(margin) if margin is not None else 0.0,
            "truncated": cut_c or cut_r,
            "identical": chosen_ids == rejected_ids,
        }

    encoded = dataset.map(encode_pair, remove_columns=list(dataset.column_names), desc="Tokenizing pairs")
    truncated, identical = sum(encoded["truncated"]), sum(encoded["identical"])
    kept = encoded.filter(lambda row: not row["identical"], desc="Dropping identical pairs")
    if truncated or identical:
        log.warning(
            "reward pairs: %d of %d cut to max_length=%d (%s side); %d dropped with chosen == rejected tokens",
            truncated,
            len(encoded),
            max_length,
            truncation_side.value,
            identical,
        )
    if len(kept) == 0:
        raise empty_split_error(split, dataset, {"chosen == rejected": identical}, unit="pairs")
    return kept.remove_columns(["truncated", "identical"])


@dataclass
class RewardCollator:
    """Right-pad the ``2B`` sequences of a micro-batch into one batch: chosen rows first, then rejected."""

    pad_token_id: int

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """``input_ids``/``attention_mask`` ``(2B, longest)`` and ``margin`` ``(B,)``."""
        import torch

        sequences = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        input_ids, attention_mask = pad_batch(sequences, self.pad_token_id)
        margin = torch.tensor([float(r["margin"]) for r in rows])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "margin": margin}


# --- what the trainer calls ------------------------------------------------------------------------------------------


def plot_score_histogram(chosen: torch.Tensor, rejected: torch.Tensor, path: Path, *, title: str) -> None:
    """Overlaid histograms of chosen and rejected scores (shared bins), saved as a PNG (matplotlib, no display)."""
    import numpy as np
    from matplotlib.figure import Figure

    chosen_np, rejected_np = chosen.float().numpy(), rejected.float().numpy()
    bins = np.histogram_bin_edges(np.concatenate([chosen_np, rejected_np]), bins=30).tolist()
    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.subplots()
    axes.hist(chosen_np, bins=bins, alpha=0.6, label=f"chosen (mean {chosen_np.mean():.3f})")
    axes.hist(rejected_np, bins=bins, alpha=0.6, label=f"rejected (mean {rejected_np.mean():.3f})")
    axes.set_xlabel("reward")
    axes.set_ylabel("pairs")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


@dataclass
class RewardObjective:
    """The Bradley-Terry loss and its metrics, for :class:`~alignment.methods.seqcls.trainer.SequenceScoreTrainer`."""

    center_rewards_coefficient: float
    """Weight of the centring term."""
    plot_path: Path | None
    """Where each evaluation writes the score histogram (None: no plot)."""

    def items(self, batch: Mapping[str, torch.Tensor]) -> int:
        """Pairs in the micro-batch."""
        return int(batch["margin"].numel())

    def loss(
        self, scores: torch.Tensor, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair BT loss from ``(2B, 1)`` scores (chosen rows first); records both scores."""
        rewards = scores[:, 0]
        half = rewards.size(0) // 2
        chosen, rejected = rewards[:half], rewards[half:]
        per_pair = bt_loss(
            chosen, rejected, margin=batch["margin"], center_rewards_coefficient=self.center_rewards_coefficient
        )
        return per_pair, {"chosen": chosen.detach(), "rejected": rejected.detach()}

    def summarize(
        self, records: Mapping[str, torch.Tensor], *, mode: str, step: int, main_process: bool
    ) -> dict[str, float]:
        """Pairwise accuracy (strictly r_w > r_l; ties count as wrong), mean margin and mean scores."""
        chosen, rejected = records["chosen"], records["rejected"]
        margins = chosen - rejected
        if mode == "eval" and main_process and self.plot_path is not None:
            title = f"step {step}: accuracy {float((margins > 0).float().mean()):.3f} on {margins.numel()} pairs"
            plot_score_histogram(chosen, rejected, self.plot_path, title=title)
        return {
            "rewards/accuracies": float((margins > 0).float().mean()),
            "rewards/margins": float(margins.mean()),
            "rewards/chosen": float(chosen.mean()),
            "rewards/rejected": float(rejected.mean()),
        }


# --- run --------------------------------------------------------------------------------------------------------------


def run(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Validate and tokenise pairs, load the one-output model, train, save it with its tokenizer; final metrics."""
    from alignment.data.mix import build_splits
    from alignment.methods.pairwise.core import row_checks
    from alignment.methods.seqcls.trainer import SequenceScoreTrainer
    from alignment.models.config import ProblemType
    from alignment.models.load import load_tokenizer
    from alignment.models.seqcls import load_model_for_classification, save_classifier
    from alignment.training.arguments import training_args
    from alignment.training.callbacks import MetricsJsonlCallback
    from alignment.training.checkpoint import train_and_save

    method = cfg.method
    assert isinstance(method, RewardConfig)
    checks = row_checks(method)
    splits = build_splits(cfg.data, checks.validate, checks.columns)
    tokenizer = load_tokenizer(cfg.model)
    length, side = method.max_length, method.truncation_side
    train = tokenize_reward_pairs(splits.train, tokenizer, max_length=length, truncation_side=side)
    evaluation = (
        tokenize_reward_pairs(splits.eval, tokenizer, max_length=length, truncation_side=side, split="eval")
        if splits.eval is not None
        else None
    )
    model = load_model_for_classification(cfg.model, tokenizer, labels=["reward"], problem_type=ProblemType.regression)

    args = training_args(
        cfg,
        ctx,
        evaluation=evaluation is not None,
        remove_unused_columns=False,
        prediction_loss_only=True,
        label_names=["margin"],
    )
    trainer = SequenceScoreTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=RewardCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[MetricsJsonlCallback(ctx.output_dir / "metrics.jsonl")],
        objective=RewardObjective(method.center_rewards_coefficient, ctx.output_dir / "reward_scores.png"),
        train_lengths=[
            len(c) + len(r) for c, r in zip(train["chosen_input_ids"], train["rejected_input_ids"], strict=True)
        ],
        max_tokens_per_batch=method.max_tokens_per_batch,
    )
    metrics = train_and_save(trainer, method=method, model_dir=ctx.model_dir)
    if trainer.is_world_process_zero():
        save_classifier(trainer.model, tokenizer, ctx.model_dir)
    return metrics
