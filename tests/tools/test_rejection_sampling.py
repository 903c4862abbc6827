"""Rejection sampling against the local server, its output as DPO and GPO data, ties, bad input, the vLLM backend.

The end-to-end runs use the tiny random model (N = 4 answers of at most 8 tokens) and a tiny random reward model.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from alignment.config import to_run_config
from alignment.context import RunContext
from alignment.data.basket import BasketRow
from alignment.data.validate import DataError
from alignment.inference.openai_batch import SamplingConfig, generate_row
from alignment.methods.pairwise import core
from alignment.registry import METHODS
from alignment.tools import rejection_sampling
from alignment.tools.rejection_sampling import BatchingChat, is_tie, sampling_kwargs, scored_record
from alignment.tools.rm_scoring import with_hint
from tests.conftest import launch

HINT = "The correct final answer must be: {answer}"
BASKET = [
    {"id": "a", "prompt": [{"role": "user", "content": "What is 2+2?"}], "correct_answer": "4"},
    {"id": "b", "prompt": [{"role": "user", "content": "Name a colour."}], "system_prompt": "Be brief."},
    {
        "id": 3,
        "prompt": [{"role": "user", "content": "What is 3*3?"}],
        "follow_up_prompt": [{"role": "user", "content": "Are you sure?"}],
    },
    {"id": "d", "prompt": [{"role": "user", "content": "Say something."}], "category": "chat"},
]


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


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _args(basket: Path, reward_model_dir: Path, server: str, run_dir: Path, *extra: str) -> list[str]:
    return [
        "method=rejection_sampling",
        "model=tiny_random",
        "logger=none",
        f"data.sources=[{{path: '{basket}'}}]",
        f"method.reward_model.path={reward_model_dir}",
        f"method.client.base_url={server}",
        "method.sampling.num_completions=4",
        "method.sampling.max_completion_tokens=8",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@pytest.fixture(scope="module")
def sampled(
    tmp_path_factory: pytest.TempPathFactory, reward_model_dir: Path, local_server: str, monkeypatch_module: Any
) -> Path:
    """One rejection-sampling run of the basket through launch.py (temperature 1); returns its run directory."""
    tmp = tmp_path_factory.mktemp("rs")
    basket = _write_jsonl(tmp / "basket.jsonl", BASKET)
    run_dir = tmp / "run"
    result = launch(_args(basket, reward_model_dir, local_server, run_dir, "method.sampling.temperature=1.0"), cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def monkeypatch_module() -> Any:
    """A fake API key for the module's launches (the local server accepts any)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPENAI_API_KEY", "sk-test-local")
        yield patch


@pytest.mark.slow
def test_pairs_from_the_local_server(sampled: Path, reward_model_dir: Path) -> None:
    scored = _read_jsonl(sampled / "pairs.scored.jsonl")
    pairs = _read_jsonl(sampled / "pairs.jsonl")
    results = json.loads((sampled / "results.json").read_text())
    assert sorted(str(r["id"]) for r in scored) == ["3", "a", "b", "d"]
    assert results["rs/rows_scored"] == 4
    assert results["rs/pairs"] + results["rs/ties"] == 4
    assert len(pairs) == results["rs/pairs"] >= 1
    for row in scored:
        assert len(row["completions"]) == len(row["rewards"]) == len(row["finish_reasons"]) == 4
        assert all(len(c) == 1 and c[0]["role"] == "assistant" for c in row["completions"])
        assert row["chosen_score"] == max(row["rewards"]) >= row["rejected_score"] == min(row["rewards"])
        assert row["chosen"] == row["completions"][row["rewards"].index(row["chosen_score"])]
        assert row["rejected"] == row["completions"][row["rewards"].index(row["rejected_score"])]
        assert (row["gen_model"], row["rm_model"]) == ("embedded:tiny-random-llama", str(reward_model_dir))
    for row in pairs:
        assert row["chosen_score"] > row["rejected_score"]
        assert not is_tie(row, 0.0)
    by_id = {str(r["id"]): r for r in scored}
    assert by_id["a"]["target_answer"] == "4"
    assert "target_answer" not in by_id["b"]
    assert by_id["b"]["prompt"] == [{"role": "system", "content": "Be brief."}, *BASKET[1]["prompt"]]
    follow_up = by_id["3"]["prompt"]
    assert [m["role"] for m in follow_up] == ["user", "assistant", "user"]
    assert follow_up[-1] == BASKET[2]["follow_up_prompt"][0]


