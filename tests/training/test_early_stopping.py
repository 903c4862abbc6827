"""Early stopping and the best model (``method.early_stopping_*``, ``metric_for_best_model``, ``load_best_*``).

Settings that cannot work fail when the config is converted, before anything loads. The callback is checked on
hand-fed evaluations (threshold, a missing metric, the count carried through a resume), and one DPO run on the
tiny random Llama shows the whole path: its eval set is the train pair swapped, so the eval loss rises with every
step, and training stops long before ``max_steps`` with the best checkpoint's weights saved.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerControl, TrainerState, TrainingArguments

from alignment.config import to_run_config
from alignment.context import RunContext
from alignment.distributed import DistributedConfig
from alignment.methods.pairwise import dpo
from alignment.methods.sft import SftConfig
from alignment.training.arguments import training_args, training_kwargs
from alignment.training.callbacks import EarlyStopping, SampleGenerationCallback
from tests.methods.helpers import pair_row, read_logs, run_method, write_jsonl

TINY = ["model=tiny_random", "logger=none"]  # method=sft, the default
STOPPING = ["method.early_stopping_patience=2"]
BEST = ["method.load_best_model_at_end=true"]
EVERY_STEP = ["method.eval_steps=1", "method.save_steps=1"]

# --- config-time checks -------------------------------------------------------------------------------------------

REJECTED = {
    "no eval strategy": (
        [*STOPPING, "method.eval_strategy=no"],
        "method.early_stopping_patience=2 compares evaluations, but method.eval_strategy=no",
    ),
    "no eval split": (
        [*STOPPING, "data.sources=[{path: 'embedded:train.jsonl'}]", "data.eval_fraction=0"],
        "method.early_stopping_patience=2 compares evaluations, but there is no eval split (data.eval_fraction=0",
    ),
    "no checkpoints": (
        [*BEST, *EVERY_STEP, "method.save_strategy=no"],
        "method.save_strategy=no must equal method.eval_strategy=steps",
    ),
    # The defaults: evaluate every quarter of the run, save every 500 steps.
    "fraction and count": (
        BEST,
        "method.save_steps=500 and method.eval_steps=0.25: one is a step count, the other a fraction of the run",
    ),
    "not a multiple": (
        [*BEST, "method.eval_steps=2", "method.save_steps=3"],
        "save_steps must be a multiple of eval_steps (e.g. method.save_steps=2)",
    ),
    "fractions, not a multiple": (
        [*BEST, "method.eval_steps=0.2", "method.save_steps=0.5"],
        "save_steps must be a multiple of eval_steps",
    ),
}


@pytest.mark.parametrize("case", REJECTED, ids=list(REJECTED))
def test_settings_that_cannot_work_fail_at_conversion(compose: Any, case: str) -> None:
    overrides, message = REJECTED[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        to_run_config(compose([*TINY, *overrides]))


@pytest.mark.parametrize(
    "overrides",
    [
        [*STOPPING],  # early stopping alone needs no checkpoints
        [*BEST, "method.eval_steps=0.25", "method.save_steps=0.5"],
        [*BEST, "method.eval_steps=0.1", "method.save_steps=0.3"],  # 0.3 / 0.1 is not exact in binary floats
        [*BEST, "method.eval_strategy=epoch", "method.save_strategy=epoch"],
        [*BEST, "method.eval_steps=2", "method.save_steps=6"],
    ],
)
def test_settings_that_work_convert(compose: Any, overrides: list[str], tmp_path: Path) -> None:
    run = to_run_config(compose([*TINY, *overrides]))
    training_args(run, RunContext(tmp_path, "r", None), evaluation=True)  # HF accepts them too


def test_training_args_without_an_eval_split_refuse_early_stopping(compose: Any, tmp_path: Path) -> None:
    """The config promised an eval split the data did not give (e.g. one train row, nothing to hold out)."""
    run = to_run_config(compose([*TINY, *STOPPING]))
    with pytest.raises(ValueError, match="there is no eval split"):
        training_args(run, RunContext(tmp_path, "r", None), evaluation=False)


@pytest.mark.parametrize(
    ("settings", "metric", "greater"),
    [
        ({}, None, None),  # off: HF's defaults
        ({"early_stopping_patience": 3}, "eval_loss", False),
        ({"load_best_model_at_end": True}, "eval_loss", False),
        ({"early_stopping_patience": 3, "metric_for_best_model": "eval_exact_match"}, "eval_exact_match", True),
        ({"early_stopping_patience": 3, "metric_for_best_model": "loss", "greater_is_better": True}, "loss", True),
    ],
)
def test_the_compared_metric_and_its_direction(settings: dict[str, Any], metric: str | None, greater: Any) -> None:
    kwargs = training_kwargs(SftConfig(**settings), DistributedConfig(), output_dir="o", seed=0, run_name="r")
    args = TrainingArguments(**{**kwargs, "use_cpu": True, "eval_strategy": "epoch", "save_strategy": "epoch"})
    assert (args.metric_for_best_model, args.greater_is_better) == (metric, greater)
    assert args.load_best_model_at_end is settings.get("load_best_model_at_end", False)


# --- the callback on hand-fed evaluations -------------------------------------------------------------------------


class _Trainer:
    """What the callback needs of a trainer: somewhere to log."""

    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []

    def log(self, logs: dict[str, float]) -> None:
        self.logged.append(logs)


def _evaluate(callback: EarlyStopping, args: Any, state: TrainerState, value: float) -> TrainerControl:
    """One evaluation during training: the callback sees it, then HF's best-metric update runs (lower is better)."""
    control = TrainerControl()
    state.global_step += 1
    callback.on_evaluate(args, state, control, metrics={"eval_loss": value, "eval_runtime": 0.1})
    if state.best_metric is None or value < state.best_metric:
        state.best_metric = value
    return control


