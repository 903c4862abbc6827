"""Everything around a method's ``run``: the run directory, seeding, trackers, and the final metrics.

The run directory (Hydra's job output dir) receives ``config.yaml`` (the resolved config, secrets redacted),
``environment.json`` (package versions, git revision, command line), ``metrics.jsonl``, ``results.json``,
``curves.png`` (:mod:`alignment.plots`), ``launch.log`` (Hydra's log file; a failed run's error is its ERROR
line), ``generations/`` and the trained ``model/``. Hydra's own ``.hydra/`` copy is disabled in ``conf/config.yaml``
because it would store overrides unredacted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from alignment.config import RunConfig
from alignment.context import FAILED, RunContext
from alignment.distributed import DistributedBackend
from alignment.loggers import close_trackers, open_trackers, quiet_console
from alignment.redact import redact, redact_dirname, redact_override
from alignment.registry import METHODS
from alignment.task import MethodConfig, TaskFailedError

log = logging.getLogger(__name__)

_PACKAGES = (
    "effective-alignment",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "hydra-core",
    "omegaconf",
    "wandb",
    "clearml",
    "tensorboard",
)


def context_from_hydra() -> RunContext:
    """Run directory, name and group of the current Hydra job.

    The name (W&B run, ClearML task) is the job's overrides, secrets redacted (``method=dpo,method.beta=0.1``);
    without overrides, ``job<N>`` for a sweep job and Hydra's job name (``launch``) for a single run. A sweep's
    jobs share the group ``<date>_<time>`` of the sweep folder.
    """
    hydra = HydraConfig.get()
    output_dir = Path(hydra.runtime.output_dir)
    dirname = redact_dirname(
        hydra.job.override_dirname, list(hydra.overrides.task), hydra.job.config.override_dirname.kv_sep
    )
    if hydra.mode == RunMode.MULTIRUN:
        group = "_".join(Path(hydra.sweep.dir).parts[-2:])
        return RunContext(output_dir, dirname or f"job{hydra.job.num}", group)
    return RunContext(output_dir, dirname or str(hydra.job.name), None)


def _git_revision() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"revision": None, "dirty": None}
    return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def environment(overrides: list[str]) -> dict[str, Any]:
    """Package versions, git revision, interpreter, host and the (redacted) command line."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "command": [Path(sys.argv[0]).name, *(redact_override(o) for o in overrides)],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": platform.node(),
        "git": _git_revision(),
        "packages": versions,
    }


def write_run_files(cfg: RunConfig, ctx: RunContext, overrides: list[str]) -> dict[str, Any]:
    """Write ``config.yaml`` and ``environment.json``; return the redacted config as a plain dict."""
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    redacted_config = redact(OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True))
    (ctx.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(redacted_config), encoding="utf-8")
    (ctx.output_dir / "environment.json").write_text(json.dumps(environment(overrides), indent=2), encoding="utf-8")
    assert isinstance(redacted_config, dict)
    return redacted_config


def redact_sweep_file(sweep_dir: Path) -> None:
    """Rewrite Hydra's ``multirun.yaml`` (written verbatim by the sweeper) with secrets redacted."""
    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        return
    data = redact(OmegaConf.to_container(OmegaConf.load(path)))
    overrides = data.get("hydra", {}).get("overrides", {})
    for kind in ("task", "hydra"):
        overrides[kind] = [redact_override(o) for o in overrides.get(kind) or []]
    # Atomic: every job of a sweep (and every task of a multi-task SLURM job) rewrites this file, maybe at once.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(OmegaConf.to_yaml(data), encoding="utf-8")
    tmp.replace(path)


def write_failure(ctx: RunContext, error: Exception) -> None:
    """Record why a run failed in ``results.json`` (``status: failed``, the error's type and message) and the log.

    Secrets in the message are redacted; the metrics the error carries (a data tool's row counts,
    :class:`~alignment.task.TaskFailedError`) are kept beside it.
    """
    metrics = error.metrics if isinstance(error, TaskFailedError) else {}
    kind, message = type(error).__name__, str(redact(str(error)))
    record = {"status": FAILED, "error": {"type": kind, "message": message}}
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    ctx.results_file.write_text(json.dumps({**record, **metrics}, indent=2), encoding="utf-8")
    # One record in launch.log (Hydra's file handler), where users look first; its message may span lines.
    log.error("run failed: %s: %s (recorded in %s)", kind, message, ctx.results_file)


