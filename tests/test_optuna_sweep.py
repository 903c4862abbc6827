"""Optuna sweeps (``hydra/sweeper=optuna``): ``launch.py`` returns the named objective, and a real study runs.

The study runs ``conf/experiment/optuna_smpo.yaml`` itself (``hydra.mode: MULTIRUN``, no ``-m``) on the tiny model
with Hydra's basic launcher: three trials one after another in one subprocess. The same sweep through
``hydra/launcher=slurm_local`` returns the same values (submitit hands each job's return value back); that was
checked by hand on the local cluster (README "Optuna sweeps") and is not repeated here to keep CI short.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from alignment.redact import job_number
from alignment.runner import ObjectiveNotFoundError, objective_value
from tests.conftest import launch

METRICS = {"train_loss": 2.5, "eval_loss": 2.0, "eval_rewards/accuracies": 0.75}


def test_the_named_objective_is_returned() -> None:
    assert objective_value(METRICS, "eval_rewards/accuracies") == 0.75
    assert objective_value(METRICS, "train_loss") == 2.5


def test_without_an_objective_eval_loss_then_train_loss_then_nothing() -> None:
    assert objective_value(METRICS, None) == 2.0
    assert objective_value({"train_loss": 2.5}, None) == 2.5
    assert objective_value({"dedup/rows_kept": 10.0}, None) is None


def test_no_metrics_return_nothing_whatever_the_objective() -> None:
    """``plan=true`` and the non-first nodes of a multi-node job return no metrics; the launcher reads node 0's."""
    assert objective_value({}, "eval_rewards/accuracies") is None


def test_a_missing_objective_names_the_metrics_the_run_has() -> None:
    with pytest.raises(ObjectiveNotFoundError) as caught:
        objective_value(METRICS, "eval_accuracy")
    assert str(caught.value) == (
        "objective='eval_accuracy' is not among the run's final metrics (results.json); it has: eval_loss, "
        "eval_rewards/accuracies, train_loss"
    )


@pytest.mark.slow
def test_a_three_trial_study_of_the_example_experiment(tmp_path: Path) -> None:
    """Three trials ran; ``optimization_results.yaml`` names the best trial's parameters and its metric."""
    objective = "eval_rewards/margins"  # continuous: three trials do not tie
    result = launch(
        [
            "experiment=optuna_smpo",
            "model=tiny_random",
            "data=debug/smpo",
            "data.num_train_samples=8",
            "data.max_eval_samples=4",
            "method.max_steps=1",
            "method.per_device_train_batch_size=8",
            "logger=none",
            f"objective={objective}",
            "hydra.sweeper.n_trials=3",
            "hydra.sweep.dir=sweep",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    sweep = tmp_path / "sweep"
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: job_number(p.name) or 0)
    assert [job_number(j.name) for j in jobs] == [0, 1, 2]
    trials = []
    for job in jobs:
        value = json.loads((job / "results.json").read_text(encoding="utf-8"))[objective]
        method = yaml.safe_load((job / "config.yaml").read_text(encoding="utf-8"))["method"]
        assert method["name"] == "smpo"
        assert method["max_steps"] == 1
        # the folder is named by the trial's overrides (objective and logger left out, data=debug/smpo flat)
        assert job.name.startswith(
            f"{job_number(job.name)}_data.max_eval_samples-4+data.num_train_samples-8+data-debug_smpo+"
            f"experiment-optuna_smpo+method.beta-{method['beta']}+method.learning_rate-{method['learning_rate']}+"
        ), job.name
        trials.append((value, {"method.beta": method["beta"], "method.learning_rate": method["learning_rate"]}))
    assert all(math.isfinite(value) for value, _ in trials)
    assert len({tuple(params.values()) for _, params in trials}) == 3  # three different points were tried
    best_value, best_params = max(trials, key=lambda trial: trial[0])  # the experiment's direction: maximize
    study = yaml.safe_load((sweep / "optimization_results.yaml").read_text(encoding="utf-8"))
    assert study["name"] == "optuna"
    assert study["best_value"] == best_value
    assert study["best_params"] == pytest.approx(best_params, rel=1e-12)
    assert 0.5 <= best_params["method.beta"] <= 4.0
    assert 1e-6 <= best_params["method.learning_rate"] <= 1e-4
