"""Formats users already have (ShareGPT, Alpaca, TRL's standard ones): detection, conversion, errors, training.

Every expected conversion below is written out by hand from the README "Data formats" table.
"""

from __future__ import annotations

import dataclasses
import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset, DatasetDict

from alignment.config import to_run_config
from alignment.data.config import DataConfig, SourceConfig, SourceFormat
from alignment.data.formats import SHAREGPT_ROLES, detect
from alignment.data.load import ORIGIN, load_source
from alignment.data.mix import build_splits
from alignment.data.validate import DataError
from alignment.methods import sft
from alignment.methods.pairwise import core

SFT = (partial(sft.row_problems, roles=["assistant"]), ("messages",))
PAIRS = (core.row_problems, core.COLUMNS)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def load(path: str, checks: tuple[Any, tuple[str, ...]] = SFT, **kwargs: Any) -> Dataset:
    validate, keep = checks
    return load_source(SourceConfig(path=path, **kwargs), validate, keep).train


def error_of(path: str, checks: tuple[Any, tuple[str, ...]] = SFT, **kwargs: Any) -> str:
    with pytest.raises(DataError) as caught:
        load(path, checks, **kwargs)
    return str(caught.value)


SHAREGPT = [
    {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4"},
        ]
    },
    {
        "system": "You add.",
        "id": 7,
        "conversations": [{"from": "user", "value": "1+1?"}, {"from": "assistant", "value": "2"}],
    },
    {
        "conversations": [
            {"from": "human", "value": "How old is Ann?"},
            {"from": "function_call", "value": '{"name": "age", "arguments": {"who": "Ann"}}'},
            {"from": "observation", "value": '{"age": 33}'},
            {"from": "gpt", "value": "33"},
        ]
    },
]
SHAREGPT_MESSAGES = [
    [system("Be brief."), user("2+2?"), assistant("4")],
    [system("You add."), user("1+1?"), assistant("2")],
    [
        user("How old is Ann?"),
        assistant('{"name": "age", "arguments": {"who": "Ann"}}'),
        {"role": "tool", "content": '{"age": 33}'},
        assistant("33"),
    ],
]
ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "Be warm."},
    {"instruction": "And 3+3?", "output": "6", "history": [["1+1?", "2"], ["2+2?", "4"]]},
]
ALPACA_MESSAGES = [
    [user("Add the numbers.\n2 and 3"), assistant("5")],
    [system("Be warm."), user("Say hi."), assistant("Hi!")],
    [user("1+1?"), assistant("2"), user("2+2?"), assistant("4"), user("And 3+3?"), assistant("6")],
]
PROMPT_COMPLETION = [
    {"prompt": "2+2?", "completion": "4"},
    {"prompt": [system("S"), user("3+3?")], "completion": [assistant("6")]},
]
PROMPT_COMPLETION_MESSAGES = [[user("2+2?"), assistant("4")], [system("S"), user("3+3?"), assistant("6")]]
PREFERENCE = [
    {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5},
    {"prompt": [system("S"), user("3+3?")], "chosen": "6", "rejected": [assistant("7")]},
    {"chosen": [user("1+1?"), assistant("2")], "rejected": [user("1+1?"), assistant("3")]},  # implicit prompt
]


# --- each format, converted and validated ----------------------------------------------------------------------


