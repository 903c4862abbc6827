"""RM scoring end to end, generation against the local server, and bad input failing before any work.

Through launch.py, several generators give a comparison JSON and PNG, with rewards equal to direct
``score_conversations`` calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from alignment.config import to_run_config
from alignment.context import RunContext
from alignment.data.validate import DataError
from alignment.tools import rm_scoring
from alignment.tools.rm_scoring import RewardScorerConfig, check_reward_model_path, with_hint
from tests.conftest import launch

HINT = "The correct final answer must be: {answer}"


@pytest.fixture(scope="module")
def reward_model_dir(tiny_random_path: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama with a (seeded) random one-output head, saved with its tokenizer: a reward model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_random_path)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_random_path, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    path = tmp_path_factory.mktemp("reward_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _answers(tmp_path: Path) -> tuple[Path, Path]:
    """Two generators in one file (``model`` column) and a third as a file without that column."""
    answers = _write_jsonl(
        tmp_path / "answers.jsonl",
        [
            {"model": "gen-a", "conversation": _conversation("What is 2+2?", "2 + 2 = 4"), "correct_answer": "4"},
            {"model": "gen-a", "conversation": _conversation("What is 3*3?", "It is 9, because 3 threes make nine.")},
            {"model": "gen-a", "conversation": _conversation("Name a colour.", "Blue.")},
            {"model": "gen-b", "conversation": _conversation("What is 2+2?", "five"), "correct_answer": "4"},
            {"model": "gen-b", "conversation": _conversation("What is 3*3?", "9")},
        ],
    )
    baseline = _write_jsonl(
        tmp_path / "baseline.jsonl",
        [{"conversation": [{"role": "system", "content": "Be brief."}, *_conversation("Hi", "Hello there!")]}],
    )
    return answers, baseline


def _direct_scores(reward_model_dir: Path, rows: list[dict[str, Any]]) -> list[float]:
    from alignment.models.seqcls import load_reward_model, score_conversations

    model, tokenizer = load_reward_model(str(reward_model_dir))
    conversations = [with_hint(r["conversation"], r.get("correct_answer"), HINT) for r in rows]
    return score_conversations(model, tokenizer, conversations)


@pytest.mark.slow
def test_launch_compares_generators(tmp_path: Path, reward_model_dir: Path) -> None:
    answers, baseline = _answers(tmp_path)
    run_dir = tmp_path / "run"
    result = launch(
        [
            "method=rm_scoring",
            "method.answers=data",
            f"method.reward_model.path={reward_model_dir}",
            "model=tiny_random",
            "logger=none",
            f"data.sources=[{{path: '{answers}'}}, {{path: '{baseline}'}}]",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "rm_scoring.json").read_text())
    assert list(summary) == ["gen-a", "gen-b", "baseline"]
    assert {m for per_model in summary.values() for m in per_model} == {"reward", "length_chars", "length_tokens"}
    assert summary["gen-a"]["reward"]["count"] == 3
    assert summary["gen-b"]["length_chars"]["max"] == len("five")
    assert (run_dir / "rm_scoring.png").read_bytes()[:4] == b"\x89PNG"
    assert "Reward by generator model" in result.stdout

    rows = [json.loads(line) for path in (answers, baseline) for line in path.read_text().splitlines()]
    expected = _direct_scores(reward_model_dir, rows)
    scored = [json.loads(line) for line in (run_dir / "scored.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in scored] == pytest.approx(expected, abs=1e-6)
    assert [r["origin"] for r in scored] == [f"{answers}:{i}" for i in range(1, 6)] + [f"{baseline}:1"]
    gen_b = [e for e, r in zip(expected, rows, strict=True) if r.get("model") == "gen-b"]
    assert summary["gen-b"]["reward"]["mean"] == pytest.approx(sum(gen_b) / 2, abs=1e-6)
    assert summary["gen-b"]["reward"]["min"] == pytest.approx(min(gen_b), abs=1e-6)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["reward_mean/gen-b"] == pytest.approx(summary["gen-b"]["reward"]["mean"])


@pytest.mark.slow
def test_generated_answers_from_the_local_server(
    compose: Any, tmp_path: Path, reward_model_dir: Path, local_server: str, monkeypatch: Any
) -> None:
    """One answer per basket row is generated, scored as it arrives, written per generator and summarised."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-local")
    basket = _write_jsonl(
        tmp_path / "basket.jsonl",
        [
            {"id": 1, "prompt": [{"role": "user", "content": "What is 2+2?"}], "correct_answer": "4"},
            {"id": 2, "prompt": [{"role": "user", "content": "Name a colour."}], "system_prompt": "Be brief."},
        ],
    )
    overrides = [
        f"method.reward_model.path={reward_model_dir}",
        f"method.client.base_url={local_server}",
        "method.sampling.max_completion_tokens=8",
        f"data.sources=[{{path: '{basket}'}}]",
    ]
    metrics = _run(compose, tmp_path, overrides)
    run_dir = tmp_path / "run"
    records = [json.loads(line) for line in (run_dir / "embedded_tiny-random-llama.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == [1, 2]
    expected = _direct_scores(reward_model_dir, [{**r, "correct_answer": r.get("correct_answer")} for r in records])
    assert [r["reward"] for r in records] == pytest.approx(expected, abs=1e-6)
    assert all(r["response"] == r["conversation"][-1]["content"] for r in records)
    summary = json.loads((run_dir / "rm_scoring.json").read_text())
    assert summary["embedded:tiny-random-llama"]["reward"]["count"] == 2
    assert metrics["generate/embedded:tiny-random-llama/rows_written"] == 2
    assert (run_dir / "rm_scoring.png").is_file()
    again = _run(compose, tmp_path, overrides)  # resumed: nothing sent, the statistics still cover both rows
    assert again["generate/embedded:tiny-random-llama/rows_resumed"] == 2
    assert again["reward_count/embedded:tiny-random-llama"] == 2


def test_correct_answer_hint_changes_the_score(reward_model_dir: Path) -> None:
    """The hint is a system message in front of the conversation; without a correct answer nothing is added."""
    conversation = _conversation("What is 2+2?", "4")
    assert with_hint(conversation, None, HINT) == conversation
    hinted = with_hint(conversation, 4, HINT)
    assert hinted[0] == {"role": "system", "content": "The correct final answer must be: 4"}
    assert hinted[1:] == conversation
    scorer = rm_scoring.RewardScorer(RewardScorerConfig(path=str(reward_model_dir)))
    plain, with_answer = scorer.score([conversation, conversation], [None, "4"])
    assert plain != with_answer


def test_reward_model_path_checked_first(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"method.reward_model.path is required"):
        check_reward_model_path(RewardScorerConfig())
    with pytest.raises(FileNotFoundError, match=r"method.reward_model.path=.*no such folder"):
        check_reward_model_path(RewardScorerConfig(path=str(tmp_path / "missing_rm")))
    assert check_reward_model_path(RewardScorerConfig(path="org/some-reward-model")) == "org/some-reward-model"


def _run(compose: Any, tmp_path: Path, overrides: list[str]) -> dict[str, float]:
    cfg = to_run_config(compose(["method=rm_scoring", "model=tiny_random", "logger=none", *overrides]))
    return rm_scoring.run(cfg, RunContext(tmp_path / "run", "test", None))


def test_bad_rows_fail_before_the_reward_model_loads(compose: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """A row without a conversation, or one that does not end in an answer, is named by file:line."""
    bad = _write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"model": "a", "conversation": _conversation("q", "a")},
            {"model": "a", "messages": _conversation("q", "a")},
            {"model": "a", "conversation": [{"role": "user", "content": "q"}]},
        ],
    )

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the reward model was loaded before the data was validated")

    monkeypatch.setattr(rm_scoring.RewardScorer, "__init__", no_loading)
    with pytest.raises(DataError) as err:
        _run(
            compose,
            tmp_path,
            ["method.answers=data", "method.reward_model.path=org/rm", f"data.sources=[{{path: '{bad}'}}]"],
        )
    message = str(err.value)
    assert f"{bad}:2: missing column 'conversation'" in message
    assert f"{bad}:3: column 'conversation': the last message must be the assistant's answer" in message
    assert f"{bad}:1" not in message


