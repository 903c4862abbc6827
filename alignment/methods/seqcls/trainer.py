"""The trainer of the sequence-classification methods (reward model, classifier).

A method supplies an :class:`Objective`: a pure per-item loss over the pooled head outputs, the item count of a
micro-batch (pairs, examples), and a summary of what the loss recorded (metrics; the eval summary may also write
plots). The trainer does the forward (:func:`alignment.models.seqcls.sequence_scores`), normalises the loss over
the whole optimizer step (items of every micro-batch and rank counted first, so micro-batch 1 x accumulation 4
equals 4 x 1), and logs the summaries. Kept apart from the method files so that composing a config never imports
the Trainer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from alignment.models.seqcls import sequence_scores
from alignment.training.metrics import gather_from_ranks
from alignment.training.trainer import StepNormalisedTrainer


class Objective(Protocol):
    """What a sequence-classification method contributes to the trainer."""

    def items(self, batch: Mapping[str, torch.Tensor]) -> int:
        """Items (pairs, examples) in a micro-batch: the unit the loss is averaged over."""

    def loss(
        self, scores: torch.Tensor, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-item loss ``(items,)`` from head outputs ``(rows, num_labels)``, and per-item tensors to record."""

    def summarize(
        self, records: Mapping[str, torch.Tensor], *, mode: str, step: int, main_process: bool
    ) -> dict[str, float]:
        """Metrics from everything recorded since the last log (``mode``: ``train``/``eval``); plots if main."""


class SequenceScoreTrainer(StepNormalisedTrainer):
    """A step-normalised trainer whose loss is an :class:`Objective` over pooled sequence scores."""

    def __init__(
        self, *args: Any, objective: Objective, train_lengths: Sequence[int] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.objective: Objective = objective
        self._train_lengths = train_lengths
        self._records: dict[str, dict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def step_counts(self, batch: Mapping[str, Any]) -> Sequence[float]:
        """Items (pairs, examples) of one micro-batch."""
        return (float(self.objective.items(batch)),)

    def step_window(self, counts: Sequence[float]) -> float:
        """The step's item count."""
        return counts[0]

    def train_lengths(self) -> Sequence[int]:
        """Tokens of each train item (all its sequences), as the method passed them."""
        if self._train_lengths is None:
            raise ValueError("max_tokens_per_batch needs the train items' token lengths (train_lengths)")
        return self._train_lengths

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """Pooled scores, the objective's per-item loss, and this micro-batch's share of the step's loss."""
        scores = sequence_scores(model, inputs["input_ids"], inputs["attention_mask"]).float()
        per_item, record = self.objective.loss(scores, inputs)
        # HF's prediction_step passes a count too; evaluation is a plain per-batch mean.
        training = model.training and num_items_in_batch is not None
        loss = per_item.sum() / (float(num_items_in_batch) if training else max(per_item.numel(), 1))
        loss = self.scale_for_ranks(loss, training=training)
        mode = "train" if model.training else "eval"
        for key, value in record.items():
            # Kept on this rank (ranks may hold different numbers of items); gathered once per log.
            items = self.metric_items(len(value), training=model.training)
            self._records[mode][key].append(value.detach()[:items].cpu())
        return (loss, {}) if return_outputs else loss

    def logged_metrics(self, mode: str) -> dict[str, float]:
        """The objective's summary of every rank's items since the last log (a collective: every rank logs)."""
        local = {key: torch.cat(values) for key, values in self._records[mode].items() if values}
        self._records[mode].clear()
        per_rank = gather_from_ranks(local)
        keys = sorted({key for records in per_rank for key in records})
        if not keys:
            return {}
        records = {key: torch.cat([r[key] for r in per_rank if key in r]) for key in keys}
        return self.objective.summarize(
            records, mode=mode, step=self.state.global_step, main_process=self.is_world_process_zero()
        )
