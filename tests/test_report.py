"""The sweep report on hand-written job directories in the runner's formats."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from alignment.report import Mode, best_of, build, curves_from, main, varying


def _job(sweep: Path, num: int, overrides: list[str], records: list[dict[str, float]], results: bool = True) -> Path:
    job = sweep / str(num)
    job.mkdir(parents=True)
    (job / "config.yaml").write_text("seed: 42\n")
    (job / "environment.json").write_text(json.dumps({"command": ["launch.py", *overrides]}))
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if results:
        final = {"train_loss": records[-2]["loss"], "eval_loss": records[-1]["eval_loss"], "eval_runtime": 1.0}
        (job / "results.json").write_text(json.dumps(final))
    return job


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Three jobs: two finished (the second better), one interrupted at checkpoint-1 and resumed up to step 2."""
    root = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    common = ["model=tiny_random", "method.max_steps=2"]
    _job(
        root,
        0,
        [*common, "method.learning_rate=1e-4"],
        [
            {"step": 0, "epoch": 0, "eval_loss": 3.0},
            {"step": 1, "epoch": 0.1, "loss": 2.5},
            {"step": 2, "epoch": 0.2, "loss": 2.0},
            {"step": 2, "epoch": 0.2, "eval_loss": 2.2},
        ],
    )
    _job(
        root,
        1,
        [*common, "method.learning_rate=2e-4"],
        [
            {"step": 0, "epoch": 0, "eval_loss": 3.0},
            {"step": 1, "epoch": 0.1, "loss": 2.0},
            {"step": 2, "epoch": 0.2, "loss": 1.5},
            {"step": 2, "epoch": 0.2, "eval_loss": 1.7},
        ],
    )
    job = _job(
        root,
        2,
        [*common, "method.learning_rate=4e-4"],
        [
            {"step": 1, "epoch": 0.1, "loss": 9.0},
            {"step": 1, "epoch": 0.1, "loss": 1.0},  # after a resume the step is logged again: the last value counts
            {"step": 2, "epoch": 0.2, "loss": 0.5},
        ],
        results=False,
    )
    (job / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (job / "metrics.jsonl").open("a").write('{"step": 3, "lo')  # torn last line of a killed job
    (root / ".submitit" / "ignored").mkdir(parents=True)
    return root


def test_curves_keep_the_last_value_per_step_and_skip_non_numbers() -> None:
    records = [{"step": 1, "loss": 3.0, "flag": True, "note": "x"}, {"step": 1, "loss": 2.0}, {"epoch": 1}]
    assert curves_from(records) == {"loss": [(1, 2.0)]}


def test_best_of() -> None:
    series = [(0, 3.0), (1, float("nan")), (2, 1.0), (3, 1.0), (4, 2.0)]
    assert best_of(series, Mode.min) == (1.0, 2)
    assert best_of(series, Mode.max) == (3.0, 0)
    assert best_of([], Mode.min) == (None, None)


def test_varying_overrides() -> None:
    assert varying([["a=1", "b=1"], ["a=1", "b=2"]]) == ([["b=1"], ["b=2"]], ["a=1"])


def test_build_reads_every_job(sweep: Path) -> None:
    jobs = build(sweep)
    assert [(j.name, j.status, j.steps) for j in jobs] == [
        ("0", "completed", 2),
        ("1", "completed", 2),
        ("2", "interrupted@1", 2),
    ]
    assert [(j.best, j.best_step) for j in jobs] == [(2.2, 2), (1.7, 2), (None, None)]
    assert jobs[2].curves["loss"] == [(1, 1.0), (2, 0.5)]
    assert jobs[0].final["train_loss"] == 2.0
    assert jobs[0].wall_s is not None


def test_cli_writes_csv_markdown_and_png(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(sweep)]) == 0
    with (sweep / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["job"], r["overrides"], r["status"], r["best_eval_loss"]) for r in rows] == [
        ("0", "method.learning_rate=1e-4", "completed", "2.2"),
        ("1", "method.learning_rate=2e-4", "completed", "1.7"),
        ("2", "method.learning_rate=4e-4", "interrupted@1", ""),
    ]
    assert "eval_runtime" not in rows[0], "throughput columns are left out"
    markdown = (sweep / "report.md").read_text()
    assert markdown.startswith("Shared overrides: `model=tiny_random method.max_steps=2`")
    assert "| 1 | method.learning_rate=2e-4 | completed |" in markdown
    assert (sweep / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "interrupted@1" in out
    assert "report.csv" in out


def test_cli_rejects_a_folder_without_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "no job directory with config.yaml" in capsys.readouterr().err


def test_a_failed_job_shows_its_error(sweep: Path) -> None:
    """A job whose run raised wrote ``results.json`` with ``status: failed``: the report names the error."""
    error = {"type": "DataError", "message": "train.jsonl:3: missing column 'prompt'\ntrain.jsonl:4: more"}
    failed = {"status": "failed", "error": error, "generate/rows_failed": 3.0}
    (sweep / "2" / "results.json").write_text(json.dumps(failed))
    jobs = build(sweep)
    assert jobs[2].status == "failed: DataError: train.jsonl:3: missing column 'prompt'"
    assert jobs[2].final == {"generate/rows_failed": 3.0}
    assert main([str(sweep)]) == 0
    assert "| failed: DataError: train.jsonl:3: missing column 'prompt' |" in (sweep / "report.md").read_text()


def test_each_method_gets_its_own_loss_axis(tmp_path: Path) -> None:
    """SFT's and DPO's losses are on different scales: one panel per method and metric, a legend on each."""
    import warnings

    from alignment.report import sweep_figure

    root = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    sft = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.2}]
    dpo = [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.6}, {"step": 2, "eval_loss": 0.65}]
    for num, (method, records) in enumerate([("sft", sft), ("dpo", dpo), ("sft", sft)]):
        job = _job(root, num, [f"method={method}", f"seed={num}"], records)
        (job / "config.yaml").write_text(f"seed: {num}\nmethod:\n  name: {method}\n")
    jobs = build(root)
    assert [j.method for j in jobs] == ["sft", "dpo", "sft"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figure = sweep_figure(jobs, "eval_loss", ["0: a", "1: b", "2: c"])
        assert main([str(root)]) == 0
    panels = {
        axis.get_title(): [t.get_text() for t in axis.get_legend().get_texts()] if axis.get_legend() else []
        for axis in figure.axes
    }
    assert panels == {
        "sft: loss": ["0: a", "2: c"],
        "sft: eval_loss": ["0: a", "2: c"],
        "dpo: loss": ["1: b"],
        "dpo: eval_loss": ["1: b"],
    }
    assert (root / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_single_run_keeps_its_own_curves_png(tmp_path: Path) -> None:
    """``report <run dir>`` of a single run writes report_curves.png and leaves the run's curves.png alone."""
    run = _job(tmp_path, 0, ["model=tiny_random"], [{"step": 1, "loss": 2.0}, {"step": 1, "eval_loss": 2.1}])
    (run / "curves.png").write_bytes(b"the run's own plot")
    assert main([str(run)]) == 0
    assert (run / "curves.png").read_bytes() == b"the run's own plot"
    assert (run / "report_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_named_job_folders_keep_their_order_names_and_slurm_states(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``<num>_<overrides>`` folders: sorted by job number (10 after 2), shown by name, sacct state by number."""
    import alignment.report as report_module

    records = [{"step": 1, "loss": 2.0}, {"step": 1, "eval_loss": 2.1}]
    for num, method, done in [(2, "dpo", True), (10, "smpo", False)]:
        job = _job(tmp_path, num, [f"method={method}"], records, results=done)
        job.rename(tmp_path / f"{num}_method-{method}")
    # sacct answers by array task index = job number; job 2's own results.json wins over its state
    monkeypatch.setattr(report_module, "slurm_states", lambda _: {"2": "COMPLETED", "10": "RUNNING"})
    jobs = build(tmp_path)
    assert [(j.name, j.status) for j in jobs] == [("2_method-dpo", "completed"), ("10_method-smpo", "RUNNING")]
    assert main([str(tmp_path)]) == 0
    with (tmp_path / "report.csv").open() as handle:
        assert [(r["job"], r["overrides"]) for r in csv.DictReader(handle)] == [
            ("2_method-dpo", "method=dpo"),
            ("10_method-smpo", "method=smpo"),
        ]