def test_sharegpt_rows_become_messages(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sharegpt.jsonl", SHAREGPT)
    loaded = load(path)
    assert loaded.column_names == ["messages", ORIGIN]
    assert loaded["messages"] == SHAREGPT_MESSAGES
    assert loaded[ORIGIN] == [f"{path}:1", f"{path}:2", f"{path}:3"]


def test_alpaca_rows_become_messages(tmp_path: Path) -> None:
    assert load(write_jsonl(tmp_path / "alpaca.jsonl", ALPACA))["messages"] == ALPACA_MESSAGES


def test_prompt_completion_rows_become_messages(tmp_path: Path) -> None:
    loaded = load(write_jsonl(tmp_path / "pc.jsonl", PROMPT_COMPLETION))
    assert loaded["messages"] == PROMPT_COMPLETION_MESSAGES


def test_string_preference_rows_become_message_lists(tmp_path: Path) -> None:
    loaded = load(write_jsonl(tmp_path / "prefs.jsonl", PREFERENCE), PAIRS)
    assert loaded.column_names == ["prompt", "chosen", "rejected", "margin", ORIGIN]
    assert loaded[0] | {ORIGIN: None} == {
        "prompt": [user("2+2?")],
        "chosen": [assistant("4")],
        "rejected": [assistant("5")],
        "margin": 1.5,
        ORIGIN: None,
    }
    assert (loaded[1]["prompt"], loaded[1]["chosen"], loaded[1]["rejected"]) == (
        [system("S"), user("3+3?")],
        [assistant("6")],
        [assistant("7")],
    )
    assert (loaded[2]["prompt"], loaded[2]["margin"]) == (None, None)  # the pairwise loader splits it later


def test_text_rows_are_kept_for_methods_that_read_text(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lm.jsonl", [{"text": "Once upon a time."}, {"text": "The end."}])
    assert load(path, (lambda row: [], ("text",)))["text"] == ["Once upon a time.", "The end."]


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"messages": []}, {"conversations": []}], SourceFormat.native),  # messages wins
        ([{"conversations": []}], SourceFormat.sharegpt),
        ([{"instruction": "", "output": ""}], SourceFormat.alpaca),
        ([{"prompt": "p", "chosen": [], "rejected": []}], SourceFormat.preference),
        ([{"prompt": [], "chosen": [], "rejected": []}], SourceFormat.native),  # already message lists
        ([{"prompt": "p", "completion": "c"}], SourceFormat.prompt_completion),
        ([{"prompt": "p", "completion": "c", "label": True}], SourceFormat.native),  # TRL's unpaired preference
        ([{"text": "t"}], SourceFormat.text),
        ([{"text": "t", "label": 1}], SourceFormat.native),  # the classification columns
        ([{"prompt": [], "completions": [], "rewards": []}], SourceFormat.native),  # GPO groups
    ],
)
def test_detection_by_columns(rows: list[dict[str, Any]], expected: SourceFormat) -> None:
    assert detect(rows) is expected


# --- mixtures, explicit formats, hub copies ---------------------------------------------------------------------


def test_sources_in_different_formats_mix_into_one_dataset(tmp_path: Path) -> None:
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", SHAREGPT)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    native = write_jsonl(tmp_path / "native.jsonl", [{"messages": [user("hi"), assistant("hello")]}])
    saved = tmp_path / "pc_saved"
    Dataset.from_list(PROMPT_COMPLETION[:1]).save_to_disk(str(saved))
    sources = [SourceConfig(path=p) for p in (sharegpt, alpaca, native, str(saved))]
    splits = build_splits(DataConfig(sources=sources, eval_fraction=0.0), *SFT)
    assert splits.train.column_names == ["messages", ORIGIN]
    assert splits.train["messages"] == [
        *SHAREGPT_MESSAGES,
        *ALPACA_MESSAGES,
        [user("hi"), assistant("hello")],
        PROMPT_COMPLETION_MESSAGES[0],
    ]
    assert splits.train[ORIGIN][3:7] == [f"{alpaca}:1", f"{alpaca}:2", f"{alpaca}:3", f"{native}:1"]
    assert splits.train[ORIGIN][-1] == f"{saved}[train] row 0"


def test_an_explicit_format_overrides_detection(tmp_path: Path) -> None:
    # prompt/completion/label is TRL's unpaired preference: auto leaves it alone, so SFT finds no messages...
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "2+2?", "completion": "4", "label": True}])
    assert f"{path}:1: missing column 'messages' (columns present: completion, label, prompt)" in error_of(path)
    # ...unless the user says these are prompt/completion rows.
    assert load(path, format=SourceFormat.prompt_completion)["messages"] == [[user("2+2?"), assistant("4")]]
    # And native means unchanged: string preference rows then fail the pairwise check.
    prefs = write_jsonl(tmp_path / "prefs.jsonl", PREFERENCE[:1])
    message = error_of(prefs, PAIRS, format=SourceFormat.native)
    assert f"{prefs}:1: column 'prompt': expected a non-empty list of {{role, content}} messages, got str '2+2?'" in (
        message
    )


def test_a_format_set_in_yaml_is_an_enum_and_a_typo_fails_at_conversion() -> None:
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"sources": [{"path": "a.jsonl", "format": "alpaca"}]})
    data = OmegaConf.to_object(cfg)
    assert isinstance(data, DataConfig)
    assert data.sources[0].format is SourceFormat.alpaca
    with pytest.raises(ValidationError, match="Invalid value 'csv'"):
        OmegaConf.merge(OmegaConf.structured(DataConfig), {"sources": [{"path": "a.jsonl", "format": "csv"}]})


