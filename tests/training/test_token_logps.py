"""The packed forwards' per-token log-probs (chunked output head, counted positions only) equal the full-logits ones.

Each test writes out the computation the pairwise methods and GPO used before the chunked head (the model's
logits at every position of the packed row, fp32 log-softmax, gather) and compares values and the gradients of
every trained parameter, to 1e-5 in fp32, on the tiny random Llama (tied input/output embeddings).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from alignment.data.chat_template import IGNORE_INDEX
from alignment.methods.pairwise.core import PairCollator, sequence_logps
from alignment.training.packed import attention_kwargs, counted_token_logps, mask_kwargs, sum_per_sequence
from tests.methods.helpers import tiny_model

PROMPT, CHOSEN, REJECTED = [5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18]


def _model(path: str, head: str, attn: str = "sdpa") -> Any:
    """``full``: everything trains; ``frozen``: the tied head/embedding matrix does not; ``lora``: PEFT on the head."""
    model = tiny_model(path, attn).train()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    if head == "frozen":
        model.get_output_embeddings().weight.requires_grad_(False)
    if head == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["lm_head", "q_proj"])
        model = get_peft_model(model, config)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; non-zero, the head's adapter term counts
                torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(0))
    return model


def _grads(model: Any, value: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(value, params))


def _assert_same(new: list[torch.Tensor], old: list[torch.Tensor]) -> None:
    assert len(new) == len(old) > 0
    for a, b in zip(new, old, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert any(bool(b.abs().sum() > 0) for b in old)


def _full_logps(model: Any, batch: dict[str, torch.Tensor], attention: dict[str, Any]) -> torch.Tensor:
    """Before: the log-prob of every shifted position's label from the full ``(tokens, V)`` logits (0 if ignored)."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **attention).logits[0, :-1]
    targets = batch["labels"][0, 1:]
    logps = logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    return logps * (targets != IGNORE_INDEX)


def _pairs() -> dict[str, torch.Tensor]:
    """Two pairs packed as ``PairCollator`` does: chosen sides first, prompts ignored."""
    rows = []
    for shift in (0, 100):
        prompt = [t + shift for t in PROMPT[: 3 + shift // 50]]
        chosen, rejected = [t + shift for t in CHOSEN], [t + shift for t in REJECTED]
        rows.append(
            {
                "chosen_input_ids": prompt + chosen,
                "chosen_labels": [IGNORE_INDEX] * len(prompt) + chosen,
                "rejected_input_ids": prompt + rejected,
                "rejected_labels": [IGNORE_INDEX] * len(prompt) + rejected,
            }
        )
    return PairCollator()(rows)


@pytest.mark.parametrize("head", ["full", "frozen", "lora"])
def test_counted_token_logps_equal_the_full_logits(tiny_random_path: str, head: str) -> None:
    model = _model(tiny_random_path, head)
    batch = _pairs()
    attention = attention_kwargs(model, batch["position_ids"], batch["sequence_ids"])
    weights = torch.linspace(-1.0, 1.0, batch["labels"].size(1) - 1)  # a different gradient per position
    logps, predicting = counted_token_logps(model, batch, attention)
    new = _grads(model, (logps * weights[predicting]).sum())
    full = _full_logps(model, batch, attention)
    old = _grads(model, (full * weights).sum())
    assert predicting.tolist() == (batch["labels"][0, 1:] != IGNORE_INDEX).nonzero().flatten().tolist()
    torch.testing.assert_close(logps, full[predicting].detach(), rtol=1e-5, atol=1e-5)
    _assert_same(new, old)


@pytest.mark.parametrize("head", ["full", "frozen"])
def test_pairwise_sequence_logps_equal_the_full_logits(tiny_random_path: str, head: str) -> None:
    model = _model(tiny_random_path, head)
    batch = _pairs()

    def shaper(logps: torch.Tensor, targets: Any, ids: Any, mask: Any, pairs: int) -> torch.Tensor:
        return torch.where(ids >= pairs, 3.0 * logps, logps.clamp(max=-9.0))  # like SMPO: per side, per token

    new = sequence_logps(model, batch, shaper)
    assert new.shaped is not None
    loss = new.chosen.sum() - 2 * new.rejected.sum() + new.shaped.chosen.sum() - new.shaped.rejected.sum()
    new_grads = _grads(model, loss)
    # Before: the same sums over the full logits of the row.
    full = _full_logps(model, batch, attention_kwargs(model, batch["position_ids"], batch["sequence_ids"]))
    owner = batch["sequence_ids"][0, 1:]
    mask = batch["labels"][0, 1:] != IGNORE_INDEX
    sums = sum_per_sequence(full, owner, 4)
    shaped = sum_per_sequence(torch.where(mask, shaper(full, None, owner, mask, 2), 0.0), owner, 4)
    old_grads = _grads(model, sums[:2].sum() - 2 * sums[2:].sum() + shaped[:2].sum() - shaped[2:].sum())
    torch.testing.assert_close(torch.cat([new.chosen, new.rejected]), sums.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        torch.cat([new.shaped.chosen, new.shaped.rejected]), shaped.detach(), rtol=1e-5, atol=1e-5
    )
    assert torch.cat([new.chosen_tokens, new.rejected_tokens]).tolist() == [3.0, 3.0, 6.0, 6.0]
    _assert_same(new_grads, old_grads)
    with torch.no_grad():  # the reference's path: no graph, same values
        reference = sequence_logps(model, batch)
    assert reference.chosen.grad_fn is None
    torch.testing.assert_close(reference.chosen, new.chosen.detach())


def test_gpo_token_logps_equal_the_full_logits(tiny_random_path: str) -> None:
    """Groups sharing their prompt in the row (a block mask: eager attention gets it as a dense additive mask)."""
    from alignment.methods.gpo.gpo import GroupCollator, token_logps

    model = _model(tiny_random_path, "full", attn="eager")
    rows = [
        {
            "prompt_ids": PROMPT,
            "completion_ids": [CHOSEN, REJECTED],
            "completion_labels": [CHOSEN, REJECTED],
            "rewards": [1.0, 0.0],
            "advantages": [0.7, -0.7],
        },
        {
            "prompt_ids": PROMPT[:2],
            "completion_ids": [REJECTED[:4], CHOSEN, CHOSEN[:1]],
            "completion_labels": [REJECTED[:4], CHOSEN, CHOSEN[:1]],
            "rewards": [0.0, 1.0, 0.5],
            "advantages": [-1.0, 1.0, 0.0],
        },
    ]
    batch = GroupCollator(share_prompt=True)(rows)
    logps, owners = token_logps(model, batch)
    weights = torch.linspace(-1.0, 1.0, logps.numel())
    new = _grads(model, (logps * weights).sum())
    # Before: the full logits under a block mask written out (same group; the shared prompt, or the same completion).
    segments, groups = batch["segment_ids"][0], batch["group_ids"][0]
    visible = (segments[None, :] < 0) | (segments[:, None] == segments[None, :])
    allowed = ((groups[:, None] == groups[None, :]) & visible).tril()[None, None]
    full = _full_logps(model, batch, mask_kwargs(model, allowed))
    counted = batch["labels"][0, 1:] != IGNORE_INDEX
    old = _grads(model, (full[counted] * weights).sum())
    assert owners.tolist() == [0] * 3 + [1] * 6 + [2] * 4 + [3] * 3 + [4] * 1
    torch.testing.assert_close(logps, full[counted].detach(), rtol=1e-5, atol=1e-5)
    _assert_same(new, old)
