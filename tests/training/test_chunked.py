"""The chunked output-head loss equals the eager one in value and gradient, and reads a real model's head right."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from alignment.training.chunked import (
    OutputHead,
    chunked_head_loss,
    chunked_token_logps,
    eager_head_loss,
    eager_token_logps,
    final_hidden_states,
    head_is_sharded,
    head_token_logps,
    output_head,
    project,
)

TOKENS, WIDTH, VOCAB, RANK = 13, 8, 40, 3


def _objective(labels: torch.Tensor, teacher: torch.Tensor) -> Any:
    """A loss touching every logit non-linearly: CE to labels plus KL to a fixed teacher; metric sums too."""

    def objective(logits: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(logits, -1)
        target = torch.log_softmax(teacher[rows], -1)
        ce = -logp.gather(-1, labels[rows, None]).squeeze(-1)
        kl = (target.exp() * (target - logp)).sum(-1)
        sums = torch.stack([ce.sum().detach(), (logits.argmax(-1) == labels[rows]).sum().float()])
        return (ce + 0.5 * kl).sum(), sums

    return objective


def _leaves(lora: bool, bias: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {
        "hidden": torch.randn(TOKENS, WIDTH, generator=g, dtype=torch.float64),
        "weight": torch.randn(VOCAB, WIDTH, generator=g, dtype=torch.float64),
    }
    if bias:
        out["bias"] = torch.randn(VOCAB, generator=g, dtype=torch.float64)
    if lora:
        out["lora_a"] = torch.randn(RANK, WIDTH, generator=g, dtype=torch.float64)
        out["lora_b"] = torch.randn(VOCAB, RANK, generator=g, dtype=torch.float64)
    return {k: v.requires_grad_(True) for k, v in out.items()}


def _run(kind: str, leaves: dict[str, torch.Tensor], chunk: int, **settings: Any) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    teacher = torch.randn(TOKENS, VOCAB, generator=g, dtype=torch.float64)
    head = OutputHead(
        leaves["weight"],
        leaves.get("bias"),
        leaves.get("lora_a"),
        leaves.get("lora_b"),
        lora_scaling=0.7,
        **settings,
    )
    objective = _objective(labels, teacher)
    if kind == "eager":
        loss, sums = eager_head_loss(leaves["hidden"], head, objective)
    else:
        loss, sums = chunked_head_loss(leaves["hidden"], head, objective, chunk_size=chunk)
    grads = torch.autograd.grad(3.0 * loss, list(leaves.values()))
    return loss.detach(), sums, grads


@pytest.mark.parametrize("chunk", [1, 4, TOKENS, 64])
@pytest.mark.parametrize(("lora", "bias"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("settings", [{}, {"logit_scale": 0.25, "softcap": 3.0}])
def test_chunked_equals_eager_in_value_and_gradient(chunk: int, lora: bool, bias: bool, settings: dict) -> None:
    eager = _run("eager", _leaves(lora, bias), chunk, **settings)
    chunked = _run("chunked", _leaves(lora, bias), chunk, **settings)
    torch.testing.assert_close(chunked[0].double(), eager[0].double(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(chunked[1], eager[1])
    for a, b in zip(chunked[2], eager[2], strict=True):
        assert b.abs().sum() > 0  # every tensor gets a gradient, including the LoRA pair on the head
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_frozen_tensors_get_no_gradient_and_no_grad_mode_skips_the_backward_pass() -> None:
    leaves = _leaves(lora=False, bias=False)
    leaves["weight"].requires_grad_(False)
    labels = torch.zeros(TOKENS, dtype=torch.long)
    objective = _objective(labels, torch.zeros(TOKENS, VOCAB, dtype=torch.float64))
    head = OutputHead(leaves["weight"])
    loss, _ = chunked_head_loss(leaves["hidden"], head, objective, chunk_size=4)
    (grad_hidden,) = torch.autograd.grad(loss, [leaves["hidden"]])
    assert leaves["weight"].grad is None
    assert grad_hidden.abs().sum() > 0
    with torch.no_grad():
        plain, _ = chunked_head_loss(leaves["hidden"], head, objective, chunk_size=4)
    assert not plain.requires_grad
    torch.testing.assert_close(plain, loss.detach())


def test_the_first_vocab_rows_of_a_padded_head() -> None:
    leaves = _leaves(lora=True, bias=True)
    head = OutputHead(leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"], 0.5)
    cut = head.truncated(VOCAB - 7)
    logits = project(cut, leaves["hidden"])
    torch.testing.assert_close(logits, project(head, leaves["hidden"])[:, : VOCAB - 7])


@pytest.fixture
def tiny(tiny_random_path: str) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_random_path, dtype=torch.float32)


def test_final_hidden_states_and_output_head_reproduce_the_models_logits(tiny: Any) -> None:
    ids = torch.randint(0, 1000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    expected = tiny(input_ids=ids, attention_mask=mask).logits
    _, head = output_head(tiny)
    hidden = final_hidden_states(tiny, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(project(head, hidden.flatten(0, 1)).view_as(expected), expected, rtol=1e-5, atol=1e-5)


def test_a_sharded_head_is_projected_through_its_module(tiny: Any) -> None:
    """ZeRO-3 (a parameter with ``ds_id``): the head module's own forward gathers the shard, counted tokens only."""
    hidden = torch.randn(6, tiny.config.hidden_size)
    targets = torch.randint(0, tiny.config.vocab_size, (6,))
    rows: list[int] = []
    tiny.lm_head.register_forward_hook(lambda _module, args, _out: rows.append(args[0].shape[0]))
    assert not head_is_sharded(tiny)
    chunked = head_token_logps(tiny, hidden, targets, chunk_size=4)
    assert rows == []  # the chunked path reads the weight, it never calls the module
    tiny.lm_head.weight.ds_id = 7  # what DeepSpeed sets on a ZeRO-3 partitioned parameter
    assert head_is_sharded(tiny)
    through_module = head_token_logps(tiny, hidden, targets, chunk_size=4)
    assert rows == [6]
    torch.testing.assert_close(through_module, chunked, rtol=1e-5, atol=1e-5)


