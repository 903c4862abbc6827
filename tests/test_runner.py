"""The run directory's files and secret redaction: config.yaml, environment.json, tracker names."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from alignment.config import to_run_config
from alignment.context import RunContext
from alignment.redact import REDACTED, redact, redact_dirname, redact_override
from alignment.runner import context_from_hydra, environment, write_run_files

# Made-up credentials in the real formats (prefix + length).
OPENAI_KEY = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0" * 2
HF_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"
GITHUB_TOKEN = "ghp_" + "0123456789abcdefABCDEF0123456789abcd"


@pytest.mark.parametrize(
    "key",
    [
        "api_key",
        "apiKey",
        "wandb_api_key",
        "OPENAI-API-KEY",
        "secret",
        "client_secret",
        "password",
        "passwd",
        "token",
        "hf_token",
        "hub_token",
        "access_token",
        "auth_token",
        "private_key",
        "aws_secret_access_key",
        "credentials",
        "authorization",
    ],
)
def test_redact_hides_values_under_secret_keys(key: str) -> None:
    assert redact({key: "plain-looking"}) == {key: REDACTED}
    assert redact({"nested": {key: 12345}}) == {"nested": {key: REDACTED}}


def test_redact_hides_a_whole_subtree_under_a_secret_key() -> None:
    assert redact({"secrets": {"wandb": "abc", "list": [1, 2]}}) == {"secrets": REDACTED}
    assert redact({"api_keys": ["a", "b"]}) == {"api_keys": REDACTED}


@pytest.mark.parametrize("key", ["pad_token", "eos_token", "bos_token", "unk_token", "mask_token"])
def test_redact_keeps_tokenizer_special_tokens(key: str) -> None:
    assert redact({"model": {key: "<|im_end|>"}}) == {"model": {key: "<|im_end|>"}}


@pytest.mark.parametrize("secret", [OPENAI_KEY, HF_TOKEN, GITHUB_TOKEN, "xoxb-1234567890-abcdefghij"])
def test_redact_hides_credential_values_anywhere(secret: str) -> None:
    tree = {"entity": secret, "sources": [{"path": f"https://user:{secret}@example.com/data.jsonl"}], "tags": [secret]}
    assert redact(tree) == {
        "entity": REDACTED,
        "sources": [{"path": f"https://user:{REDACTED}@example.com/data.jsonl"}],
        "tags": [REDACTED],
    }


def test_redact_keeps_ordinary_values_and_does_not_mutate_its_input() -> None:
    tree = {
        "name_or_path": "hf_checkpoints/llama-3-8b",
        "revision": "796937aa0233cddb7dd8983edd09911e9a414c70",
        "max_new_tokens": 64,
        "added_special_tokens": ["<tool>"],
        "token": None,
        "optim": "adamw_torch",
        "chat_template": "{{ messages }}",
        "task": "sk-short",
    }
    original = json.loads(json.dumps(tree))
    assert redact(tree) == tree
    assert tree == original
    secret = {"api_key": "x", "inner": [{"password": "y"}]}
    redact(secret)
    assert secret == {"api_key": "x", "inner": [{"password": "y"}]}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+logger.api_key=abc", f"+logger.api_key={REDACTED}"),
        ("++hub_token=abc", f"++hub_token={REDACTED}"),
        ("+token=abc", f"+token={REDACTED}"),
        ("token=abc,def", f"token={REDACTED}"),
        (f"logger.entity={HF_TOKEN}", f"logger.entity={REDACTED}"),
        (f"data.path=https://u:{OPENAI_KEY}@host/x", f"data.path=https://u:{REDACTED}@host/x"),
        ("model.pad_token=<|im_end|>", "model.pad_token=<|im_end|>"),
        ("method.learning_rate=1e-4", "method.learning_rate=1e-4"),
        ("model=tiny_random", "model=tiny_random"),
        ("~model.lora", "~model.lora"),
    ],
)
def test_redact_override(override: str, expected: str) -> None:
    assert redact_override(override) == expected


@pytest.mark.parametrize("kv_sep", ["=", ":"])
def test_redact_dirname_hides_secrets_in_a_sweep_jobs_name(kv_sep: str) -> None:
    overrides = ["method.learning_rate=1e-4", "+logger.api_key=abc=def", f"logger.entity={HF_TOKEN}"]
    dirname = ",".join(sorted(o.replace("=", kv_sep) for o in overrides))
    redacted = redact_dirname(dirname, overrides, kv_sep)
    assert redacted == ",".join(
        sorted(
            o.replace("=", kv_sep)
            for o in ["method.learning_rate=1e-4", f"+logger.api_key={REDACTED}", f"logger.entity={REDACTED}"]
        )
    )


@pytest.fixture
def hydra_job(compose: Callable[[list[str]], Any], tmp_path: Path) -> Iterator[Callable[..., RunContext]]:
    """``job(overrides, multirun)`` sets a composed Hydra job config as the current one and returns its context."""
    from hydra import compose as hydra_compose

    def job(overrides: list[str], *, multirun: bool) -> RunContext:
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.MULTIRUN if multirun else RunMode.RUN
            cfg.hydra.runtime.output_dir = str(tmp_path / "multirun" / "2026-11-28" / "10-00-00" / "3")
            cfg.hydra.sweep.dir = str(tmp_path / "multirun" / "2026-11-28" / "10-00-00")
            cfg.hydra.job.num = 3
        HydraConfig.instance().set_config(cfg)
        return context_from_hydra()

    yield job
    HydraConfig.instance().cfg = None


def test_sweep_job_names_are_redacted(hydra_job: Callable[..., RunContext], tmp_path: Path) -> None:
    ctx = hydra_job(["model=tiny_random", f"logger.entity={HF_TOKEN}", "method.learning_rate=1e-4"], multirun=True)
    assert ctx.group == "2026-11-28_10-00-00"
    assert ctx.name == f"logger.entity={REDACTED},method.learning_rate=1e-4,model=tiny_random"
    assert ctx.output_dir == tmp_path / "multirun" / "2026-11-28" / "10-00-00" / "3"
    assert hydra_job([], multirun=True).name == "job3"


def test_single_run_is_named_by_its_overrides_not_a_timestamp(hydra_job: Callable[..., RunContext]) -> None:
    """W&B run / ClearML task names of a single run: its overrides (redacted), else Hydra's job name."""
    single = hydra_job(
        ["model=tiny_random", "method=dpo", "method.beta=0.1", f"logger.entity={HF_TOKEN}"], multirun=False
    )
    assert (single.name, single.group) == (
        f"logger.entity={REDACTED},method.beta=0.1,method=dpo,model=tiny_random",
        None,
    )
    assert hydra_job([], multirun=False).name == "app"  # compose's job name; launch.py's is "launch"


