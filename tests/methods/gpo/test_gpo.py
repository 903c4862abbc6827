"""GPO: hand-computed losses and advantages, validation, packing, trainer invariants, the CLI and a learning check.

The two-group batch used by the loss cases (advantages given directly; ``p`` the token probabilities):

=====  =====  ===  =======================  ===============
group  G      seq  A                        p per token
=====  =====  ===  =======================  ===============
0      2      0    +1                       1/2, 1/4
0      2      1    -1                       1/2
1      3      2    +2                       1/4
1      3      3    -1                       1/2, 1/2
1      3      4    -1                       1
=====  =====  ===  =======================  ===============

7 tokens, 2 groups. Token weights: ``sequence_mean`` gives ``1 / (|o_i| · G · N_groups)`` = seq 0: 1/8 per token,
seq 1: 1/4, seq 2: 1/6, seq 3: 1/12 per token, seq 4: 1/6 (they sum to 1); ``token_sum`` gives 1/7 to every token.

1. ``grpo``: ``loss_t = -A_i`` (the ratio is 1). ``sequence_mean``: sequence means -1, 1 | -2, 1, 1, group means 0 and
   0, so ``L = 0``; ``token_sum``: ``(-1-1+1-2+1+1+1)/7 = 0``. The gradient is ``∂L/∂c_t = -A_i · w_t``:
   seq 0: -1/8, seq 1: +1/4, seq 2: -1/3, seq 3: +1/12, seq 4: +1/6 (``sequence_mean``), ``-A_i/7`` (``token_sum``).
2. ``prob_weighted``: ``loss_t = -A_i p_t`` = -1/2, -1/4 | +1/2 | -1/2 | +1/2, +1/2 | +1.
   ``sequence_mean``: group 0 ``(-3/8 + 1/2)/2 = 1/16``, group 1 ``(-1/2 + 1/2 + 1)/3 = 1/3``, ``L = (1/16 + 1/3)/2
   = 19/96 = 0.1979167``; ``token_sum``: ``(5/4)/7 = 0.1785714``. Gradient ``-A_i p_t w_t``.
3. KL: with ``log π_ref = log π + ln 2`` on every token, ``rho = ln 2`` and ``KL_t = 2 - ln 2 - 1 = 0.3068528``; both
   aggregations have weights summing to 1, so ``β = 0.1`` adds 0.03068528 to each value above, and ``∂KL_t/∂c_t =
   1 - e^rho = -1`` adds ``-β w_t`` to each gradient.

Limiting cases: a reference equal to the policy adds nothing (k3 is 0 with zero gradient there); ``prob_weighted`` on
tokens of probability 1 has the value and gradient of ``grpo``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from alignment.config import to_run_config
from alignment.context import RunContext
from alignment.data import demo, demo_gpo
from alignment.data.chat_template import IGNORE_INDEX
from alignment.data.config import DataConfig, SourceConfig
from alignment.data.mix import build_splits
from alignment.data.validate import DataError
from alignment.methods.gpo.gpo import (
    AGGREGATIONS,
    GPO_TERMS,
    AdvantageScale,
    GpoConfig,
    GpoLossType,
    GroupCollator,
    GroupCounts,
    TokenAggregation,
    batch_counts,
    gpo_loss,
    group_advantages,
    packed_lengths,
    row_problems,
    token_logps,
    tokenize_groups,
)
from alignment.methods.gpo.trainer import GpoTrainer, precompute_reference, reference_token_logps
from alignment.models.frozen import FrozenModel
from alignment.registry import METHODS, gpo
from tests.conftest import launch
from tests.methods.helpers import sgd_step_args, tiny_model

LN2 = math.log(2.0)
KL_LN2 = 1 - LN2  # k3 at rho = ln 2

# --- the loss ---------------------------------------------------------------------------------------------------

ADVANTAGES = [1.0, -1.0, 2.0, -1.0, -1.0]
PROBS = [0.5, 0.25, 0.5, 0.25, 0.5, 0.5, 1.0]
SEQUENCE = [0, 0, 1, 2, 3, 3, 4]
GROUP_SIZES = [2.0, 2.0, 3.0, 3.0, 3.0]
WEIGHTS = {
    TokenAggregation.sequence_mean: [1 / 8, 1 / 8, 1 / 4, 1 / 6, 1 / 12, 1 / 12, 1 / 6],
    TokenAggregation.token_sum: [1 / 7] * 7,
}
VALUES = {
    (GpoLossType.grpo, TokenAggregation.sequence_mean): 0.0,
    (GpoLossType.grpo, TokenAggregation.token_sum): 0.0,
    (GpoLossType.prob_weighted, TokenAggregation.sequence_mean): 19 / 96,
    (GpoLossType.prob_weighted, TokenAggregation.token_sum): 5 / 28,
}


def _batch(probs: list[float] = PROBS) -> tuple[torch.Tensor, ...]:
    policy = torch.tensor(probs, dtype=torch.float64).log().requires_grad_()
    return policy, torch.tensor(ADVANTAGES, dtype=torch.float64), torch.tensor(SEQUENCE), torch.tensor(GROUP_SIZES)


def _loss(
    loss_type: GpoLossType, aggregation: TokenAggregation, *, kl_beta: float = 0.0, ref_shift: float = 0.0
) -> Any:
    policy, advantages, sequence, sizes = _batch()
    reference = policy.detach() + ref_shift if kl_beta else None
    out = gpo_loss(
        policy,
        reference,
        advantages,
        sequence,
        sizes,
        GroupCounts(groups=2.0, tokens=7.0),
        loss_type=loss_type,
        aggregation=aggregation,
        kl_beta=kl_beta,
    )
    (grad,) = torch.autograd.grad(out.loss, policy)
    return out, grad


def _expected_grad(loss_type: GpoLossType, aggregation: TokenAggregation, kl_beta: float = 0.0) -> list[float]:
    scale = {GpoLossType.grpo: [1.0] * 7, GpoLossType.prob_weighted: PROBS}[loss_type]
    return [(-ADVANTAGES[s] * p - kl_beta) * w for s, p, w in zip(SEQUENCE, scale, WEIGHTS[aggregation], strict=True)]


@pytest.mark.parametrize("aggregation", list(AGGREGATIONS))
@pytest.mark.parametrize("loss_type", list(GPO_TERMS))
def test_hand_computed_values_and_gradients(loss_type: GpoLossType, aggregation: TokenAggregation) -> None:
    """Cases 1 and 2 of the module docstring, for every entry of both dicts."""
    out, grad = _loss(loss_type, aggregation)
    assert float(out.loss.detach()) == pytest.approx(VALUES[loss_type, aggregation], abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor(_expected_grad(loss_type, aggregation), dtype=torch.float64))
    assert out.kl is None
    assert out.per_token_loss.shape == (7,)


@pytest.mark.parametrize("aggregation", list(AGGREGATIONS))
@pytest.mark.parametrize("loss_type", list(GPO_TERMS))
def test_k3_kl_to_the_reference_adds_beta_times_its_weighted_mean(
    loss_type: GpoLossType, aggregation: TokenAggregation
) -> None:
    """Case 3: rho = ln 2 on every token."""
    out, grad = _loss(loss_type, aggregation, kl_beta=0.1, ref_shift=LN2)
    assert float(out.loss.detach()) == pytest.approx(VALUES[loss_type, aggregation] + 0.1 * KL_LN2, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor(_expected_grad(loss_type, aggregation, 0.1), dtype=torch.float64))
    assert out.kl is not None
    torch.testing.assert_close(out.kl, torch.full((7,), KL_LN2, dtype=torch.float64))


def test_limits_reference_equal_to_policy_and_certain_tokens() -> None:
    for aggregation in AGGREGATIONS:
        plain, plain_grad = _loss(GpoLossType.prob_weighted, aggregation)
        same, same_grad = _loss(GpoLossType.prob_weighted, aggregation, kl_beta=0.5)
        assert float(same.loss.detach()) == pytest.approx(float(plain.loss.detach()), abs=1e-12)
        torch.testing.assert_close(same_grad, plain_grad)
        policy, advantages, sequence, sizes = _batch([1.0] * 7)
        outs = [
            gpo_loss(
                policy,
                None,
                advantages,
                sequence,
                sizes,
                GroupCounts(2.0, 7.0),
                loss_type=t,
                aggregation=aggregation,
                kl_beta=0.0,
            )
            for t in GPO_TERMS
        ]
        assert float(outs[0].loss.detach()) == pytest.approx(float(outs[1].loss.detach()), abs=1e-12)
        grads = [torch.autograd.grad(o.loss, policy, retain_graph=True)[0] for o in outs]
        torch.testing.assert_close(grads[0], grads[1])


def test_gradients_stay_finite_for_extreme_log_probs() -> None:
    policy = torch.tensor([-200.0, -1e-9, -50.0, 0.0, -30.0, -1.0, -80.0], dtype=torch.float64, requires_grad=True)
    reference = torch.tensor([0.0, -200.0, -1.0, -50.0, -30.0, -5.0, 0.0], dtype=torch.float64)
    _, advantages, sequence, sizes = _batch()
    for loss_type in GPO_TERMS:
        for aggregation in AGGREGATIONS:
            out = gpo_loss(
                policy,
                reference,
                advantages,
                sequence,
                sizes,
                GroupCounts(2.0, 7.0),
                loss_type=loss_type,
                aggregation=aggregation,
                kl_beta=0.01,
            )
            (grad,) = torch.autograd.grad(out.loss, policy)
            assert torch.isfinite(out.loss), (loss_type, aggregation)
            assert torch.isfinite(grad).all(), (loss_type, aggregation)


def test_micro_batch_shares_sum_to_the_step_loss() -> None:
    """Splitting the two groups over two micro-batches with the step's window gives the whole batch's loss."""
    for loss_type in GPO_TERMS:
        for aggregation in AGGREGATIONS:
            whole, _ = _loss(loss_type, aggregation, kl_beta=0.1, ref_shift=LN2)
            policy, advantages, sequence, sizes = _batch()
            window = GroupCounts(2.0, 7.0)
            kwargs = {"loss_type": loss_type, "aggregation": aggregation, "kl_beta": 0.1}
            first = gpo_loss(
                policy[:3], policy[:3].detach() + LN2, advantages[:2], sequence[:3], sizes[:2], window, **kwargs
            )
            second = gpo_loss(
                policy[3:], policy[3:].detach() + LN2, advantages[2:], sequence[3:] - 2, sizes[2:], window, **kwargs
            )
            assert float((first.loss + second.loss).detach()) == pytest.approx(float(whole.loss.detach()), abs=1e-12)


# --- advantages -------------------------------------------------------------------------------------------------


def test_group_advantages_by_hand() -> None:
    """[1, 0]: mean 1/2, std 1/2. [1, 0, 0]: mean 1/3, std √2/3. All of [1, 0, 1, 0, 0]: mean 2/5, std √6/5."""
    eps = 1e-4
    everything = [1.0, 0.0, 1.0, 0.0, 0.0]
    two = group_advantages([1.0, 0.0], everything, scale=AdvantageScale.group, epsilon=eps)
    assert two == pytest.approx([0.5 / (0.5 + eps), -0.5 / (0.5 + eps)], rel=1e-12)
    three = group_advantages([1.0, 0.0, 0.0], everything, scale=AdvantageScale.group, epsilon=eps)
    std = math.sqrt(2) / 3
    assert three == pytest.approx([(2 / 3) / (std + eps), (-1 / 3) / (std + eps), (-1 / 3) / (std + eps)], rel=1e-12)
    batch = group_advantages([1.0, 0.0, 0.0], everything, scale=AdvantageScale.batch, epsilon=eps)
    assert batch == pytest.approx([(2 / 3) / (math.sqrt(6) / 5 + eps), *[(-1 / 3) / (math.sqrt(6) / 5 + eps)] * 2])
    unscaled = group_advantages([3.0, 1.0], everything, scale=AdvantageScale.none, epsilon=eps)
    assert unscaled == [1.0, -1.0]
    assert group_advantages([0.7, 0.7, 0.7], everything, scale=AdvantageScale.group, epsilon=eps) == [0.0] * 3


# --- data -------------------------------------------------------------------------------------------------------

USER = {"role": "user", "content": "What is 2 + 3?"}


def answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


GROUPS: list[dict[str, Any]] = [
    {"prompt": [USER], "completions": [answer("2 + 3 = 5"), answer("2 + 3 = 6")], "rewards": [1.0, 0.0]},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
        "completions": [answer("Blue."), answer("Green, like grass in the spring rain."), answer("Red")],
        "rewards": [0.2, 0.9, -0.4],
    },
    {
        "prompt": [{"role": "user", "content": "Count to three, then explain at some length why you stopped there."}],
        "completions": [answer("1, 2, 3."), answer("one two three four"), answer("1 2 3"), answer("Three.")],
        "rewards": [1, 0, 1, 0],
    },
    {
        "prompt": [USER, *answer("5"), {"role": "user", "content": "And 3 + 4?"}],
        "completions": [answer("7"), answer("8, I think")],
        "rewards": [2.5, -1.0],
    },
]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _load(path: Path) -> Dataset:
    return build_splits(
        DataConfig(sources=[SourceConfig(path=str(path))], eval_fraction=0), row_problems, gpo.COLUMNS
    ).train


@pytest.mark.parametrize(
    ("row", "column", "reason"),
    [
        (
            {"prompt": [USER], "completions": [answer("5"), answer("6")], "rewards": [1.0]},
            "'completions'/'rewards'",
            "2 completions but 1 rewards",
        ),
        (
            {"prompt": [USER], "completions": [answer("5"), answer("6")], "rewards": [1.0, float("nan")]},
            "'rewards'[1]",
            "expected a finite number",
        ),
        (
            {"prompt": [USER], "completions": [answer("5"), answer("6")], "rewards": [1.0, float("inf")]},
            "'rewards'[1]",
            "expected a finite number",
        ),
        (
            {"prompt": [USER], "completions": [answer("5"), answer("  ")], "rewards": [1.0, 0.0]},
            "'completions[1]'",
            "empty completion",
        ),
        (
            {"prompt": [USER], "completions": [answer("5"), []], "rewards": [1.0, 0.0]},
            "'completions[1]'",
            "non-empty list",
        ),
        (
            {"prompt": [USER], "completions": [answer("5"), [USER]], "rewards": [1.0, 0.0]},
            "'completions[1]'",
            "assistant turns",
        ),
        (
            {"prompt": [USER], "completions": [answer("5"), answer("6")], "rewards": [1.0, "high"]},
            "'rewards'[1]",
            "expected a number",
        ),
        (
            {"prompt": [USER], "completions": [answer("5"), answer("6")], "rewards": [True, 0.0]},
            "'rewards'[0]",
            "expected a number",
        ),
        ({"prompt": [USER], "completions": [], "rewards": []}, "'completions'", "non-empty list"),
        ({"prompt": [USER], "completions": [answer("5"), answer("6")]}, "'rewards'", "missing column"),
        (
            {"prompt": [USER, *answer("5")], "completions": [answer("5"), answer("6")], "rewards": [1.0, 0.0]},
            "'prompt'",
            "ends on an assistant turn",
        ),
    ],
)
def test_bad_groups_fail_with_file_line_and_column(
    tmp_path: Path, row: dict[str, Any], column: str, reason: str
) -> None:
    path = _write(tmp_path / "groups.jsonl", [GROUPS[0], row])
    with pytest.raises(DataError) as err:
        _load(path)
    line = next(entry for entry in str(err.value).splitlines() if f"{path}:2:" in entry)
    assert column in line
    assert reason in line
    assert f"{path}:1:" not in str(err.value)


@pytest.fixture(scope="module")
def tokenizer(tiny_random_path: str) -> Any:
    return AutoTokenizer.from_pretrained(tiny_random_path)


def _tokenize(rows: list[dict[str, Any]], tokenizer: Any, **kwargs: Any) -> tuple[Dataset, Any]:
    settings = {"max_length": 512, "scale": AdvantageScale.group, "epsilon": 1e-4, **kwargs}
    return tokenize_groups(Dataset.from_list(rows), tokenizer, **settings)


def test_small_and_equal_reward_groups_are_dropped_and_counted(
    tmp_path: Path, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    single = {"prompt": [USER], "completions": [answer("5")], "rewards": [1.0]}
    equal = {"prompt": [USER], "completions": [answer("5"), answer("6"), answer("7")], "rewards": [0.5, 0.5, 0.5]}
    path = _write(tmp_path / "groups.jsonl", [GROUPS[0], single, equal, GROUPS[1], single])
    with caplog.at_level(logging.INFO, logger="alignment.methods.gpo.gpo"):
        kept, stats = tokenize_groups(_load(path), tokenizer, max_length=512, scale=AdvantageScale.group, epsilon=1e-4)
    assert len(kept) == 2
    assert (stats.groups, stats.too_small, stats.zero_advantage, stats.empty) == (5, 2, 1, 0)
    assert stats.zero_advantage_fraction == pytest.approx(1 / 3)
    assert "2 group(s) with fewer than 2 completions dropped" in caplog.text
    assert f"{path}:2" in caplog.text  # the first dropped group is named by file:line
    assert "1 with equal rewards skipped (zero advantage, 33.3%)" in caplog.text


def test_tokenised_groups_share_the_prompt_and_train_only_the_completions(tokenizer: Any) -> None:
    kept, _ = _tokenize(GROUPS, tokenizer)
    assert len(kept) == len(GROUPS)
    for row, out in zip(GROUPS, kept, strict=True):
        assert len(out["completion_ids"]) == len(row["completions"]) == len(out["advantages"])
        for completion, ids, labels in zip(
            row["completions"], out["completion_ids"], out["completion_labels"], strict=True
        ):
            assert labels[0] == IGNORE_INDEX  # each segment starts with the token that predicts its first token
            trained = [t for t in labels if t != IGNORE_INDEX]
            assert tokenizer.decode(trained) == completion[0]["content"] + "<|im_end|>"
            whole = tokenizer.apply_chat_template(row["prompt"] + completion, tokenize=False)
            assert tokenizer.decode(out["prompt_ids"] + ids) == whole
        assert sum(out["advantages"]) == pytest.approx(0.0, abs=1e-9)
    shared = packed_lengths(kept, share_prompt=True)
    repeated = packed_lengths(kept, share_prompt=False)
    assert all(s < r for s, r in zip(shared, repeated, strict=True))


def test_long_completions_are_cut_at_the_end_and_empty_groups_dropped(tokenizer: Any) -> None:
    long = {"prompt": [USER], "completions": [answer("five " * 60), answer("5")], "rewards": [0.0, 1.0]}
    hopeless = {
        "prompt": [{"role": "user", "content": "word " * 300}],
        "completions": [answer("a"), answer("b")],
        "rewards": [0.0, 1.0],
    }
    kept, stats = _tokenize([long, hopeless], tokenizer, max_length=64)
    assert (stats.truncated, stats.empty, len(kept)) == (2, 1, 1)
    (row,) = kept
    assert len(row["prompt_ids"]) + len(row["completion_ids"][0]) == 64


# --- the packed forward -----------------------------------------------------------------------------------------


def _alone(model: Any, ids: list[int], labels: list[int]) -> torch.Tensor:
    """Completion token log-probs of one sequence forwarded alone, with no mask at all."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    targets = torch.tensor(labels[1:])
    mask = targets != IGNORE_INDEX
    return logits.log_softmax(-1)[mask].gather(-1, targets[mask][:, None]).squeeze(-1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_log_probs_equal_unpacked_forwards(tiny_random_path: str, tokenizer: Any, attn: str) -> None:
    rows = list(_tokenize(GROUPS, tokenizer)[0])
    model = tiny_model(tiny_random_path, attn)
    expected, owners = [], []
    for row in rows:
        for ids, labels in zip(row["completion_ids"], row["completion_labels"], strict=True):
            logps = _alone(model, row["prompt_ids"] + ids, [IGNORE_INDEX] * len(row["prompt_ids"]) + labels)
            owners += [len(expected)] * len(logps)
            expected.append(logps)
    for share in (True, False):
        batch = GroupCollator(share_prompt=share)(rows)
        with torch.no_grad():
            logps, sequence = token_logps(model, batch)
        torch.testing.assert_close(logps, torch.cat(expected), rtol=1e-5, atol=1e-5)
        assert sequence.tolist() == owners
        assert batch_counts(batch) == GroupCounts(4.0, float(len(owners)))
        assert batch["input_ids"].numel() == sum(packed_lengths(Dataset.from_list(rows), share_prompt=share))
    shared = GroupCollator(share_prompt=True)(rows)
    assert shared["group_sizes"].tolist() == [2.0] * 2 + [3.0] * 3 + [4.0] * 4 + [2.0] * 2
    assert shared["rewards"].tolist() == pytest.approx([r for g in GROUPS for r in g["rewards"]])


def test_shared_prompt_is_rejected_with_flash_attention(tiny_random_path: str, tokenizer: Any) -> None:
    rows = list(_tokenize(GROUPS[:1], tokenizer)[0])
    model = tiny_model(tiny_random_path)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="share_prompt=true needs sdpa or eager"):
        token_logps(model, GroupCollator(share_prompt=True)(rows))


