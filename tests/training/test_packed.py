"""The padding-free packed forward: attention kept inside each packed sequence, counted log-probs, per-sequence sums.

The attention tests use a stand-in model (only ``config._attn_implementation`` and ``dtype`` are read) on the row
``sequence_ids = [[0, 0, 1, 1, 1]]``, ``position_ids = [[0, 1, 0, 1, 2]]``: token ``q`` may attend to ``k`` when
both belong to the same sequence and ``k <= q``, a block-diagonal causal pattern with blocks of 2 and 3.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from alignment.data.chat_template import IGNORE_INDEX
from alignment.training.packed import (
    attention_implementation,
    attention_kwargs,
    counted_token_logps,
    mask_kwargs,
    sum_per_sequence,
)
from alignment.training.segments import KEY
from tests.methods.helpers import tiny_model

SEQUENCE_IDS = torch.tensor([[0, 0, 1, 1, 1]])
POSITION_IDS = torch.tensor([[0, 1, 0, 1, 2]])
ALLOWED = torch.tensor(
    [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ],
    dtype=torch.bool,
)[None, None]


def fake_model(attn: str | None, dtype: torch.dtype = torch.float32) -> Any:
    """What the packed forward reads of a model: its attention implementation and dtype."""
    config = SimpleNamespace() if attn is None else SimpleNamespace(_attn_implementation=attn)
    return SimpleNamespace(config=config, dtype=dtype)


def wrapped(model: Any) -> Any:
    """Like DDP or a DeepSpeed engine: the model is ``.module``, with no ``config`` or ``dtype`` of its own."""
    return SimpleNamespace(module=model)


def test_attention_implementation_is_read_through_a_wrapper() -> None:
    assert attention_implementation(fake_model("eager")) == "eager"
    assert attention_implementation(wrapped(fake_model("flash_attention_2"))) == "flash_attention_2"
    assert attention_implementation(fake_model(None)) is None


@pytest.mark.parametrize("through_wrapper", [False, True])
def test_sdpa_attends_sequence_by_sequence(through_wrapper: bool) -> None:
    """Sdpa gets the row's sequences as causal segments (no T x T mask) and a 4-D placeholder mask."""
    model = fake_model("sdpa")
    kwargs = attention_kwargs(wrapped(model) if through_wrapper else model, POSITION_IDS, SEQUENCE_IDS)
    assert set(kwargs) == {"attention_mask", KEY}
    assert kwargs["attention_mask"].shape == (1, 1, 1, 1)
    assert kwargs[KEY].spans == [(0, 2), (2, 5)]
    assert kwargs[KEY].masks == [None, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("through_wrapper", [False, True])
def test_eager_gets_the_additive_mask_in_the_models_dtype(dtype: torch.dtype, through_wrapper: bool) -> None:
    model = fake_model("eager", dtype)
    mask = attention_kwargs(wrapped(model) if through_wrapper else model, POSITION_IDS, SEQUENCE_IDS)["attention_mask"]
    lowest = torch.finfo(dtype).min
    expected = torch.tensor(
        [
            [0, lowest, lowest, lowest, lowest],
            [0, 0, lowest, lowest, lowest],
            [lowest, lowest, 0, lowest, lowest],
            [lowest, lowest, 0, 0, lowest],
            [lowest, lowest, 0, 0, 0],
        ],
        dtype=dtype,
    )[None, None]
    assert mask.dtype == dtype
    assert torch.equal(mask, expected)


def test_an_implementation_other_than_sdpa_gets_the_additive_mask() -> None:
    # Adding a boolean mask would add 0/1 to the scores and mask nothing, so only sdpa may get one.
    for attn in ("flex_attention", None):
        mask = mask_kwargs(fake_model(attn), ALLOWED)["attention_mask"]
        assert mask.dtype == torch.float32
        assert torch.equal(mask == 0, ALLOWED)


@pytest.mark.parametrize("through_wrapper", [False, True])
def test_flash_attention_gets_the_varlen_boundaries(through_wrapper: bool) -> None:
    model = fake_model("flash_attention_2")
    kwargs = attention_kwargs(wrapped(model) if through_wrapper else model, POSITION_IDS, SEQUENCE_IDS)
    assert set(kwargs) == {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 2, 5]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert torch.equal(kwargs["cu_seq_lens_k"], kwargs["cu_seq_lens_q"])
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 3


def test_flash_attention_boundaries_of_three_sequences() -> None:
    positions = torch.tensor([[0, 1, 2, 3, 0, 0, 1]])  # lengths 4, 1, 2
    kwargs = attention_kwargs(fake_model("flash_attention_2"), positions, torch.tensor([[0, 0, 0, 0, 1, 2, 2]]))
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 4, 5, 7]
    assert kwargs["max_length_q"] == 4