def test_lora_on_the_output_head_trains_through_the_chunks(tiny: Any) -> None:
    """PEFT LoRA on ``lm_head`` (the original toolkit's targets): chunked gradients equal the model's own forward's."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["lm_head", "q_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; a non-zero B makes the head's adapter term count
            torch.nn.init.normal_(param, std=0.1)
    ids = torch.randint(0, 1000, (2, 7))
    labels = torch.randint(0, 1000, (14,))
    teacher = torch.randn(14, tiny.config.vocab_size)
    objective = _objective(labels, teacher)

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad]

    logits = model(input_ids=ids).logits.flatten(0, 1).float()
    reference = grads(objective(logits, slice(0, 14))[0])
    _module, head = output_head(model)
    assert head.lora_a is not None
    assert head.lora_b is not None
    assert head.lora_a.requires_grad
    hidden = final_hidden_states(model, input_ids=ids).flatten(0, 1)
    chunked = grads(chunked_head_loss(hidden, head, objective, chunk_size=5)[0])
    assert len(chunked) == len(reference) > 4
    for a, b in zip(chunked, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --- per-token log-probs ----------------------------------------------------------------------------------------

HEADS = {
    "plain": {},
    "bias_lora_dropout": {"bias": True, "lora": True, "dropout": 0.3},
    "lora_scale_softcap": {"lora": True, "logit_scale": 0.25, "softcap": 3.0},
}


def _token_case(kind: str, frozen: bool, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], Any]:
    """Leaves (hidden, then the head's tensors) and the head; the head's tensors train unless ``frozen``."""
    spec = HEADS[kind]
    made = _leaves(bool(spec.get("lora")), bool(spec.get("bias")))
    leaves = {k: (0.5 * v.detach()).to(dtype) for k, v in made.items()}  # logits of a few units, as in a model
    for name, leaf in leaves.items():
        leaf.requires_grad_(name == "hidden" or not frozen)
    dropout = torch.nn.Dropout(spec["dropout"]) if "dropout" in spec else None
    settings = {k: v for k, v in spec.items() if k in ("logit_scale", "softcap")}
    head = OutputHead(
        leaves["weight"], leaves.get("bias"), leaves.get("lora_a"), leaves.get("lora_b"), 0.7, dropout, **settings
    )
    return leaves, head


def _token_run(kind: str, frozen: bool, chunk: int | None, dtype: torch.dtype = torch.float32) -> tuple[Any, ...]:
    """Log-probs and the gradients of a weighted sum of them (the same dropout mask in both paths: seeded)."""
    leaves, head = _token_case(kind, frozen, dtype)
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(2))
    weights = torch.linspace(-1.0, 2.0, TOKENS)  # a different upstream gradient per token
    torch.manual_seed(3)
    if chunk is None:
        logps = eager_token_logps(leaves["hidden"], head, targets)
    else:
        logps = chunked_token_logps(leaves["hidden"], head, targets, chunk_size=chunk)
    trained = [v for v in leaves.values() if v.requires_grad]
    return logps.detach(), torch.autograd.grad((logps * weights).sum(), trained)


@pytest.mark.parametrize("chunk", [1, 4, TOKENS, 64])  # 4 does not divide the 13 tokens
@pytest.mark.parametrize("kind", list(HEADS))
@pytest.mark.parametrize("frozen", [False, True])
def test_chunked_token_logps_equal_eager_in_value_and_gradient(chunk: int, kind: str, frozen: bool) -> None:
    """fp32, 1e-5: trainable heads (backward in vocabulary blocks) and frozen ones (gradients kept from forward)."""
    eager = _token_run(kind, frozen, None)
    chunked = _token_run(kind, frozen, chunk)
    assert chunked[0].dtype == torch.float32
    torch.testing.assert_close(chunked[0], eager[0], rtol=1e-5, atol=1e-5)
    spec = HEADS[kind]
    assert (
        len(chunked[1]) == len(eager[1]) == (1 if frozen else 2 + bool(spec.get("bias")) + 2 * bool(spec.get("lora")))
    )
    for a, b in zip(chunked[1], eager[1], strict=True):
        assert b.abs().sum() > 0  # every trained tensor gets a gradient, the LoRA pair on the head included
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_lora_dropout_masks_forward_and_backward_alike() -> None:
    """The mask drawn once for forward is the one backward's second projection uses (not a new draw)."""
    leaves, head = _token_case("bias_lora_dropout", frozen=False)
    targets = torch.zeros(TOKENS, dtype=torch.long)
    torch.manual_seed(3)
    chunked = chunked_token_logps(leaves["hidden"], head, targets, chunk_size=4)
    (grad,) = torch.autograd.grad(chunked.sum(), [leaves["lora_a"]])
    torch.manual_seed(3)
    eager = eager_token_logps(leaves["hidden"], head, targets)
    (expected,) = torch.autograd.grad(eager.sum(), [leaves["lora_a"]])
    torch.manual_seed(4)  # another mask gives other values: the comparison above can tell masks apart
    assert not torch.allclose(eager_token_logps(leaves["hidden"], head, targets), eager.detach(), atol=1e-3)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)


