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

:func:`chunked_token_logps` gives per-token log-probs ``log p(y_t | h_t)`` instead of a scalar (the pairwise
methods and GPO sum them per sequence and apply a loss that is not linear in them, so the gradient reaching each
token is unknown until backward). Forward projects a chunk of tokens at a time. With a frozen head (LoRA away
from the head, a reference model) each token's gradient with respect to its own hidden state is taken in forward
and kept, ``(n, H)``: backward only scales it. With a trainable head forward keeps each token's logsumexp, and
backward projects once more, a block of vocabulary rows (all tokens) at a time, so each block's weight gradient is
written once instead of a ``(V, H)`` gradient being summed for every token chunk. :func:`head_token_logps` picks,
for a model, this path or the module's (below).

Under ZeRO-3 and FSDP (:func:`head_is_sharded`) the head's weight is a shard that only the module's own forward
gathers; those runs project through the module (:func:`module_head_loss`, :func:`module_logits`; eager, counted
positions only).
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


def project(
    head: OutputHead,
    hidden: torch.Tensor,
    tensors: list[torch.Tensor | None] | None = None,
    dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 logits of ``hidden`` ``(n, H)`` through ``head`` (``tensors`` replace the head's own, same order).

    ``dropped`` is the LoRA branch's input when the caller applied the adapter's dropout itself (None: applied here).
    """
    weight, bias, lora_a, lora_b = tensors if tensors is not None else head.tensors()
    assert weight is not None
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if lora_a is not None and lora_b is not None:
        if dropped is None:
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


class _ChunkedTokenLogps(torch.autograd.Function):
    """Per-token log-probs a chunk at a time; backward gets what it needs without keeping any chunk's logits.

    Forward goes over chunks of ``chunk_size`` tokens. ``store`` (no head tensor trains): token ``t``'s log-prob
    depends on ``h_t`` alone, so forward takes each chunk's ``d logp_t / d h_t`` at once and keeps these ``(n, H)``
    rows; backward scales them by the incoming gradient. Otherwise forward keeps each token's logsumexp ``(n,)``
    and backward projects again, a block of vocabulary rows at a time (:func:`_vocab_blocked_grads`), sending
    ``g_t (onehot(y_t) - softmax(z_t))`` back through the projection to the hidden states and head tensors.
    The inputs after ``store`` are ``hidden``, ``dropped`` (the LoRA branch's input, None: ``hidden``) and
    the head's tensors; ``head`` itself carries no dropout here (the caller applied it).
    """

    @staticmethod
    def forward(
        ctx: Any,
        head: OutputHead,
        targets: torch.Tensor,
        chunk_size: int,
        store: bool,
        hidden: torch.Tensor,
        dropped: torch.Tensor | None,
        *tensors: torch.Tensor | None,
    ) -> torch.Tensor:
        wide = torch.promote_types(hidden.dtype, torch.float32)  # the logits' dtype (fp32 for bf16 models)
        logps = torch.empty(hidden.size(0), dtype=wide, device=hidden.device)
        norms = torch.empty_like(logps)
        inputs, wanted = [hidden, dropped], list(ctx.needs_input_grad[4:6])  # False for a None input
        kept = [torch.zeros_like(t) if t is not None and want else None for t, want in zip(inputs, wanted, strict=True)]
        for part in _chunks(hidden.size(0), chunk_size):
            with torch.set_grad_enabled(store):  # no head tensor requires a gradient when ``store``
                rows = _rows(inputs, part, wanted if store else [False, False])
                logits = project(head, rows[0], list(tensors), rows[1])
            logps[part], norms[part] = _gather_logps(logits.detach(), targets[part])
            if store:
                sources = [row for row, want in zip(rows, wanted, strict=True) if want]
                grads = iter(
                    torch.autograd.grad(logits, sources, _logit_grad(logits.detach(), norms[part], targets[part]))
                )
                for grad, want in zip(kept, wanted, strict=True):
                    if want:
                        grad[part] = next(grads)  # type: ignore[index]
        ctx.store, ctx.head, ctx.chunk_size, ctx.head_tensors = store, head, chunk_size, len(tensors)
        if store:
            ctx.save_for_backward(*kept)
        else:
            ctx.save_for_backward(hidden, dropped, targets, norms, *tensors)
        return logps

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        if ctx.store:  # each row's gradient was taken in forward
            scaled = [(grad[:, None] * g).to(g.dtype) if g is not None else None for g in ctx.saved_tensors]
            return (None, None, None, None, *scaled, *[None] * ctx.head_tensors)
        hidden, dropped, targets, norms, *tensors = ctx.saved_tensors
        inputs = [hidden, dropped, *tensors]
        grads = _vocab_blocked_grads(ctx.head, ctx.chunk_size, ctx.needs_input_grad[4:], grad, targets, norms, inputs)
        return (None, None, None, None, *grads)


_VOCAB_ROWS = (2, 3, 5)
"""Inputs (hidden, dropped, weight, bias, lora_a, lora_b) with a row per vocabulary entry."""


def _vocab_blocked_grads(
    head: OutputHead,
    chunk_size: int,
    needs: tuple[bool, ...],
    grad: torch.Tensor,
    targets: torch.Tensor,
    norms: torch.Tensor,
    inputs: list[torch.Tensor | None],
) -> list[torch.Tensor | None]:
    """Gradients of ``sum_t grad_t logp_t`` for ``inputs`` (hidden, dropped, weight, bias, lora_a, lora_b).

    The projection is done again one block of vocabulary rows at a time, for all tokens (``chunk_size * V / n``
    rows: as many logits as a forward chunk). Each block's rows of weight, bias and ``lora_b`` get their gradient
    whole, once; only the ``(n, H)`` hidden-state (and the small ``lora_a``) gradients are summed over blocks.
    Blocks of tokens would instead sum a ``(V, H)`` weight gradient per chunk: ``V / n`` times that traffic.
    """
    hidden, weight = inputs[0], inputs[2]
    assert hidden is not None
    assert weight is not None
    vocab = weight.size(0)
    block = max(1, chunk_size * vocab // max(hidden.size(0), 1))
    leaves = [
        t.detach().requires_grad_(need) if t is not None and i not in _VOCAB_ROWS else None
        for i, (t, need) in enumerate(zip(inputs, needs, strict=True))
    ]
    out = [
        torch.zeros_like(t, dtype=t.dtype if i in _VOCAB_ROWS else torch.promote_types(t.dtype, torch.float32))
        if t is not None and need
        else None
        for i, (t, need) in enumerate(zip(inputs, needs, strict=True))
    ]
    for start in range(0, vocab, block):
        part = slice(start, min(start + block, vocab))
        with torch.enable_grad():
            rows: list[Any] = [
                t[part].detach().requires_grad_(need) if t is not None and i in _VOCAB_ROWS else leaves[i]
                for i, (t, need) in enumerate(zip(inputs, needs, strict=True))
            ]
            logits = project(head, rows[0], rows[2:], rows[1])
        upstream = (logits.detach() - norms[:, None]).exp_().mul_(-grad[:, None])  # -g_t softmax(z_t)
        inside = ((targets >= part.start) & (targets < part.stop)).nonzero().flatten()
        upstream[inside, targets[inside] - part.start] += grad[inside]  # + g_t onehot(y_t)
        wanted = [i for i, need in enumerate(needs) if need]
        found = torch.autograd.grad(logits, [rows[i] for i in wanted], upstream, allow_unused=True)
        for i, value in zip(wanted, found, strict=True):
            total = out[i]
            if value is None or total is None:
                continue
            if i in _VOCAB_ROWS:
                total[part] = value
            else:
                total.add_(value)
    return [g.to(t.dtype) if g is not None and t is not None else None for g, t in zip(out, inputs, strict=True)]


def _rows(inputs: list[torch.Tensor | None], part: slice, grad: list[bool]) -> list[Any]:
    """The chunk's rows of each input, as leaves that require a gradient where ``grad`` says."""
    return [t[part].detach().requires_grad_(g) if t is not None else None for t, g in zip(inputs, grad, strict=True)]


def _chunks(rows: int, chunk_size: int) -> list[slice]:
    return [slice(start, min(start + chunk_size, rows)) for start in range(0, rows, chunk_size)]


def _gather_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-prob of each row's target, each row's logsumexp)``, both ``(rows,)``."""
    norms = logits.logsumexp(-1)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - norms, norms


def _logit_grad(logits: torch.Tensor, norms: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``d logp_t / d z_t = onehot(y_t) - softmax(z_t)``, ``(rows, V)``."""
    grad = (logits - norms[:, None]).exp_().neg_()
    grad[torch.arange(grad.size(0), device=grad.device), targets] += 1.0
    return grad


def chunked_token_logps(
    hidden: torch.Tensor, head: OutputHead, targets: torch.Tensor, *, chunk_size: int = 0
) -> torch.Tensor:
    """``log p(targets[t] | hidden[t])`` through ``head``, ``(n,)`` (fp32 at least), a chunk of logits at a time.

    Differentiable with respect to ``hidden`` ``(n, H)`` and the head's tensors that require a gradient; equal to
    :func:`eager_token_logps` (to float rounding) in value and gradient. With a frozen head (no head tensor
    requires a gradient: LoRA elsewhere, a reference) each token's gradient with respect to its hidden state is
    taken in forward and kept, ``(n, H)``, so backward only scales it; with a trainable head backward projects
    again from the kept per-token logsumexp, a block of vocabulary rows at a time. Without gradient it is a plain
    loop over chunks. ``chunk_size`` (tokens per chunk; a backward block holds as many logits) 0 takes as many
    tokens as keep :data:`CHUNK_LOGITS` logits. A LoRA dropout on the head is drawn here, once, for all chunks.
    """
    if chunk_size == 0:
        chunk_size = max(1, CHUNK_LOGITS // head.weight.size(0))
    tensors = head.tensors()
    trains = [t is not None and t.requires_grad for t in tensors]
    if not torch.is_grad_enabled() or not (hidden.requires_grad or any(trains)):
        parts = [
            _gather_logps(project(head, hidden[part]), targets[part])[0] for part in _chunks(len(hidden), chunk_size)
        ]
        return (
            torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
        )
    dropped = None
    if head.lora_a is not None and head.lora_b is not None and head.lora_dropout is not None:
        applied = head.lora_dropout(hidden)  # here, once, so that backward's second projection sees the same mask
        dropped = None if applied is hidden else applied
    bare = replace(head, lora_dropout=None)
    logps: torch.Tensor = _ChunkedTokenLogps.apply(  # type: ignore[no-untyped-call]
        bare, targets, chunk_size, not any(trains), hidden, dropped, *tensors
    )
    return logps


def eager_token_logps(hidden: torch.Tensor, head: OutputHead, targets: torch.Tensor) -> torch.Tensor:
    """The reference: log-softmax of the full ``(n, V)`` logits, gathered (what :func:`chunked_token_logps` avoids)."""
    return torch.log_softmax(project(head, hidden), -1).gather(-1, targets[:, None]).squeeze(-1)


def eager_head_loss(hidden: torch.Tensor, head: OutputHead, objective: Objective) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the objective on the full ``(tokens, V)`` logits (what :func:`chunked_head_loss` avoids)."""
    return objective(project(head, hidden), slice(0, hidden.size(0)))


def module_logits(
    hidden: torch.Tensor, module: torch.nn.Module, head: OutputHead, vocab: int | None = None
) -> torch.Tensor:
    """fp32 logits from the head *module* (its hooks gather ZeRO-3 / FSDP shards), first ``vocab`` rows; eager."""
    logits: torch.Tensor = module(hidden)[..., :vocab]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if head.logit_scale != 1.0:
        logits = logits * head.logit_scale
    if head.softcap is not None:
        logits = head.softcap * torch.tanh(logits / head.softcap)
    return logits


def module_head_loss(
    hidden: torch.Tensor, module: torch.nn.Module, head: OutputHead, objective: Objective, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective on logits from the head *module* (its hooks gather ZeRO-3 / FSDP shards); eager."""
    return objective(module_logits(hidden, module, head, vocab), slice(0, hidden.size(0)))


def head_is_sharded(model: Any) -> bool:
    """Whether ZeRO-3 or FSDP shards ``model`` (any wrapper): its head's weight is then a shard outside forward.

    Read from the model itself: a DeepSpeed ZeRO-3 parameter carries ``ds_id``; FSDP2 makes the model an
    ``FSDPModule`` (and its parameters DTensors); FSDP1 wraps it in ``FullyShardedDataParallel``.
    """
    _module, head = output_head(model)
    if hasattr(head.weight, "ds_id"):
        return True
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if isinstance(head.weight, DTensor):
        return True
    wrappers = (model, getattr(model, "module", model), unwrap_causal_lm(model))
    return any(isinstance(m, FSDPModule | FullyShardedDataParallel) for m in wrappers)


def head_token_logps(model: Any, hidden: torch.Tensor, targets: torch.Tensor, *, chunk_size: int = 0) -> torch.Tensor:
    """fp32 log-probs of ``targets`` ``(n,)`` from ``model``'s final hidden states ``(n, H)`` of those tokens.

    :func:`chunked_token_logps` through the model's :func:`output_head`; under ZeRO-3 / FSDP (:func:`head_is_sharded`)
    the eager projection through the head module instead (the ``n`` counted tokens only).
    """
    module, head = output_head(model)
    if head_is_sharded(model):
        logits = module_logits(hidden, module, head)
        return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    return chunked_token_logps(hidden, head, targets, chunk_size=chunk_size)


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
