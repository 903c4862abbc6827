"""SFT's chunked loss against TRL's ``SFTTrainer`` on the same batches of the tiny random Llama (fp32, CPU).

Both trainers get the same rows, the same collator settings and a fresh copy of the same weights; one micro-batch
goes through ``compute_loss`` with the ``num_items_in_batch`` the HF Trainer would pass, then backward. The loss,
every gradient and TRL's logged token metrics must agree. The rows are the four SFT test conversations (which the
random model gets all wrong) plus one whose answer is the model's own greedy continuation (which it gets right), so
``mean_token_accuracy`` lies strictly between 0 and 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset

from alignment.data.chat_template import tokenize_conversation
from alignment.methods import sft_trainer
from alignment.methods.sft_trainer import ChunkedSFTTrainer, nll_objective
from tests.methods.helpers import tiny_model
from tests.methods.test_sft import ROWS

LAYOUTS = {
    "padded": {},
    "padding_free": {"padding_free": True, "max_length": None},
    "packing": {"packing": True, "max_length": 256},
}
GREEDY_TOKENS = 12


def sft_rows(path: str, tokenizer: Any) -> Dataset:
    """The SFT test conversations (39 labels), and a prompt followed by the tiny model's own greedy answer (12)."""
    encoded = [tokenize_conversation(tokenizer, m, ["assistant"], 512) for m in ROWS]
    items = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
    model = tiny_model(path)
    ids = list(encoded[1].input_ids[:10])
    prompt = len(ids)
    with torch.no_grad():
        for _ in range(GREEDY_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    items.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return Dataset.from_list(items)


@pytest.fixture(scope="module")
def rows(tiny_random_path: str, smollm2_tokenizer: Any) -> Dataset:
    """:func:`sft_rows`, built once."""
    return sft_rows(tiny_random_path, smollm2_tokenizer)


@dataclass
class Step:
    """One micro-batch through a trainer: its loss, the gradients and the metrics TRL would log."""

    loss: float
    grads: dict[str, torch.Tensor]
    metrics: dict[str, list[float]]
    counted: int


def _step(trainer_class: Any, path: str, rows: Dataset, tokenizer: Any, out: Path, flags: dict[str, Any]) -> Step:
    from trl import SFTConfig

    model = tiny_model(path).train()
    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=len(rows),
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        **flags,
    )
    trainer = trainer_class(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    counted = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    loss = trainer.compute_loss(model, trainer._prepare_inputs(batch), num_items_in_batch=counted)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return Step(loss.item(), grads, dict(trainer._metrics["train"]), int(counted))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_gradients_and_token_metrics_equal_trl(
    layout: str,
    rows: Dataset,
    tiny_random_path: str,
    smollm2_tokenizer: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fp32: the chunked loss and every gradient equal TRL's to 1e-5, the token metrics to float rounding.

    Padding-free and packed rows go through sdpa one conversation at a time (TRL's through one block mask).

    Only the counted positions (51 labels: 39 of the conversations, 12 greedy) reach the output head.
    """
    from trl import SFTTrainer

    projected: list[int] = []
    real = sft_trainer.chunked_head_loss

    def spy(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        projected.append(hidden.size(0))
        return real(hidden, *args, **kwargs)

    layouts: list[Any] = []
    real_segments = sft_trainer.segment_kwargs

    def segments_spy(layout: Any, device: torch.device) -> Any:
        layouts.append(layout)
        return real_segments(layout, device)

    monkeypatch.setattr(sft_trainer, "chunked_head_loss", spy)
    monkeypatch.setattr(sft_trainer, "segment_kwargs", segments_spy)
    flags = LAYOUTS[layout]
    theirs = _step(SFTTrainer, tiny_random_path, rows, smollm2_tokenizer, tmp_path / "trl", flags)
    ours = _step(ChunkedSFTTrainer, tiny_random_path, rows, smollm2_tokenizer, tmp_path / "ours", flags)
    assert theirs.counted == ours.counted == 39 + GREEDY_TOKENS
    assert projected == [ours.counted]
    if layout == "padded":
        assert layouts == []
    else:  # sdpa: each of the 5 conversations attended on its own slice, in every layer (TRL: a T x T block mask)
        assert [len(x.spans) for x in layouts] == [len(rows)]
        assert layouts[0].calls == tiny_model(tiny_random_path).config.num_hidden_layers
    assert ours.loss == pytest.approx(theirs.loss, abs=1e-5)
    assert ours.grads.keys() == theirs.grads.keys()
    assert len(ours.grads) == len(list(tiny_model(tiny_random_path).parameters()))
    worst = max(ours.grads, key=lambda n: (ours.grads[n] - theirs.grads[n]).abs().max().item())
    assert torch.allclose(ours.grads[worst], theirs.grads[worst], rtol=0, atol=1e-5), worst
    assert ours.metrics.keys() == theirs.metrics.keys() == {"entropy", "mean_token_accuracy", "num_tokens"}
    # the greedy answer's 12 tokens are right, the random model's guesses at the 39 others wrong
    assert theirs.metrics["mean_token_accuracy"] == [pytest.approx(GREEDY_TOKENS / ours.counted)]
    assert ours.metrics["mean_token_accuracy"] == [pytest.approx(GREEDY_TOKENS / ours.counted, rel=1e-6)]
    assert ours.metrics["entropy"] == [pytest.approx(theirs.metrics["entropy"][0], rel=1e-6)]
    assert ours.metrics["num_tokens"] == theirs.metrics["num_tokens"]


def test_objective_by_hand() -> None:
    """Two tokens over a 3-word vocabulary, worked out by hand.

    Row 0: logits (0, 0, ln 2) -> p = (1/4, 1/4, 1/2); label 2: NLL ln 2, entropy 1.5 ln 2, correct.
    Row 1: logits (0, 0, 0) -> p = 1/3 each; label 1: NLL ln 3, entropy ln 3, wrong (the first maximum is word 0).
    """
    import math

    logits = torch.tensor([[0.0, 0.0, math.log(2)], [0.0, 0.0, 0.0]])
    loss, sums = nll_objective(torch.tensor([2, 1]))(logits, slice(0, 2))
    assert loss.item() == pytest.approx(math.log(2) + math.log(3))
    entropy, correct = sums.tolist()
    assert entropy == pytest.approx(1.5 * math.log(2) + math.log(3))
    assert correct == 1.0
