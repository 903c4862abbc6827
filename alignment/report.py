"""Sweep report: one row per job of a multirun (local or SLURM) and a plot of the jobs' training curves.

``python -m alignment.report multirun/<date>/<time>`` reads what the runner wrote in each job directory
(``config.yaml``, ``environment.json``, ``metrics.jsonl``, ``results.json``) and writes beside them:

* ``report.csv`` and ``report.md``: job (its folder name, ``<job number>_<overrides>``), the overrides that differ
  between jobs, status, steps, wall time, final train/eval loss, the best value of the objective (``--objective``,
  default ``eval_loss``) and its step, and every other final ``eval_*`` metric;
* ``curves.png``: train loss and the objective against the step, one line per job, each method on its own axes
  (losses of different methods are not comparable); ``report_curves.png`` when the directory is a single run's,
  whose own ``curves.png`` it keeps;
* a rich table on the console.

A job without ``results.json`` is ``running``/``incomplete`` (``interrupted@<step>`` when it holds a checkpoint);
for SLURM sweeps the scheduler's state (``sacct``) is shown instead when it is known. A job whose run raised is
``failed: <Type>: <message>`` (the first line of the message, from its ``results.json``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from alignment.context import failure, read_results
from alignment.plots import curves_from, draw_panel, new_figure, read_jsonl
from alignment.redact import job_number

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_ARRAY_TASK = re.compile(r"^(\d+)_(\d+)$")
_TIMING = re.compile(r"_runtime$|_per_second$")  # HF's throughput keys: noise in a comparison table
_CONSOLE_COLUMNS = 9  # job .. best_step; the per-metric columns go to the files only
_ERROR_CHARS = 200  # of a failed job's error in the status column


class Mode(StrEnum):
    """Whether a smaller or a larger objective is better."""

    min = "min"
    max = "max"


@dataclass
class JobReport:
    """What one job directory says about its run."""

    name: str
    """Job directory name: ``<job number>_<overrides>`` (:func:`alignment.redact.sweep_job_dirname`)."""
    overrides: list[str]
    """The job's command-line overrides, as the runner recorded them (secrets redacted)."""
    status: str
    """``completed``, ``failed: <Type>: <message>``, a SLURM state, ``interrupted@<step>`` or ``incomplete``."""
    steps: int | None
    """Last optimizer step logged."""
    wall_s: float | None
    """Seconds from the start of the (last) attempt to ``results.json``."""
    final: dict[str, float]
    """``results.json``: final train summary and the latest eval metrics."""
    best: float | None
    """Best logged value of the objective."""
    best_step: int | None
    """Step of that best value."""
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Logged ``(step, value)`` series per metric; a resumed run's repeated steps keep the latest value."""
    method: str | None = None
    """``method.name`` from the job's ``config.yaml``; None when it names none."""


def best_of(series: list[tuple[int, float]], mode: Mode) -> tuple[float | None, int | None]:
    """Best finite value of a series and its step (the first such step on ties)."""
    finite = [(v, s) for s, v in series if math.isfinite(v)]
    if not finite:
        return None, None
    pick = min if mode is Mode.min else max
    value, _ = pick(finite, key=lambda item: item[0])
    step = next(s for v, s in finite if v == value)
    return value, step


def _checkpoint_step(job_dir: Path) -> int | None:
    steps = [
        int(m.group(1)) for p in (job_dir / "checkpoints").glob("checkpoint-*") if (m := _CHECKPOINT.match(p.name))
    ]
    return max(steps) if steps else None


def _overrides(job_dir: Path) -> list[str]:
    env = job_dir / "environment.json"
    if not env.is_file():
        return []
    command = json.loads(env.read_text(encoding="utf-8")).get("command", [])
    return [str(o) for o in command[1:]]


