"""The HF Trainer of the pairwise methods: a pure loss over one packed forward, normalised per optimizer step.

Kept apart from :mod:`alignment.methods.pairwise` so that composing a config never imports the Trainer.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from alignment.methods.pairwise import (
    LossFn,
    PairLogps,
    PreferenceLoss,
    Progress,
    Reference,
    TokenBudgetBatchSampler,
    TokenShaper,
    Window,
    batch_window,
    merge_windows,
    place,
    sequence_logps,
    total_loss,
)


class PairwiseTrainer(Trainer):
    """An HF Trainer whose loss is a method's pure pairwise loss over one packed forward."""

    def __init__(
        self,
        *args: Any,
        loss_fn: LossFn,
        reference: Reference | None,
        token_shaper: TokenShaper | None = None,
        max_tokens_per_batch: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_tokens_per_batch = max_tokens_per_batch
        self.loss_fn = loss_fn
        self.reference = reference
        self.token_shaper = token_shaper
        """Reshapes the policy's token log-probs into ``PairLogps.shaped`` (never the reference's)."""
        # The loss is normalised over the optimizer step by `_get_num_items_in_batch`, not divided by HF.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        if reference is not None and reference.model is not None:
            # The Trainer places only the policy; a frozen copy left on the CPU would meet GPU batches.
            place(reference.model, self.args.device)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def get_train_dataloader(self) -> Any:
        """Fixed pairs per micro-batch, or whole pairs up to ``max_tokens_per_batch`` tokens each."""
        if self.max_tokens_per_batch is None:
            return super().get_train_dataloader()
        dataset: Any = self.train_dataset
        sides = zip(dataset["chosen_input_ids"], dataset["rejected_input_ids"], strict=True)
        lengths = [len(chosen) + len(rejected) for chosen, rejected in sides]
        sampler = TokenBudgetBatchSampler(lengths, self.max_tokens_per_batch, self.args.seed)
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
        )
        return self.accelerator.prepare(loader)

    def _get_num_items_in_batch(self, batch_samples: list[Any], device: torch.device) -> Any:
        window = merge_windows([batch_window(b) for b in batch_samples])
        if self.args.world_size > 1:
            counts = torch.tensor([window.pairs, window.chosen_tokens, window.rejected_tokens], device=device)
            counts = self.accelerator.gather(counts[None]).sum(0)
            window = Window(*(float(c) for c in counts))
        return window

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """Policy (and reference) log-probs, the method's loss, and this micro-batch's share of the step's loss."""
        policy = sequence_logps(model, inputs, self.token_shaper)
        reference = self.reference.logps(model, inputs) if self.reference is not None else None
        progress = Progress(self.state.global_step, max(self.state.max_steps, 1))
        out = self.loss_fn(policy, reference, progress)
        # HF's prediction_step also passes `_get_num_items_in_batch` (a Window); evaluation is per batch, unscaled.
        training = model.training and isinstance(num_items_in_batch, Window)
        window = num_items_in_batch if training else Window.of(policy)
        loss = total_loss(out, policy, window)
        if training and self.args.world_size > 1:
            loss = loss * self.args.world_size  # DDP averages gradients over ranks; the window is global
        self._record(out, policy, "train" if model.training else "eval")
        return (loss, {}) if return_outputs else loss

    def _record(self, out: PreferenceLoss, policy: PairLogps, mode: str) -> None:
        margins = out.chosen_reward - out.rejected_reward
        per_pair = {
            "rewards/chosen": out.chosen_reward,
            "rewards/rejected": out.rejected_reward,
            "rewards/accuracies": (margins > 0).float(),
            "rewards/margins": margins,
            "logps/chosen": policy.chosen.detach(),
            "logps/rejected": policy.rejected.detach(),
        }
        for key, value in per_pair.items():
            # Per-pair values, not per-rank means: gather_for_metrics drops the samples an uneven last batch
            # repeats, which only makes sense for a tensor with one entry per sample.
            self._metrics[mode][key].append(float(self.accelerator.gather_for_metrics(value.detach()).float().mean()))
        for key, scalar in out.metrics.items():
            self._metrics[mode][key].append(scalar)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the means of the preference metrics gathered since the last log."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._metrics[mode].items():
            if values:
                logs[prefix + key] = sum(values) / len(values)
        self._metrics[mode].clear()
        super().log(logs, start_time)
