"""ORPO: hand-computed odds-ratio values, the small-probability limit, stability, TRL equality, and a tiny run.

Mean log-probs are chosen as logs of simple probabilities p, so odds p/(1 - p) are exact: p = 0.5 -> odds 1,
p = 0.2 -> odds 0.25. The per-pair loss is ``-beta * log sigmoid(log_odds) = beta * softplus(-log_odds)``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from alignment.methods.pairwise import orpo
from alignment.methods.pairwise.core import PairCollator, PairCounts, PairLogps, sequence_logps, total_loss
from alignment.methods.pairwise.orpo import log1mexp, log_odds_ratio, orpo_loss
from tests.methods.helpers import TINY_DEMO_PAIRS, mean_logps, run_method

LOG_HALF, LOG_FIFTH = math.log(0.5), math.log(0.2)


PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def means(chosen: list[float], rejected: list[float]) -> PairLogps:
    """Pairs whose mean log-probs are the given values: sums over 3 chosen and 2 rejected tokens."""
    return mean_logps(chosen, rejected, chosen_tokens=3, rejected_tokens=2)


def test_values() -> None:
    # (p_w, p_l) = (0.5, 0.2): log_odds = log 1 - log 0.25 = 1.3862944 -> 0.1 * softplus(-1.386) = 0.1 * log 1.25
    #   = 0.0223144;  (0.2, 0.5): log_odds = -1.3862944 -> 0.1 * log 5 = 0.1609438;  equal: 0.1 * log 2 = 0.0693147.
    policy = means([LOG_HALF, LOG_FIFTH, LOG_FIFTH], [LOG_FIFTH, LOG_HALF, LOG_FIFTH])
    out = orpo_loss(policy, beta=0.1)
    assert out.per_pair_loss.detach().tolist() == pytest.approx([0.0223144, 0.1609438, 0.0693147], abs=1e-7)
    assert out.metrics["log_odds_chosen"] == pytest.approx(0.0, abs=1e-6)  # mean of 1.386, -1.386 and 0
    # log_odds_ratio is mean log sigmoid(log_odds) = -(mean per-pair loss) / beta.
    assert out.metrics["log_odds_ratio"] == pytest.approx(-(0.0223144 + 0.1609438 + 0.0693147) / 3 / 0.1, abs=1e-5)
    # Rewards are beta times the mean log-probs.
    assert out.chosen_reward.tolist() == pytest.approx([0.1 * LOG_HALF, 0.1 * LOG_FIFTH, 0.1 * LOG_FIFTH])


def test_total_is_chosen_nll_plus_odds_term() -> None:
    # Chosen NLL (token mean) = -(3 log 0.5 + 3 log 0.2) / 6 = (0.6931472 + 1.6094379) / 2 = 1.1512925.
    policy = means([LOG_HALF, LOG_FIFTH], [LOG_FIFTH, LOG_HALF])
    out = orpo_loss(policy, beta=0.1)
    assert (out.chosen_nll_weight, out.rejected_nll_weight) == (1.0, 0.0)
    loss = float(total_loss(out, policy, PairCounts.of(policy)).detach())
    assert loss == pytest.approx(1.1512925 + (0.0223144 + 0.1609438) / 2, abs=1e-6)


def test_small_probability_limit_is_sigmoid_on_mean_logps() -> None:
    # p -> 0: log(1 - p) -> 0, so log_odds -> mean_w - mean_l. Means -40 and -41: log_odds = 1 (to ~1e-17),
    # loss = 0.1 * softplus(-1) = 0.0313262.
    out = orpo_loss(means([-40.0], [-41.0]), beta=0.1)
    assert out.per_pair_loss.detach().tolist() == pytest.approx([0.0313262], abs=1e-7)


def test_log1mexp_is_stable_and_matches_trl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(os.environ, "TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp

    x = torch.tensor([-1e-9, -1e-4, -0.5, -math.log(2), -0.9, -5.0, -60.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-6)
    assert torch.equal(log1mexp(x), trl_log1mexp(x))
    # Near p = 1 the naive form cancels in fp32; ours stays finite with a finite gradient.
    near_one = torch.tensor([-1e-7], requires_grad=True)
    log_odds_ratio(near_one, torch.tensor([-1.0])).sum().backward()
    assert near_one.grad is not None
    assert torch.isfinite(near_one.grad).all()


def test_finite_gradients() -> None:
    policy = means([-0.01, -2.0, -30.0], [-0.02, -0.5, -1e-4])
    out = orpo_loss(policy, beta=0.1)
    total_loss(out, policy, PairCounts.of(policy)).backward()
    for grad in (policy.chosen.grad, policy.rejected.grad):
        assert grad is not None
        assert torch.isfinite(grad).all()


# --- equality with TRL's experimental ORPOTrainer --------------------------------------------------------------------


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


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_loss_equals_trl_orpo_trainer(
    tiny_random_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, beta: float
) -> None:
    """Same model, same pairs as TRL tokenises them: TRL's odds-ratio term and metrics equal ours (fp32, ~1e-5).

    TRL's NLL also covers the prompt tokens (ours covers the completion only), so the comparison takes TRL's total
    minus the ``nll_loss`` it logs.
    """
    monkeypatch.setitem(os.environ, "TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from alignment.data.load import resolve_path

    tokenizer = AutoTokenizer.from_pretrained(tiny_random_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_random_path, dtype=torch.float32)
    model.train(False)
    lines = Path(resolve_path("embedded:train.jsonl")).read_text(encoding="utf-8").splitlines()[:4]
    dataset = Dataset.from_list([{k: json.loads(line)[k] for k in PAIR_COLUMNS} for line in lines])
    args = ORPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, beta=beta, max_length=256, report_to=[], use_cpu=True
    )
    trainer = ORPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        theirs_total = float(trainer.compute_loss(model, batch))
        policy = sequence_logps(model, packed_from_trl(batch))
        out = orpo_loss(policy, beta=beta)
    logged = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
    assert float(out.per_pair_loss.mean()) == pytest.approx(theirs_total - logged["nll_loss"], rel=1e-5, abs=1e-6)
    assert out.metrics["log_odds_ratio"] == pytest.approx(logged["log_odds_ratio"], rel=1e-5, abs=1e-6)
    assert out.metrics["log_odds_chosen"] == pytest.approx(logged["log_odds_chosen"], rel=1e-5, abs=1e-6)
    assert float(out.chosen_reward.mean()) == pytest.approx(logged["rewards/chosen"], rel=1e-5)
    assert float(out.rejected_reward.mean()) == pytest.approx(logged["rewards/rejected"], rel=1e-5)


def test_run_trains_and_evaluates(compose: Any, tmp_path: Path) -> None:
    metrics = run_method(orpo.run, compose, tmp_path, [*TINY_DEMO_PAIRS, "method=orpo"])
    assert math.isfinite(metrics["train_loss"])
    assert math.isfinite(metrics["eval_loss"])
    assert "eval_log_odds_ratio" in metrics
