"""The real ``launch.py`` in a subprocess: printing the config, failing early on bad input, and a local sweep.

Every launch runs from ``tmp_path``, so Hydra's ``outputs/`` and ``multirun/`` land there. The environment is the
offline one from ``conftest.py``: a run that tried to download a hub model would fail instead.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from alignment.models.config import Dtype
from alignment.redact import job_number
from alignment.registry import METHODS
from tests.conftest import ROOT, launch

# A config check loads no model and no data: well under a minute even on a busy 2-core machine.
QUICK_S = 120


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return f"{result.stdout}\n{result.stderr}"


def _written(tmp_path: Path, name: str) -> list[Path]:
    return sorted(tmp_path.rglob(name))


def test_print_config_loads_nothing(tmp_path: Path) -> None:
    """``--cfg job`` prints the composed, typed config of an 8B run and exits 0 without a download or a run dir."""
    result = launch(["method=sft", "model=llama8b", "data=smoltalk_mix", "--cfg", "job"], cwd=tmp_path, timeout=QUICK_S)
    assert result.returncode == 0, _output(result)
    # transformers prints "[INFO] Running in WANDB offline mode" on import when WANDB_MODE=offline (conftest).
    start = re.search(r"^model:$", result.stdout, re.MULTILINE)
    assert start is not None, result.stdout
    printed = yaml.safe_load(result.stdout[start.start() :])
    assert set(printed) == {"model", "method", "data", "distributed", "logger", "seed", "plan", "objective"}
    assert printed["model"]["name_or_path"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert printed["method"]["name"] == "sft"
    assert [s["path"] for s in printed["data"]["sources"]] == ["HuggingFaceTB/smoltalk"] * 2
    assert "learning_rate" in printed["method"]  # schema defaults are filled in, not only the YAML's keys
    assert list(tmp_path.iterdir()) == [], "printing the config must not create outputs/ or anything else"


def test_unknown_method_lists_the_available_ones(tmp_path: Path) -> None:
    result = launch(["method=nonexistent"], cwd=tmp_path, timeout=QUICK_S)
    out = _output(result)
    assert result.returncode != 0
    assert "method/nonexistent" in out
    listed = re.search(r"Available options in 'method':\n((?:\t.*\n)+)", out)
    assert listed is not None, out
    assert set(listed.group(1).split()) == {p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")}
    assert set(METHODS) <= set(listed.group(1).split())
    assert _written(tmp_path, "config.yaml") == []


def test_wrong_type_names_the_key_and_the_type(tmp_path: Path) -> None:
    result = launch(["method.learning_rate=abc"], cwd=tmp_path, timeout=QUICK_S)
    out = _output(result)
    assert result.returncode != 0
    assert "method.learning_rate" in out
    assert "Float" in out
    assert "'abc'" in out
    assert _written(tmp_path, "config.yaml") == []


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.foo=1", "method.foo"),
        ("+method.foo=1", "method.foo"),
        ("+model.lora.foo=1", "model.lora.foo"),
        ("+foo=1", "foo"),
    ],
)
def test_unknown_key_is_rejected_before_the_run(tmp_path: Path, override: str, key: str) -> None:
    """Plain overrides fail in Hydra, ``+``/``++`` ones in ``to_run_config``: both as one error block, with the fields.

    Hydra's own advice (``To append to your config use +method.foo=1``) would only lead to the second failure.
    """
    result = launch(["model=tiny_random", override], cwd=tmp_path, timeout=QUICK_S)
    assert result.returncode != 0
    # A key that passes Hydra fails inside the job, which Hydra prefixes with "Error executing job with overrides".
    assert re.search(rf"^error: unknown config key '{re.escape(key)}'", result.stderr, re.MULTILINE), result.stderr
    assert re.search(r"^  (\w+ fields|top-level settings \(key=value\)): \w", result.stderr, re.MULTILINE), (
        result.stderr
    )
    assert "To append to your config" not in result.stderr
    assert "Traceback" not in result.stderr
    assert _written(tmp_path, "config.yaml") == [], "the run started before the key was rejected"


def test_misspelt_key_suggests_the_field_and_the_methods_that_have_it(tmp_path: Path) -> None:
    """``method.beta`` under the default SFT names the methods with a ``beta``; a typo gets the close field name."""
    result = launch(["method.lerning_rate=1e-5", "method.beta=0.1"], cwd=tmp_path, timeout=QUICK_S)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    # Hydra stops at the first unknown override; the second is checked by calling the message builder below.
    assert lines[:2] == [
        "error: unknown config key 'method.lerning_rate': SftConfig (method=sft) has no field 'lerning_rate'",
        "  did you mean: method.learning_rate?",
    ], result.stderr
    assert lines[2].startswith("  SftConfig fields: bf16, "), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unknown_key_messages() -> None:
    """The message builder: other methods' fields, and a top-level typo lists the groups."""
    from alignment.cli import unknown_key_message
    from alignment.config import RunConfig
    from alignment.methods.sft import SftConfig

    beta = unknown_key_message("method.beta", SftConfig).splitlines()
    have_beta = [name for name, method in METHODS.items() if "beta" in {f.name for f in fields(method.schema)}]
    assert {"dpo", "cpo", "orpo", "simpo", "smpo"} <= set(have_beta)
    assert beta[1] == (
        f"  beta is a field of method={', '.join(have_beta)}: select one, e.g. method={have_beta[0]} method.beta=..."
    )
    assert unknown_key_message("methd", RunConfig).splitlines()[:3] == [
        "unknown config key 'methd': neither a config group nor a top-level setting",
        "  did you mean: method?",
        "  config groups (group=option): model, method, data, distributed, logger, experiment, hydra/launcher, "
        "hydra/sweeper",
    ]


