"""How a generated sequence is cut and streamed: whole characters, stop strings held back, log-probs with text."""

from __future__ import annotations

from typing import Any

import pytest

from alignment.inference.engine import Delta, Engine, Job, SamplingKey, TokenLogprob, _Sequence


@pytest.fixture(scope="module")
def engine(tiny_random_path: str) -> Engine:
    """An engine with the real tokenizer and no model: sequences are fed tokens by hand."""
    from transformers import AutoTokenizer

    engine = Engine.__new__(Engine)
    engine.tokenizer = AutoTokenizer.from_pretrained(tiny_random_path)
    engine.stop_ids = {engine.tokenizer.eos_token_id}
    engine._token_texts = {}
    return engine


def stream(engine: Engine, text: str, *, stop: list[str], max_tokens: int = 50, logprobs: bool = False) -> Any:
    """Feed the tokens of ``text`` (each with log-prob -index) to one sequence; return its deltas and completion."""
    deltas: list[Delta] = []
    job = Job([], 1, max_tokens, SamplingKey(0.0, None, None), stop, lambda _: None, emit=deltas.append)
    job.top_logprobs = 0 if logprobs else None
    sequence = _Sequence(engine, job, 0)
    for i, token in enumerate(engine.tokenizer.encode(text, add_special_tokens=False)):
        if not sequence.open:
            break
        sequence.push(token, (-float(i), ()))
    sequence.close()
    return deltas, sequence.completion()


def test_multibyte_characters_split_over_tokens_are_streamed_whole(engine: Engine) -> None:
    text = "naïve café 😀 日本語"  # the emoji and two of the kanji are each split over two or three byte tokens
    deltas, completion = stream(engine, text, stop=[])
    assert completion.text == text
    assert "".join(d.text for d in deltas) == text
    assert not any("\ufffd" in d.text for d in deltas)
    assert [d.text for d in deltas if d.text] == ["na", "ïve", " café", " 😀", " 日", "本", "語"]
    assert deltas[-1].finish_reason == "length"


def test_a_stop_string_is_held_back_until_it_is_ruled_out_then_cut(engine: Engine) -> None:
    deltas, completion = stream(engine, " stop here: END and more", stop=[": END", "hereafter"], logprobs=True)
    assert (completion.text, completion.finish_reason) == (" stop here", "stop")
    # "here" may begin "hereafter": held back until ":" rules that out; ":" may begin ": END", which then comes.
    assert [(d.text, d.finish_reason) for d in deltas] == [(" stop", None), (" ", None), ("here", None), ("", "stop")]
    expected = [TokenLogprob(2853, " stop", 0.0, (), 0), TokenLogprob(1535, " here", -1.0, (), 5)]
    assert completion.logprobs == expected  # ":" and " END" start at or after the cut
    assert [entry for d in deltas for entry in d.logprobs] == expected


def test_the_token_cap_and_the_end_of_turn_token_finish_a_sequence(engine: Engine) -> None:
    deltas, completion = stream(engine, " one two three four", stop=[], max_tokens=2)
    assert (completion.text, completion.tokens, completion.finish_reason) == (" one two", 2, "length")
    assert [(d.text, d.finish_reason) for d in deltas] == [(" one", None), (" two", "length")]