def test_hub_style_save_to_disk_copies_convert_train_and_eval_splits(tmp_path: Path) -> None:
    folder = tmp_path / "sharegpt_hub"
    rows = [{"system": None, "id": None, **row} for row in SHAREGPT]  # from_list takes the first row's columns
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:1])}).save_to_disk(str(folder))
    loaded = load_source(SourceConfig(path=str(folder), eval_split="test"), *SFT)
    assert loaded.train["messages"] == SHAREGPT_MESSAGES
    assert loaded.train[ORIGIN] == [f"{folder}[train] row {i}" for i in range(3)]
    assert loaded.eval is not None
    assert loaded.eval["messages"] == SHAREGPT_MESSAGES[:1]

    prefs = tmp_path / "prefs_hub"
    Dataset.from_list([{"prompt": "2+2?", "chosen": "4", "rejected": "5"}] * 2).save_to_disk(str(prefs))
    pairs = load(str(prefs), PAIRS)
    assert pairs["chosen"] == [[assistant("4")]] * 2
    assert pairs["margin"] == [None, None]

    bad = tmp_path / "alpaca_hub"
    Dataset.from_list([ALPACA[0], {**ALPACA[0], "output": ""}]).save_to_disk(str(bad))
    assert (
        f"{bad}[train] row 1: column 'messages'[1].content: empty assistant turn (trained turns need text) "
        "(after converting the alpaca row)"
    ) in error_of(str(bad))


# --- errors: file:line in the row's own terms, and formats the method cannot read -------------------------------


ROLES = ", ".join(SHAREGPT_ROLES)


@pytest.mark.parametrize(
    ("good", "bad", "problem"),
    [
        (
            SHAREGPT[0],
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]},
            f"column 'conversations'[1].from: unknown speaker 'bot' (accepted: {ROLES})",
        ),
        (SHAREGPT[0], {"conversations": "hi"}, "column 'conversations': expected a non-empty list of {from, value}"),
        (
            SHAREGPT[0],
            {"system": "S", "conversations": SHAREGPT[0]["conversations"]},
            "column 'system' and a system turn in 'conversations'[0]: give the system prompt once",
        ),
        (ALPACA[0], {"instruction": "Add.", "output": 5}, "column 'output': expected a string, got int"),
        (
            ALPACA[0],
            {"instruction": "Add.", "output": "5", "history": [["1+1?"]]},
            "column 'history'[0]: expected a [user, assistant] pair of strings, got list ['1+1?']",
        ),
        (ALPACA[0], {"instruction": " ", "output": "5"}, "columns 'instruction' and 'input': both empty"),
        (
            PROMPT_COMPLETION[0],
            {"prompt": "2+2?", "completion": None},
            "column 'completion': expected a string or a list of {role, content} messages, got null",
        ),
        (
            PROMPT_COMPLETION[0],
            {"prompt": [{"role": "bot", "content": "x"}], "completion": "4"},
            "column 'prompt'[0].role: unknown role 'bot' (expected one of system, user, assistant, tool)",
        ),
        (PROMPT_COMPLETION[0], {"prompt": "2+2?", "completion": ""}, "column 'messages'[1].content: empty assistant"),
    ],
)
def test_a_malformed_row_names_file_line_and_its_own_column(
    tmp_path: Path, good: dict[str, Any], bad: dict[str, Any], problem: str
) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [good, bad, good])
    message = error_of(path)
    assert message.startswith("1 invalid row(s); nothing was trained:\n  "), message
    assert f"{path}:2: {problem}" in message


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (
            {"chosen": "4", "rejected": "5"},
            "missing column 'prompt': string 'chosen'/'rejected' need one (only message lists can share their start "
            "as an implicit prompt)",
        ),
        ({"prompt": "2+2?", "chosen": 4, "rejected": "5"}, "column 'chosen': expected a string or a list of"),
        (
            {"prompt": "2+2?", "chosen": " ", "rejected": "5"},
            "column 'chosen': empty completion (after converting the preference row)",
        ),
    ],
)
def test_a_malformed_preference_row_names_file_line(tmp_path: Path, bad: dict[str, Any], problem: str) -> None:
    path = write_jsonl(tmp_path / "prefs.jsonl", [PREFERENCE[0], bad])
    assert f"{path}:2: {problem}" in error_of(path, PAIRS)