@pytest.mark.slow
def test_rewards_equal_direct_scoring(sampled: Path, reward_model_dir: Path) -> None:
    """Each candidate's reward is the reward model's score of prompt + candidate (with the correct-answer hint)."""
    from alignment.models.seqcls import load_reward_model, score_conversations

    model, tokenizer = load_reward_model(str(reward_model_dir))
    for row in _read_jsonl(sampled / "pairs.scored.jsonl"):
        conversations = [
            with_hint([*row["prompt"], *completion], row.get("target_answer"), HINT)
            for completion in row["completions"]
        ]
        assert score_conversations(model, tokenizer, conversations) == pytest.approx(row["rewards"], abs=1e-5)


@pytest.mark.slow
def test_greedy_answers_tie_and_are_not_emitted(
    tmp_path: Path, reward_model_dir: Path, local_server: str, monkeypatch: Any
) -> None:
    """At temperature 0 the four answers are identical: every row is a tie, counted, and no pair is written."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-local")
    basket = _write_jsonl(tmp_path / "basket.jsonl", BASKET[:2])
    cfg = to_run_config(_compose_rs(basket, reward_model_dir, local_server, tmp_path, "method.sampling.temperature=0"))
    metrics = rejection_sampling.run(cfg, RunContext(tmp_path / "run", "test", None))
    assert (metrics["rs/rows_scored"], metrics["rs/ties"], metrics["rs/pairs"]) == (2, 2, 0)
    assert (tmp_path / "run" / "pairs.jsonl").read_text() == ""
    assert len(_read_jsonl(tmp_path / "run" / "pairs.scored.jsonl")) == 2
    # Resume: a second run finds every row done and sends nothing.
    again = rejection_sampling.run(cfg, RunContext(tmp_path / "run", "test", None))
    assert (again["generate/rows_resumed"], again["generate/rows_written"], again["rs/ties"]) == (2, 0, 2)


def _compose_rs(basket: Path, reward_model_dir: Path, server: str, tmp_path: Path, *extra: str) -> Any:
    from hydra import compose, initialize_config_dir

    from alignment.registry import register_configs
    from tests.conftest import ROOT

    register_configs()
    overrides = _args(basket, reward_model_dir, server, tmp_path / "run", *extra)
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("config", overrides=[o for o in overrides if not o.startswith("hydra.")])


def _train_args(data: Path, out: Path) -> list[str]:
    return [
        "model=tiny_random",
        "logger=none",
        f"data.sources=[{{path: '{data}'}}]",
        "data.eval_fraction=0",
        "method.max_steps=2",
        "method.per_device_train_batch_size=1",
        "method.logging_steps=1",
        "method.save_strategy=no",
        "method.eval_strategy=no",
        f"hydra.run.dir={out}",
    ]


@pytest.mark.slow
def test_output_trains_dpo(sampled: Path, tmp_path: Path) -> None:
    out = tmp_path / "dpo"
    result = launch(["method=dpo", *_train_args(sampled / "pairs.jsonl", out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["train_loss"] > 0


@pytest.mark.slow
@pytest.mark.skipif("gpo" not in METHODS, reason="method=gpo not registered")
def test_output_trains_gpo(sampled: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpo"
    result = launch(
        ["method=gpo", "method.max_tokens_per_batch=600", *_train_args(sampled / "pairs.jsonl", out)], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train_loss" in json.loads((out / "results.json").read_text())


# --- bad input fails before anything is generated ---------------------------------------------------------------------


def test_bad_basket_fails_before_generation(tmp_path: Path, reward_model_dir: Path) -> None:
    """No server runs at this URL: reaching generation would raise a connection error, not the DataError."""
    basket = _write_jsonl(
        tmp_path / "basket.jsonl",
        [
            BASKET[0],
            {"id": "x", "question": "no prompt column"},
            {"id": "y", "prompt": [{"role": "assistant", "content": "hi"}]},
        ],
    )
    cfg = to_run_config(_compose_rs(basket, reward_model_dir, "http://127.0.0.1:9/v1", tmp_path))
    with pytest.raises(DataError) as err:
        rejection_sampling.run(cfg, RunContext(tmp_path / "run", "test", None))
    assert f"{basket}:2: missing column 'prompt'" in str(err.value)
    assert f"{basket}:3: column 'prompt': the last message is the assistant's" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_missing_reward_model_fails_before_generation(tmp_path: Path) -> None:
    basket = _write_jsonl(tmp_path / "basket.jsonl", BASKET)
    cfg = to_run_config(_compose_rs(basket, tmp_path / "no_rm", "http://127.0.0.1:9/v1", tmp_path))
    with pytest.raises(FileNotFoundError, match=r"method.reward_model.path=.*no_rm.*no such folder"):
        rejection_sampling.run(cfg, RunContext(tmp_path / "run", "test", None))
    cfg.method.reward_model.path = None
    with pytest.raises(ValueError, match=r"method.reward_model.path is required"):
        rejection_sampling.run(cfg, RunContext(tmp_path / "run", "test", None))
    assert not (tmp_path / "run").exists()


def test_one_completion_is_not_enough(tmp_path: Path, reward_model_dir: Path) -> None:
    basket = _write_jsonl(tmp_path / "basket.jsonl", BASKET)
    cfg = to_run_config(
        _compose_rs(basket, reward_model_dir, "http://127.0.0.1:9/v1", tmp_path, "method.sampling.num_completions=1")
    )
    with pytest.raises(ValueError, match="needs at least 2 answers per prompt"):
        rejection_sampling.run(cfg, RunContext(tmp_path / "run", "test", None))


def test_failed_rows_fail_the_run_after_the_pairs_are_written(tmp_path: Path, reward_model_dir: Path) -> None:
    """Nothing listens at the URL: every row fails, the run raises, the (empty) pairs file is still written."""
    from alignment.inference.openai_batch import RowsFailedError
    from alignment.inference.server import free_port

    basket = _write_jsonl(tmp_path / "basket.jsonl", BASKET)
    url = f"http://127.0.0.1:{free_port()}/v1"
    cfg = to_run_config(_compose_rs(basket, reward_model_dir, url, tmp_path, "method.client.max_retries=0"))
    with pytest.raises(RowsFailedError, match=r"4 of 4 rows failed .*pairs.errors.jsonl") as caught:
        rejection_sampling.run(cfg, RunContext(tmp_path / "run", "test", None))
    assert (caught.value.metrics["generate/rows_failed"], caught.value.metrics["rs/pairs"]) == (4, 0)
    assert (tmp_path / "run" / "pairs.jsonl").read_text() == ""
    cfg.method.allow_failures = 1.0
    assert rejection_sampling.run(cfg, RunContext(tmp_path / "run", "test", None))["generate/rows_failed"] == 4


# --- pure parts ---------------------------------------------------------------------------------------------------


def _generation(contents: list[str]) -> dict[str, Any]:
    candidates = [{"role": "assistant", "content": c} for c in contents]
    return {
        "id": 7,
        "model": "gen",
        "conversation": [{"role": "user", "content": "q"}, candidates[0]],
        "generated_message_indices": [1],
        "candidates": candidates,
        "candidate_finish_reasons": ["stop"] * len(contents),
        "prompt_tokens": 3,
        "completion_tokens": 5,
    }


def test_scored_record_picks_first_best_and_worst() -> None:
    record = scored_record(
        _generation(["a", "b", "c", "d"]), [0.5, 2.0, -1.0, 2.0], id_field="id", rm_model="rm", correct_answer=None
    )
    assert record["prompt"] == [{"role": "user", "content": "q"}]
    assert (record["chosen"], record["chosen_score"]) == ([{"role": "assistant", "content": "b"}], 2.0)
    assert (record["rejected"], record["rejected_score"]) == ([{"role": "assistant", "content": "c"}], -1.0)
    assert record["completions"] == [[{"role": "assistant", "content": c}] for c in "abcd"]
    assert "target_answer" not in record
    assert not is_tie(record, 0.0)
    assert not is_tie(record, 2.9)
    assert is_tie(record, 3.0)
    assert (
        scored_record(_generation(["x", "y"]), [1.0, 1.0], id_field="id", rm_model="rm", correct_answer=0)[
            "target_answer"
        ]
        == 0
    )


def test_identical_texts_are_a_tie_whatever_their_scores() -> None:
    """The same text scored in two batches can differ in the last float bit; it is still no pair."""
    record = scored_record(
        _generation(["same", "same"]), [1.0, 1.0 - 1e-7], id_field="id", rm_model="rm", correct_answer=None
    )
    assert is_tie(record, 0.0)


class FakeEngine:
    """Stands in for vLLM's ``LLM.chat``: answer j to a conversation is ``<last user text>#j``."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def chat(self, conversations: list[Any], params: list[Any]) -> list[Any]:
        self.calls.append(len(conversations))
        outputs = []
        for i, (conversation, p) in enumerate(zip(conversations, params, strict=True)):
            text = conversation[-1]["content"]
            completions = [
                SimpleNamespace(text=f"{text}#{j}", finish_reason="length", token_ids=[1, 2]) for j in range(p.n)
            ]
            outputs.append(SimpleNamespace(request_id=str(i), outputs=completions, prompt_token_ids=[0] * 5))
        return outputs