def test_token_logps_without_gradient_and_without_tokens() -> None:
    leaves, head = _token_case("lora_scale_softcap", frozen=False)
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = chunked_token_logps(leaves["hidden"], head, targets, chunk_size=5)
        eager = eager_token_logps(leaves["hidden"], head, targets)
    assert plain.grad_fn is None
    torch.testing.assert_close(plain, eager, rtol=1e-5, atol=1e-5)
    # Nothing requires a gradient (a frozen reference's hidden states): the plain loop too.
    frozen = OutputHead(leaves["weight"].detach())
    assert chunked_token_logps(leaves["hidden"].detach(), frozen, targets, chunk_size=5).grad_fn is None
    # A micro-batch without counted tokens: an empty result that still back-propagates (zero gradient).
    empty = chunked_token_logps(leaves["hidden"][:0], head, targets[:0], chunk_size=5)
    assert empty.shape == (0,)
    (grad,) = torch.autograd.grad(empty.sum(), [leaves["weight"]])
    assert not grad.any()


def test_bf16_heads_give_fp32_log_probs_and_bf16_gradients() -> None:
    for frozen in (False, True):
        eager = _token_run("lora_scale_softcap", frozen, None, torch.bfloat16)
        chunked = _token_run("lora_scale_softcap", frozen, 4, torch.bfloat16)
        assert chunked[0].dtype == torch.float32
        torch.testing.assert_close(chunked[0], eager[0], rtol=1e-2, atol=1e-2)
        for a, b in zip(chunked[1], eager[1], strict=True):
            assert a.dtype == torch.bfloat16
            torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
