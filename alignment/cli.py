"""What ``launch.py`` shows a user who got something wrong: one error block, not a traceback.

User errors are a small set of exception types (:data:`USER_ERRORS`, and Hydra's unknown-key error); they print
as ``error: <message>`` on stderr and exit 1. Anything else is a bug and keeps its traceback.
``HYDRA_FULL_ERROR=1`` (or its alias ``ALIGNMENT_DEBUG=1``) shows the full traceback of every error.
A submitting ``hydra/launcher`` without ``-m`` is refused before the run starts (:class:`RunModeCheck`).
A run that fails still records its error in ``results.json`` first (:func:`alignment.runner.write_failure`).
Sweep job folders get readable names through the ``alignment.job_dir`` resolver (:func:`register_resolvers`).

Importing this module (which ``launch.py`` does) loads no ML stack.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from alignment.config import ConfigError, RunConfig, UnknownKeyError
from alignment.data.validate import DataError
from alignment.distributed import DistributedSetupError
from alignment.ranges import RangeError
from alignment.redact import sweep_job_dirname
from alignment.registry import METHODS
from alignment.runner import ObjectiveNotFoundError

DEBUG_VARIABLES = ("HYDRA_FULL_ERROR", "ALIGNMENT_DEBUG")
"""Either set to ``1`` shows the traceback of a user error too (Hydra's own switch, and this project's alias)."""

LOCAL_LAUNCHERS = frozenset({"basic"})
"""``hydra/launcher`` options that run in this process; every other one submits jobs, which needs ``-m``."""


USER_ERRORS: tuple[type[Exception], ...] = (
    DataError,
    RangeError,
    ConfigError,
    UnknownKeyError,
    ObjectiveNotFoundError,
    DistributedSetupError,
)
"""Exception types that are the user's to fix: printed as one error block, without a traceback."""


def launcher_mode_problem(launcher: str | None) -> str | None:
    """Why a single run (no ``-m``) with this ``hydra/launcher`` choice must not start; None when it may.

    Without ``-m`` Hydra runs the job in this process and never calls the launcher: ``hydra/launcher=slurm`` would
    load the model on the login node, and ``plan=true`` would print an sbatch script that nothing submits.
    """
    if launcher is None or launcher in LOCAL_LAUNCHERS:
        return None
    return (
        f"hydra/launcher={launcher} submits jobs only in multirun mode; without -m this command would run here, "
        f"in this process. Add -m to submit: python launch.py -m hydra/launcher={launcher} ... "
        "(nothing was loaded or submitted)"
    )


class RunModeCheck(Callback):
    """Hydra callback (``conf/config.yaml``): refuse a submitting launcher in a single run, before the run dir exists.

    It exits rather than raises: Hydra turns an exception in a callback into a warning and runs the job anyway.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Exit 1 with :func:`launcher_mode_problem`'s message, if there is one."""
        if OmegaConf.select(config, "plan", default=False):
            return  # plan=true trains and submits nothing; it shows the sbatch script that -m would submit
        choices = OmegaConf.select(config, "hydra.runtime.choices", default=None)
        problem = launcher_mode_problem(choices.get("hydra/launcher") if choices is not None else None)
        if problem is not None:
            raise SystemExit(f"error: {problem}")


def job_dir(num: int, override_dirname: str, *, _root_: DictConfig) -> str:
    """``${alignment.job_dir:${hydra.job.num},${hydra.job.override_dirname}}``: a sweep job's folder name.

    :func:`alignment.redact.sweep_job_dirname` of the job; the overrides it redacts and Hydra's ``kv_sep`` come
    from the config root (``hydra.overrides.task``, ``hydra.job.config.override_dirname.kv_sep``).
    """
    hydra = _root_.hydra
    overrides = [str(o) for o in hydra.overrides.task]
    return sweep_job_dirname(int(num), str(override_dirname), overrides, str(hydra.job.config.override_dirname.kv_sep))


def register_resolvers() -> None:
    """Register this project's OmegaConf resolvers (``alignment.job_dir``, used by ``hydra.sweep.subdir``).

    Called when this module is imported: ``launch.py`` imports it before Hydra composes, and a SLURM array task,
    which never runs ``launch.py``'s module code, imports it when it unpickles the :class:`RunModeCheck` callback,
    before Hydra resolves ``hydra.sweep.subdir`` there.
    """
    OmegaConf.register_new_resolver("alignment.job_dir", job_dir, replace=True)


register_resolvers()