def test_write_run_files_never_shows_a_secret(compose: Callable[[list[str]], Any], tmp_path: Path) -> None:
    cfg = to_run_config(compose(["model=tiny_random"]))
    cfg.model.pad_token = "<|im_end|>"
    cfg.logger.entity = HF_TOKEN
    cfg.data.sources[0].path = f"https://user:{OPENAI_KEY}@example.com/train.jsonl"
    overrides = ["model=tiny_random", f"logger.entity={HF_TOKEN}", "+logger.api_key=abc123"]
    plain = write_run_files(cfg, RunContext(tmp_path / "run", "run", None), overrides)

    text = (tmp_path / "run" / "config.yaml").read_text()
    env_text = (tmp_path / "run" / "environment.json").read_text()
    for secret in (HF_TOKEN, OPENAI_KEY, "abc123"):
        assert secret not in text
        assert secret not in env_text
        assert secret not in json.dumps(plain)
    written = yaml.safe_load(text)
    assert written == plain
    assert written["logger"]["entity"] == REDACTED
    assert written["data"]["sources"][0]["path"] == f"https://user:{REDACTED}@example.com/train.jsonl"
    assert written["model"]["pad_token"] == "<|im_end|>"
    assert written["model"]["name_or_path"] == "embedded:tiny-random-llama"
    assert written["method"]["name"] == "sft"
    assert written["model"]["dtype"] == "auto"  # enums written as their values
    assert json.loads(env_text)["command"][1:] == [
        "model=tiny_random",
        f"logger.entity={REDACTED}",
        f"+logger.api_key={REDACTED}",
    ]