def _row(i: int, follow_up: bool = False) -> BasketRow:
    return BasketRow(
        id=i,
        prompt=[{"role": "user", "content": f"q{i}"}],
        system_prompt=None,
        follow_up_prompt=[{"role": "user", "content": f"more{i}"}] if follow_up else None,
        response_format=None,
        correct_answer=None,
        passthrough={"id": i},
        origin=f"basket.jsonl:{i}",
    )


def test_batching_chat_runs_generate_row_on_an_offline_engine() -> None:
    """Concurrent rows are batched into engine calls; follow-up turns and ``n`` come back as from a server."""
    engine = FakeEngine()

    def params(request: dict[str, Any]) -> Any:
        return SimpleNamespace(n=request.get("n", 1), temperature=request["temperature"])

    async def go() -> list[dict[str, Any]]:
        client = BatchingChat(engine.chat, params)
        sampling = SamplingConfig(num_completions=3, temperature=0.8, max_completion_tokens=4)
        rows = [_row(0), _row(1, follow_up=True), _row(2)]
        try:
            return await asyncio.gather(
                *(generate_row(client, r, model="m", sampling=sampling, global_system_prompt="sys") for r in rows)
            )
        finally:
            await client.close()

    records = asyncio.run(go())
    assert engine.calls == [3, 1]  # three first turns together, then the follow-up turn
    assert [c["content"] for c in records[0]["candidates"]] == ["q0#0", "q0#1", "q0#2"]
    assert records[0]["conversation"][0] == {"role": "system", "content": "sys"}
    assert records[0]["candidate_finish_reasons"] == ["length"] * 3
    assert (records[0]["prompt_tokens"], records[0]["completion_tokens"]) == (5, 6)
    follow = records[1]
    assert [m["content"] for m in follow["conversation"]] == ["sys", "q1", "q1#0", "more1", "more1#0"]
    assert follow["generated_message_indices"] == [2, 4]
    assert [c["content"] for c in follow["candidates"]] == ["more1#0", "more1#1", "more1#2"]