def _method(job_dir: Path) -> str | None:
    import yaml

    try:
        config = yaml.safe_load((job_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    method = config.get("method") if isinstance(config, dict) else None
    name = method.get("name") if isinstance(method, dict) else None
    return str(name) if name is not None else None


def _wall_s(job_dir: Path) -> float | None:
    start, end = job_dir / "environment.json", job_dir / "results.json"
    if not (start.is_file() and end.is_file()):
        return None
    return max(0.0, end.stat().st_mtime - start.stat().st_mtime)


def read_job(job_dir: Path, *, objective: str, mode: Mode, scheduler_state: str | None = None) -> JobReport:
    """Summarise one job directory."""
    results = read_results(job_dir / "results.json")
    final = results or {}
    curves = curves_from(read_jsonl(job_dir / "metrics.jsonl"))
    steps = max((s for c in curves.values() for s, _ in c), default=None)
    best, best_step = best_of(curves.get(objective, []), mode)
    if results is not None and (error := failure(results)) is not None:
        status = f"failed: {error.splitlines()[0][:_ERROR_CHARS]}"
    elif results is not None:
        status = "completed"
    elif scheduler_state:
        status = scheduler_state
    elif (ckpt := _checkpoint_step(job_dir)) is not None:
        status = f"interrupted@{ckpt}"
    else:
        status = "incomplete"
    return JobReport(
        name=job_dir.name,
        overrides=_overrides(job_dir),
        status=status,
        steps=steps,
        wall_s=_wall_s(job_dir),
        final={k: float(v) for k, v in final.items() if isinstance(v, int | float)},
        best=best,
        best_step=best_step,
        curves=curves,
        method=_method(job_dir),
    )


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job directories of a sweep: subfolders (any depth) holding the runner's ``config.yaml``, in natural order."""
    found = [p.parent for p in sweep_dir.rglob("config.yaml") if not any(part.startswith(".") for part in p.parts)]
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))])


def slurm_states(sweep_dir: Path) -> dict[str, str]:
    """``job number -> SLURM state`` from ``sacct`` for the array tasks in ``<sweep>/.submitit``; {} without SLURM.

    Hydra's submitit launcher names each task's folder ``<array id>_<task index>``; the task index is the job
    number within the launched batch (the report assumes one batch, as the basic sweeper launches), which
    :func:`build` reads back from the job folder's name (:func:`alignment.redact.job_number`).
    """
    folders = [m for p in (sweep_dir / ".submitit").glob("*_*") if (m := _ARRAY_TASK.match(p.name))]
    if not folders or shutil.which("sacct") is None:
        return {}
    arrays = sorted({m.group(1) for m in folders})
    try:
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(arrays)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.splitlines():
        job, _, state = line.partition("|")
        if m := _ARRAY_TASK.match(job):
            states[m.group(2)] = state.split()[0] if state else "UNKNOWN"
    return states


def varying(overrides: list[list[str]]) -> tuple[list[list[str]], list[str]]:
    """Split each job's overrides into those that differ between jobs and the ones all jobs share."""
    common = [o for o in overrides[0] if all(o in other for other in overrides[1:])] if overrides else []
    return [[o for o in job if o not in common] for job in overrides], common


def build(sweep_dir: Path, *, objective: str = "eval_loss", mode: Mode = Mode.min) -> list[JobReport]:
    """Read every job of a sweep directory.

    Raises:
        FileNotFoundError: the directory has no job directory with a ``config.yaml``.
    """
    dirs = job_dirs(sweep_dir)
    if not dirs:
        raise FileNotFoundError(f"{sweep_dir}: no job directory with config.yaml (is this a multirun sweep dir?)")
    states = slurm_states(sweep_dir)
    nums = [job_number(d.name) for d in dirs]
    return [
        read_job(d, objective=objective, mode=mode, scheduler_state=None if n is None else states.get(str(n)))
        for d, n in zip(dirs, nums, strict=True)
    ]


