"""A 2-job sweep through ``hydra/launcher=slurm`` on the local cluster, submitted without waiting, then reported."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, launch
from tests.slurm.conftest import job_dirs, job_logs, wait_for

TINY = [
    "model=tiny_random",
    "method.max_steps=2",
    "method.eval_steps=2",
    "method.save_strategy=no",
    "method.per_device_train_batch_size=2",
    "logger=none",
    "data.max_eval_samples=4",
]
# <job number>_<overrides>: hydra.* and hydra/launcher, and logger, are not in the names
NAMES = [
    f"{num}_data.max_eval_samples-4+method.eval_steps-2+method.max_steps-2+method.per_device_train_batch_size-2+"
    f"method.save_strategy-no+method-{method}+model-tiny_random"
    for num, method in [(0, "dpo"), (1, "smpo")]
]


@pytest.mark.slow
def test_two_job_sweep_through_the_slurm_preset(slurm_cluster: str, tmp_path: Path) -> None:
    """``-m hydra/launcher=slurm method=dpo,smpo`` queues one array, returns at once (wait=false), both jobs finish."""
    started = time.monotonic()
    result = launch(
        [
            "-m",
            "hydra/launcher=slurm",
            f"hydra.launcher.partition={slurm_cluster}",
            "hydra.launcher.gpus_per_node=null",  # the test cluster has CPUs only
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2",
            "hydra.launcher.timeout_min=10",
            "hydra.launcher.wait=false",
            "method=dpo,smpo",
            *TINY,
        ],
        cwd=tmp_path,
        timeout=120,
    )
    submit_s = time.monotonic() - started
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    sweep = next(tmp_path.glob("multirun/*/*"))
    submitted = json.loads((sweep / "submitted.json").read_text(encoding="utf-8"))
    assert [e["num"] for e in submitted] == [0, 1]
    assert ["method=dpo" in e["overrides"] for e in submitted] == [True, False]
    array_ids = {e["job_id"].split("_")[0] for e in submitted}
    assert len(array_ids) == 1, f"one job array expected: {submitted}"
    assert not list(sweep.rglob("results.json")), "the launcher waited for the jobs although wait=false"

    wait_for(lambda: len(list(sweep.glob("*/results.json"))) == 2, 300, "both jobs' results.json", interval=1)
    print(
        f"\n[slurm] submit returned in {submit_s:.1f}s; both jobs done {time.monotonic() - started:.1f}s after submit"
    )
    jobs = job_dirs(tmp_path)
    assert [j.name for j in jobs] == NAMES, job_logs(sweep)  # resolved on the compute node: same names as locally
    for job, method in zip(jobs, ["dpo", "smpo"], strict=True):
        assert yaml.safe_load((job / "config.yaml").read_text())["method"]["name"] == method
        results = json.loads((job / "results.json").read_text(encoding="utf-8"))
        assert math.isfinite(results["train_loss"])
        assert math.isfinite(results["eval_loss"])
        steps = [json.loads(line)["step"] for line in (job / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == 2
        assert (job / "model" / "config.json").is_file()
        env = json.loads((job / "environment.json").read_text(encoding="utf-8"))
        assert f"method={method}" in env["command"]

    report = subprocess.run(
        [sys.executable, "-m", "alignment.report", str(sweep)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert report.returncode == 0, report.stderr
    with (sweep / "report.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["job"], r["overrides"], r["status"], r["steps"]) for r in rows] == [
        (NAMES[0], "method=dpo", "completed", "2"),
        (NAMES[1], "method=smpo", "completed", "2"),
    ]
    assert (sweep / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