def run(cfg: RunConfig) -> dict[str, float]:
    """Run the configured method in the current Hydra job (``plan=true`` only checks and prints the plan).

    With a distributed backend the job spawns its ranks (:mod:`alignment.launch.ranks`), which run
    :func:`execute` on the resolved config; otherwise this process runs it.
    """
    from alignment.launch.preemption import requeue_after_ranks, with_resume
    from alignment.launch.ranks import needs_ranks, run_ranks
    from alignment.launch.slurm import prepare_task_ranks

    hydra = HydraConfig.get()
    ctx = context_from_hydra()
    cfg = dataclasses.replace(cfg, method=with_resume(cfg.method, ctx))  # a requeued job continues its checkpoint
    if cfg.plan:
        from alignment.plan import print_plan

        print_plan(cfg, ctx)
        return {}
    if hydra.mode == RunMode.MULTIRUN:
        redact_sweep_file(Path(hydra.sweep.dir))
    prepare_task_ranks(cfg.distributed)  # hydra/launcher=slurm_tasks: this SLURM task becomes one rank
    if needs_ranks(cfg.distributed):
        with requeue_after_ranks():  # in a SLURM job: the ranks save on the time-limit signal, then requeue
            return run_ranks(cfg, ctx, list(hydra.overrides.task))
    return execute(cfg, ctx, list(hydra.overrides.task))


def execute(cfg: RunConfig, ctx: RunContext, overrides: list[str]) -> dict[str, float]:
    """The run body shared by a single process and every rank: all ranks train, rank 0 alone writes run files.

    Trackers are closed even when the method fails; a failure (other than a preemption, whose requeued run resumes)
    is recorded in ``results.json`` (:func:`write_failure`) and raised on.
    """
    from transformers import set_seed

    from alignment.launch.preemption import preemption_guard
    from alignment.launch.ranks import is_main_process, rank_session
    from alignment.training.checkpoint import PreemptedError

    quiet_console(deepspeed=cfg.distributed.backend is DistributedBackend.deepspeed)
    main = is_main_process()
    redacted_config = write_run_files(cfg, ctx, overrides) if main else {}
    log.info("run directory: %s", ctx.output_dir)
    set_seed(cfg.seed)
    if main:
        open_trackers(cfg.logger, ctx, redacted_config)
    failed = True
    try:
        with rank_session(cfg, ctx) as rank_metrics, preemption_guard():  # SLURM time-limit signal: save, then requeue
            metrics = METHODS[cfg.method.name].run(cfg, ctx)
        metrics.update(rank_metrics)
        failed = False
    except Exception as error:
        if main and not isinstance(error, PreemptedError):
            write_failure(ctx, error)
        raise
    finally:
        if main:
            close_trackers(cfg.logger, failed=failed)
    if not main:
        return metrics
    if isinstance(cfg.method, MethodConfig) and not cfg.method.keep_checkpoints:
        shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)
    # HF pickles TrainingArguments beside the weights; config.yaml is the record, and no pickle ships.
    (ctx.model_dir / "training_args.bin").unlink(missing_ok=True)
    ctx.results_file.write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    log.info("final metrics: %s", json.dumps(metrics))
    from alignment.plots import write_run_curves

    if (curves := write_run_curves(ctx.output_dir)) is not None:
        log.info("training curves: %s", curves)
    return metrics


class ObjectiveNotFoundError(KeyError):
    """``objective`` names a metric the run's final results do not have."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError would quote the message


def objective_value(metrics: dict[str, float], objective: str | None) -> float | None:
    """What ``launch.py`` returns to the sweeper: ``metrics[objective]`` from the run's final results.

    Without an ``objective``: ``eval_loss``, else ``train_loss``, else None (a data tool). Empty metrics (``plan=true``,
    a node other than the first of a multi-node job, whose result the launcher does not read) give None.

    Raises:
        ObjectiveNotFoundError: ``objective`` is set and not among the metrics; the message lists them.
    """
    if not metrics:
        return None
    if objective is None:
        return metrics.get("eval_loss", metrics.get("train_loss"))
    if objective not in metrics:
        raise ObjectiveNotFoundError(
            f"objective={objective!r} is not among the run's final metrics (results.json); it has: "
            f"{', '.join(sorted(metrics))}"
        )
    return float(metrics[objective])
