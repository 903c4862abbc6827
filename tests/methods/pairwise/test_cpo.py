"""CPO: hand-computed loss values per variant, limits, gradients, config checks, TRL equality, and a tiny run.

Inputs are :class:`PairLogps` built by hand; ``z`` is the summed (``sigmoid``/``hinge``) or mean (``ipo``/``simpo``)
log-prob difference chosen - rejected. Values are worked out in the comments (softplus(x) = log(1 + e^x)).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from alignment.methods.pairwise import cpo
from alignment.methods.pairwise.core import PairCollator, PairCounts, PairLogps, sequence_logps, total_loss
from alignment.methods.pairwise.cpo import CPO_LOSSES, LENGTH_NORMALISED, CpoConfig, CpoVariant, cpo_loss
from tests.methods.helpers import TINY_DEMO_PAIRS, run_method

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def pairs(chosen: list[float], rejected: list[float], chosen_tokens: list[float] | None = None) -> PairLogps:
    """Summed log-probs; one token per sequence unless told (so sums and means coincide)."""
    n = len(chosen)
    return PairLogps(
        torch.tensor(chosen, requires_grad=True),
        torch.tensor(rejected, requires_grad=True),
        torch.tensor(chosen_tokens or [1.0] * n),
        torch.tensor([1.0] * n),
    )


def per_pair(policy: PairLogps, variant: CpoVariant, **kwargs: Any) -> list[float]:
    out = cpo_loss(policy, loss_type=variant, **{"beta": 0.1, **kwargs})
    return out.per_pair_loss.detach().tolist()


# --- hand-computed values ---------------------------------------------------------------------------------------


def test_sigmoid_values() -> None:
    # beta = 0.1. z = -10 - (-20) = 10 -> softplus(-1) = 0.3132617; z = 0 -> log 2 = 0.6931472;
    # z = -30 - (-10) = -20 -> softplus(2) = 2.1269280.
    got = per_pair(pairs([-10.0, -5.0, -30.0], [-20.0, -5.0, -10.0]), CpoVariant.sigmoid)
    assert got == pytest.approx([0.3132617, 0.6931472, 2.1269280], abs=1e-6)


def test_sigmoid_label_smoothing_and_limit() -> None:
    policy = pairs([-10.0], [-20.0])  # beta * z = 1
    # eps = 0.5: 0.5 * softplus(-1) + 0.5 * softplus(1) = 0.5 * (0.3132617 + 1.3132617) = 0.8132617.
    assert per_pair(policy, CpoVariant.sigmoid, label_smoothing=0.5) == pytest.approx([0.8132617], abs=1e-6)
    # eps = 0.1: 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617.
    assert per_pair(policy, CpoVariant.sigmoid, label_smoothing=0.1) == pytest.approx([0.4132617], abs=1e-6)
    # Limit: beta * z -> +inf gives loss -> 0 (z = 1000, beta * z = 100: softplus(-100) ~ 3.7e-44).
    assert per_pair(pairs([0.0], [-1000.0]), CpoVariant.sigmoid) == pytest.approx([0.0], abs=1e-12)


def test_hinge_values_and_limit() -> None:
    # max(0, 1 - 0.1 z): z = 5 -> 0.5; z = -10 -> 2.0; z = 0 -> 1.0.
    assert per_pair(pairs([-5.0, -20.0, -3.0], [-10.0, -10.0, -3.0]), CpoVariant.hinge) == pytest.approx(
        [0.5, 2.0, 1.0]
    )
    # Limit: zero from z = 1/beta = 10 on (and beyond).
    assert per_pair(pairs([-10.0, 0.0], [-20.0, -50.0]), CpoVariant.hinge) == [0.0, 0.0]


def test_ipo_values_and_limit() -> None:
    # Mean log-probs: chosen -4/2 = -2, rejected -9/3 = -3 -> z = 1 -> (1 - 1/(2*0.1))^2 = (1 - 5)^2 = 16.
    # chosen -6/3 = -2, rejected -1/1 = -1 -> z = -1 -> (-1 - 5)^2 = 36.  chosen -1/1, rejected -8/1: z = 7 -> 4.
    policy = PairLogps(
        torch.tensor([-4.0, -6.0, -1.0]),
        torch.tensor([-9.0, -1.0, -8.0]),
        torch.tensor([2.0, 3.0, 1.0]),
        torch.tensor([3.0, 1.0, 1.0]),
    )
    assert per_pair(policy, CpoVariant.ipo) == pytest.approx([16.0, 36.0, 4.0])
    # Limit: zero exactly at z = 1/(2 beta) = 5; the summed difference (here 10) is not what counts.
    at_target = PairLogps(torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([2.0]), torch.tensor([2.0]))
    assert per_pair(at_target, CpoVariant.ipo) == pytest.approx([0.0])


def test_simpo_values_and_limit() -> None:
    # beta = 2, gamma = 0.5 on mean log-probs: -softplus... = softplus(-(2 z - 0.5)).
    # chosen -2/2 = -1, rejected -5/4 = -1.25: z = 0.25 -> 2 z - 0.5 = 0 -> log 2 = 0.6931472;
    # z = 0.5 -> 0.5 -> softplus(-0.5) = 0.4740770;  z = -0.25 -> -1 -> softplus(1) = 1.3132617.
    policy = PairLogps(
        torch.tensor([-2.0, -1.0, -1.25]),
        torch.tensor([-5.0, -1.5, -1.0]),
        torch.tensor([2.0, 1.0, 1.0]),
        torch.tensor([4.0, 1.0, 1.0]),
    )
    got = per_pair(policy, CpoVariant.simpo, beta=2.0, simpo_gamma=0.5)
    assert got == pytest.approx([0.6931472, 0.4740770, 1.3132617], abs=1e-6)
    # Limit: gamma = 0 is the sigmoid loss on mean log-probs.
    no_margin = per_pair(policy, CpoVariant.simpo, beta=2.0, simpo_gamma=0.0)
    means = pairs([-1.0, -1.0, -1.25], [-1.25, -1.5, -1.0])
    assert no_margin == pytest.approx(per_pair(means, CpoVariant.sigmoid, beta=2.0), abs=1e-7)


def test_total_adds_cpo_alpha_times_chosen_token_mean_nll() -> None:
    # Pair terms 0.3132617 and 0.6931472 (test_sigmoid_values); chosen NLL = (10 + 5) / (3 + 2) = 3.
    policy = pairs([-10.0, -5.0], [-20.0, -5.0], chosen_tokens=[3.0, 2.0])
    out = cpo_loss(policy, beta=0.1, loss_type=CpoVariant.sigmoid, cpo_alpha=0.5)
    assert (out.chosen_nll_weight, out.rejected_nll_weight) == (0.5, 0.0)
    loss = total_loss(out, policy, PairCounts.of(policy))
    assert float(loss.detach()) == pytest.approx((0.3132617 + 0.6931472) / 2 + 0.5 * 3.0, abs=1e-6)
    # Rewards are beta times the (summed, for sigmoid) log-probs.
    assert out.chosen_reward.tolist() == pytest.approx([-1.0, -0.5])
    assert out.rejected_reward.tolist() == pytest.approx([-2.0, -0.5])


@pytest.mark.parametrize("variant", list(CPO_LOSSES))
def test_every_variant_has_finite_gradients(variant: CpoVariant) -> None:
    policy = PairLogps(
        torch.tensor([-12.0, -3.0, -40.0], requires_grad=True),
        torch.tensor([-11.0, -9.0, -0.5], requires_grad=True),
        torch.tensor([4.0, 3.0, 20.0]),
        torch.tensor([5.0, 3.0, 1.0]),
    )
    out = cpo_loss(policy, beta=0.1, loss_type=variant, cpo_alpha=1.0)
    assert out.per_pair_loss.shape == (3,)
    total_loss(out, policy, PairCounts.of(policy)).backward()
    for grad in (policy.chosen.grad, policy.rejected.grad):
        assert grad is not None
        assert torch.isfinite(grad).all()
    assert (variant in LENGTH_NORMALISED) == (variant in (CpoVariant.ipo, CpoVariant.simpo))


def test_label_smoothing_is_rejected_where_it_has_no_meaning() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        CpoConfig(loss_type=CpoVariant.hinge, label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        CpoConfig(label_smoothing=0.7)
    assert CpoConfig(loss_type=CpoVariant.simpo, label_smoothing=0.1).label_smoothing == 0.1


def test_wrong_loss_type_lists_the_allowed_ones(compose: Any) -> None:
    with pytest.raises(Exception, match="loss_type=dpo") as info:
        compose(["method=cpo", "method.loss_type=dpo"])
    assert "expected one of [sigmoid, hinge, ipo, simpo]" in str(info.value.__cause__)


# --- equality with TRL's experimental CPOTrainer ---------------------------------------------------------------------


def packed_from_trl(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """TRL's padded chosen/rejected batch as our packed row: each sequence's unpadded ids and labels."""
    rows = []
    for i in range(len(batch["chosen_input_ids"])):
        row = {}
        for side in ("chosen", "rejected"):
            keep = batch[f"{side}_attention_mask"][i].bool()
            row[f"{side}_input_ids"] = batch[f"{side}_input_ids"][i][keep].tolist()
            row[f"{side}_labels"] = batch[f"{side}_labels"][i][keep].tolist()
        rows.append(row)
    return PairCollator()(rows)


@pytest.fixture(scope="module")
def tiny_model_and_rows(tiny_random_path: str) -> tuple[Any, Any, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.data.load import resolve_path

    tokenizer = AutoTokenizer.from_pretrained(tiny_random_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_random_path, dtype=torch.float32)
    model.train(False)
    lines = Path(resolve_path("embedded:train.jsonl")).read_text(encoding="utf-8").splitlines()[:4]
    return model, tokenizer, Dataset.from_list([{k: json.loads(line)[k] for k in PAIR_COLUMNS} for line in lines])


@pytest.mark.parametrize(
    ("variant", "cpo_alpha", "label_smoothing"),
    [
        (CpoVariant.sigmoid, 1.0, 0.0),
        (CpoVariant.sigmoid, 0.0, 0.2),
        (CpoVariant.hinge, 0.0, 0.0),
        (CpoVariant.ipo, 0.5, 0.0),
        (CpoVariant.simpo, 0.0, 0.0),
        (CpoVariant.simpo, 1.0, 0.1),
    ],
)
def test_loss_equals_trl_cpo_trainer(
    tiny_model_and_rows: tuple[Any, Any, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variant: CpoVariant,
    cpo_alpha: float,
    label_smoothing: float,
) -> None:
    """Same model, same pairs as TRL tokenises them: TRL's ``compute_loss`` equals ours (fp32, ~1e-5)."""
    monkeypatch.setitem(os.environ, "TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    model, tokenizer, dataset = tiny_model_and_rows
    hyper = {"beta": 0.3, "cpo_alpha": cpo_alpha, "label_smoothing": label_smoothing}
    args = CPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        loss_type=variant.value,
        simpo_gamma=0.4,
        max_length=256,
        report_to=[],
        use_cpu=True,
        **hyper,
    )
    trainer = CPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        theirs = float(trainer.compute_loss(model, batch))
        policy = sequence_logps(model, packed_from_trl(batch))
        out = cpo_loss(policy, loss_type=variant, simpo_gamma=0.4, **hyper)
        ours = float(total_loss(out, policy, PairCounts.of(policy)))
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-5)


# --- a run on the tiny random Llama ----------------------------------------------------------------------------


def test_run_trains_and_evaluates(compose: Any, tmp_path: Path) -> None:
    metrics = run_method(cpo.run, compose, tmp_path, [*TINY_DEMO_PAIRS, "method=cpo", "method.loss_type=simpo"])
    assert math.isfinite(metrics["train_loss"])
    assert math.isfinite(metrics["eval_loss"])
    assert "eval_rewards/accuracies" in metrics
