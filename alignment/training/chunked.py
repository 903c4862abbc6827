"""A loss over the output head's logits without ever holding vocabulary-sized logits for all tokens.

A language model's last step, ``logits = hidden @ W.T`` (plus a LoRA term, a logit scale, a soft cap), is where
long sequences and large vocabularies spend their memory: 2,048 tokens x 128k vocabulary is 1 GiB of fp32 logits
per copy, and an eager loss keeps several copies (logits, log-softmax, their gradients) for backward.

:func:`chunked_head_loss` takes the final hidden states of the counted tokens only (positions that carry no loss
are dropped before the projection), projects ``chunk_size`` tokens at a time, evaluates the caller's
``objective`` on that chunk's logits and, in the same pass, the gradient of the chunk's loss with respect to the
hidden states and the head's trainable tensors; the chunk's logits are then freed. Backward only scales those
gradients by the incoming gradient. The peak memory of the loss path is a few ``chunk_size x V`` buffers plus the
fp32 gradient of the head, whatever the number of tokens, and the work equals the eager path's (one projection
forward, one backward), so nothing is recomputed.

The objective must return a *sum* (a scalar linear in the tokens, so chunks add up) and a vector of metric sums;
``eager_head_loss`` evaluates the same objective on the full logits and is the reference the chunked path must
equal. A LoRA adapter on the head trains inside the chunks: ``z = h W^T + s (dropout(h) A^T) B^T``.

Under ZeRO-3 and FSDP the head's weight is a shard that only the module's own forward gathers; those runs call
:func:`module_head_loss`, which projects through the module (eager, counted positions only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

Objective = Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]]
"""``objective(logits, rows) -> (loss_sum, metric_sums)``: ``logits`` ``(n, V)`` fp32 of the tokens ``rows``."""


@dataclass(frozen=True)
class OutputHead:
    """The tensors and settings of a model's output projection, as :func:`chunked_head_loss` applies them."""

    weight: torch.Tensor
    """``(V, H)``; a view of the first ``vocab`` rows when the vocabulary is cut to a shared range."""
    bias: torch.Tensor | None = None
    """``(V,)`` or None."""
    lora_a: torch.Tensor | None = None
    """``(r, H)``: the active LoRA adapter's down projection (None without an adapter on the head)."""
    lora_b: torch.Tensor | None = None
    """``(V, r)``: its up projection."""
    lora_scaling: float = 1.0
    """``lora_alpha / r`` (PEFT's ``scaling``)."""
    lora_dropout: Callable[[torch.Tensor], torch.Tensor] | None = None
    """The adapter's dropout module (applied to the hidden states entering ``lora_a``)."""
    logit_scale: float = 1.0
    """Multiplies the logits (Cohere's ``logit_scale``; Granite's ``1 / logits_scaling``)."""
    softcap: float | None = None
    """Final-logit soft cap ``c * tanh(z / c)`` (Gemma 2/3's ``final_logit_softcapping``)."""

    def tensors(self) -> list[torch.Tensor | None]:
        """The head's tensors in :func:`project`'s order."""
        return [self.weight, self.bias, self.lora_a, self.lora_b]

    def truncated(self, vocab: int) -> OutputHead:
        """The head restricted to the first ``vocab`` output rows (a shared tokenizer range)."""
        bias = self.bias[:vocab] if self.bias is not None else None
        lora_b = self.lora_b[:vocab] if self.lora_b is not None else None
        return replace(self, weight=self.weight[:vocab], bias=bias, lora_b=lora_b)