def test_submitting_launcher_without_multirun_is_refused(tmp_path: Path) -> None:
    """Without ``-m`` Hydra never calls the launcher: ``hydra/launcher=slurm`` would train here, so it is refused."""
    result = launch(["hydra/launcher=slurm", "model=llama8b"], cwd=tmp_path, timeout=QUICK_S)
    assert result.returncode == 1, _output(result)
    assert result.stderr.startswith("error: hydra/launcher=slurm submits jobs only in multirun mode"), result.stderr
    assert "Add -m to submit: python launch.py -m hydra/launcher=slurm" in result.stderr
    assert "sbatch" not in result.stdout
    assert list(tmp_path.iterdir()) == [], "no run directory"


def test_bad_enum_value_names_the_allowed_values(tmp_path: Path) -> None:
    result = launch(["model.dtype=float64"], cwd=tmp_path, timeout=QUICK_S)
    out = _output(result)
    assert result.returncode != 0
    assert "model.dtype" in out
    assert "'float64'" in out
    listed = re.search(r"expected one of \[([^\]]*)\]", out)
    assert listed is not None, out
    assert [v.strip() for v in listed.group(1).split(",")] == [d.value for d in Dtype]


FAKE_KEY = "sk-" + "a1b2c3d4e5f6g7h8i9j0k1l2"  # a credential-shaped value that must never reach a file
SWEEP = [
    "-m",
    "model=tiny_random",
    "method.learning_rate=1e-4,2e-4",
    "method.max_steps=2",
    "method.eval_steps=2",
    "method.save_steps=1",
    "method.num_generation_samples=2",
    "logger=none",
    f"logger.project=team/{FAKE_KEY}",  # a secret and a '/' in one value: the job folder names show neither
    "data.max_eval_samples=8",
]
# Hydra's override_dirname (sorted, ``logger=none`` excluded) behind the job number, redacted, '/' as '_'.
JOB_NAMES = [
    f"{num}_data.max_eval_samples-8+logger.project-team_redacted+method.eval_steps-2+method.learning_rate-{lr}+"
    "method.max_steps-2+method.num_generation_samples-2+method.save_steps-1+model-tiny_random"
    for num, lr in [(0, "0.0001"), (1, "0.0002")]
]


