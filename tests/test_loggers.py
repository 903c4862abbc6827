"""Trackers: the HF ``report_to`` mapping, the metrics JSONL, and real tiny SFT runs into each backend's offline files.

The end-to-end tests drive the same path as ``alignment.runner.run`` (write_run_files -> open_trackers -> the
method's run -> close_trackers) without Hydra's job machinery, and read back what each tracker wrote locally:
W&B's ``run-*.wandb`` log, ClearML's offline session zip, TensorBoard's event files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from alignment.config import to_run_config
from alignment.context import RunContext
from alignment.loggers import (
    LoggerBackend,
    LoggerConfig,
    close_trackers,
    log_samples,
    open_trackers,
    report_to,
)
from alignment.training.callbacks import MetricsJsonlCallback

GROUP = "loggers-test"
ROWS = [
    {"origin": "demo:1", "prompt": "2+2?", "reference": "4", "generation": "4"},
    {"origin": "demo:2", "prompt": "3|3?", "reference": "6", "generation": "line\nbreak"},
]
TINY_RUN = [
    "model=tiny_random",
    "logger.offline=true",
    "method.max_steps=2",
    "method.eval_steps=2",
    "method.logging_steps=1",
    "method.save_strategy=no",
    "method.num_generation_samples=2",
    "method.max_new_tokens=4",
    "method.per_device_train_batch_size=2",
    "method.per_device_eval_batch_size=4",
    "data.max_eval_samples=8",
    "data.sources.0.sample_fraction=0.02",
]


@pytest.fixture
def hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep W&B's and ClearML's per-user folders, and the TensorBoard folder variable, inside this test."""
    home = tmp_path / "home"
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(home / "clearml_cache"))
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    return home


def state(step: int = 3, *, main: bool = True) -> TrainerState:
    return TrainerState(global_step=step, epoch=0.5, is_world_process_zero=main)


def tiny_sft(compose: Callable[[list[str]], Any], backend: str, out: Path) -> RunContext:
    """Compose a 2-step SFT of the tiny model and run it the way the runner does."""
    from alignment.methods import sft
    from alignment.runner import write_run_files

    cfg = to_run_config(compose([*TINY_RUN, f"logger={backend}"]))
    ctx = RunContext(output_dir=out, name=f"tiny-{backend}", group=GROUP)
    plain = write_run_files(cfg, ctx, [])
    open_trackers(cfg.logger, ctx, plain)
    try:
        sft.run(cfg, ctx)
    finally:
        close_trackers(cfg.logger)
    return ctx


def check_metrics_jsonl(out: Path) -> None:
    """Train loss at every logged step, eval loss before training and at the end, the final summary."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2]
    assert [r["step"] for r in records if "train_loss" in r] == [2]
    assert all(math.isfinite(r[k]) for r in records for k in ("loss", "eval_loss", "train_loss") if k in r)
    assert all(isinstance(r["epoch"], int | float) for r in records)


# --- unit tests ---------------------------------------------------------------------------------------------------


def test_report_to_covers_every_backend() -> None:
    expected = {
        LoggerBackend.none: "none",
        LoggerBackend.console: "none",
        LoggerBackend.tensorboard: "tensorboard",
        LoggerBackend.wandb: "wandb",
        LoggerBackend.clearml: "clearml",
    }
    assert {backend: report_to(LoggerConfig(backend=backend)) for backend in LoggerBackend} == expected


def test_metrics_jsonl_appends_one_line_per_log_on_the_main_process_only(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    callback = MetricsJsonlCallback(path)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    callback.on_log(args, state(1), TrainerControl(), logs={"loss": 2.5})
    callback.on_log(args, state(2, main=False), TrainerControl(), logs={"loss": 2.0})
    callback.on_log(args, state(2), TrainerControl(), logs={})
    callback.on_log(args, state(3), TrainerControl(), logs={"eval_loss": 1.5})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"step": 1, "epoch": 0.5, "loss": 2.5}, {"step": 3, "epoch": 0.5, "eval_loss": 1.5}]


def test_wandb_mode_is_offline_or_left_to_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``offline=false`` must not force "online": WANDB_MODE=offline/disabled in the environment still applies."""
    import wandb

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs))
    ctx = RunContext(tmp_path, "run-a", "sweep-1")
    for offline in (True, False):
        open_trackers(LoggerConfig(backend=LoggerBackend.wandb, offline=offline, tags=["t"]), ctx, {"seed": 1})
    assert [c["mode"] for c in calls] == ["offline", None]
    assert calls[0] | {"mode": None} == calls[1]
    assert {k: calls[0][k] for k in ("project", "name", "group", "tags", "dir", "config")} == {
        "project": "effective-alignment",
        "name": "run-a",
        "group": "sweep-1",
        "tags": ["t"],
        "dir": str(tmp_path),
        "config": {"seed": 1},
    }


