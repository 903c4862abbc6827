"""Experiment trackers (``conf/logger``): metrics JSONL always, plus console / TensorBoard / W&B / ClearML.

W&B runs and ClearML tasks are opened here (project, group, name, tags, offline mode, the redacted resolved
config) before training; the HF Trainer integrations then attach to the open run instead of creating their
own, and :func:`close_trackers` finishes them even when training fails. Credentials come only from the
environment (``WANDB_API_KEY``, ``CLEARML_API_ACCESS_KEY``…), never from the config.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from alignment.context import RunContext

log = logging.getLogger(__name__)


class LoggerBackend(StrEnum):
    """Where metrics go besides ``metrics.jsonl`` in the run directory."""

    none = "none"
    console = "console"
    tensorboard = "tensorboard"
    wandb = "wandb"
    clearml = "clearml"


@dataclass
class LoggerConfig:
    """Metric and sample logging."""

    backend: LoggerBackend = LoggerBackend.console
    """Tracker to send metrics and sample generations to."""
    project: str = "effective-alignment"
    """W&B / ClearML project."""
    offline: bool = False
    """Write W&B / ClearML data locally only (sync later); tests use this."""
    tags: list[str] = field(default_factory=list)
    """Tags on the W&B run / ClearML task."""
    entity: str | None = None
    """W&B entity (team or user); None uses the account default."""


_REPORT_TO = {
    LoggerBackend.none: "none",
    LoggerBackend.console: "none",
    LoggerBackend.tensorboard: "tensorboard",
    LoggerBackend.wandb: "wandb",
    LoggerBackend.clearml: "clearml",
}


def report_to(cfg: LoggerConfig) -> str:
    """The HF ``report_to`` value for a backend."""
    return _REPORT_TO[cfg.backend]


def _open_wandb(cfg: LoggerConfig, run: RunContext, config: dict[str, Any]) -> None:
    import wandb

    wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        name=run.name,
        group=run.group,
        tags=list(cfg.tags) or None,
        dir=str(run.output_dir),
        mode="offline" if cfg.offline else "online",
        config=config,
    )


def _open_clearml(cfg: LoggerConfig, run: RunContext, config: dict[str, Any]) -> None:
    from clearml import Task

    if cfg.offline:
        Task.set_offline(True)
    task = Task.init(
        project_name=f"{cfg.project}/{run.group}" if run.group else cfg.project,
        task_name=run.name,
        tags=list(cfg.tags) or None,
        auto_connect_frameworks=False,
        auto_connect_arg_parser=False,
        reuse_last_task_id=False,
    )
    task.connect_configuration(config, name="resolved config")


def _open_tensorboard(cfg: LoggerConfig, run: RunContext, config: dict[str, Any]) -> None:
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.output_dir / "tensorboard")


_OPENERS: dict[LoggerBackend, Callable[[LoggerConfig, RunContext, dict[str, Any]], None]] = {
    LoggerBackend.wandb: _open_wandb,
    LoggerBackend.clearml: _open_clearml,
    LoggerBackend.tensorboard: _open_tensorboard,
}


def open_trackers(cfg: LoggerConfig, run: RunContext, config: dict[str, Any]) -> None:
    """Start the tracker run (if the backend has one) with the already-redacted resolved config."""
    opener = _OPENERS.get(cfg.backend)
    if opener is not None:
        opener(cfg, run, config)


def close_trackers(cfg: LoggerConfig) -> None:
    """Finish the W&B run / close the ClearML task; safe to call when nothing was opened."""
    if cfg.backend is LoggerBackend.wandb:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    elif cfg.backend is LoggerBackend.clearml:
        from clearml import Task

        task = Task.current_task()
        if task is not None:
            task.close()


def log_samples(cfg: LoggerConfig, run: RunContext, rows: Sequence[dict[str, Any]], step: int) -> None:
    """Send sample generations (list of flat dicts) to the active tracker as a table."""
    if not rows:
        return
    columns = list(rows[0])
    if cfg.backend is LoggerBackend.wandb:
        import wandb

        if wandb.run is not None:
            table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
            wandb.run.log({"eval/samples": table, "train/global_step": step})
    elif cfg.backend is LoggerBackend.clearml:
        import pandas as pd
        from clearml import Task

        task = Task.current_task()
        if task is not None:
            task.get_logger().report_table("eval samples", "generations", iteration=step, table_plot=pd.DataFrame(rows))
    elif cfg.backend is LoggerBackend.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(run.output_dir / "tensorboard")) as writer:
            header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            body = "".join("| " + " | ".join(_cell(row[c]) for c in columns) + " |\n" for row in rows)
            writer.add_text("eval/samples", header + body, global_step=step)
    elif cfg.backend is LoggerBackend.console:
        for row in rows[:3]:
            shown = {k: v for k, v in row.items() if k != "prompt"}
            log.info("sample @%d: %s", step, json.dumps(shown, ensure_ascii=False)[:300])


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", "<br>")


class MetricsJsonlCallback(TrainerCallback):
    """Append every logged metrics dict, with step and epoch, to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write one JSON line per log event."""
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