def _job_dirs(tmp_path: Path) -> list[Path]:
    """``multirun/<date>/<time>/<num>_<overrides>`` folders, by job number; exactly one sweep is expected."""
    sweeps = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    assert len(sweeps) == 1, sweeps
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}", sweeps[0].relative_to(tmp_path / "multirun").as_posix())
    return sorted((p for p in sweeps[0].iterdir() if p.is_dir()), key=lambda p: job_number(p.name) or 0)


@pytest.mark.slow
def test_local_sweep_writes_one_complete_run_dir_per_job(tmp_path: Path) -> None:
    """Two 2-step SFT jobs of the tiny model: each has its config, environment, metrics, results and model.

    The job folders are named by their overrides: no secret, no nested folder for the '/' in a value.
    """
    result = launch(SWEEP, cwd=tmp_path)
    assert result.returncode == 0, _output(result)[-4000:]
    jobs = _job_dirs(tmp_path)
    assert [job.name for job in jobs] == JOB_NAMES
    for job, learning_rate in zip(jobs, [1e-4, 2e-4], strict=True):
        config = yaml.safe_load((job / "config.yaml").read_text(encoding="utf-8"))
        assert config["method"]["learning_rate"] == pytest.approx(learning_rate)
        assert config["method"]["max_steps"] == 2
        assert config["model"]["name_or_path"] == "embedded:tiny-random-llama"
        environment = json.loads((job / "environment.json").read_text(encoding="utf-8"))
        assert any(arg.startswith("method.learning_rate=") for arg in environment["command"])
        metrics = [json.loads(line) for line in (job / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        assert max(m["step"] for m in metrics) == 2
        assert any("eval_loss" in m for m in metrics)
        results = json.loads((job / "results.json").read_text(encoding="utf-8"))
        assert math.isfinite(results["train_loss"])
        assert math.isfinite(results["eval_loss"])
        assert (job / "model" / "config.json").is_file()
        assert list((job / "model").glob("*.safetensors"))
        assert not (job / "checkpoints").exists(), "a finished run keeps no checkpoints unless keep_checkpoints"
        assert not (job / "model" / "training_args.bin").exists(), "no pickle in the run directory"
    written = [p for p in (tmp_path / "multirun").rglob("*") if p.is_file() and p.suffix in {".yaml", ".json", ".log"}]
    assert any(p.name == "multirun.yaml" for p in written)
    leaked = [p for p in written if FAKE_KEY in p.read_text(encoding="utf-8")]
    assert not leaked, f"secret-looking override written verbatim to {leaked}"


GOOD_ROW = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
USER, ASSISTANT = GOOD_ROW["messages"]


def _launch_on(
    tmp_path: Path, lines: list[str], env: dict[str, str] | None = None
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """Train the tiny model on a JSONL file made of ``lines``; assert it failed before writing anything trained."""
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    result = launch(["model=tiny_random", "logger=none", f"data.sources=[{{path: '{data}'}}]"], cwd=tmp_path, env=env)
    out = _output(result)
    assert result.returncode != 0
    assert "Error merging override" not in out, "the override itself was rejected; the data was never read"
    for name in ("model", "checkpoints", "metrics.jsonl"):
        assert _written(tmp_path, name) == [], f"{name} written although the data was invalid"
    # results.json records the failure only: no metrics of a run that never trained.
    (results,) = _written(tmp_path, "results.json")
    assert json.loads(results.read_text()) == {
        "status": "failed",
        "error": {"type": "DataError", "message": json.loads(results.read_text())["error"]["message"]},
    }
    return data, result


MALFORMED = [json.dumps(GOOD_ROW), '{"messages": [{"role": "user", ', json.dumps(GOOD_ROW)]


def test_malformed_json_line_fails_before_training(tmp_path: Path) -> None:
    """The line and the JSON column of the syntax error are named, as one error block on stderr: no traceback."""
    data, result = _launch_on(tmp_path, MALFORMED)
    assert re.search(rf"^error: {re.escape(str(data))}:2:\d+: malformed JSON", result.stderr, re.MULTILINE), (
        result.stderr[-4000:]
    )
    assert "Traceback" not in result.stderr


def test_full_error_shows_the_traceback_of_a_user_error(tmp_path: Path) -> None:
    """``HYDRA_FULL_ERROR=1`` is the debug switch: the same data error with its traceback."""
    data, result = _launch_on(tmp_path, MALFORMED, env={"HYDRA_FULL_ERROR": "1"})
    assert "Traceback (most recent call last)" in result.stderr
    assert re.search(rf"DataError: {re.escape(str(data))}:2:\d+: malformed JSON", result.stderr), result.stderr[-4000:]


def test_every_bad_row_is_named_before_training(tmp_path: Path) -> None:
    """Each bad row is reported as ``file:line``, with the column (and the element inside it) and the reason."""
    lines = [
        json.dumps(GOOD_ROW),
        json.dumps({"conversation": [USER, ASSISTANT]}),
        json.dumps({"messages": [{"role": "bot", "content": "hi"}, ASSISTANT]}),
        json.dumps({"messages": [USER, {"role": "assistant", "content": 2}]}),
        json.dumps(GOOD_ROW),
    ]
    data, result = _launch_on(tmp_path, lines)
    out = _output(result)
    expected = {
        2: ["missing column 'messages'", "conversation"],
        3: ["column 'messages'[0].role", "unknown role 'bot'"],
        4: ["column 'messages'[1].content", "expected a string"],
    }
    for number, fragments in expected.items():
        located = [line for line in out.splitlines() if f"{data}:{number}: " in line]
        assert located, (number, out[-4000:])
        for fragment in fragments:
            assert any(fragment in line for line in located), (fragment, located)
    assert f"{data}:1:" not in out
    assert f"{data}:5:" not in out


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["method=smpo", "method.beta=1.5"], {"name": "smpo", "beta": 1.5}),
        (
            ["method=dpo", "method.loss_type=[sigmoid,sft]", "method.loss_weights=[1.0,0.5]"],
            {"name": "dpo", "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
        ),
    ],
)
def test_preference_method_examples_compose(tmp_path: Path, overrides: list[str], expected: dict[str, object]) -> None:
    """The issue's command-line examples compose to the values typed."""
    result = launch([*overrides, "--cfg", "job"], cwd=tmp_path)
    assert result.returncode == 0, _output(result)
    method = yaml.safe_load(result.stdout[result.stdout.index("model:") :])["method"]
    assert {key: method[key] for key in expected} == expected


def test_wrong_dpo_loss_type_lists_the_allowed_ones(tmp_path: Path) -> None:
    result = launch(["method=dpo", "method.loss_type=[sigmoid,simpo]"], cwd=tmp_path)
    out = _output(result)
    assert result.returncode != 0
    assert "method.loss_type" in out
    for allowed in ("sigmoid", "hinge", "ipo", "exo_pair", "bco_pair", "discopop", "sigmoid_norm"):
        assert allowed in out


@pytest.mark.slow
def test_sweep_over_preference_methods_on_the_demo_data(tmp_path: Path) -> None:
    """``-m method=dpo,smpo,simpo`` trains each on the default demo data: one job directory per method."""
    result = launch(
        [
            "-m",
            "model=tiny_random",
            "method=dpo,smpo,simpo",
            "method.max_steps=2",
            "method.eval_steps=2",
            "method.save_strategy=no",
            "method.per_device_train_batch_size=2",
            "logger=none",
            "data.max_eval_samples=4",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, _output(result)[-4000:]
    jobs = _job_dirs(tmp_path)
    assert [yaml.safe_load((job / "config.yaml").read_text())["method"]["name"] for job in jobs] == [
        "dpo",
        "smpo",
        "simpo",
    ]
    for job in jobs:
        results = json.loads((job / "results.json").read_text(encoding="utf-8"))
        assert math.isfinite(results["train_loss"])
        assert "eval_rewards/accuracies" in results
        assert (job / "model" / "config.json").is_file()