def project(head: OutputHead, hidden: torch.Tensor, tensors: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """fp32 logits of ``hidden`` ``(n, H)`` through ``head`` (``tensors`` replace the head's own, same order)."""
    weight, bias, lora_a, lora_b = tensors if tensors is not None else head.tensors()
    assert weight is not None
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if lora_a is not None and lora_b is not None:
        dropped = head.lora_dropout(hidden) if head.lora_dropout is not None else hidden
        logits = logits + (dropped @ lora_a.T.to(dropped.dtype)) @ lora_b.T.to(dropped.dtype) * head.lora_scaling
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least (bf16 heads)
    if head.logit_scale != 1.0:
        logits = logits * head.logit_scale
    if head.softcap is not None:
        logits = head.softcap * torch.tanh(logits / head.softcap)
    return logits


class _ChunkedHeadLoss(torch.autograd.Function):
    """Loss and gradients chunk by chunk in forward; backward scales the stored gradients."""

    @staticmethod
    def forward(
        ctx: Any,
        head: OutputHead,
        objective: Objective,
        chunk_size: int,
        hidden: torch.Tensor,
        *tensors: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = [hidden, *tensors]
        wanted = [t is not None and need for t, need in zip(inputs, ctx.needs_input_grad[3:], strict=True)]
        grads: list[torch.Tensor | None] = [None] * len(inputs)
        total = hidden.new_zeros((), dtype=torch.float32)
        metrics: torch.Tensor | None = None
        rows = hidden.size(0)
        leaves = [
            t.detach().requires_grad_(w) if t is not None else None for t, w in zip(inputs[1:], wanted[1:], strict=True)
        ]
        for start in range(0, rows, chunk_size):
            part = slice(start, min(start + chunk_size, rows))
            with torch.enable_grad():
                chunk = hidden[part].detach().requires_grad_(wanted[0])
                loss, sums = objective(project(head, chunk, leaves), part)
            targets = [t for t, w in zip([chunk, *leaves], wanted, strict=True) if w and t is not None]
            found = iter(torch.autograd.grad(loss, targets, allow_unused=True) if loss.requires_grad else [])
            for index, want in enumerate(wanted):
                if not want:
                    continue
                grad = next(found, None)
                if grad is None:
                    continue
                if index == 0:
                    full = grads[0] if grads[0] is not None else torch.zeros_like(hidden)
                    full[part] = grad.to(hidden.dtype)
                    grads[0] = full
                else:
                    wide = grad.to(torch.promote_types(grad.dtype, torch.float32))  # fp32 sums for bf16 heads
                    previous = grads[index]
                    grads[index] = wide if previous is None else previous + wide
            total = total + loss.detach()
            metrics = sums.detach() if metrics is None else metrics + sums.detach()
        ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
        ctx.present = [g is not None for g in grads]
        ctx.dtypes = [t.dtype if t is not None else None for t in inputs]
        assert metrics is not None, "chunked_head_loss needs at least one token"
        ctx.mark_non_differentiable(metrics)
        return total, metrics

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, _grad_metrics: torch.Tensor) -> tuple[Any, ...]:
        saved = ctx.saved_tensors
        out: list[torch.Tensor | None] = []
        for grad, present, dtype in zip(saved, ctx.present, ctx.dtypes, strict=True):
            out.append((grad * grad_total).to(dtype) if present else None)
        return (None, None, None, *out)


CHUNK_LOGITS = 1 << 22
"""Logit values per chunk when the chunk size is automatic (16 MiB in fp32)."""


def chunked_head_loss(
    hidden: torch.Tensor, head: OutputHead, objective: Objective, *, chunk_size: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``objective`` summed over chunks of ``hidden`` ``(tokens, H)``: (loss, metric sums), never all logits at once.

    The loss is differentiable with respect to ``hidden`` and the head's tensors that require a gradient; it
    equals :func:`eager_head_loss` (to float rounding) in value and gradient. ``chunk_size`` 0 takes as many
    tokens per chunk as keep :data:`CHUNK_LOGITS` logits, whatever the vocabulary.
    """
    if chunk_size == 0:
        chunk_size = max(1, CHUNK_LOGITS // head.weight.size(0))
    if hidden.size(0) == 0:
        raise ValueError("chunked_head_loss: no tokens (the caller must skip micro-batches without counted tokens)")
    tensors = head.tensors()
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in [hidden, *tensors]):
        total, metrics = hidden.new_zeros((), dtype=torch.float32), None
        for start in range(0, hidden.size(0), chunk_size):
            part = slice(start, min(start + chunk_size, hidden.size(0)))
            loss, sums = objective(project(head, hidden[part]), part)
            total, metrics = total + loss.detach(), sums if metrics is None else metrics + sums
        assert metrics is not None
        return total, metrics
    result: tuple[torch.Tensor, torch.Tensor] = _ChunkedHeadLoss.apply(  # type: ignore[no-untyped-call]
        head, objective, chunk_size, hidden, *tensors
    )
    return result


def eager_head_loss(hidden: torch.Tensor, head: OutputHead, objective: Objective) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the objective on the full ``(tokens, V)`` logits (what :func:`chunked_head_loss` avoids)."""
    return objective(project(head, hidden), slice(0, hidden.size(0)))


def module_head_loss(
    hidden: torch.Tensor, module: torch.nn.Module, head: OutputHead, objective: Objective, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective on logits from the head *module* (its hooks gather ZeRO-3 / FSDP shards); eager."""
    logits = module(hidden)[..., :vocab]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if head.logit_scale != 1.0:
        logits = logits * head.logit_scale
    if head.softcap is not None:
        logits = head.softcap * torch.tanh(logits / head.softcap)
    return objective(logits, slice(0, hidden.size(0)))


def output_head(model: Any) -> tuple[torch.nn.Module, OutputHead]:
    """The output module of a (DDP-, PEFT-wrapped) causal LM and its :class:`OutputHead`.

    A PEFT LoRA layer on the head contributes its active adapter's ``A``, ``B``, scaling and dropout; a head in
    ``modules_to_save`` contributes the trained copy. The model config's logit scale and final soft cap apply.
    """
    inner = unwrap_causal_lm(model)
    module = inner.get_output_embeddings()
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    settings: dict[str, Any] = {"logit_scale": scale, "softcap": float(softcap) if softcap else None}
    layer: Any = module
    modules_to_save = getattr(layer, "modules_to_save", None)
    if modules_to_save is not None:  # PEFT ModulesToSaveWrapper: the active adapter's trained copy
        active = _active_adapter(layer)
        layer = (
            modules_to_save[active]
            if active in modules_to_save and not layer.disable_adapters
            else layer.original_module
        )
    lora_a = getattr(layer, "lora_A", None)
    if lora_a is not None:  # PEFT LoRA Linear
        active = _active_adapter(layer)
        base = layer.get_base_layer()
        if active in lora_a and not layer.disable_adapters and not layer.merged:
            if getattr(layer, "use_dora", {}).get(active, False):
                raise NotImplementedError("DoRA on the output head is not supported by the chunked loss")
            return module, OutputHead(
                base.weight,
                base.bias,
                lora_a[active].weight,
                layer.lora_B[active].weight,
                float(layer.scaling[active]),
                layer.lora_dropout[active],
                **settings,
            )
        layer = base
    return module, OutputHead(layer.weight, getattr(layer, "bias", None), **settings)


def _active_adapter(layer: Any) -> str:
    active = layer.active_adapters if hasattr(layer, "active_adapters") else layer.active_adapter
    names = [active] if isinstance(active, str) else list(active)
    if len(names) != 1:
        raise NotImplementedError(f"the chunked loss supports one active adapter on the head, got {names}")
    return str(names[0])


def unwrap_causal_lm(model: Any) -> Any:
    """The causal LM inside DDP/DeepSpeed (``.module``) and PEFT (``get_base_model``) wrappers."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def final_hidden_states(model: Any, **inputs: Any) -> torch.Tensor:
    """The final (post-norm) hidden states ``(batch, tokens, H)`` of one forward through ``model`` (any wrapper).

    The forward goes through the wrapper (so DDP and DeepSpeed see it) with ``logits_to_keep=1``: the head
    projects one position only, and the hidden states are read from the decoder's output by a hook.
    """
    inner = unwrap_causal_lm(model)
    decoder = getattr(inner, inner.base_model_prefix)
    captured: list[torch.Tensor] = []

    def keep(_module: Any, _args: Any, output: Any) -> None:
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = decoder.register_forward_hook(keep)
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]