def _fmt(value: float | int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def rows(jobs: list[JobReport], objective: str) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, one row per job, and the overrides every job shares."""
    varied, common = varying([j.overrides for j in jobs])
    extra = sorted(
        {k for j in jobs for k in j.final if k.startswith("eval_") and not _TIMING.search(k)} - {"eval_loss", objective}
    )
    header = ["job", "overrides", "status", "steps", "wall_s", "train_loss", "eval_loss"]
    header += [f"best_{objective}", "best_step", *extra]
    table = []
    for job, own in zip(jobs, varied, strict=True):
        row = [job.name, " ".join(own), job.status, _fmt(job.steps), _fmt(job.wall_s)]
        row += [_fmt(job.final.get("train_loss")), _fmt(job.final.get("eval_loss"))]
        row += [_fmt(job.best), _fmt(job.best_step), *(_fmt(job.final.get(k)) for k in extra)]
        table.append(row)
    return header, table, common


def write_csv(path: Path, header: list[str], table: list[list[str]]) -> None:
    """The table as CSV."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(table)


def write_markdown(path: Path, header: list[str], table: list[list[str]], common: list[str]) -> None:
    """The table as a GitHub markdown table, with the shared overrides above it."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    text = [f"Shared overrides: `{' '.join(common)}`", ""] if common else []
    text += [line(header), line(["---"] * len(header)), *(line(r) for r in table)]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")


def sweep_figure(jobs: list[JobReport], objective: str, labels: list[str]) -> Figure:
    """Train loss and the objective against the step: for each method a panel per metric, one line per job.

    Methods' losses differ in scale (SFT's cross-entropy, DPO's sigmoid loss), so each method gets its own axes,
    in the order the methods first appear; a panel without any logged series is left out.
    """
    methods = list(dict.fromkeys(job.method for job in jobs))
    metrics = list(dict.fromkeys(("loss", objective)))
    panels = []
    for method in methods:
        for metric in metrics:
            lines = [
                (label, job.curves[metric])
                for job, label in zip(jobs, labels, strict=True)
                if job.method == method and job.curves.get(metric)
            ]
            if lines:
                panels.append((f"{method}: {metric}" if method else metric, lines))
    figure, axes = new_figure(max(len(panels), 1), columns=len(metrics))
    for axis, (title, lines) in zip(axes, panels, strict=False):
        draw_panel(axis, title, lines)
    if not panels:
        axes[0].set_title("no job logged a metric yet")
        axes[0].set_axis_off()
    return figure


def plot(path: Path, jobs: list[JobReport], objective: str, labels: list[str]) -> None:
    """Save :func:`sweep_figure` as a PNG (matplotlib's Agg canvas)."""
    sweep_figure(jobs, objective, labels).savefig(path, dpi=110)


def print_table(header: list[str], table: list[list[str]], common: list[str], title: str) -> None:
    """A rich table on the console."""
    from rich.console import Console
    from rich.table import Table

    rich_table = Table(title=title, caption=f"shared: {' '.join(common)}" if common else None)
    for name in header:
        rich_table.add_column(name, overflow="fold")
    for row in table:
        rich_table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # piped or captured: don't squeeze the table into 80 columns
        console.width = 160
    console.print(rich_table)


def _label(name: str, overrides: str) -> str:
    """A job's legend entry: its number and the overrides that differ (the folder name can be 200 characters)."""
    num = job_number(name)
    short = name if num is None else str(num)
    return f"{short}: {overrides}" if overrides else short


def report(
    sweep_dir: Path, *, objective: str = "eval_loss", mode: Mode = Mode.min, out_dir: Path | None = None
) -> dict[str, Path]:
    """Write report.csv, report.md and curves.png for a sweep directory and print the table; return the paths."""
    jobs = build(sweep_dir, objective=objective, mode=mode)
    header, table, common = rows(jobs, objective)
    out = out_dir or sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    # A single run's directory already holds the run's own curves.png (alignment.plots): keep it.
    plot_name = "report_curves.png" if (out / "config.yaml").is_file() else "curves.png"
    paths = {"csv": out / "report.csv", "markdown": out / "report.md", "plot": out / plot_name}
    write_csv(paths["csv"], header, table)
    write_markdown(paths["markdown"], header, table, common)
    plot(paths["plot"], jobs, objective, [_label(job.name, r[1]) for job, r in zip(jobs, table, strict=True)])
    print_table(
        header[:_CONSOLE_COLUMNS], [r[:_CONSOLE_COLUMNS] for r in table], common, title=str(sweep_dir.resolve())
    )
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m alignment.report <sweep_dir> [--objective eval_loss] [--mode min] [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m alignment.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory, e.g. multirun/2025-01-01/12-00-00")
    parser.add_argument("--objective", default="eval_loss", help="logged metric for the best column and plot")
    parser.add_argument("--mode", type=Mode, choices=list(Mode), default=Mode.min, help="min or max is best")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep dir)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory")
    try:
        paths = report(args.sweep_dir, objective=args.objective, mode=args.mode, out_dir=args.out)
    except FileNotFoundError as error:
        parser.error(str(error))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
