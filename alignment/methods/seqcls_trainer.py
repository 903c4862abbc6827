"""The HF Trainer of the sequence-classification methods (reward model, classifier).

A method supplies an :class:`Objective`: a pure per-item loss over the pooled head outputs, the item count of a
micro-batch (pairs, examples), and a summary of what the loss recorded (metrics; the eval summary may also write
plots). The trainer does the forward (:func:`alignment.models.reward.sequence_scores`), normalises the loss over
the whole optimizer step (items of every micro-batch and rank counted first, so micro-batch 1 x accumulation 4
equals 4 x 1), and logs the summaries. Kept apart from the method files so that composing a config never imports
the Trainer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from alignment.methods.pairwise import TokenBudgetBatchSampler
from alignment.models.reward import sequence_scores


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


class SequenceScoreTrainer(Trainer):
    """An HF Trainer whose loss is an :class:`Objective` over pooled sequence scores."""

    def __init__(
        self,
        *args: Any,
        objective: Objective,
        train_lengths: Sequence[int] | None = None,
        max_tokens_per_batch: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.objective: Objective = objective
        self.train_lengths = train_lengths
        self.max_tokens_per_batch = max_tokens_per_batch
        # The loss is normalised over the optimizer step by `_get_num_items_in_batch`, not divided by HF.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._records: dict[str, dict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def get_train_dataloader(self) -> Any:
        """Fixed items per micro-batch, or whole items up to ``max_tokens_per_batch`` tokens each."""
        if self.max_tokens_per_batch is None or self.train_lengths is None:
            return super().get_train_dataloader()
        sampler = TokenBudgetBatchSampler(self.train_lengths, self.max_tokens_per_batch, self.args.seed)
        loader = DataLoader(
            self.train_dataset,  # type: ignore[arg-type]
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
        )
        return self.accelerator.prepare(loader)

    def _get_num_items_in_batch(self, batch_samples: list[Any], device: torch.device) -> Any:
        items = float(sum(self.objective.items(b) for b in batch_samples))
        if self.args.world_size > 1:
            items = float(self.accelerator.gather(torch.tensor([items], device=device)).sum())
        return items

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
        if training and self.args.world_size > 1:
            loss = loss * self.args.world_size  # DDP averages gradients over ranks; the count is global
        mode = "train" if model.training else "eval"
        for key, value in record.items():
            # gather_for_metrics drops the samples an uneven last eval batch repeats.
            self._records[mode][key].append(self.accelerator.gather_for_metrics(value.detach()).cpu())
        return (loss, {}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the objective's summary of what was recorded since the last log."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        recorded = self._records[mode]
        if recorded and all(recorded.values()):
            records = {key: torch.cat(values) for key, values in recorded.items()}
            summary = self.objective.summarize(
                records, mode=mode, step=self.state.global_step, main_process=self.is_world_process_zero()
            )
            prefix = "eval_" if mode == "eval" else ""
            logs.update({prefix + key: value for key, value in summary.items()})
        recorded.clear()
        super().log(logs, start_time)