def test_threshold_counts_small_improvements_as_none(tmp_path: Path) -> None:
    """Patience 2, threshold 0.1: 1.0 sets the best; 0.95 and 0.92 improve by less than 0.1, so training stops."""
    args = TrainingArguments(str(tmp_path), metric_for_best_model="eval_loss", greater_is_better=False, use_cpu=True)
    trainer = _Trainer()
    callback = EarlyStopping(trainer, patience=2, threshold=0.1)
    state = TrainerState(max_steps=10)
    assert not _evaluate(callback, args, state, 1.0).should_training_stop
    assert not _evaluate(callback, args, state, 0.95).should_training_stop  # 0.05 better: not enough
    assert callback.early_stopping_patience_counter == 1
    assert _evaluate(callback, args, state, 0.92).should_training_stop
    assert (callback.stopped_at, trainer.logged) == (3, [{"early_stopping/stopped": 1.0}])


def test_threshold_zero_counts_any_improvement(tmp_path: Path) -> None:
    args = TrainingArguments(str(tmp_path), metric_for_best_model="eval_loss", greater_is_better=False, use_cpu=True)
    callback = EarlyStopping(_Trainer(), patience=1, threshold=0.0)
    state = TrainerState(max_steps=10)
    for value in (1.0, 0.99, 0.98):
        assert not _evaluate(callback, args, state, value).should_training_stop
    assert _evaluate(callback, args, state, 0.98).should_training_stop  # equal is no improvement


def test_a_missing_metric_is_an_error_naming_the_ones_there(tmp_path: Path) -> None:
    """HF's callback only warns and never stops; a misspelt metric must not train to the end silently."""
    args = TrainingArguments(str(tmp_path), metric_for_best_model="exact_match", use_cpu=True)
    callback = EarlyStopping(_Trainer(), patience=1, threshold=0.0)
    with pytest.raises(
        ValueError, match=r"'exact_match': this evaluation has no 'eval_exact_match' \(it has eval_loss\)"
    ):
        callback.on_evaluate(args, TrainerState(), TrainerControl(), metrics={"eval_loss": 1.0})


def test_a_resumed_run_keeps_the_count_of_evaluations_without_improvement(tmp_path: Path) -> None:
    args = TrainingArguments(
        str(tmp_path), metric_for_best_model="eval_loss", eval_strategy="steps", eval_steps=1, use_cpu=True
    )
    first = EarlyStopping(_Trainer(), patience=3, threshold=0.0)
    state = TrainerState(max_steps=10, stateful_callbacks=[first])
    first.on_train_begin(args, state, TrainerControl())
    for value in (1.0, 1.1, 1.2):  # the best, then two evaluations without improvement
        _evaluate(first, args, state, value)
    state.stateful_callbacks["EarlyStopping"] = first.state()  # what HF's checkpoint save writes
    state.save_to_json(str(tmp_path / "trainer_state.json"))
    saved = TrainerState.load_from_json(str(tmp_path / "trainer_state.json"))
    resumed = EarlyStopping(_Trainer(), patience=3, threshold=0.0)
    resumed.on_train_begin(args, saved, TrainerControl())
    assert resumed.early_stopping_patience_counter == 2
    assert _evaluate(resumed, args, saved, 1.3).should_training_stop


