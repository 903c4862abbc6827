"""``python -m alignment.chat``: a subprocess driven through stdin, and the REPL in this process, vs ``generate``.

Expected answers come from ``model.generate`` in this process, with the session's seed and settings. The random
model's sampled text is varied, so a second turn only matches if its prompt held the first turn (greedy decoding
of that model repeats one token, so the greedy check is the weaker one).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from alignment.chat import Chat, repl
from alignment.inference.engine import Engine, SamplingKey, resolve_model
from tests.conftest import ROOT

MODEL = "embedded:tiny-random-llama"
BANNER = "chatting with {} (commands: /reset, /system <text>, /history, /exit; Ctrl-D quits)\n"


def run_chat(args: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "alignment.chat", *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


class Reference:
    """Answers of ``model.generate`` on the chat template's rendering of a conversation."""

    def __init__(self, model: Any, tokenizer: Any, **sampling: Any) -> None:
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling

    def answer(self, messages: list[dict[str, str]], max_new_tokens: int) -> str:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([list(ids)]), max_new_tokens=max_new_tokens, pad_token_id=2, **self.sampling
            )
        generated = out[0, len(ids) :].tolist()
        if 2 in generated:  # the end-of-turn token ends the answer
            generated = generated[: generated.index(2)]
        return str(self.tokenizer.decode(generated, skip_special_tokens=True))


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess (OMP_NUM_THREADS=1): the same sums, so the same samples
    yield
    torch.set_num_threads(threads)


def lora_run_directory(tiny_random_path: str, run: Path) -> Any:
    """A run directory whose ``model/`` is a LoRA adapter with random (non-zero) weights; returns the merged model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_random_path, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    adapted = get_peft_model(base, config)
    adapted.save_pretrained(run / "model")
    AutoTokenizer.from_pretrained(tiny_random_path).save_pretrained(run / "model")
    (run / "results.json").write_text(json.dumps({"train_loss": 1.0}))
    return adapted.merge_and_unload().eval()


def test_session_on_a_lora_run_directory(tiny_random_path: str, tmp_path: Path, one_thread: None) -> None:
    """Two turns (the second sees the first), /history, /system, /reset, an unknown command, /exit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    merged = lora_run_directory(tiny_random_path, run)
    stdin = "Hello there\nTell me more.\n/history\n/system Be brief.\nWhat now?\n/reset\n/history\n/bogus\n/exit\nnever"
    result = run_chat([str(run), "--temperature", "1", "--seed", "5", "--max-new-tokens", "7"], stdin)
    assert result.returncode == 0, result.stderr[-3000:]

    tokenizer = AutoTokenizer.from_pretrained(tiny_random_path)
    reference = Reference(merged, tokenizer, do_sample=True, top_k=0, top_p=1.0)
    torch.manual_seed(5)  # once, after loading, as the session does
    first = [{"role": "user", "content": "Hello there"}]
    answer1 = reference.answer(first, 7)
    second = [*first, {"role": "assistant", "content": answer1}, {"role": "user", "content": "Tell me more."}]
    answer2 = reference.answer(second, 7)
    answer3 = reference.answer(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What now?"}], 7
    )
    assert len({answer1, answer2, answer3}) == 3, "the answers should differ for this check to mean anything"
    prompt = ">>> "
    expected = (
        BANNER.format(run)
        + f"{prompt}{answer1}\n"
        + f"{prompt}{answer2}\n"
        + f"{prompt}user: Hello there\nassistant: {answer1}\nuser: Tell me more.\nassistant: {answer2}\n(4 messages)\n"
        + f"{prompt}(system prompt set, history cleared)\n"
        + f"{prompt}{answer3}\n"
        + f"{prompt}(history cleared)\n"
        + f"{prompt}system: Be brief.\n(0 messages)\n"
        + f"{prompt}unknown command /bogus (commands: /reset, /system <text>, /history, /exit)\n"
        + prompt
    )
    assert result.stdout == expected
    # The base model without the adapter answers otherwise: the session did load the adapter.
    base = AutoModelForCausalLM.from_pretrained(tiny_random_path, dtype=torch.float32).eval()
    torch.manual_seed(5)
    assert Reference(base, tokenizer, do_sample=True, top_k=0, top_p=1.0).answer(first, 7) != answer1


def test_greedy_answers_equal_generate_and_end_of_input_exits(tiny_random_path: str) -> None:
    """The REPL in this process on the embedded model (``--temperature 0``), fed lines until end of input."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = Engine.load(MODEL)
    session = Chat(engine, system="You are terse.", key=SamplingKey(0.0, None, None), max_new_tokens=6)
    lines = iter(["Hi", "  ", "And then?"])
    prompts: list[str] = []

    def read_or_eof(prompt: str) -> str:
        line = next(lines, None)
        prompts.append(prompt)
        if line is None:
            raise EOFError
        return line

    out = io.StringIO()
    repl(session, read_or_eof, out)
    model = AutoModelForCausalLM.from_pretrained(tiny_random_path, dtype=torch.float32).eval()
    reference = Reference(model, AutoTokenizer.from_pretrained(tiny_random_path), do_sample=False)
    first = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    answer1 = reference.answer(first, 6)
    second = [*first, {"role": "assistant", "content": answer1}, {"role": "user", "content": "And then?"}]
    answer2 = reference.answer(second, 6)
    assert out.getvalue() == f"{answer1}\n{answer2}\n\n"  # the blank line is skipped; end of input adds a newline
    assert prompts == [">>> "] * 4
    assert session.history == [*second[1:], {"role": "assistant", "content": answer2}]


def test_a_run_directory_without_a_model_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(FileNotFoundError, match="without a model/ folder"):
        resolve_model(str(tmp_path))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path / "model")
    assert resolve_model(str(tmp_path / "model")) == str(tmp_path / "model")
    (tmp_path / "model" / "config.json").unlink()
    assert resolve_model(MODEL) == MODEL
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        resolve_model(str(tmp_path / "model"))