def test_clearml_task_gets_project_group_name_tags_and_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from clearml import Task

    inits: list[dict[str, Any]] = []
    connected: list[tuple[Any, str]] = []
    offline: list[bool] = []
    task = SimpleNamespace(connect_configuration=lambda config, name: connected.append((config, name)))

    def init(**kwargs: Any) -> SimpleNamespace:
        inits.append(kwargs)
        return task

    monkeypatch.setattr(Task, "init", init)
    monkeypatch.setattr(Task, "set_offline", lambda flag: offline.append(flag))
    cfg = LoggerConfig(backend=LoggerBackend.clearml, project="p", offline=True, tags=["a"])
    open_trackers(cfg, RunContext(tmp_path, "run-a", "sweep-1"), {"seed": 1})
    open_trackers(LoggerConfig(backend=LoggerBackend.clearml, project="p"), RunContext(tmp_path, "run-b", None), {})
    assert offline == [True]
    assert [(i["project_name"], i["task_name"], i["tags"]) for i in inits] == [
        ("p/sweep-1", "run-a", ["a"]),
        ("p", "run-b", None),
    ]
    assert all(i["reuse_last_task_id"] is False and i["auto_connect_arg_parser"] is False for i in inits)
    # No framework patching and no repository detection (its git subprocess can hang task.close(), see loggers.py).
    frameworks = inits[0]["auto_connect_frameworks"]
    assert frameworks["detect_repository"] is False
    assert not any(frameworks.values())
    assert connected == [({"seed": 1}, "resolved config"), ({}, "resolved config")]


@pytest.mark.parametrize("backend", list(LoggerBackend))
def test_close_trackers_is_safe_when_nothing_was_opened(backend: LoggerBackend) -> None:
    close_trackers(LoggerConfig(backend=backend))


def test_tensorboard_folder_is_set_for_the_run_and_cleared_after(hermetic: Path, tmp_path: Path) -> None:
    cfg = LoggerConfig(backend=LoggerBackend.tensorboard)
    open_trackers(cfg, RunContext(tmp_path, "run", None), {})
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tensorboard")
    close_trackers(cfg)
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ


def test_log_samples_writes_a_markdown_table_to_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    log_samples(LoggerConfig(backend=LoggerBackend.tensorboard), RunContext(tmp_path, "r", None), ROWS, step=7)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    [event] = events.Tensors("eval/samples/text_summary")
    text = make_ndarray(event.tensor_proto).item().decode()
    assert event.step == 7
    assert text.splitlines()[:3] == [
        "| origin | prompt | reference | generation |",
        "|---|---|---|---|",
        "| demo:1 | 2+2? | 4 | 4 |",
    ]
    assert "| demo:2 | 3\\|3? | 6 | line<br>break |" in text


def test_log_samples_to_console_and_with_no_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One short readable line per sample (at most 3): origin file:line, reference, generation; no prompt, no JSON."""
    long_row = {
        "origin": "/data/demo/test.jsonl:60",
        "prompt": "p",
        "reference": "98 * 7 = 686",
        "generation": "\n" * 64,
    }
    with caplog.at_level(logging.INFO, logger="alignment.loggers"):
        log_samples(LoggerConfig(backend=LoggerBackend.console), RunContext(tmp_path, "r", None), ROWS, step=5)
        log_samples(LoggerConfig(backend=LoggerBackend.console), RunContext(tmp_path, "r", None), [long_row] * 4, 6)
    assert [r.getMessage() for r in caplog.records] == [
        "sample @5 demo:1 | reference: 4 | generation: 4",
        "sample @5 demo:2 | reference: 6 | generation: line\\nbreak",
        *["sample @6 test.jsonl:60 | reference: 98 * 7 = 686 | generation: " + "\\n" * 29 + "\\…"] * 3,
    ]
    assert "2+2?" not in caplog.text
    log_samples(LoggerConfig(backend=LoggerBackend.tensorboard), RunContext(tmp_path, "r", None), [], step=5)
    assert not (tmp_path / "tensorboard").exists()


# --- end to end: a real tiny SFT into each backend's offline files ------------------------------------------------


def wandb_records(path: Path) -> Iterator[Any]:
    """Records of a ``run-*.wandb`` file; wandb 0.31 ships the protobuf schema but no Python reader.

    The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each with a 4-byte checksum,
    a 2-byte little-endian length and a 1-byte type (1 full, 2 first, 3 middle, 4 last record piece), holding
    ``wandb_internal_pb2.Record`` messages.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:
            pos += room  # block trailer padding
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(records: list[Any]) -> list[dict[str, Any]]:
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