def _schema_fields(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []


def _groups() -> list[str]:
    """The config groups a command line selects from: ``conf/``'s and Hydra's launcher and sweeper."""
    from hydra.core.global_hydra import GlobalHydra

    fixed = ["model", "method", "data", "distributed", "logger", "experiment"]
    found: list[str] = []
    if GlobalHydra.instance().is_initialized():
        loader = GlobalHydra.instance().config_loader()
        found = [g for g in loader.list_groups("") if g not in ("hydra", "schema", *fixed)]
    return [*fixed, *sorted(found), "hydra/launcher", "hydra/sweeper"]


def unknown_key_message(key: str, schema: type | None) -> str:
    """The message for a key its schema does not define: close names, the schema's fields, who has it elsewhere.

    Args:
        key: the full dotted key, e.g. ``method.lerning_rate``.
        schema: the dataclass of the node the key was set on (``SftConfig``); ``RunConfig`` for a top-level key.
    """
    parent, _, leaf = key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    fields = _schema_fields(schema) if schema is not None else []
    lines = []
    if not parent:
        groups = _groups()
        plain = [f for f in fields if f not in groups]
        lines.append(f"unknown config key {key!r}: neither a config group nor a top-level setting")
        close = difflib.get_close_matches(leaf, [*groups, *plain], n=3, cutoff=0.6)
        if close:
            lines.append(f"  did you mean: {', '.join(close)}?")
        lines.append(f"  config groups (group=option): {', '.join(groups)}")
        lines.append(f"  top-level settings (key=value): {', '.join(plain)}")
        return "\n".join(lines)
    name = schema.__name__ if schema is not None else parent
    selected = next((n for n, m in METHODS.items() if m.schema is schema), None) if parent == "method" else None
    where = f"{name} (method={selected})" if selected else name
    lines.append(f"unknown config key {key!r}: {where} has no field {leaf!r}")
    close = difflib.get_close_matches(leaf, fields, n=3, cutoff=0.6)
    if close:
        lines.append(f"  did you mean: {', '.join(prefix + c for c in close)}?")
    if parent == "method":
        others = [n for n, m in METHODS.items() if n != selected and leaf in _schema_fields(m.schema)]
        if others:
            lines.append(
                f"  {leaf} is a field of method={', '.join(others)}: select one, e.g. method={others[0]} {key}=..."
            )
    if fields:
        lines.append(f"  {name} fields: {', '.join(sorted(fields))}")
    return "\n".join(lines)


def user_error_message(error: BaseException) -> str | None:
    """The message to print for a user error; None for anything else (a bug, or an error Hydra prints well)."""
    from hydra.errors import ConfigCompositionException

    if isinstance(error, UnknownKeyError):
        return unknown_key_message(error.key, error.schema)
    if isinstance(error, USER_ERRORS):
        return str(error)
    cause = error.__cause__
    if (
        isinstance(error, ConfigCompositionException)
        and isinstance(cause, ConfigKeyError | ConfigAttributeError)
        and cause.full_key
        and str(cause.msg).startswith("Key ")
        and " not in " in str(cause.msg)
    ):
        schema = cause.object_type
        return unknown_key_message(cause.full_key, schema if isinstance(schema, type) else RunConfig)
    return None


def debug_requested() -> bool:
    """Whether ``HYDRA_FULL_ERROR=1`` or ``ALIGNMENT_DEBUG=1`` asks for tracebacks of user errors too."""
    return any(os.environ.get(name) == "1" for name in DEBUG_VARIABLES)


def _report_user_errors(func: Callable[[], Any]) -> Any:
    try:
        return func()
    except Exception as error:
        message = None if debug_requested() else user_error_message(error)
        if message is None:
            raise
        sys.stderr.write(f"error: {message}\n(HYDRA_FULL_ERROR=1 or ALIGNMENT_DEBUG=1 shows the traceback)\n")
        sys.stderr.flush()
        sys.exit(1)


@contextmanager
def user_errors_reported() -> Iterator[None]:
    """Within: a Hydra app (``@hydra.main``) prints user errors as one block and exits 1; bugs keep their traceback.

    Hydra reports every error of composing and running in ``hydra._internal.utils.run_and_report`` (a traceback, or
    its own compact text for composition errors, such as "To append to your config use +key"); this wraps it.
    """
    from hydra._internal import utils

    if os.environ.get("ALIGNMENT_DEBUG") == "1":
        os.environ["HYDRA_FULL_ERROR"] = "1"
    original = utils.run_and_report

    def run_and_report(func: Callable[[], Any]) -> Any:
        return original(lambda: _report_user_errors(func))

    utils.run_and_report = run_and_report
    try:
        yield
    finally:
        utils.run_and_report = original