def test_sum_per_sequence() -> None:
    """Out = [1 + 2, 3, 4 + 5, 0]: sequence 3 owns no value and sums to zero; the gradient is each owner's weight."""
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    owner = torch.tensor([0, 0, 1, 2, 2])
    out = sum_per_sequence(values, owner, 4)
    assert out.tolist() == [3.0, 3.0, 9.0, 0.0]
    (out * torch.tensor([1.0, 10.0, 100.0, 1000.0])).sum().backward()
    assert values.grad is not None
    assert values.grad.tolist() == [1.0, 1.0, 10.0, 100.0, 100.0]


def test_sum_per_sequence_keeps_dtype() -> None:
    out = sum_per_sequence(torch.tensor([0.5, 0.25], dtype=torch.float64), torch.tensor([1, 1]), 2)
    assert out.dtype == torch.float64
    assert out.tolist() == [0.0, 0.75]


# --- counted log-probs on the tiny random Llama ---------------------------------------------------------------


def _alone(model: Any, ids: list[int]) -> torch.Tensor:
    """Log-softmax of one sequence forwarded by itself (no packing, no mask), ``(len(ids), vocab)``."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_counted_token_logps_equal_a_plain_log_softmax_gather(tiny_random_path: str, attn: str) -> None:
    model = tiny_model(tiny_random_path, attn)
    first, second = [11, 12, 13, 14], [21, 22, 23, 24, 25]
    # Counted: tokens 13, 14 of the first sequence and 24, 25 of the second (the prompt tokens are ignored).
    first_labels = [IGNORE_INDEX, IGNORE_INDEX, 13, 14]
    second_labels = [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 24, 25]
    batch = {
        "input_ids": torch.tensor([first + second]),
        "labels": torch.tensor([first_labels + second_labels]),
        "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]]),
        "sequence_ids": torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]]),
    }
    attention = attention_kwargs(model, batch["position_ids"], batch["sequence_ids"])
    with torch.no_grad():
        logps, positions = counted_token_logps(model, batch, attention)
    # Shifted row: labels[0, 1:] = [-, 13, 14, -, -, -, 24, 25]; position t predicts token t + 1.
    assert positions.tolist() == [1, 2, 6, 7]
    alone_first, alone_second = _alone(model, first), _alone(model, second)
    expected = torch.stack(
        [alone_first[1, 13], alone_first[2, 14], alone_second[2, 24], alone_second[3, 25]]  # predicted from t - 1
    )
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    # The same as the log-softmax of the full packed forward, gathered at the counted positions.
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **attention).logits[0, :-1]
    targets = batch["labels"][0, 1:]
    plain = full.float().log_softmax(-1)[positions].gather(-1, targets[positions][:, None]).squeeze(-1)
    torch.testing.assert_close(logps, plain, rtol=1e-5, atol=1e-5)
    assert bool((logps < 0).all())


def test_counted_token_logps_through_a_wrapper_and_with_gradient(tiny_random_path: str) -> None:
    model = tiny_model(tiny_random_path)
    batch = {
        "input_ids": torch.tensor([[11, 12, 13, 21, 22]]),
        "labels": torch.tensor([[IGNORE_INDEX, 12, 13, IGNORE_INDEX, 22]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1]]),
        "sequence_ids": torch.tensor([[0, 0, 0, 1, 1]]),
    }

    class Wrapped(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, **kwargs: Any) -> Any:
            return self.module(**kwargs)

    wrapper = Wrapped(model)
    attention = attention_kwargs(wrapper, batch["position_ids"], batch["sequence_ids"])
    logps, positions = counted_token_logps(wrapper, batch, attention)
    direct, _ = counted_token_logps(model, batch, attention_kwargs(model, batch["position_ids"], batch["sequence_ids"]))
    assert positions.tolist() == [0, 1, 3]
    torch.testing.assert_close(logps, direct)
    logps.sum().backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad is not None
    assert bool(torch.isfinite(grad).all())
    assert float(grad.abs().sum()) > 0


def test_a_model_that_drops_the_segment_keyword_is_refused(tiny_random_path: str) -> None:
    """Under sdpa the row would otherwise be attended as one unmasked sequence: refused after the forward."""

    class Dropping(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, **kwargs: Any) -> Any:
            kwargs.pop(KEY)
            return self.module(**kwargs)

    model = Dropping(tiny_model(tiny_random_path, "sdpa"))
    batch = {
        "input_ids": torch.tensor([[11, 12, 13, 21, 22]]),
        "labels": torch.tensor([[IGNORE_INDEX, 12, 13, IGNORE_INDEX, 22]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1]]),
        "sequence_ids": torch.tensor([[0, 0, 0, 1, 1]]),
    }
    with pytest.raises(RuntimeError, match="did not pass the forward keyword 'packed_segments'"):
        counted_token_logps(model, batch, attention_kwargs(model, batch["position_ids"], batch["sequence_ids"]))
