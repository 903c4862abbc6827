"""What a run prints when nobody watches a terminal (SLURM ``.out`` files, pipes), and what a resumed run warns.

The subprocess's stdout and stderr are pipes, as under SLURM: no progress bar may redraw there.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from alignment.config import to_run_config
from alignment.context import RunContext
from tests.conftest import launch

TINY = [
    "model=tiny_random",
    "logger=console",
    "method.max_steps=1",
    "method.eval_steps=1",
    "method.eval_on_start=false",
    "method.save_strategy=no",
    "method.num_generation_samples=1",
    "method.max_new_tokens=4",
    "data.max_eval_samples=2",
    "data.sources.0.sample_fraction=0.02",
]


@pytest.mark.slow
def test_a_run_without_a_terminal_prints_plain_lines(tmp_path: Path) -> None:
    """No carriage-return progress bars, no escape codes, no DeepSpeed CPU notice, samples as short readable lines."""
    result = launch(TINY, cwd=tmp_path)
    out = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, out[-4000:]
    assert "\r" not in out, [line for line in out.split("\n") if "\r" in line][:3]
    assert "\x1b[" not in out
    assert "Setting accelerator to CPU" not in out
    samples = [line for line in out.splitlines() if "[alignment.loggers][INFO] - sample @" in line]
    assert len(samples) == 1, out[-4000:]  # one prompt, evaluated after the step
    assert all(" | reference: " in line and " | generation: " in line and '{"' not in line for line in samples)
    assert all(len(line.split(" - ", 1)[1]) < 200 for line in samples)
    assert "'train_loss'" in out, "the Trainer's summary is still printed (as one line) without the bars"
    (results,) = tmp_path.rglob("results.json")
    assert "total_flos" in json.loads(results.read_text(encoding="utf-8")), "the printer took it from the summary"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def trainer_warnings() -> Iterator[list[str]]:
    """Messages of transformers' trainer_utils logger (it does not propagate to the root logger)."""
    import transformers.utils.logging  # noqa: F401  (adds Logger.warning_once)

    handler = _Records()
    logging.Logger.warning_once.cache_clear()  # type: ignore[attr-defined]  # transformers' lru_cache: warn again
    logger = logging.getLogger("transformers.trainer_utils")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


@pytest.mark.slow
def test_an_identical_rerun_resumes_without_a_settings_mismatch_warning(
    compose: Callable[[list[str]], Any], tmp_path: Path, trainer_warnings: list[str]
) -> None:
    """Fractional ``eval_steps``/``save_steps`` (saved as step counts) match an identical rerun's settings."""
    from alignment.launch.preemption import with_resume
    from alignment.methods import sft

    overrides = [
        *TINY[:2],
        "method.max_steps=2",
        "method.eval_strategy=no",  # HF compares eval_steps all the same
        "method.eval_steps=0.5",
        "method.save_steps=0.5",
        "method.logging_steps=0.5",
        "method.keep_checkpoints=true",
        "data.sources.0.sample_fraction=0.02",
    ]
    ctx = RunContext(tmp_path / "run", "run", None)
    sft.run(to_run_config(compose(overrides)), ctx)
    shutil.rmtree(ctx.checkpoint_dir / "checkpoint-2")  # interrupted after the step-1 checkpoint
    cfg = to_run_config(compose(overrides))
    resumed = with_resume(cfg.method, ctx)
    assert getattr(resumed, "resume_from_checkpoint", None) == str(ctx.checkpoint_dir / "checkpoint-1")
    cfg.method = resumed
    sft.run(cfg, ctx)
    assert (ctx.checkpoint_dir / "checkpoint-2").is_dir(), "the rerun did not train the remaining step"
    mismatches = [m for m in trainer_warnings if "do not match" in m]
    assert mismatches == [], mismatches