def test_close_trackers_returns_after_wandb_wrote_everything(hermetic: Path, tmp_path: Path) -> None:
    """W&B writes the run file in a service process: close_trackers waits until it has flushed and exited.

    Finishing the run alone returns before the service closes the file; a reader then (a test under load, a sync
    right after the run) could find no exit record.
    """
    import psutil
    import wandb

    cfg = LoggerConfig(backend=LoggerBackend.wandb, offline=True)
    open_trackers(cfg, RunContext(tmp_path, "run", None), {"seed": 1})
    wandb.run.log({"train/loss": 1.0})
    close_trackers(cfg, failed=True)
    services = [p.name() for p in psutil.Process().children(recursive=True) if "wandb" in p.name()]
    assert services == [], "W&B's service is still running: the run file may not be complete"
    [log_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    [exit_record] = [r.exit for r in wandb_records(log_file) if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 1


@pytest.mark.slow
def test_wandb_offline_run_holds_config_metrics_and_samples(
    compose: Callable[[list[str]], Any], hermetic: Path, tmp_path: Path
) -> None:
    import wandb

    out = tmp_path / "run"
    tiny_sft(compose, "wandb", out)
    assert wandb.run is None  # finished by close_trackers
    check_metrics_jsonl(out)
    [log_file] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(log_file))
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.run_group, run.display_name) == ("effective-alignment", GROUP, "tiny-wandb")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["model"]["name_or_path"] == "embedded:tiny-random-llama"
    assert config["method"]["max_steps"] == 2
    history = wandb_history(records)
    assert [h["train/global_step"] for h in history if "train/loss" in h] == [1, 2]
    assert [h["train/global_step"] for h in history if "eval/loss" in h] == [0, 2]
    samples = [h for h in history if "eval/samples/_type" in h]
    assert [(h["train/global_step"], h["eval/samples/nrows"], h["eval/samples/ncols"]) for h in samples] == [
        (0, 2, 4),
        (2, 2, 4),
    ]
    assert any(r.WhichOneof("record_type") == "exit" for r in records)


@pytest.mark.slow
@pytest.mark.timeout(120)  # a hung task.close() (see test_clearml_task_gets_...) would otherwise wait 300 s
def test_clearml_offline_session_holds_scalars_samples_and_config(
    compose: Callable[[list[str]], Any], hermetic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clearml import Task
    from clearml.config.cache import SessionCache

    monkeypatch.setattr(SessionCache, "SESSION_CACHE_FOLDER", str(hermetic / "clearml_home"))
    out = tmp_path / "run"
    tiny_sft(compose, "clearml", out)
    assert Task.current_task() is None  # closed by close_trackers
    check_metrics_jsonl(out)
    [session] = (hermetic / "clearml_cache" / "offline").glob("offline-*.zip")
    with zipfile.ZipFile(session) as archive:
        task = json.loads(archive.read("task.json"))
        events = [e for line in archive.read("metrics.jsonl").decode().splitlines() for e in json.loads(line)]
    assert (task["name"], task["project_name"]) == ("tiny-clearml", f"effective-alignment/{GROUP}")
    assert "resolved config" in task["configuration"]
    scalars = {(e["metric"], e["variant"], e["iter"]) for e in events if e["type"] == "training_stats_scalar"}
    assert {("train", "loss", 1), ("train", "loss", 2), ("eval", "loss", 0), ("eval", "loss", 2)} <= scalars
    tables = sorted((e["metric"], e["variant"], e["iter"]) for e in events if e["type"] == "plot")
    assert tables == [("eval samples", "generations", 0), ("eval samples", "generations", 2)]


@pytest.mark.slow
def test_tensorboard_events_hold_train_loss_and_samples(
    compose: Callable[[list[str]], Any], hermetic: Path, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    tiny_sft(compose, "tensorboard", out)
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ
    check_metrics_jsonl(out)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert all(math.isfinite(e.value) for e in events.Scalars("train/loss"))
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 2]
    assert [e.step for e in events.Tensors("eval/samples/text_summary")] == [0, 2]
