"""Experiment trackers (``conf/logger``): metrics JSONL always, plus console / TensorBoard / W&B / ClearML.

W&B runs and ClearML tasks are opened here (project, group, name, tags, offline mode, the redacted resolved
config) before training; the HF Trainer integrations then attach to the open run instead of creating their
own, and :func:`close_trackers` finishes them even when training fails. Credentials come only from the
environment (``WANDB_API_KEY``, ``CLEARML_API_ACCESS_KEY``…), never from the config.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from omegaconf import MISSING

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

    backend: LoggerBackend = MISSING
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
        # None leaves the mode to wandb (WANDB_MODE=offline/disabled in the environment wins over "online").
        mode="offline" if cfg.offline else None,
        config=config,
    )


# Every framework binding off, and repository detection too (a bare ``False`` leaves detection on; a key missing
# from the dict means True, so all are listed). Detection runs ``git`` from a thread while ClearML forks its
# reporting subprocess; seen in tests after a model load: the thread stuck inside ``Popen`` and ``task.close()``
# waiting its full 300 s for it. The run's environment.json records the git revision instead.
_CLEARML_NO_AUTO_CONNECT = dict.fromkeys(
    (
        "detect_repository",
        "hydra",
        "pytorch",
        "tensorboard",
        "tensorflow",
        "tfdefines",
        "matplotlib",
        "scikit",
        "joblib",
        "xgboost",
        "catboost",
        "lightgbm",
        "fastai",
        "megengine",
        "gradio",
    ),
    False,
)


def _open_clearml(cfg: LoggerConfig, run: RunContext, config: dict[str, Any]) -> None:
    from clearml import Task

    if cfg.offline:
        Task.set_offline(True)
    task = Task.init(
        project_name=f"{cfg.project}/{run.group}" if run.group else cfg.project,
        task_name=run.name,
        tags=list(cfg.tags) or None,
        auto_connect_frameworks=_CLEARML_NO_AUTO_CONNECT,
        auto_connect_arg_parser=False,
        reuse_last_task_id=False,
    )
    task.connect_configuration(config, name="resolved config")


_TENSORBOARD_DIR_ENV = "TENSORBOARD_LOGGING_DIR"


def _open_tensorboard(cfg: LoggerConfig, run: RunContext, config: dict[str, Any]) -> None:
    # HF's TensorBoardCallback reads the folder from this variable when the Trainer is built.
    os.environ[_TENSORBOARD_DIR_ENV] = str(run.output_dir / "tensorboard")


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


def close_trackers(cfg: LoggerConfig, *, failed: bool = False) -> None:
    """Finish the W&B run / close the ClearML task (marked failed when the run raised); safe when none is open.

    Returns once every tracker file is complete: W&B writes the run in a service process, which ``wandb.finish``
    only tells to finish, so the service is torn down (``wandb.teardown``: it flushes and closes the run files,
    then exits) before this returns.
    """
    if cfg.backend is LoggerBackend.wandb:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)
            _teardown_wandb(wandb)
    elif cfg.backend is LoggerBackend.clearml:
        from clearml import Task

        task = Task.current_task()
        if task is not None:
            if failed:
                task.mark_failed(status_reason="run raised an exception", force=True)
            task.close()
    elif cfg.backend is LoggerBackend.tensorboard:
        # A later run in the same process (a test, a notebook) must not write into this run's folder.
        os.environ.pop(_TENSORBOARD_DIR_ENV, None)


def _teardown_wandb(wandb: Any) -> None:
    try:
        wandb.teardown()
    except SystemExit as exited:  # the service exited with an error code: not a reason to end this process
        log.warning("W&B's service process exited with code %s", exited.code)


def log_samples(cfg: LoggerConfig, run: RunContext, rows: Sequence[dict[str, Any]], step: int) -> None:
    r"""Send sample generations (list of flat dicts) to the active tracker as the ``eval/samples`` table.

    The console gets one short line per sample (the full rows are in ``generations/step_<N>.jsonl``): the origin's
    file name and line, then every other column but the prompt, newlines shown as \\n, each cut short.
    """
    if cfg.backend is LoggerBackend.console:
        for row in rows[:_CONSOLE_SAMPLES]:
            origin = str(row.get("origin", ""))
            shown = " | ".join(f"{k}: {_short(v)}" for k, v in row.items() if k not in ("prompt", "origin"))
            log.info("sample @%d %s | %s", step, Path(origin).name if origin else "-", shown)
        return
    log_table(cfg, run, "eval/samples", rows, step, series="generations")


def log_table(
    cfg: LoggerConfig, run: RunContext, key: str, rows: Sequence[dict[str, Any]], step: int, *, series: str = "table"
) -> None:
    """Send a table (list of flat dicts) to the active tracker under ``key``; the console backend prints nothing.

    ClearML files it as title ``key`` with ``/`` as a space, and ``series``.
    """
    if not rows:
        return
    columns = list(rows[0])
    if cfg.backend is LoggerBackend.wandb:
        import wandb

        if wandb.run is not None:
            table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
            wandb.run.log({key: table, "train/global_step": step})
    elif cfg.backend is LoggerBackend.clearml:
        import pandas as pd
        from clearml import Task

        task = Task.current_task()
        if task is not None:
            title = key.replace("/", " ")
            task.get_logger().report_table(title, series, iteration=step, table_plot=pd.DataFrame(rows))
    elif cfg.backend is LoggerBackend.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(run.output_dir / "tensorboard")) as writer:
            header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            body = "".join("| " + " | ".join(_cell(row[c]) for c in columns) + " |\n" for row in rows)
            writer.add_text(key, header + body, global_step=step)


def interactive_console() -> bool:
    """Whether progress bars can redraw in place: stderr (where tqdm draws) is a terminal.

    Not under SLURM (``.out`` files), ``2>&1 | tee`` or a pipe: there every redraw would be another line of
    carriage returns and escape codes.
    """
    return sys.stderr.isatty()


_DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU"


class _DropDeepSpeedCpuNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_DEEPSPEED_CPU_NOTICE)


def quiet_console(*, deepspeed: bool) -> None:
    """Keep the run's console readable; call once per process before the method runs.

    * Without the DeepSpeed backend, DeepSpeed's "Setting accelerator to CPU" warning is dropped: accelerate
      imports ``deepspeed`` whenever it is installed (``extract_model_from_parallel``, when the Trainer is built),
      and the import probes for an accelerator and warns on a CPU machine.
    * Without an interactive console (:func:`interactive_console`), the progress bars of ``datasets``,
      ``transformers`` (weights loading, shard writing) and the hub are off; the Trainer's own bars are switched
      off by ``disable_tqdm`` in its arguments (:func:`alignment.training.arguments.training_args`).
    """
    if not deepspeed:
        # The logger DeepSpeed creates on import is this one (logging.getLogger returns it): the filter stays on it.
        notices = logging.getLogger("DeepSpeed")
        if not any(isinstance(f, _DropDeepSpeedCpuNotice) for f in notices.filters):
            notices.addFilter(_DropDeepSpeedCpuNotice())
    if not interactive_console():
        import datasets
        import transformers.utils.logging
        from huggingface_hub.utils.tqdm import disable_progress_bars

        datasets.disable_progress_bars()
        disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]


_CONSOLE_SAMPLES = 3
_CONSOLE_WIDTH = 60


def _short(value: Any) -> str:
    """A value on one console line: newlines and tabs escaped, cut to ``_CONSOLE_WIDTH`` characters with ``…``."""
    text = str(value).replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return text if len(text) <= _CONSOLE_WIDTH else text[: _CONSOLE_WIDTH - 1] + "…"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", "<br>")
