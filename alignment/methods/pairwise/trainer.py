"""The trainer of the pairwise methods: a method's pure loss over one packed forward, normalised per step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from alignment.methods.pairwise.core import (
    LossFn,
    PairCounts,
    PairLogps,
    PreferenceLoss,
    Progress,
    TokenShaper,
    batch_counts,
    reference_logps,
    sequence_logps,
    total_loss,
)
from alignment.models.frozen import FrozenModel
from alignment.training.metrics import MetricSums
from alignment.training.trainer import StepNormalisedTrainer


class PairwiseTrainer(StepNormalisedTrainer):
    """A step-normalised trainer whose loss is a method's pure pairwise loss over one packed forward."""

    def __init__(
        self,
        *args: Any,
        loss_fn: LossFn,
        reference: FrozenModel | None,
        token_shaper: TokenShaper | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn
        self.reference = reference
        self.token_shaper = token_shaper
        """Reshapes the policy's token log-probs into ``PairLogps.shaped`` (never the reference's)."""
        if reference is not None:
            reference.prepare(self.accelerator)  # on the training device, or sharded like the policy (ZeRO-3/FSDP)
        self._metrics = MetricSums()

    def step_counts(self, batch: Mapping[str, Any]) -> Sequence[float]:
        """Pairs, chosen and rejected completion tokens of one micro-batch."""
        counts = batch_counts(batch)
        return (counts.pairs, counts.chosen_tokens, counts.rejected_tokens)

    def step_window(self, counts: Sequence[float]) -> PairCounts:
        """The step's counts as :class:`PairCounts`."""
        return PairCounts(*counts)

    def train_lengths(self) -> Sequence[int]:
        """Tokens of each pair (both sides)."""
        dataset: Any = self.train_dataset
        sides = zip(dataset["chosen_input_ids"], dataset["rejected_input_ids"], strict=True)
        return [len(chosen) + len(rejected) for chosen, rejected in sides]

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """Policy (and reference) log-probs, the method's loss, and this micro-batch's share of the step's loss."""
        policy = sequence_logps(model, inputs, self.token_shaper)
        reference = reference_logps(self.reference, model, inputs) if self.reference is not None else None
        progress = Progress(self.state.global_step, max(self.state.max_steps, 1))
        out = self.loss_fn(policy, reference, progress)
        # HF's prediction_step also passes `_get_num_items_in_batch` (PairCounts); evaluation is per batch, unscaled.
        training = model.training and isinstance(num_items_in_batch, PairCounts)
        counts = num_items_in_batch if training else PairCounts.of(policy)
        loss = self.scale_for_ranks(total_loss(out, policy, counts), training=training)
        self._record(out, policy, "train" if model.training else "eval")
        return (loss, {}) if return_outputs else loss

    def _record(self, out: PreferenceLoss, policy: PairLogps, mode: str) -> None:
        """Add this micro-batch's sums and pair count to the metrics of ``mode`` (no collective here)."""
        margins = out.chosen_reward - out.rejected_reward
        per_pair = {
            "rewards/chosen": out.chosen_reward,
            "rewards/rejected": out.rejected_reward,
            "rewards/accuracies": (margins > 0).float(),
            "rewards/margins": margins,
            "logps/chosen": policy.chosen,
            "logps/rejected": policy.rejected,
        }
        pairs = self.metric_items(len(margins), training=mode == "train")
        sums = torch.stack([value.detach()[:pairs].float().sum() for value in per_pair.values()]).tolist()
        for key, total in zip(per_pair, sums, strict=True):
            self._metrics.add(mode, key, total, pairs)
        for key, scalar in out.metrics.items():
            # A micro-batch's scalar (a mean over its pairs or tokens) weighs by its pairs.
            self._metrics.add(mode, key, scalar * pairs, pairs)

    def logged_metrics(self, mode: str) -> dict[str, float]:
        """The preference metrics since the last log, over every rank's pairs (a collective: every rank logs)."""
        return self._metrics.pop(mode)
