"""The step-normalised trainer base and its token-budget batching, on a one-weight linear model on CPU.

The subclass here counts, per micro-batch, its rows and the sum of their ``w`` column, and its loss is
``sum(w * (a * x - y)^2) / step_rows``: a mean over the rows of the whole optimizer step, whatever the split into
micro-batches. With plain SGD (lr 1, no clipping) the weight moves by exactly its gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import transformers
from datasets import Dataset

from alignment.training.trainer import StepNormalisedTrainer, TokenBudgetBatchSampler
from tests.methods.helpers import sgd_step_args

LENGTHS = [30, 5, 12, 70, 8, 8, 25, 40, 3, 19]
ROWS = [{"idx": i, "x": float(i + 1), "y": 1.0, "w": float(i % 3 + 1), "length": n} for i, n in enumerate(LENGTHS)]


class Window(NamedTuple):
    """The step's rows and summed ``w``."""

    rows: float
    weight: float


class Linear(torch.nn.Module):
    """``a * x`` with one weight ``a = 0.5``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * x


def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack the columns of the rows (dataset order kept in ``idx``)."""
    return {key: torch.tensor([row[key] for row in rows]) for key in ("idx", "x", "y", "w")}


class RowTrainer(StepNormalisedTrainer):
    """A minimal subclass: counts rows and ``w``, weighted squared error over the step's rows, fixed metrics."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.windows: list[Any] = []
        self.modes: list[str] = []

    def step_counts(self, batch: Mapping[str, Any]) -> Sequence[float]:
        return (float(len(batch["idx"])), float(batch["w"].sum()))

    def step_window(self, counts: Sequence[float]) -> Window:
        return Window(*counts)

    def train_lengths(self) -> Sequence[int]:
        return list(self.train_dataset["length"])

    def logged_metrics(self, mode: str) -> dict[str, float]:
        self.modes.append(mode)
        return {"accuracy": 0.5 if mode == "train" else 0.25}

    def compute_loss(
        self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        self.windows.append(num_items_in_batch)
        errors = inputs["w"] * (model(inputs["x"]) - inputs["y"]) ** 2
        loss = self.scale_for_ranks(errors.sum() / num_items_in_batch.rows, training=model.training)
        return (loss, {}) if return_outputs else loss


def _trainer(out: Path, rows: list[dict[str, Any]] = ROWS, **overrides: Any) -> RowTrainer:
    budget = overrides.pop("max_tokens_per_batch", None)
    return RowTrainer(
        model=Linear(),
        args=sgd_step_args(out, **overrides),
        train_dataset=Dataset.from_list(rows),
        data_collator=collate,
        max_tokens_per_batch=budget,
    )


# --- token-budget batching -----------------------------------------------------------------------------------


def test_token_budget_sampler_covers_every_pair_once_within_the_budget() -> None:
    lengths = [30, 5, 12, 70, 8, 8, 25, 40, 3, 19]
    sampler = TokenBudgetBatchSampler(lengths, budget=50, seed=3)
    batches = sampler.batches()
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        # a pair over the budget (70) trains alone; every other micro-batch stays within it
        assert len(batch) == 1 or sum(lengths[i] for i in batch) <= 50
    assert [3] in batches
    assert batches == TokenBudgetBatchSampler(lengths, budget=50, seed=3).batches()  # seeded
    assert len(sampler) == len(batches) == len(list(sampler))
    sampler.set_epoch(1)
    assert sampler.batches() != batches  # a new order each epoch
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        TokenBudgetBatchSampler(lengths, budget=0, seed=0)


def test_token_budget_sampler_fills_micro_batches_greedily_in_the_shuffled_order() -> None:
    # Equal lengths of 10 under a budget of 25: every micro-batch holds two items, the last one the odd item out.
    sampler = TokenBudgetBatchSampler([10] * 5, budget=25, seed=0)
    order = torch.randperm(5, generator=torch.Generator().manual_seed(0)).tolist()
    assert sampler.batches() == [order[0:2], order[2:4], order[4:5]]


def _loaded_indices(trainer: RowTrainer) -> list[list[int]]:
    return [batch["idx"].tolist() for batch in trainer.get_train_dataloader()]


def test_token_budget_dataloader_only_with_max_tokens_per_batch(tmp_path: Path) -> None:
    fixed = _loaded_indices(_trainer(tmp_path, per_device_train_batch_size=4))
    assert [len(batch) for batch in fixed] == [4, 4, 2]  # per_device_train_batch_size rows, shuffled
    assert sorted(i for batch in fixed for i in batch) == list(range(len(ROWS)))

    budgeted = _loaded_indices(_trainer(tmp_path, per_device_train_batch_size=4, max_tokens_per_batch=50, seed=3))
    assert budgeted == TokenBudgetBatchSampler(LENGTHS, budget=50, seed=3).batches()
    assert [len(batch) for batch in budgeted] != [4, 4, 2]


# --- the step's counts ---------------------------------------------------------------------------------------


def test_num_items_in_batch_sums_step_counts_over_micro_batches(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    micro_batches = [collate(ROWS[0:2]), collate(ROWS[2:5])]  # w = (1, 2) and (3, 1, 2)
    window = trainer._get_num_items_in_batch(micro_batches, torch.device("cpu"))
    assert window == Window(rows=5.0, weight=9.0)
    assert isinstance(window, Window)


def test_base_step_window_is_the_tuple_of_counts(tmp_path: Path) -> None:
    assert StepNormalisedTrainer.step_window(_trainer(tmp_path), [5.0, 9.0]) == (5.0, 9.0)


def test_num_items_in_batch_sums_over_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _trainer(tmp_path)
    monkeypatch.setattr(type(trainer.args), "world_size", property(lambda self: 2))
    # A second rank that saw 3 rows with w summing to 4.
    monkeypatch.setattr(trainer.accelerator, "gather", lambda t: torch.cat([t, torch.tensor([[3.0, 4.0]])]))
    window = trainer._get_num_items_in_batch([collate(ROWS[0:2]), collate(ROWS[2:5])], torch.device("cpu"))
    assert window == Window(rows=8.0, weight=13.0)


def test_every_micro_batch_of_a_step_gets_the_step_window(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer.train()
    # Two micro-batches of 2 rows; both see the 4 rows of the step (w sums differ with the shuffle, but agree).
    assert [window.rows for window in trainer.windows] == [4.0, 4.0]
    assert trainer.windows[0] == trainer.windows[1]


def _step(out: Path, micro: int, accumulation: int) -> float:
    trainer = _trainer(
        out, ROWS[:4], per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation, seed=0
    )
    trainer.train()
    return float(trainer.model.a.detach())


def test_grad_accumulation_1x4_equals_4x1(tmp_path: Path) -> None:
    """One SGD step over rows x = 1..4, y = 1, w = 1, 2, 3, 1 from a = 0.5.

    d/da of sum(w (a x - 1)^2) / 4 = sum(2 w x (a x - 1)) / 4 = 2 (1*1*-0.5 + 2*2*0 + 3*3*0.5 + 1*4*1) / 4 = 4.
    """
    one_by_four = _step(tmp_path / "a", micro=1, accumulation=4)
    four_by_one = _step(tmp_path / "b", micro=4, accumulation=1)
    assert four_by_one == pytest.approx(0.5 - 4.0)
    assert one_by_four == pytest.approx(four_by_one, abs=1e-6)


# --- ranks and logging ---------------------------------------------------------------------------------------


def test_scale_for_ranks_multiplies_only_training_losses_with_several_ranks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = _trainer(tmp_path)
    loss = torch.tensor(1.5)
    assert trainer.scale_for_ranks(loss, training=True).item() == 1.5  # one rank
    assert trainer.scale_for_ranks(loss, training=False).item() == 1.5
    monkeypatch.setattr(type(trainer.args), "world_size", property(lambda self: 2))
    assert trainer.scale_for_ranks(loss, training=True).item() == 3.0
    assert trainer.scale_for_ranks(loss, training=False).item() == 1.5  # evaluation is per rank


def test_log_adds_the_metrics_of_the_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _trainer(tmp_path)
    reached: list[dict[str, float]] = []
    monkeypatch.setattr(transformers.Trainer, "log", lambda self, logs, start_time=None: reached.append(dict(logs)))
    trainer.log({"loss": 1.0})
    trainer.log({"eval_loss": 2.0})
    assert reached == [{"loss": 1.0, "accuracy": 0.5}, {"eval_loss": 2.0, "eval_accuracy": 0.25}]
    assert trainer.modes == ["train", "eval"]


def test_the_default_logged_metrics_add_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _trainer(tmp_path)
    monkeypatch.setattr(RowTrainer, "logged_metrics", StepNormalisedTrainer.logged_metrics)
    reached: list[dict[str, float]] = []
    monkeypatch.setattr(transformers.Trainer, "log", lambda self, logs, start_time=None: reached.append(dict(logs)))
    trainer.log({"loss": 1.0})
    assert reached == [{"loss": 1.0}]