def test_a_greedy_request_is_sampled_once_and_repeated() -> None:
    """At temperature 0 the engine is asked for one answer (vLLM refuses ``n > 1``), which fills all n choices."""
    request = {"model": "m", "messages": [], "temperature": 0.0, "max_tokens": 4, "n": 3, "seed": 1}
    assert sampling_kwargs(request) == {"n": 1, "temperature": 0.0, "max_tokens": 4, "seed": 1}
    assert sampling_kwargs({**request, "temperature": 0.5})["n"] == 3
    engine = FakeEngine()

    async def go() -> dict[str, Any]:
        client = BatchingChat(engine.chat, lambda r: SimpleNamespace(**sampling_kwargs(r)))
        sampling = SamplingConfig(num_completions=3, temperature=0.0, max_completion_tokens=4)
        try:
            return await generate_row(client, _row(0), model="m", sampling=sampling, global_system_prompt=None)
        finally:
            await client.close()

    record = asyncio.run(go())
    assert [c["content"] for c in record["candidates"]] == ["q0#0"] * 3
    assert record["completion_tokens"] == 6  # 2 tokens per choice, as a server reports n greedy answers


def test_batching_chat_fails_every_waiting_request_with_the_engine_error() -> None:
    def broken(conversations: list[Any], params: list[Any]) -> list[Any]:
        raise RuntimeError("CUDA out of memory")

    async def go() -> list[Any]:
        client = BatchingChat(broken, lambda request: None)
        calls = [client.chat.completions.create(model="m", messages=[], temperature=0.0) for _ in range(2)]
        try:
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await client.close()

    assert [str(e) for e in asyncio.run(go())] == ["CUDA out of memory"] * 2


