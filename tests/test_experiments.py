"""Every experiment composes offline; ``experiment=debug`` runs every training method and data tool end to end.

Experiment files are found by globbing, and their count is asserted (style rule 10). Composing reads no model and
no data: ``conftest.py`` sets the hub libraries offline and fails any non-loopback connection, so an experiment
that needed the hub to compose would fail here. The debug runs go through ``launch.py -m``: Hydra's basic
launcher runs the jobs one after another in one process, so the ML stack is imported once per sweep.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from tests.conftest import ROOT, launch

CONF = ROOT / "conf"
EXPERIMENTS = sorted((CONF / "experiment").rglob("*.yaml"))
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
TOOLS = ["dedup", "distill_cache", "export", "generate", "rejection_sampling", "rm_scoring"]
TRAINING = [m for m in METHODS if m not in TOOLS]
TINY = "embedded:tiny-random-llama"
DEBUG_ROWS = 16  # data.num_train_samples in conf/experiment/debug.yaml
# A hub id (``org/name``) or a local JSONL file, as the original configs named their models and datasets.
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
DEMO_EXPERIMENTS = ("debug", "optuna_smpo")  # on the embedded model and demo data, not the original's hub ids


def _name(path: Path) -> str:
    return path.relative_to(CONF / "experiment").with_suffix("").as_posix()


def _leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """``(dotted.key, value)`` for every scalar or scalar list under ``value``; lists of dicts are walked."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{path}[{i}]")]
    return [(path, value)]


def _own_values(path: Path) -> dict[str, Any]:
    """What an experiment file sets itself (without its ``defaults`` list)."""
    values = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(values, dict)
    values.pop("defaults", None)
    values.pop("hydra", None)  # Hydra's own node (a sweeper's settings): compose() returns the job's config only
    return values


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return f"{result.stdout}\n{result.stderr}"[-4000:]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _sweep_jobs(sweep_dir: Path) -> dict[str, Path]:
    """``method.name -> job directory`` of a finished ``launch.py -m`` sweep."""
    jobs = {}
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        config = yaml.safe_load((job / "config.yaml").read_text(encoding="utf-8"))
        assert config["model"]["name_or_path"] == TINY, job
        jobs[config["method"]["name"]] = job
    return jobs


def test_case_counts() -> None:
    """The globs found every experiment and method that exists today (a broken glob fails here)."""
    assert len(EXPERIMENTS) >= 11  # 10 ports of the original's training configs + debug
    assert CONF / "experiment" / "debug.yaml" in EXPERIMENTS
    assert len(TRAINING) >= 9
    assert set(TOOLS) <= set(METHODS)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=_name)
def test_experiment_composes_offline(compose: Any, path: Path) -> None:
    """``experiment=<name>`` (no ``+``) composes and converts; the file's own values arrive in the typed object."""
    run = OmegaConf.to_object(compose([f"experiment={_name(path)}"]))
    assert type(run).__name__ == "RunConfig"
    assert run.method.name in METHODS
    typed = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(run), enum_to_str=True))
    for key, value in _leaves(_own_values(path)):
        assert OmegaConf.select(typed, key) == value, f"{key} of {path.name} not applied"
    if path.stem in DEMO_EXPERIMENTS:
        return
    assert HUB_ID.fullmatch(run.model.name_or_path), run.model.name_or_path
    for source in run.data.sources:
        assert HUB_ID.fullmatch(source.path) or source.path.endswith(".jsonl"), source.path


@pytest.mark.parametrize("method", METHODS)
def test_debug_composes_with_every_method(compose: Any, method: str) -> None:
    """``experiment=debug method=<any>``: the tiny model and the method's own demo slice (``data=debug/<method>``)."""
    run = OmegaConf.to_object(compose(["experiment=debug", f"method={method}"]))
    assert run.method.name == method
    assert run.model.name_or_path == TINY
    slice_ = OmegaConf.to_object(compose([f"data=debug/{method}"])).data
    assert run.data.sources == slice_.sources
    assert run.data.num_train_samples == DEBUG_ROWS


