"""SFT's trainer: TRL's ``SFTTrainer`` with the loss taken from the final hidden states of the counted positions.

The loss is TRL's, normalised the same way (``N`` = ``num_items_in_batch``, the counted labels of the whole
gradient-accumulation window on every rank, so micro-batch 1 x accumulation 4 gives the gradient of 4 x 1)::

    L = -(1/N) * sum_{t counted} log softmax(h_t W^T)[y_t]

where ``h_t`` is the final hidden state at position ``t`` and ``y_t = labels[t + 1]``. Positions whose next label
is -100 (prompt turns, padding, the first token of each packed or padding-free sequence, which TRL's collator
masks) never reach the output head. The forward asks the model for the logits of one position per row
(``logits_to_keep=1``) and reads the hidden states from the decoder
(:func:`~alignment.training.chunked.final_hidden_states`). From there, one of three paths:

* the head sharded (ZeRO-3, FSDP): :func:`~alignment.training.chunked.module_head_loss` through the head module,
  whose hooks gather the shards (eager, counted positions only);
* Liger on for the model (``model.liger``, :mod:`alignment.models.liger`) and the head one plain matrix (no LoRA
  on it, no logit scale): Liger's fused linear cross entropy, a Triton kernel; it logs ``mean_token_accuracy``
  but computes no entropy, so ``entropy`` is not logged then;
* otherwise :func:`~alignment.training.chunked.chunked_head_loss`: a few thousand tokens' logits at a time.

TRL's per-step metrics are kept: ``mean_token_accuracy`` (the label is the first argmax), ``entropy`` (of the
next-token distribution, averaged over counted tokens) and ``num_tokens``. Settings whose loss is not this NLL
(an MoE auxiliary loss, ``loss_type=dft``, label smoothing, a ``compute_loss_func``) and calls that want the
logits back (``return_outputs``) go to TRL's own ``compute_loss``; SFT's config sets none of them.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from trl import SFTTrainer

from alignment.models.liger import is_patched
from alignment.training.chunked import (
    Objective,
    OutputHead,
    chunked_head_loss,
    final_hidden_states,
    head_is_sharded,
    module_head_loss,
    output_head,
    unwrap_causal_lm,
)
from alignment.training.packed import attention_implementation
from alignment.training.segments import check_used, segment_kwargs, sequence_layout

IGNORE_INDEX = -100


def nll_objective(targets: torch.Tensor) -> Objective:
    """The objective of :func:`chunked_head_loss` for next-token labels ``targets`` ``(n,)``.

    ``objective(logits (k, V), rows) -> (summed NLL, [summed entropy, correct top-1 count])`` over the chunk's rows.
    """

    def objective(logits: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        target = targets[rows]
        logp = torch.log_softmax(logits, dim=-1)
        nll = -logp.gather(-1, target[:, None]).sum()
        with torch.no_grad():
            plain = logp.detach()
            entropy = -(plain.exp() * plain).sum()
            correct = (logits.detach().argmax(-1) == target).sum()
        return nll, torch.stack([entropy.double(), correct.double()])

    return objective


def _liger_loss(hidden: torch.Tensor, head: OutputHead, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and correct top-1 count through Liger's fused linear cross entropy (fp32 gradient sums)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(
        reduction="sum", softcap=head.softcap, return_token_accuracy=True, accum_dtype=torch.float32
    )
    out = loss_fn(head.weight, hidden.to(head.weight.dtype), targets, head.bias)
    return out.loss, (out.token_accuracy * targets.numel()).detach()


def padding_free_attention(model: Any, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Under sdpa, a padding-free row (TRL's collator sets ``cu_seq_lens_q``) attended sequence by sequence.

    Without it HF builds a ``T x T`` block mask from the position ids and sdpa computes every masked block; with it
    each conversation is one causal sdpa call on its own slice (:mod:`alignment.training.segments`). Padded batches
    and other implementations (flash-attention reads ``cu_seq_lens`` itself) are left as they are.
    """
    bounds = inputs.get("cu_seq_lens_q")
    if bounds is None or attention_implementation(model) != "sdpa" or inputs["input_ids"].size(0) != 1:
        return {}
    layout = sequence_layout(list(itertools.pairwise(bounds.tolist())))
    return segment_kwargs(layout, inputs["input_ids"].device)


class ChunkedSFTTrainer(SFTTrainer):  # type: ignore[misc]
    """TRL's ``SFTTrainer`` whose NLL never holds the logits of all positions (module docstring)."""

    def _own_loss(self) -> bool:
        """Whether the loss is the plain NLL this trainer computes (else TRL's ``compute_loss`` runs)."""
        return not (
            self.aux_loss_enabled
            or self.compute_loss_func is not None
            or self.label_smoother is not None
            or self.args.loss_type != "nll"
        )

    def head_loss(
        self, model: Any, hidden: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Summed NLL, correct top-1 count and summed entropy (None under Liger) of ``hidden`` ``(n, H)``."""
        module, head = output_head(model)
        if hidden.size(0) == 0:  # keeps the graph (DDP) and gives a zero gradient
            zero = hidden.sum() * 0.0
            return zero, zero.detach(), zero.detach()
        if head_is_sharded(model):
            vocab = int(getattr(head.weight, "ds_shape", head.weight.shape)[0])  # ZeRO-3 keeps the full shape there
            total, sums = module_head_loss(hidden, module, head, nll_objective(targets), vocab)
        elif is_patched(unwrap_causal_lm(model)) and head.lora_a is None and head.logit_scale == 1.0:
            total, correct = _liger_loss(hidden, head, targets)
            return total, correct, None
        else:
            total, sums = chunked_head_loss(hidden, head, nll_objective(targets))
        return total, sums[1], sums[0]

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The NLL of the counted positions over ``num_items_in_batch``, and TRL's metrics for the step's log."""
        if return_outputs or not self._own_loss():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        counted = labels[:, 1:] != IGNORE_INDEX
        forward = {key: value for key, value in inputs.items() if key not in ("labels", "use_cache")}
        forward.update(padding_free_attention(model, inputs))
        hidden = final_hidden_states(model, **forward)[:, :-1][counted]
        check_used(forward, model)
        total, correct, entropy = self.head_loss(model, hidden, labels[:, 1:][counted])
        tokens = counted.sum() if num_items_in_batch is None else num_items_in_batch
        loss = total / torch.as_tensor(tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # DDP averages; N counts all ranks
        self._log_token_metrics(inputs, counted, correct, entropy)
        return loss

    def _log_token_metrics(
        self,
        inputs: dict[str, torch.Tensor],
        counted: torch.Tensor,
        correct: torch.Tensor,
        entropy: torch.Tensor | None,
    ) -> None:
        """TRL's ``entropy``, ``mean_token_accuracy`` and ``num_tokens``, gathered over ranks as TRL gathers them."""
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        valid = gather(counted.sum()).sum()
        if entropy is not None:
            entropy_sum = gather(entropy.detach()).sum()
            self._metrics[mode]["entropy"].append((entropy_sum / valid).item() if valid > 0 else 0.0)
        num_correct = gather(correct.detach()).sum()
        self._metrics[mode]["mean_token_accuracy"].append((num_correct / valid).item() if valid > 0 else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                processed = gather(inputs["attention_mask"].sum()).sum().item()
            else:  # padding-free: one row, all real tokens
                positions = inputs["position_ids"]
                processed = gather(torch.tensor(positions.size(1), device=positions.device)).sum().item()
            self._total_train_tokens += processed // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
