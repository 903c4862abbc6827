"""The step-normalised trainer every custom method trainer extends, and its token-budget batching.

A method's loss is a mean over the items (pairs, groups, examples) or tokens of a whole optimizer step, not of
one micro-batch: before the step's first micro-batch the HF Trainer hands :meth:`_get_num_items_in_batch` every
micro-batch of the step, and :class:`StepNormalisedTrainer` sums their counts (:meth:`step_counts`) over the
micro-batches and the data-parallel ranks. Each micro-batch then divides its summed loss by those step totals,
so micro-batch 1 x accumulation 4 gives the gradient of 4 x 1, and two ranks the gradient of one rank with twice
the batch (DDP averages gradients over ranks, so the loss is multiplied back by the world size).

A subclass supplies a few small hooks: the per-micro-batch counts and their typed form (:meth:`step_counts`,
:meth:`step_window`), the train-item lengths for token budgets (:meth:`train_lengths`), ``compute_loss``, and
the metrics recorded since the last log (:meth:`logged_metrics`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from alignment.training.metrics import real_items


class TokenBudgetBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Micro-batches of whole pairs holding at most ``budget`` tokens (both sides), in a seeded shuffled order.

    Pairs are taken in a fresh random order each epoch (seed + epoch) and added to the current micro-batch while
    it stays within the budget; a pair longer than the budget trains alone. Every pair appears once per epoch.
    """

    def __init__(self, lengths: Sequence[int], budget: int, seed: int) -> None:
        if budget < 1:
            raise ValueError(f"max_tokens_per_batch must be >= 1, got {budget}")
        self.lengths = list(lengths)
        self.budget = budget
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for a new epoch."""
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This epoch's micro-batches (deterministic for a seed and epoch)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        out: list[list[int]] = []
        current: list[int] = []
        used = 0
        for index in torch.randperm(len(self.lengths), generator=generator).tolist():
            if current and used + self.lengths[index] > self.budget:
                out.append(current)
                current, used = [], 0
            current.append(index)
            used += self.lengths[index]
        if current:
            out.append(current)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        """Yield the epoch's micro-batches as lists of dataset indices."""
        yield from self.batches()

    def __len__(self) -> int:
        return len(self.batches())


class StepNormalisedTrainer(Trainer):
    """An HF Trainer whose loss is normalised over the whole optimizer step (micro-batches and ranks)."""

    def __init__(self, *args: Any, max_tokens_per_batch: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_tokens_per_batch = max_tokens_per_batch
        """Micro-batches of whole items up to this many tokens (None: ``per_device_train_batch_size`` items)."""
        # The loss is normalised over the optimizer step by `_get_num_items_in_batch`, not divided by HF.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

    # --- hooks ---------------------------------------------------------------------------------------------

    def step_counts(self, batch: Mapping[str, Any]) -> Sequence[float]:
        """The counts one micro-batch adds to its step (items, tokens...); summed over micro-batches and ranks."""
        raise NotImplementedError

    def step_window(self, counts: Sequence[float]) -> Any:
        """The step's summed counts in the form ``compute_loss`` receives as ``num_items_in_batch``."""
        return tuple(counts)

    def train_lengths(self) -> Sequence[int]:
        """Tokens of each train item, for ``max_tokens_per_batch``."""
        raise NotImplementedError

    def logged_metrics(self, mode: str) -> dict[str, float]:
        """Metrics of ``mode`` (``train``/``eval``) recorded since the last log (then forgotten); none by default."""
        return {}

    # --- the shared machinery ------------------------------------------------------------------------------

    def get_train_dataloader(self) -> Any:
        """Fixed items per micro-batch, or whole items up to ``max_tokens_per_batch`` tokens each."""
        if self.max_tokens_per_batch is None:
            return super().get_train_dataloader()
        sampler = TokenBudgetBatchSampler(self.train_lengths(), self.max_tokens_per_batch, self.args.seed)
        loader = DataLoader(
            self.train_dataset,  # type: ignore[arg-type]
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
        )
        return self.accelerator.prepare(loader)

    def _get_num_items_in_batch(self, batch_samples: list[Any], device: torch.device) -> Any:
        per_batch = [list(self.step_counts(batch)) for batch in batch_samples]
        counts = [float(sum(column)) for column in zip(*per_batch, strict=True)]
        if self.args.world_size > 1:
            gathered = self.accelerator.gather(torch.tensor([counts], device=device)).sum(0)
            counts = [float(c) for c in gathered]
        return self.step_window(counts)

    def metric_items(self, items: int, *, training: bool) -> int:
        """How many of this rank's ``items`` (first dimension of per-item values) count in the logged metrics.

        All of them in training (the repeats that fill an uneven last round of batches are trained on too, and HF
        fetches a step's micro-batches ahead, so the end-of-data flag is not per micro-batch there); in an
        evaluation's last batch only the real ones (:func:`alignment.training.metrics.real_items`).
        """
        if training:
            return items
        state = self.accelerator.gradient_state
        return real_items(
            items, rank=self.args.process_index, remainder=state.remainder, last_batch=state.end_of_dataloader
        )

    def scale_for_ranks(self, loss: torch.Tensor, *, training: bool) -> torch.Tensor:
        """A training loss times the world size: DDP averages gradients over ranks, and the step counts are global."""
        if not (training and self.args.world_size > 1):
            return loss
        scaled: torch.Tensor = loss * self.args.world_size
        return scaled

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the method's metrics recorded since the last log (``eval_``-prefixed during evaluation)."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + key: value for key, value in self.logged_metrics(mode).items()})
        super().log(logs, start_time)
