"""Resume: a run killed after a checkpoint and rerun into its directory ends with an uninterrupted run's books.

Every run goes through the runner's :func:`~alignment.runner.execute` (which writes ``results.json``), on the tiny
random Llama, 3 steps, a checkpoint every 2. A kill is an exception raised from inside the training loop (after
step 3 was logged, or at a point of HF's checkpoint write); the rerun resumes as the runner does
(:func:`~alignment.launch.preemption.with_resume`).

Timing fields (``*_runtime``, ``*_per_second``) differ between any two runs and are left out of the equality;
``train_runtime`` must cover the whole run, so it is at least the killed attempt's training time up to its
checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import alignment.training.checkpoint as checkpoint
from alignment.config import RunConfig, to_run_config
from alignment.context import RunContext
from alignment.launch.preemption import with_resume
from alignment.runner import execute
from alignment.task import MethodConfig

COMMON = [
    "logger=none",
    "method.max_steps=3",
    "method.save_steps=2",
    "method.eval_steps=2",
    "method.logging_steps=1",
    "method.learning_rate=1e-3",
    "method.warmup_steps=1",
    "method.per_device_train_batch_size=2",
    "method.per_device_eval_batch_size=4",
    "data.num_train_samples=12",  # drawn from the one source (sampling_weight), so a few rows are read
    "data.max_eval_samples=4",
]


def _demo(name: str) -> str:
    """The embedded demo files ``<name>train.jsonl`` / ``<name>test.jsonl``, of which 12 train rows are drawn."""
    source = f"path: 'embedded:{name}train.jsonl', eval_path: 'embedded:{name}test.jsonl', sampling_weight: 1"
    return f"data.sources=[{{{source}}}]"


CASES = {
    # Logging every 3 steps: the checkpoint at step 2 falls inside a logging window. Evaluates at the start and at
    # steps 2 and 3, and generates samples at every evaluation; TRL counts num_tokens.
    "sft": [
        "method=sft",
        _demo(""),
        "method.logging_steps=3",
        "method.num_generation_samples=2",
        "method.max_new_tokens=4",
    ],
    "dpo_precomputed": ["method=dpo", _demo(""), "method.reference=precomputed", "method.max_length=128"],
    "smpo": ["method=smpo", _demo(""), "method.max_length=128"],  # the margin schedule follows the global step
    "gpo": ["method=gpo", _demo("gpo_"), "method.max_length=128"],
    "reward": ["method=reward", _demo("reward_"), "method.max_length=128"],
}
TIMING = ("_runtime", "_per_second")
KILL_STEP = 3


class KilledError(Exception):
    """Stands for kill -9: the process ends where it is, nothing after it runs."""


class KillAfterLog(TrainerCallback):
    """Ends the run right after step ``step`` was logged (and written to ``metrics.jsonl``); times the run."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.began = 0.0
        self.saved: dict[int, float] = {}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.began = time.time()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.saved[state.global_step] = time.time() - self.began

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.global_step == self.step and "loss" in (kw.get("logs") or {}):
            raise KilledError(f"killed after step {self.step}")


@pytest.fixture
def add_callback(monkeypatch: pytest.MonkeyPatch) -> Callable[[TrainerCallback], None]:
    """Add a callback to the trainer of the next runs (each method's ``run`` imports ``train_and_save`` at call)."""
    real = checkpoint.train_and_save
    extra: list[TrainerCallback] = []

    def with_extra(trainer: Any, **kwargs: Any) -> dict[str, float]:
        for callback in extra:
            trainer.add_callback(callback)
        return real(trainer, **kwargs)

    monkeypatch.setattr(checkpoint, "train_and_save", with_extra)
    return extra.append


