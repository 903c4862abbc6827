"""``method=generate`` through launch.py against the local server: shapes, resume after SIGKILL, no key leak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from alignment.data.basket import load_basket
from tests.conftest import ROOT, launch

FAKE_KEY = "sk-fake-test-key-0123456789abcdefXYZ"
GLOBAL_SYSTEM = "Reply briefly."


def generate_args(base_url: str, *extra: str) -> list[str]:
    return [
        "method=generate",
        "model=tiny_random",
        "logger=none",
        f"method.client.base_url={base_url}",
        "method.sampling.max_completion_tokens=6",
        *extra,
    ]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_record(record: dict[str, Any], row: Any, num_completions: int) -> None:
    """One output line against its basket row: passthrough, conversation shape, indices, candidates, tokens."""
    conversation = record["conversation"]
    system = row.system_prompt if row.system_prompt is not None else GLOBAL_SYSTEM
    assert conversation[0] == {"role": "system", "content": system}
    assert conversation[1 : 1 + len(row.prompt)] == row.prompt
    indices = record["generated_message_indices"]
    if row.follow_up_prompt is None:
        assert indices == [len(conversation) - 1] == [1 + len(row.prompt)]
    else:
        assert indices == [1 + len(row.prompt), len(conversation) - 1]
        assert conversation[indices[0] + 1 : indices[1]] == row.follow_up_prompt
    assert all(conversation[i]["role"] == "assistant" for i in indices)
    assert len(record["finish_reason"]) == len(indices)
    assert len(record["candidates"]) == len(record["candidate_finish_reasons"]) == num_completions
    assert record["candidates"][0] == conversation[-1]
    assert record["prompt_tokens"] > 0
    assert record["completion_tokens"] >= num_completions
    assert record["model"] == "embedded:tiny-random-llama"
    assert {k: record[k] for k in row.passthrough} == row.passthrough
    assert not {"prompt", "system_prompt", "follow_up_prompt"} & set(record)


def test_generate_demo_basket_end_to_end_without_leaking_the_key(
    local_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    run_dir = tmp_path / "run"
    args = generate_args(
        local_server,
        "data=demo_basket",
        "method.sampling.num_completions=2",
        "method.sampling.temperature=0.8",
        f"method.global_system_prompt={GLOBAL_SYSTEM}",
        f"hydra.run.dir={run_dir}",
    )
    result = launch(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row.id: row for row in load_basket("embedded:basket.jsonl")}
    records = read_jsonl(run_dir / "generations.jsonl")
    assert sorted(r["id"] for r in records) == sorted(rows)  # exactly one line per id
    for record in records:
        check_record(record, rows[record["id"]], num_completions=2)
    assert any(len(r["generated_message_indices"]) == 2 for r in records)  # follow-ups were exercised
    assert (run_dir / "generations.errors.jsonl").read_text(encoding="utf-8") == ""
    metrics = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    assert (metrics["generate/rows_written"], metrics["generate/rows_failed"]) == (24, 0)
    assert metrics["generate/tokens_per_s"] > 0
    assert "row/s" in result.stderr
    assert "tok/s" in result.stderr
    # The key was in the environment of the run; it must appear in no file the run wrote and in no log line.
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert FAKE_KEY not in path.read_text(encoding="utf-8", errors="replace"), path
    assert FAKE_KEY not in result.stdout + result.stderr
    assert "key_env: OPENAI_API_KEY" in (run_dir / "config.yaml").read_text(encoding="utf-8")


def test_bad_basket_fails_before_any_request(tmp_path: Path, compose: Any) -> None:
    from alignment.config import to_run_config
    from alignment.context import RunContext
    from alignment.data.validate import DataError
    from alignment.tools import generate

    basket = tmp_path / "bad.jsonl"
    basket.write_text('{"id": "a", "prompt": [{"role": "assistant", "content": "hi"}]}\n', encoding="utf-8")
    # Port 9 (discard) has no listener: a request would fail with a connection error, not a DataError.
    cfg = to_run_config(compose(generate_args("http://127.0.0.1:9/v1", f"data.sources=[{{path:{basket}}}]")))
    with pytest.raises(DataError, match=f"{basket}:1: column 'prompt': the last message is the assistant's"):
        generate.run(cfg, RunContext(tmp_path, "run", None))
    assert not (tmp_path / "generations.jsonl").exists()


def test_sigkill_mid_run_then_rerun_loses_and_duplicates_nothing(local_server: str, tmp_path: Path) -> None:
    basket = tmp_path / "basket.jsonl"
    ids = [f"row-{i:02d}" for i in range(40)]
    basket.write_text(
        "".join(json.dumps({"id": i, "prompt": [{"role": "user", "content": f"Say {i}"}]}) + "\n" for i in ids),
        encoding="utf-8",
    )
    output = tmp_path / "out" / "generations.jsonl"
    args = generate_args(
        local_server, f"data.sources=[{{path:{basket}}}]", f"method.output_path={output}", "method.client.concurrency=2"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), *args, f"hydra.run.dir={tmp_path / 'first'}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if output.exists() and output.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.05)
    process.kill()  # SIGKILL: no cleanup runs
    process.wait()
    before = output.read_bytes()
    written = before.count(b"\n")
    assert 4 <= written < len(ids), f"the kill did not land mid-run ({written} rows written)"
    # Simulate dying inside a write as well: half a line with no newline at the end.
    with output.open("ab") as handle:
        handle.write(b'{"id": "row-99", "model": "embedded:tiny-ra')

    result = launch([*args, f"hydra.run.dir={tmp_path / 'second'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torn last line" in result.stdout + result.stderr
    lines = output.read_text(encoding="utf-8").splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == ids  # none lost, none duplicated, torn line gone
    assert output.read_bytes().startswith(before.rsplit(b"\n", 1)[0])  # the rows written before were kept
    metrics = json.loads((tmp_path / "second" / "results.json").read_text(encoding="utf-8"))
    resumed = len(before.rsplit(b"\n", 1)[0].splitlines())
    assert (metrics["generate/rows_resumed"], metrics["generate/rows_written"]) == (resumed, len(ids) - resumed)


def dead_url() -> str:
    """A loopback URL nothing listens on (a port just found free): every request fails to connect at once."""
    from alignment.inference.server import free_port

    return f"http://127.0.0.1:{free_port()}/v1"


def test_failed_rows_fail_the_run_and_the_summary_is_still_written(tmp_path: Path) -> None:
    """Against a dead port every row fails: the run exits non-zero, naming the count and the errors file."""
    run_dir = tmp_path / "run"
    args = generate_args(dead_url(), "data=demo_basket", "method.client.max_retries=0", f"hydra.run.dir={run_dir}")
    result = launch(args, cwd=tmp_path)
    assert result.returncode != 0, result.stderr[-3000:]
    errors = run_dir / "generations.errors.jsonl"
    assert "RowsFailedError" in result.stderr
    assert f"24 of 24 rows failed (method.allow_failures=0.0 allows 0); reasons in {errors}" in result.stderr
    assert "first: APIConnectionError: Connection error." in result.stderr
    assert len(read_jsonl(errors)) == 24
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    assert results["status"] == "failed"
    assert results["error"]["type"] == "RowsFailedError"
    assert (results["generate/rows_written"], results["generate/rows_failed"]) == (0, 24)


def test_allow_failures_lets_a_fraction_of_rows_fail(tmp_path: Path, compose: Any) -> None:
    from alignment.config import to_run_config
    from alignment.context import RunContext
    from alignment.inference.openai_batch import RowsFailedError
    from alignment.tools import generate

    overrides = ["data=demo_basket", "method.client.max_retries=0", "method.allow_failures=1.0"]
    cfg = to_run_config(compose(generate_args(dead_url(), *overrides)))
    metrics = generate.run(cfg, RunContext(tmp_path, "run", None))
    assert (metrics["generate/rows_written"], metrics["generate/rows_failed"]) == (0, 24)
    cfg.method.allow_failures = 0.95  # 22.8 of 24 rows may fail, 24 did
    with pytest.raises(RowsFailedError, match=r"24 of 24 rows failed \(method.allow_failures=0.95 allows 22\)"):
        generate.run(cfg, RunContext(tmp_path, "run", None))
    with pytest.raises(ValueError, match=r"method.allow_failures must be in \[0(\.0)?, 1(\.0)?\], got 1.5"):
        to_run_config(compose(generate_args(dead_url(), "data=demo_basket", "method.allow_failures=1.5")))


@pytest.mark.parametrize(("failed", "allowed"), [(0, 0.0), (6, 0.25), (24, 1.0)])
def test_failures_within_the_allowed_fraction_pass(tmp_path: Path, failed: int, allowed: float) -> None:
    from alignment.inference.openai_batch import RowsFailedError, RunSummary, raise_if_rows_failed

    def summary(rows_failed: int) -> RunSummary:
        return RunSummary(24, 0, 24 - rows_failed, rows_failed, 0, 0, 1.0)

    errors = tmp_path / "x.errors.jsonl"
    errors.write_text('{"id": 1, "error_type": "APIStatusError", "error": "boom"}\n', encoding="utf-8")
    raise_if_rows_failed({errors: summary(failed)}, allow_failures=allowed, metrics={})
    if failed < 24:
        with pytest.raises(RowsFailedError, match="first: APIStatusError: boom") as caught:
            raise_if_rows_failed({errors: summary(failed + 1)}, allow_failures=allowed, metrics={"m": 1.0})
        assert caught.value.metrics == {"m": 1.0}