WINDOW = GroupCounts(6.0, 90.0)  # a step larger than the micro-batch, as with accumulation


def _dense_row_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward before segments: one (T, T) mask over the whole row; log-probs and their completion index."""
    from alignment.training.packed import counted_token_logps, mask_kwargs

    segments, groups = batch["segment_ids"][0], batch["group_ids"][0]
    visible = (segments[None, :] < 0) | (segments[:, None] == segments[None, :])
    mask = mask_kwargs(model, ((groups[:, None] == groups[None, :]) & visible).tril()[None, None])
    logps, predicting = counted_token_logps(model, batch, mask)
    return logps, segments[1:][predicting]


@pytest.mark.parametrize("share", [True, False])
def test_policy_loss_equals_the_dense_row_loss_in_value_gradient_and_metrics(
    tiny_random_path: str, tokenizer: Any, share: bool
) -> None:
    """Segment-by-segment sdpa + the head a chunk at a time (and the sharded-head fallback) ≡ dense mask + gpo_loss."""
    from functools import partial

    from alignment.methods.gpo.trainer import STATS, policy_loss

    batch = GroupCollator(share_prompt=share)(list(_tokenize(GROUPS, tokenizer)[0]))
    model = tiny_model(tiny_random_path).train()
    settings = {"loss_type": GpoLossType.prob_weighted, "aggregation": TokenAggregation.sequence_mean}
    loss_fn = partial(gpo_loss, kl_beta=0.1, **settings)
    with torch.no_grad():
        reference = _dense_row_logps(model, batch)[0] + 0.25
    logps, sequence = _dense_row_logps(model, batch)
    expected = loss_fn(logps, reference, batch["advantages"], sequence, batch["group_sizes"], WINDOW)
    expected.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == len(list(model.parameters()))
    logps = logps.detach()
    means = torch.zeros(11).index_add(0, sequence, logps) / torch.bincount(sequence).float()
    for chunked in (True, False):  # chunks of 5 tokens: completions span several, a chunk holds several
        model.zero_grad()
        loss, stats = policy_loss(model, batch, reference, loss_fn, WINDOW, chunked=chunked, chunk_size=5)
        loss.backward()
        torch.testing.assert_close(loss, expected.loss, rtol=1e-5, atol=1e-7)
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(parameter.grad, grads[name], rtol=1e-4, atol=1e-8, msg=name)
        sums = dict(zip(STATS, stats.tolist(), strict=True))
        assert (sums["tokens"], sums["sequences"]) == (logps.numel(), 11)
        assert sums["logp_sum"] == pytest.approx(float(logps.sum()), rel=1e-5)
        assert sums["prob_sum"] == pytest.approx(float(logps.exp().sum()), rel=1e-5)
        assert sums["kl_sum"] == pytest.approx(float(expected.kl.sum()), rel=1e-5)  # type: ignore[union-attr]
        assert sums["positive_logp"] == pytest.approx(float(means[batch["advantages"] > 0].sum()), rel=1e-5)


def test_a_model_that_drops_the_segment_keyword_is_refused(tiny_random_path: str, tokenizer: Any) -> None:
    """Without the keyword the row would be attended as one sequence: refused after the forward, never trained on."""
    from alignment.training.segments import KEY

    class Dropping(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.module = inner

        def forward(self, **kwargs: Any) -> Any:
            kwargs.pop(KEY)
            return self.module(**kwargs)

    batch = GroupCollator()(list(_tokenize(GROUPS[:2], tokenizer)[0]))
    with pytest.raises(RuntimeError, match="did not pass the forward keyword 'packed_segments'"):
        token_logps(Dropping(tiny_model(tiny_random_path)), batch)


# --- the trainer ------------------------------------------------------------------------------------------------


def _trainer(path: str, out: Path, train: Dataset, aggregation: TokenAggregation, **overrides: Any) -> GpoTrainer:
    from functools import partial

    model = tiny_model(path).train()
    frozen = tiny_model(path).requires_grad_(False)
    with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
        for parameter in frozen.parameters():
            parameter.mul_(0.9)
    loss_fn = partial(gpo_loss, loss_type=GpoLossType.prob_weighted, aggregation=aggregation, kl_beta=0.1)
    return GpoTrainer(
        model=model,
        args=sgd_step_args(out, **overrides),
        train_dataset=train,
        eval_dataset=train,
        data_collator=GroupCollator(),
        loss_fn=loss_fn,
        reference=FrozenModel(frozen),
        max_tokens_per_batch=None,
        share_prompt=True,
        zero_advantage_fraction={"train": 0.0, "eval": 0.0},
    )


def _parameters(trainer: GpoTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("aggregation", list(AGGREGATIONS))
def test_grad_accumulation_1x4_equals_4x1(
    tiny_random_path: str, tokenizer: Any, tmp_path: Path, aggregation: TokenAggregation
) -> None:
    """Four groups of 2 to 4 completions: one micro-batch of four ≡ four micro-batches of one (one SGD step)."""
    train = _tokenize(GROUPS, tokenizer)[0]
    whole = _trainer(tiny_random_path, tmp_path / "4x1", train, aggregation)
    before = _parameters(whole)
    whole.train()
    micro = _trainer(
        tiny_random_path,
        tmp_path / "1x4",
        train,
        aggregation,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
    )
    micro.train()
    after_whole, after_micro = _parameters(whole), _parameters(micro)
    assert all(not torch.equal(before[n], after_whole[n]) for n in before)  # every parameter trains
    for name, value in after_whole.items():
        torch.testing.assert_close(after_micro[name], value, rtol=0, atol=1e-5, msg=name)
    logged_whole, logged_micro = whole.state.log_history[0], micro.state.log_history[0]
    assert logged_micro["loss"] == pytest.approx(logged_whole["loss"], abs=1e-6)
    assert logged_micro["grad_norm"] == pytest.approx(logged_whole["grad_norm"], rel=1e-4)
    for key in ("rewards/mean", "rewards/std", "advantages/std", "kl/token_mean", "policy/token_prob_mean"):
        assert logged_micro[key] == pytest.approx(logged_whole[key], rel=1e-4), key
    assert logged_whole["kl/token_mean"] > 0


def test_evaluation_metrics_by_hand(tiny_random_path: str, tokenizer: Any, tmp_path: Path) -> None:
    train = _tokenize(GROUPS, tokenizer)[0]
    trainer = _trainer(tiny_random_path, tmp_path, train, TokenAggregation.token_sum, per_device_eval_batch_size=4)
    metrics = trainer.evaluate()
    batch = GroupCollator()(list(train))
    with torch.no_grad():
        logps, sequence = token_logps(trainer.model, batch)
    rewards = torch.tensor([float(r) for g in GROUPS for r in g["rewards"]], dtype=torch.float64)
    assert metrics["eval_rewards/mean"] == pytest.approx(float(rewards.mean()))
    assert metrics["eval_rewards/std"] == pytest.approx(float(rewards.std(unbiased=False)))
    assert metrics["eval_advantages/mean"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["eval_policy/token_prob_mean"] == pytest.approx(float(logps.exp().mean()), rel=1e-5)
    means = torch.zeros(11).index_add(0, sequence, logps) / torch.bincount(sequence).float()
    positive = batch["advantages"] > 0
    assert metrics["eval_logps/positive_advantage"] == pytest.approx(float(means[positive].mean()), rel=1e-5)
    assert metrics["eval_logps/advantage_margin"] == pytest.approx(
        float(means[positive].mean() - means[~positive].mean()), rel=1e-4
    )
    assert metrics["eval_groups/zero_advantage_fraction"] == 0.0


def test_precomputed_reference_matches_the_frozen_model_and_is_cached(
    tiny_random_path: str,
    tokenizer: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("ALIGNMENT_CACHE_DIR", str(tmp_path / "cache"))
    train = _tokenize(GROUPS, tokenizer)[0]
    frozen = tiny_model(tiny_random_path)
    with_ref = precompute_reference(train, frozen, "key", groups_per_batch=3)
    batch = GroupCollator(share_prompt=False)(list(with_ref))
    with torch.no_grad():
        live = reference_token_logps(FrozenModel(frozen), None, {k: v for k, v in batch.items() if k != "ref_logps"})  # type: ignore[arg-type]
    torch.testing.assert_close(reference_token_logps(FrozenModel(None), None, batch), live, rtol=1e-5, atol=1e-5)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="alignment.models.frozen"):
        again = precompute_reference(train, frozen, "key", groups_per_batch=1)
    assert "cache hit" in caplog.text
    assert again["ref_logps"] == with_ref["ref_logps"]


def test_adapters_reference_is_the_base_model(tiny_random_path: str, tokenizer: Any) -> None:
    from peft import LoraConfig, get_peft_model

    batch = GroupCollator()(list(_tokenize(GROUPS, tokenizer)[0]))
    with torch.no_grad():
        base = token_logps(tiny_model(tiny_random_path), batch)[0]
    torch.manual_seed(0)
    policy = get_peft_model(
        tiny_model(tiny_random_path), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        adapted = token_logps(policy, batch)[0]
    reference = reference_token_logps(FrozenModel(None), policy, batch)
    assert not torch.allclose(adapted, base, atol=1e-3)
    torch.testing.assert_close(reference, base, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_precomputed_reference_run_equals_the_frozen_copy_run(
    compose: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two SGD steps with the KL term: the cached per-token reference gives the copy's losses and metrics."""
    monkeypatch.setenv("ALIGNMENT_CACHE_DIR", str(tmp_path / "cache"))
    data = _write(tmp_path / "groups.jsonl", GROUPS)
    logs = {}
    for kind in ("copy", "precomputed"):
        overrides = [
            "model=tiny_random",
            "method=gpo",
            "logger=none",
            f"data.sources=[{{path: '{data}', eval_path: '{data}'}}]",
            "method.max_steps=2",
            "method.per_device_train_batch_size=2",
            "method.max_tokens_per_batch=null",
            "method.kl_beta=0.5",
            f"method.reference={kind}",
            "method.optim=sgd",
            "method.learning_rate=0.5",
            "method.logging_steps=1",
            "method.eval_steps=2",
            "method.save_strategy=no",
        ]
        gpo.run(to_run_config(compose(overrides)), RunContext(tmp_path / kind, kind, None))
        lines = (tmp_path / kind / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        logs[kind] = [json.loads(line) for line in lines]
    assert len(list((tmp_path / "cache" / "reference_logps").glob("gpo-*.safetensors"))) == 2  # train and eval
    assert len(logs["copy"]) == len(logs["precomputed"])
    for live, cached in zip(logs["copy"], logs["precomputed"], strict=True):
        for key in ("loss", "kl/token_mean", "eval_loss", "eval_kl/token_mean"):
            if key in live:
                assert cached[key] == pytest.approx(live[key], rel=1e-4, abs=1e-7), key
    assert [e for e in logs["copy"] if "kl/token_mean" in e][-1]["kl/token_mean"] > 0  # the policy moved away


# --- config, run and the CLI ------------------------------------------------------------------------------------


def test_config_rejects_bad_values_and_unworkable_settings_before_loading(
    compose: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert METHODS["gpo"].schema is GpoConfig
    with pytest.raises(ValueError, match="kl_beta must be >= 0"):
        GpoConfig(kl_beta=-0.1)
    import alignment.models.load as model_loading

    monkeypatch.setattr(model_loading, "load_tokenizer", lambda *a, **k: pytest.fail("loaded a tokenizer"))
    for overrides, message in (
        (["model.attn_implementation=flash_attention_2"], "share_prompt=true needs sdpa or eager"),
        (["method.kl_beta=0.1", "method.reference=adapters"], "needs model.lora.enabled=true"),
    ):
        cfg = to_run_config(compose(["model=tiny_random", "method=gpo", "data=demo_gpo", *overrides]))
        with pytest.raises(ValueError, match=message):
            gpo.run(cfg, RunContext(tmp_path, "bad", None))


def test_auto_attention_with_a_shared_prompt_loads_sdpa_even_where_flash_attention_runs(
    compose: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``model.attn_implementation=auto`` would pick flash-attention on a GPU; shared prompts need sdpa's segments."""
    import alignment.methods.gpo.trainer as gpo_trainer
    import alignment.models.load as model_loading

    monkeypatch.setattr(model_loading, "flash_attention_runs", lambda dtype: True)
    seen: list[str] = []

    def stop(cfg: Any, *args: Any) -> Any:
        seen.append(model_loading.resolve_attention(cfg.model))
        raise RuntimeError("stop before training")

    monkeypatch.setattr(gpo_trainer, "build_trainer", stop)
    for share in ("true", "false"):
        overrides = ["model=tiny_random", "method=gpo", "data=demo_gpo", f"method.share_prompt={share}"]
        cfg = to_run_config(compose(overrides))
        assert cfg.model.attn_implementation.value == "auto"
        with pytest.raises(RuntimeError, match="stop before training"):
            gpo.run(cfg, RunContext(tmp_path, share, None))
    assert seen == ["sdpa", "flash_attention_2"]


def test_shipped_demo_groups_match_the_generator_and_their_rewards(tmp_path: Path) -> None:
    written = demo_gpo.write(tmp_path)
    assert [p.name for p in written] == ["gpo_train.jsonl", "gpo_test.jsonl"]
    expressions = {}
    for path in written:
        assert path.read_bytes() == (demo.DEMO_DIR / path.name).read_bytes(), "stale: python -m alignment.data.demo_gpo"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert all(row_problems(r) == [] for r in rows)
        for row in rows:
            for completion, reward in zip(row["completions"], row["rewards"], strict=True):
                a, op, b, result = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (-?\d+)", completion[0]["content"]).groups()  # type: ignore[union-attr]
                correct = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(result)
                assert reward == float(correct)
        expressions[path.name] = {r["completions"][0][0]["content"].split(" = ")[0] for r in rows}
        equal = sum(len(set(r["rewards"])) == 1 for r in rows)
        assert 0 < equal < len(rows) / 4  # some zero-advantage groups, most carry signal
    assert len(expressions["gpo_train.jsonl"]) == demo_gpo.NUM_TRAIN
    assert expressions["gpo_train.jsonl"].isdisjoint(expressions["gpo_test.jsonl"])


def test_cli_run_on_the_demo_groups_logs_gpo_metrics(tmp_path: Path) -> None:
    """``launch.py method=gpo data=demo_gpo`` on the tiny model: 2 steps with a token budget and the KL term."""
    out = tmp_path / "run"
    result = launch(
        [
            "model=tiny_random",
            "method=gpo",
            "data=demo_gpo",
            "logger=none",
            f"hydra.run.dir={out}",
            "data.max_eval_samples=8",
            "method.max_steps=2",
            "method.max_tokens_per_batch=600",
            "method.kl_beta=0.05",
            "method.loss_type=prob_weighted",
            "method.logging_steps=1",
            "method.eval_steps=2",
            "method.save_strategy=no",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train_logs = [e for e in logs if "loss" in e]
    assert [e["step"] for e in train_logs] == [1, 2]
    names = (
        "rewards/mean",
        "rewards/std",
        "advantages/mean",
        "advantages/std",
        "groups/zero_advantage_fraction",
        "kl/token_mean",
        "policy/token_prob_mean",
        "logps/advantage_margin",
    )
    for entry in train_logs:
        assert all(math.isfinite(entry[n]) for n in names), entry
        assert 0 < entry["policy/token_prob_mean"] < 1
    assert train_logs[0]["groups/zero_advantage_fraction"] == pytest.approx(32 / 300)
    evals = [e for e in logs if "eval_loss" in e]
    assert [e["step"] for e in evals] == [0, 2]
    assert evals[0]["eval_kl/token_mean"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference at step 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert math.isfinite(results["eval_logps/advantage_margin"])


# --- learning check on the real model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gpo_raises_correct_over_wrong_log_probs_on_held_out_prompts(compose: Any, tmp_path: Path) -> None:
    """Rewards = correctness: training lifts the held-out mean log-prob of correct completions above wrong ones.

    ``eval_logps/advantage_margin`` is the mean per-token log-prob of the held-out completions with positive
    advantage (correct) minus that of those with negative advantage (wrong), on 16 held-out prompts. Measured: 6 steps
    at lr 2e-5 took it from 0.166 to 0.246; 12 steps at lr 1e-5 (twice the training time) from 0.166 to 0.242.
    """
    out = tmp_path / "run"
    overrides = [
        "model=smollm2_135m",
        "method=gpo",
        "data=demo_gpo",
        "logger=none",
        "data.max_eval_samples=16",
        "method.max_steps=6",
        "method.max_tokens_per_batch=null",
        "method.per_device_train_batch_size=4",
        "method.per_device_eval_batch_size=16",
        "method.learning_rate=2e-5",
        "method.logging_steps=1",
        "method.eval_steps=6",
        "method.save_strategy=no",
    ]
    cfg = to_run_config(compose(overrides))
    gpo.run(cfg, RunContext(out, "learn", None))
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    evals = [e for e in logs if "eval_loss" in e]
    before, after = evals[0], evals[-1]
    keys = ("eval_logps/positive_advantage", "eval_logps/negative_advantage", "eval_logps/advantage_margin")
    print({k: (round(before[k], 4), round(after[k], 4)) for k in keys})
    assert (before["step"], after["step"]) == (0, 6)
    assert after["eval_logps/advantage_margin"] > before["eval_logps/advantage_margin"] + 0.05
    assert all(math.isfinite(e["loss"]) for e in logs if "loss" in e)