@pytest.fixture
def tiny(compose: Any, tiny_random_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``tiny(overrides) -> RunConfig`` on the tiny random Llama, with a cache of this test's own."""
    monkeypatch.setenv("ALIGNMENT_CACHE_DIR", str(tmp_path / "cache"))  # precomputed reference log-probs

    def config(overrides: list[str]) -> RunConfig:
        return to_run_config(compose([f"model.name_or_path='{tiny_random_path}'", *COMMON, *overrides]))

    return config


def _ctx(out: Path) -> RunContext:
    return RunContext(output_dir=out, name=out.name, group=None)


def _resume(cfg: RunConfig, ctx: RunContext, expected: str) -> RunConfig:
    """What the runner does before executing a run in a directory that may hold an interrupted run."""
    method = with_resume(cfg.method, ctx)
    assert isinstance(method, MethodConfig)
    assert method.resume_from_checkpoint == str(ctx.checkpoint_dir / expected)
    return dataclasses.replace(cfg, method=method)


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def _assert_same_books(resumed: dict[str, Any], full: dict[str, Any], where: str) -> None:
    """The same keys, and equal values except the timing fields."""
    assert resumed.keys() == full.keys(), where
    for key, value in full.items():
        if not key.endswith(TIMING):
            assert resumed[key] == value, f"{where}: {key}"


def _weights(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted((out / "model").glob("*.safetensors")):
        tensors.update(load_file(path))
    assert tensors, f"no weights in {out / 'model'}"
    return tensors


def _assert_resumed_like_uninterrupted(resumed: Path, full: Path) -> dict[str, Any]:
    """``metrics.jsonl`` and ``results.json`` field by field (timing apart), weights and samples equal; the results."""
    full_records, resumed_records = _records(full), _records(resumed)
    assert [(r["step"], sorted(r)) for r in resumed_records] == [(r["step"], sorted(r)) for r in full_records]
    for index, (record, uninterrupted) in enumerate(zip(resumed_records, full_records, strict=True)):
        _assert_same_books(record, uninterrupted, f"metrics.jsonl line {index + 1}")
    assert all(r["grad_norm"] > 0 for r in full_records if "loss" in r), "every step moves the weights"
    results: dict[str, Any] = json.loads((resumed / "results.json").read_text(encoding="utf-8"))
    _assert_same_books(results, json.loads((full / "results.json").read_text(encoding="utf-8")), "results.json")
    full_weights, resumed_weights = _weights(full), _weights(resumed)
    assert resumed_weights.keys() == full_weights.keys()
    for name, value in full_weights.items():
        assert torch.equal(resumed_weights[name], value), name
    samples = {p.name: p.read_text(encoding="utf-8") for p in (full / "generations").glob("*.jsonl")}
    assert samples == {p.name: p.read_text(encoding="utf-8") for p in (resumed / "generations").glob("*.jsonl")}
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_books(
    case: str, tiny: Any, tmp_path: Path, add_callback: Callable[[TrainerCallback], None]
) -> None:
    """Kill after step 3 (checkpoint-2 on disk), rerun: metrics.jsonl, results.json and weights as uninterrupted."""
    cfg = tiny(CASES[case])
    full = tmp_path / "full"
    execute(cfg, _ctx(full), [])

    killed = _ctx(tmp_path / "killed")
    kill = KillAfterLog(KILL_STEP)
    add_callback(kill)
    with pytest.raises(KilledError):
        execute(cfg, killed, [])
    kill.step = -1  # the rerun runs to the end
    resumed_cfg = _resume(cfg, killed, "checkpoint-2")
    execute(resumed_cfg, killed, [])

    results = _assert_resumed_like_uninterrupted(killed.output_dir, full)
    assert results["train_runtime"] >= kill.saved[2], "train_runtime covers the killed attempt's steps too"


# HF's Trainer._save_checkpoint writes through these, in this order, then TrainerState.save_to_json.
SAVE_STAGES = ("save_model", "_save_optimizer_and_scheduler", "_save_scaler", "_save_rng_state")


@pytest.mark.slow
def test_a_kill_while_a_checkpoint_is_written_resumes_from_the_one_before(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A torn checkpoint-3 is never picked: a kill at any point of HF's write resumes from checkpoint-2.

    The killed attempt records the files of checkpoint-3 after each stage of HF's write and dies right after
    ``trainer_state.json``; from those lists every torn folder a kill can leave (the files of the stages done, the
    next file half written) is rebuilt beside a copy of checkpoint-2. The rerun in the killed directory (its
    ``trainer_state.json`` then cut in half) ends as the uninterrupted run.
    """
    cfg = tiny(CASES["reward"])
    full = tmp_path / "full"
    execute(cfg, _ctx(full), [])

    killed = _ctx(tmp_path / "killed")
    torn = killed.checkpoint_dir / "checkpoint-3"
    written: list[set[str]] = [set()]  # the files of checkpoint-3 after each stage of the write
    armed = [True]

    def recording(original: Callable[..., Any]) -> Callable[..., Any]:
        def stage(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(self, *args, **kwargs)
            state = self if isinstance(self, TrainerState) else self.state
            if armed[0] and state.global_step == 3:
                written.append({f.name for f in torn.iterdir()})
                if isinstance(self, TrainerState):
                    armed[0] = False
                    raise KilledError("killed right after trainer_state.json was written")
            return result

        return stage

    for name in SAVE_STAGES:
        monkeypatch.setattr(Trainer, name, recording(getattr(Trainer, name)))
    monkeypatch.setattr(TrainerState, "save_to_json", recording(TrainerState.save_to_json))
    with pytest.raises(KilledError):
        execute(cfg, killed, [])
    assert all(not f.is_dir() for f in torn.iterdir())

    kills = [(done, name) for done, now in itertools.pairwise(written) for name in sorted(now - done)]
    assert "trainer_state.json" in {name for _, name in kills}
    for number, (done, half) in enumerate(kills):
        folder = tmp_path / f"torn-{number}"
        shutil.copytree(killed.checkpoint_dir / "checkpoint-2", folder / "checkpoint-2")
        (folder / "checkpoint-3").mkdir()
        for name in done:
            shutil.copy2(torn / name, folder / "checkpoint-3" / name)
        data = (torn / half).read_bytes()
        (folder / "checkpoint-3" / half).write_bytes(data[: len(data) // 2])
        assert checkpoint.latest_checkpoint(folder) == folder / "checkpoint-2", f"killed while writing {half}"
    assert checkpoint.latest_checkpoint(killed.checkpoint_dir) == killed.checkpoint_dir / "checkpoint-2", (
        "killed after trainer_state.json, before every rank's files were known to be written"
    )

    state = (torn / "trainer_state.json").read_text(encoding="utf-8")
    (torn / "trainer_state.json").write_text(state[: len(state) // 2], encoding="utf-8")
    resumed_cfg = _resume(cfg, killed, "checkpoint-2")
    execute(resumed_cfg, killed, [])
    _assert_resumed_like_uninterrupted(killed.output_dir, full)