def test_debug_prints_from_the_command_line(tmp_path: Path) -> None:
    """``launch.py experiment=debug method=gpo --cfg job`` prints the GPO slice, loads nothing, writes nothing."""
    result = launch(["experiment=debug", "method=gpo", "--cfg", "job"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, _output(result)
    start = re.search(r"^model:$", result.stdout, re.MULTILINE)  # after any import-time log lines
    assert start is not None, result.stdout
    printed = yaml.safe_load(result.stdout[start.start() :])
    assert printed["model"]["name_or_path"] == TINY
    assert printed["method"]["name"] == "gpo"
    assert [s["path"] for s in printed["data"]["sources"]] == ["embedded:gpo_train.jsonl"]
    assert list(tmp_path.iterdir()) == []


# --- experiment=debug end to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def debug_jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One ``experiment=debug`` sweep: every training method, dedup and distill_cache (the tools needing no server)."""
    cwd = tmp_path_factory.mktemp("debug")
    methods = [*TRAINING, "dedup", "distill_cache"]
    result = launch(
        ["-m", "experiment=debug", f"method={','.join(methods)}", "hydra.sweep.dir=sweep"], cwd=cwd, timeout=1200
    )
    assert result.returncode == 0, _output(result)
    jobs = _sweep_jobs(cwd / "sweep")
    assert sorted(jobs) == sorted(methods)
    return jobs


@pytest.mark.slow
@pytest.mark.parametrize("method", TRAINING)
def test_debug_trains(debug_jobs: dict[str, Path], method: str) -> None:
    """A step or two, evaluated before and after: finite train and eval losses, and a saved model."""
    job = debug_jobs[method]
    metrics = _read_jsonl(job / "metrics.jsonl")
    last = max(m["step"] for m in metrics)
    assert 1 <= last <= 2
    assert {0, last} <= {m["step"] for m in metrics if "eval_loss" in m}
    results = json.loads((job / "results.json").read_text(encoding="utf-8"))
    assert math.isfinite(results["train_loss"])
    assert math.isfinite(results["eval_loss"])
    if method == "prompt_opt":  # the frozen model is not saved: the learned prompts and their codebook are
        assert (job / "best_prompt.txt").read_text(encoding="utf-8")
    else:
        assert (job / "model" / "config.json").is_file()
    assert list((job / "model").glob("*.safetensors"))


@pytest.mark.slow
def test_debug_dedup(debug_jobs: dict[str, Path]) -> None:
    """Every row of the 16-row slice is kept or mapped to a kept row."""
    job = debug_jobs["dedup"]
    kept, removed = _read_jsonl(job / "deduplicated.jsonl"), _read_jsonl(job / "removed.jsonl")
    assert len(kept) + len(removed) == DEBUG_ROWS
    results = json.loads((job / "results.json").read_text(encoding="utf-8"))
    assert (results["dedup/rows_in"], results["dedup/rows_kept"]) == (DEBUG_ROWS, len(kept))


@pytest.mark.slow
def test_debug_distill_cache(debug_jobs: dict[str, Path]) -> None:
    """The teacher's top-64 cache of the 16 train and 4 eval conversations: 388 bytes per counted token."""
    job = debug_jobs["distill_cache"]
    results = json.loads((job / "results.json").read_text(encoding="utf-8"))
    assert results["train/tokens"] > DEBUG_ROWS
    assert results["eval/tokens"] > 0
    assert results["train/bytes_per_token"] == 64 * (4 + 2) + 4
    assert 0 < results["train/teacher_mass"] <= 1
    keys = json.loads((job / "cache.json").read_text(encoding="utf-8"))["keys"]
    assert set(keys) == {"train", "eval"}


def _run_tool(tool: str, server: str, cwd: Path, *extra: str) -> Path:
    """``launch.py experiment=debug method=<tool>`` against ``server``; returns the run directory.

    One launch per tool: a sweep over tools would first compose its base config with the default method, which
    has no ``client`` key to override.
    """
    args = [f"method={tool}", f"method.client.base_url={server}", "method.sampling.max_completion_tokens=8"]
    result = launch(["experiment=debug", *args, *extra, "hydra.run.dir=run"], cwd=cwd)
    assert result.returncode == 0, _output(result)
    return cwd / "run"


@pytest.mark.slow
def test_debug_generate(local_server: str, tmp_path: Path) -> None:
    """The basket through the local server: one record per prompt, none failed."""
    run = _run_tool("generate", local_server, tmp_path)
    records = _read_jsonl(run / "generations.jsonl")
    assert records
    assert len({r["id"] for r in records}) == len(records)
    assert all(r["model"] == TINY and r["conversation"][-1]["role"] == "assistant" for r in records)
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    assert (results["generate/rows_written"], results["generate/rows_failed"]) == (len(records), 0)


@pytest.mark.slow
def test_debug_rejection_sampling(local_server: str, debug_jobs: dict[str, Path], tmp_path: Path) -> None:
    """Five answers per basket prompt, scored by the debug sweep's own reward model."""
    reward_model = debug_jobs["reward"] / "model"
    run = _run_tool("rejection_sampling", local_server, tmp_path, f"method.reward_model.path={reward_model}")
    scored = _read_jsonl(run / "pairs.scored.jsonl")
    assert scored
    for row in scored:
        assert len(row["rewards"]) == 5  # the tool's default num_completions
        assert all(math.isfinite(r) for r in row["rewards"])
        assert row["rm_model"] == str(reward_model)
    assert (run / "pairs.jsonl").is_file()


@pytest.mark.slow
def test_debug_export(debug_jobs: dict[str, Path], tmp_path: Path) -> None:
    """The debug sweep's reward model (a full sequence classifier) exported from its run directory, as is."""
    result = launch(
        ["experiment=debug", "method=export", f"method.source={debug_jobs['reward']}", "hydra.run.dir=run"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, _output(result)
    model = tmp_path / "run" / "model"
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert sorted(p.name for p in model.glob("*.safetensors")) == ["model.safetensors"]
    assert (model / "chat_template.jinja").is_file()
    results = json.loads((tmp_path / "run" / "results.json").read_text(encoding="utf-8"))
    assert results["export/merged_adapter"] == 0.0


@pytest.mark.slow
def test_debug_rm_scoring(local_server: str, debug_jobs: dict[str, Path], tmp_path: Path) -> None:
    """One answer per basket prompt, scored by the debug sweep's reward model and summarised."""
    run = _run_tool("rm_scoring", local_server, tmp_path, f"method.reward_model.path={debug_jobs['reward'] / 'model'}")
    summary = json.loads((run / "rm_scoring.json").read_text(encoding="utf-8"))
    assert list(summary) == [TINY]
    (records,) = [p for p in run.glob("*.jsonl") if not p.name.endswith(".errors.jsonl")]  # the generator's answers
    assert summary[TINY]["reward"]["count"] == len(_read_jsonl(records)) > 0
    assert math.isfinite(summary[TINY]["reward"]["mean"])
    assert (run / "rm_scoring.png").read_bytes()[:4] == b"\x89PNG"