def test_environment_records_versions_git_and_interpreter() -> None:
    env = environment(["method.max_steps=2"])
    assert set(env) == {"command", "python", "platform", "host", "git", "packages"}
    assert env["command"][1:] == ["method.max_steps=2"]
    assert re.fullmatch(r"3\.\d+\.\d+.*", env["python"])
    packages = env["packages"]
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "hydra-core", "omegaconf"):
        assert packages[name] == metadata.version(name)
    assert set(env["git"]) == {"revision", "dirty"}
    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False)
    if head.returncode == 0:
        assert env["git"]["revision"] == head.stdout.strip()
        assert isinstance(env["git"]["dirty"], bool)
    else:
        assert env["git"] == {"revision": None, "dirty": None}


def test_a_failed_run_records_why_in_results_json(compose: Callable[[list[str]], Any], tmp_path: Path) -> None:
    """A method that raises leaves ``results.json`` with ``status: failed`` and the error; the error propagates."""
    from alignment.runner import execute

    missing = tmp_path / "no-such-train.jsonl"
    cfg = to_run_config(compose(["model=tiny_random", "logger=none", f"data.sources=[{{path: '{missing}'}}]"]))
    ctx = RunContext(tmp_path / "run", "run", None)
    with pytest.raises(Exception) as caught:  # noqa: PT011 - any error the data loader raises for a missing file
        execute(cfg, ctx, [])
    results = json.loads((ctx.output_dir / "results.json").read_text(encoding="utf-8"))
    assert results == {"status": "failed", "error": {"type": type(caught.value).__name__, "message": str(caught.value)}}
    assert str(missing) in results["error"]["message"]


def test_a_failed_tool_records_its_summary_beside_the_error(
    compose: Callable[[list[str]], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error carrying metrics (a data tool whose rows failed) keeps them in ``results.json``."""
    from alignment.registry import METHODS
    from alignment.runner import execute
    from alignment.task import TaskFailedError

    def fail(cfg: Any, ctx: RunContext) -> dict[str, float]:
        raise TaskFailedError(f"3 of 4 rows failed; token {OPENAI_KEY}", {"generate/rows_failed": 3.0})

    monkeypatch.setitem(METHODS, "generate", dataclasses.replace(METHODS["generate"], run=fail))
    cfg = to_run_config(compose(["method=generate", "model=tiny_random", "logger=none"]))
    ctx = RunContext(tmp_path / "run", "run", None)
    with pytest.raises(TaskFailedError):
        execute(cfg, ctx, [])
    results = json.loads((ctx.output_dir / "results.json").read_text(encoding="utf-8"))
    assert results == {
        "status": "failed",
        "error": {"type": "TaskFailedError", "message": f"3 of 4 rows failed; token {REDACTED}"},
        "generate/rows_failed": 3.0,
    }


def test_a_failed_launch_says_why_in_launch_log_and_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad data row: results.json says failed, launch.log holds the error with file:line, the report shows it."""
    from alignment.report import main as report_main
    from tests.conftest import launch

    data = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps({"nope": 1}) + "\n", encoding="utf-8")
    args = ["model=tiny_random", "logger=none", f"data.sources=[{{path: '{data}'}}]", "hydra.run.dir=run"]
    result = launch(args, cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    assert (results["status"], results["error"]["type"]) == ("failed", "DataError")
    where = f"{data}:2: missing column 'messages'"
    assert where in results["error"]["message"]
    log_text = (run / "launch.log").read_text(encoding="utf-8")
    errors = [line for line in log_text.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, log_text
    assert "run failed: DataError: 1 invalid row(s)" in errors[0]
    assert where in log_text.split("[ERROR]", 1)[1]  # the message's next lines follow the ERROR line
    assert not (run / "curves.png").exists()
    assert report_main([str(run)]) == 0
    assert "failed: DataError: 1 invalid row(s)" in capsys.readouterr().out


def test_a_finished_run_writes_curves_png(
    compose: Callable[[list[str]], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner plots metrics.jsonl into curves.png beside results.json once the method returns."""
    from alignment.registry import METHODS
    from alignment.runner import execute

    def train(cfg: Any, ctx: RunContext) -> dict[str, float]:
        records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7}]
        (ctx.output_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return {"train_loss": 1.75, "eval_loss": 1.7}

    monkeypatch.setitem(METHODS, "sft", dataclasses.replace(METHODS["sft"], run=train))
    cfg = to_run_config(compose(["model=tiny_random", "logger=none"]))
    ctx = RunContext(tmp_path / "run", "run", None)
    assert execute(cfg, ctx, []) == {"train_loss": 1.75, "eval_loss": 1.7}
    assert (ctx.output_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