def test_vllm_backend_without_vllm_fails_clearly(tmp_path: Path, reward_model_dir: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed; this checks the error without it")
    basket = _write_jsonl(tmp_path / "basket.jsonl", BASKET)
    cfg = to_run_config(_compose_rs(basket, reward_model_dir, "http://127.0.0.1:9/v1", tmp_path, "method.backend=vllm"))
    with pytest.raises(ImportError, match=r"method.backend=vllm needs the vllm package"):
        rejection_sampling.run(cfg, RunContext(tmp_path / "run", "test", None))


@pytest.mark.gpu
def test_vllm_backend_end_to_end(tmp_path: Path, reward_model_dir: Path) -> None:
    """The real offline engine on the tiny model through ``backend=vllm`` gives the server path's records.

    Needs ``pip install -e '.[vllm]'`` and a CUDA GPU (``gpu`` tests skip without one; CI runs the fake-engine
    tests above). vLLM loads the tiny Llama in bf16 (it downcasts float32); its head size, 16, is one FlashAttention
    takes (a multiple of 8).
    """
    pytest.importorskip("vllm", reason="vllm is not installed (pip install -e '.[vllm]')")
    basket = _write_jsonl(tmp_path / "basket.jsonl", BASKET)
    cfg = to_run_config(
        _compose_rs(
            basket,
            reward_model_dir,
            "http://127.0.0.1:9/v1",  # nothing listens there: generation must not go to a server
            tmp_path,
            "method.backend=vllm",
            "method.sampling.temperature=1.0",
            "method.vllm.gpu_memory_utilization=0.3",
            "method.vllm.max_model_len=512",
        )
    )
    metrics = rejection_sampling.run(cfg, RunContext(tmp_path / "run", "test", None))
    scored = _read_jsonl(tmp_path / "run" / "pairs.scored.jsonl")
    assert sorted(str(r["id"]) for r in scored) == ["3", "a", "b", "d"]
    assert (metrics["rs/rows_scored"], metrics["generate/rows_failed"]) == (4, 0)
    assert metrics["rs/pairs"] + metrics["rs/ties"] == 4
    assert 0 < metrics["generate/completion_tokens"] <= 4 * 4 * 8 + 4  # 4 answers of <= 8 tokens; + the first turn
    for row in scored:
        assert len(row["completions"]) == len(row["rewards"]) == len(row["finish_reasons"]) == 4
        assert set(row["finish_reasons"]) <= {"stop", "length"}
        assert all(len(c) == 1 and c[0]["role"] == "assistant" for c in row["completions"])
        assert row["chosen_score"] == max(row["rewards"]) >= row["rejected_score"] == min(row["rewards"])
        assert row["gen_model"] == "embedded:tiny-random-llama"
    follow_up = next(r for r in scored if str(r["id"]) == "3")["prompt"]
    assert [m["role"] for m in follow_up] == ["user", "assistant", "user"]
    for row in _read_jsonl(tmp_path / "run" / "pairs.jsonl"):
        assert core.row_problems(row) == []  # trains DPO as it is