def test_missing_reward_model_fails_before_generation(compose: Any, tmp_path: Path) -> None:
    """No server is running at the default URL: reaching generation would fail differently."""
    with pytest.raises(FileNotFoundError, match="no such folder"):
        _run(compose, tmp_path, [f"method.reward_model.path={tmp_path / 'nope'}", "data=demo_basket"])
    assert not (tmp_path / "run").exists()


def test_several_completions_rejected(compose: Any, tmp_path: Path, reward_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="num_completions=3: RM scoring scores one answer per prompt"):
        _run(compose, tmp_path, [f"method.reward_model.path={reward_model_dir}", "method.sampling.num_completions=3"])


def test_failed_rows_fail_the_run_after_the_statistics_are_written(
    compose: Any, tmp_path: Path, reward_model_dir: Path
) -> None:
    """Nothing listens at the URL: every row of both generators fails; the report is written, then the run raises."""
    from alignment.inference.openai_batch import RowsFailedError
    from alignment.inference.server import free_port

    overrides = [
        f"method.reward_model.path={reward_model_dir}",
        f"method.client.base_url=http://127.0.0.1:{free_port()}/v1",
        "method.client.max_retries=0",
        "method.generators=[gen-a,gen-b]",
        "data=demo_basket",
    ]
    with pytest.raises(RowsFailedError, match=r"24 of 24 rows failed .*gen-a.errors.jsonl.*gen-b.errors") as caught:
        _run(compose, tmp_path, overrides)
    assert caught.value.metrics["generate/gen-b/rows_failed"] == 24
    assert (tmp_path / "run" / "rm_scoring.json").is_file()
    metrics = _run(compose, tmp_path, [*overrides, "method.allow_failures=1.0"])
    assert metrics["generate/gen-a/rows_failed"] == 24