# --- a run --------------------------------------------------------------------------------------------------------


def test_dpo_stops_early_and_saves_the_best_checkpoint(
    compose: Any, tmp_path: Path, tiny_random_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Patience 2 with an evaluation and a checkpoint at every step, at most 10 steps, on an adversarial eval set.

    Every train row is one pair (``apple`` over ``zebra``) and every eval row the same pair swapped, so the eval
    loss is the train loss at the opposite margin: -log sigmoid(-beta m) rises with every step that raises the
    train margin m (0.693 at the start; 0.775, 0.814, 0.837 after steps 1-3 on this seed). The evaluation at the
    start has no checkpoint, so step 1 is the best; steps 2 and 3 are worse, and training stops after step 3.
    ``model/`` then holds checkpoint-1's weights, not the last step's.
    """
    monkeypatch.setenv("ALIGNMENT_CACHE_DIR", str(tmp_path / "cache"))  # precomputed reference log-probs
    train = write_jsonl(tmp_path / "train.jsonl", [pair_row("Name a fruit.", "apple", "zebra")] * 4)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [pair_row("Name a fruit.", "zebra", "apple")])
    out = tmp_path / "run"
    metrics = run_method(
        dpo.run,
        compose,
        out,
        [
            "model=tiny_random",
            f"model.name_or_path='{tiny_random_path}'",  # built in the session's cache, not in this test's
            "logger=none",
            "method=dpo",
            f"data.sources=[{{path: '{train}', eval_path: '{evaluation}'}}]",
            "method.max_steps=10",
            "method.per_device_train_batch_size=2",
            "method.learning_rate=1e-3",
            "method.logging_steps=1",
            *EVERY_STEP,
            *STOPPING,
            *BEST,
        ],
    )
    logs = read_logs(out)
    evals = {e["step"]: e["eval_loss"] for e in logs if "eval_loss" in e}
    assert list(evals) == [0, 1, 2, 3]
    assert evals[0] == pytest.approx(math.log(2))  # margin 0 before training
    assert evals[0] < evals[1] < evals[2] < evals[3]
    assert max(e["step"] for e in logs) == 3 < 10
    assert [e["step"] for e in logs if "early_stopping/stopped" in e] == [3]
    assert metrics["train/global_step"] == 3
    assert metrics["early_stopping/stopped"] == 1.0
    assert (metrics["best/global_step"], metrics["best/eval_loss"]) == (1.0, evals[1])
    assert metrics["eval_loss"] == evals[1]  # the saved model's evaluation, not the last step's

    saved = load_file(out / "model" / "model.safetensors")
    best = load_file(out / "checkpoints" / "checkpoint-1" / "model.safetensors")
    last = load_file(out / "checkpoints" / "checkpoint-3" / "model.safetensors")
    assert saved.keys() == best.keys()
    assert all(torch.equal(saved[k], best[k]) for k in saved)
    assert not all(torch.equal(saved[k], last[k]) for k in saved)


def test_sample_generations_give_early_stopping_their_exact_match(tiny_random_path: str, tmp_path: Path) -> None:
    """``eval_exact_match`` joins the evaluation's metrics, so ``metric_for_best_model=eval_exact_match`` works."""
    from alignment.data.chat_template import EvalPrompt
    from alignment.loggers import LoggerConfig
    from tests.methods.helpers import tiny_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_random_path)
    prompts = [EvalPrompt("a.jsonl:1", "Say nothing.", "certainly not this")]
    samples = SampleGenerationCallback(
        prompts, tokenizer, RunContext(tmp_path, "r", None), LoggerConfig(), max_new_tokens=2, batch_size=1
    )
    metrics = {"eval_loss": 1.0}
    args = TrainingArguments(str(tmp_path), use_cpu=True)
    samples.on_evaluate(args, TrainerState(), TrainerControl(), model=tiny_model(tiny_random_path), metrics=metrics)
    assert metrics == {"eval_loss": 1.0, "eval_exact_match": 0.0}