def test_a_malformed_text_row_names_file_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lm.jsonl", [{"text": "fine"}, {"text": 3}])
    assert f"{path}:2: column 'text': expected a string, got int" in error_of(path, (lambda row: [], ("text",)))


def test_plain_text_for_sft_names_the_formats_sft_reads(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lm.jsonl", [{"text": "Once upon a time."}])
    assert error_of(path) == (
        f"data source {path!r}: its rows are in the text format (detected from its columns), which gives 'text'; "
        "plain text has no user or assistant turns to train on; this method reads 'messages', which these formats "
        "give: native, sharegpt, alpaca, prompt_completion (README: Data formats)"
    )


def test_prompt_completion_for_dpo_names_the_formats_dpo_reads(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pc.jsonl", PROMPT_COMPLETION)
    assert error_of(path, PAIRS, format=SourceFormat.prompt_completion) == (
        f"data source {path!r}: its rows are in the prompt_completion format (set by data.sources[].format), which "
        "gives 'messages'; this method reads 'prompt', 'chosen', 'rejected', 'margin', which these formats give: "
        "native, preference (README: Data formats)"
    )


def test_the_plan_converts_and_rejects_like_a_run(compose: Any, tmp_path: Path) -> None:
    from alignment.plan import check_data

    path = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    cfg = to_run_config(compose(["method=sft", "model=tiny_random"]))
    one = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=[SourceConfig(path=path)]))
    assert check_data(one) == [f"{path}: first 3 rows valid (alpaca format → columns messages)"]
    write_jsonl(tmp_path / "alpaca.jsonl", [*ALPACA, {"instruction": "x", "output": 1}])
    with pytest.raises(DataError) as planned:
        check_data(one)
    assert f"{path}:4: column 'output': expected a string, got int" in str(planned.value)
    assert str(planned.value) == error_of(path)


# --- training on converted rows ---------------------------------------------------------------------------------


TINY_RUN = [
    "experiment=debug",
    "logger=none",
    "method.max_steps=2",
    "method.per_device_train_batch_size=2",
    "method.logging_steps=1",
    "method.save_strategy=no",
    "method.eval_steps=2",
]


@pytest.mark.slow
def test_sft_trains_on_an_alpaca_file(compose: Any, tmp_path: Path) -> None:
    """The eval prompts are the rendered Alpaca conversations and their references the Alpaca outputs."""
    from tests.methods.helpers import read_logs, run_method

    train = write_jsonl(
        tmp_path / "train.jsonl",
        [{"instruction": f"What is {i} + {i}?", "input": "", "output": f"{i} + {i} = {2 * i}"} for i in range(8)],
    )
    evaluation = write_jsonl(tmp_path / "eval.jsonl", ALPACA[:2])
    out = tmp_path / "run"
    metrics = run_method(
        sft.run,
        compose,
        out,
        [
            "method=sft",
            *TINY_RUN,
            "method.max_new_tokens=4",
            f"data.sources=[{{path: '{train}', eval_path: '{evaluation}', format: alpaca}}]",
        ],
    )
    assert math.isfinite(metrics["train_loss"])
    assert math.isfinite(metrics["eval_loss"])
    assert max(log["step"] for log in read_logs(out)) == 2
    generations = [json.loads(line) for line in (out / "generations" / "step_000000.jsonl").read_text().splitlines()]
    assert [(g["origin"], g["reference"]) for g in generations] == [
        (f"{evaluation}:1", "5"),
        (f"{evaluation}:2", "Hi!"),
    ]
    assert "Add the numbers.\n2 and 3" in generations[0]["prompt"]
    assert "Be warm." in generations[1]["prompt"]


@pytest.mark.slow
def test_dpo_trains_on_string_preference_rows(compose: Any, tmp_path: Path) -> None:
    """Before the first step the policy equals its reference copy, so every pair's DPO loss is ln 2."""
    from tests.methods.helpers import read_logs, run_method

    rows = [{"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}"} for i in range(12)]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = tmp_path / "run"
    metrics = run_method(
        core_run("dpo"),
        compose,
        out,
        ["method=dpo", *TINY_RUN, f"data.sources=[{{path: '{path}'}}]", "data.eval_fraction=0.25"],
    )
    assert math.isfinite(metrics["train_loss"])
    start = next(log for log in read_logs(out) if log["step"] == 0 and "eval_loss" in log)
    assert start["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert start["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-5)


def core_run(method: str) -> Any:
    from alignment.registry import METHODS

    return METHODS[method].run
