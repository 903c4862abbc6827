"""Validation reports every bad row as ``where: column: reason`` before anything is trained."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset, DatasetDict

from alignment.data.config import SourceConfig
from alignment.data.load import load_source, read_jsonl
from alignment.data.validate import (
    MAX_REPORTED,
    ORIGIN,
    DataError,
    check_rows,
    empty_split_error,
    message_list_problems,
    require_columns,
)
from alignment.methods.sft import row_problems

COLUMNS = ("messages",)
VALIDATE = partial(row_problems, roles=["assistant"])
ROLES_LIST = "system, user, assistant, tool"
GOOD = {"messages": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]}
MESSAGES_HINT = (
    "hint: the method reads columns messages; the rows lack 'messages'; data options whose rows have them: data=demo"
)
"""The line a missing ``messages`` column adds: the demo data has the column."""


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _load_jsonl(path: Path) -> None:
    load_source(SourceConfig(path=str(path)), VALIDATE, COLUMNS)


def test_malformed_json_line_reports_line_and_column(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), '{"messages": [}', json.dumps(GOOD)])
    with pytest.raises(DataError) as caught:
        _load_jsonl(path)
    assert str(caught.value) == f"{path}:2:15: malformed JSON: Expecting value"


def test_malformed_json_at_the_end_of_a_line_reports_that_column(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), '{"messages": []', '{"messages": [], "x": '])
    with pytest.raises(DataError) as caught:
        list(read_jsonl(path))
    assert str(caught.value) == f"{path}:2:16: malformed JSON: Expecting ',' delimiter"
    path = _write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), '{"messages": [], "x": '])
    with pytest.raises(DataError) as caught:
        list(read_jsonl(path))
    assert str(caught.value) == f"{path}:2:23: malformed JSON: Expecting value"


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), "", "   ", "{oops"])
    with pytest.raises(DataError, match=rf"^{path}:4:2: malformed JSON: Expecting property name"):
        _load_jsonl(path)


def test_non_object_line_is_reported(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "list.jsonl", [json.dumps(GOOD), json.dumps([GOOD])])
    with pytest.raises(DataError) as caught:
        list(read_jsonl(path))
    assert str(caught.value) == f"{path}:2: expected a JSON object per line, got list"


BAD_ROWS: list[tuple[dict[str, Any], str]] = [
    (
        {"conversation": GOOD["messages"]},
        "missing column 'messages' (columns present: conversation)",
    ),
    (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]},
        f"column 'messages'[1].role: unknown role 'bot' (expected one of {ROLES_LIST})",
    ),
    (
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "5"}]},
        "column 'messages'[0].content: expected a string, got int 5",
    ),
    (
        {"messages": []},
        "column 'messages': expected a non-empty list of {role, content} messages, got list []",
    ),
]


@pytest.mark.parametrize(("row", "reason"), BAD_ROWS, ids=["missing", "role", "content", "empty"])
def test_bad_row_reports_line_column_and_reason(tmp_path: Path, row: dict[str, Any], reason: str) -> None:
    path = _write_lines(tmp_path / "data.jsonl", [json.dumps(GOOD), json.dumps(GOOD), json.dumps(row)])
    with pytest.raises(DataError) as caught:
        _load_jsonl(path)
    assert str(caught.value).splitlines() == [
        "1 invalid row(s); nothing was trained:",
        f"  {path}:3: {reason}",
        *([MESSAGES_HINT] if reason.startswith("missing column") else []),
    ]


def test_all_bad_rows_listed_in_one_error(tmp_path: Path) -> None:
    lines = [json.dumps(GOOD)]
    for row, _ in BAD_ROWS:
        lines += [json.dumps(row), json.dumps(GOOD)]
    path = _write_lines(tmp_path / "data.jsonl", lines)
    with pytest.raises(DataError) as caught:
        _load_jsonl(path)
    assert str(caught.value).splitlines() == [
        "4 invalid row(s); nothing was trained:",
        *(f"  {path}:{2 * i + 2}: {reason}" for i, (_, reason) in enumerate(BAD_ROWS)),
        MESSAGES_HINT,
    ]


def test_every_problem_of_a_row_is_listed(tmp_path: Path) -> None:
    row = {"messages": [{"role": "robot", "content": None}, "hello"]}
    path = _write_lines(tmp_path / "data.jsonl", [json.dumps(row)])
    with pytest.raises(DataError) as caught:
        _load_jsonl(path)
    assert str(caught.value).splitlines() == [
        "1 invalid row(s); nothing was trained:",
        f"  {path}:1: column 'messages'[0].role: unknown role 'robot' (expected one of {ROLES_LIST})",
        f"  {path}:1: column 'messages'[0].content: expected a string, got null",
        f"  {path}:1: column 'messages'[1]: expected an object with 'role' and 'content', got str 'hello'",
    ]


def test_eval_file_is_validated_too(tmp_path: Path) -> None:
    train = _write_lines(tmp_path / "train.jsonl", [json.dumps(GOOD)])
    evaluation = _write_lines(tmp_path / "eval.jsonl", [json.dumps(GOOD), json.dumps({"messages": "hi"})])
    with pytest.raises(DataError, match=rf"{evaluation}:2: column 'messages': expected a non-empty list"):
        load_source(SourceConfig(path=str(train), eval_path=str(evaluation)), VALIDATE, COLUMNS)


def test_many_bad_rows_are_counted_and_the_listing_capped(tmp_path: Path) -> None:
    bad = MAX_REPORTED + 5  # each with its own problem (an unknown role named after its row), so none is grouped
    rows = [{"messages": [{"role": f"r{i}", "content": "x"}]} for i in range(bad)]
    path = _write_lines(tmp_path / "data.jsonl", [json.dumps(row) for row in rows])
    with pytest.raises(DataError) as caught:
        _load_jsonl(path)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{bad} invalid row(s); nothing was trained:"
    assert lines[-1] == "  … and 5 more"
    assert len(lines) == 1 + MAX_REPORTED + 1
    assert lines[MAX_REPORTED].startswith(f"  {path}:{MAX_REPORTED}: ")


def test_sft_validator_needs_a_non_empty_trained_turn(tmp_path: Path) -> None:
    only_user = {"messages": [{"role": "user", "content": "hi"}]}
    empty_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}
    path = _write_lines(tmp_path / "data.jsonl", [json.dumps(only_user), json.dumps(empty_answer)])
    with pytest.raises(DataError) as caught:
        _load_jsonl(path)
    lines = str(caught.value).splitlines()
    assert lines[:2] == [
        "2 invalid row(s); nothing was trained:",
        f"  {path}:1: column 'messages': no message with a trained role (assistant); it would carry no loss",
    ]
    assert lines[2].startswith(f"  {path}:2: column 'messages'")
    assert "empty" in lines[2]
    assert len(lines) == 3


def test_save_to_disk_source_reports_name_split_and_row(tmp_path: Path) -> None:
    rows = [
        GOOD,
        {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]},
        GOOD,
        {"messages": []},
    ]
    folder = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list([GOOD])}).save_to_disk(str(folder))
    with pytest.raises(DataError) as caught:
        load_source(SourceConfig(path=str(folder), split="train", eval_split="test"), VALIDATE, COLUMNS)
    assert str(caught.value).splitlines() == [
        "2 invalid row(s); nothing was trained:",
        f"  {folder}[train] row 1: column 'messages'[1].role: unknown role 'bot' (expected one of {ROLES_LIST})",
        f"  {folder}[train] row 3: column 'messages': expected a non-empty list of {{role, content}} messages, "
        "got list []",
    ]


def test_save_to_disk_source_with_missing_column(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    # A lone ``text`` column would be read as TRL's language-modelling format (tests/data/test_formats.py).
    DatasetDict({"train": Dataset.from_list([{"chat": "a"}, {"chat": "b"}])}).save_to_disk(str(folder))
    with pytest.raises(DataError) as caught:
        load_source(SourceConfig(path=str(folder)), VALIDATE, COLUMNS)
    assert str(caught.value).splitlines()[1:] == [
        *(f"  {folder}[train] row {i}: missing column 'messages' (columns present: chat)" for i in range(2)),
        MESSAGES_HINT,
    ]


# The building blocks directly


def test_message_list_problems_accepts_a_good_conversation() -> None:
    assert message_list_problems(GOOD["messages"], "messages") == []
    tool_turn = [{"role": "tool", "content": "{}"}, {"role": "system", "content": ""}]
    assert message_list_problems(tool_turn, "chosen") == []


@pytest.mark.parametrize(
    ("value", "problems"),
    [
        (None, ["column 'chosen': expected a non-empty list of {role, content} messages, got null"]),
        ("hi", ["column 'chosen': expected a non-empty list of {role, content} messages, got str 'hi'"]),
        ([{"content": "x"}], [f"column 'chosen'[0].role: unknown role None (expected one of {ROLES_LIST})"]),
        ([{"role": "user"}], ["column 'chosen'[0].content: expected a string, got null"]),
        (
            [{"role": "user", "content": ["x" * 50]}],
            [f"column 'chosen'[0].content: expected a string, got list {str(['x' * 50])[:40]}…"],
        ),
    ],
)
def test_message_list_problems(value: Any, problems: list[str]) -> None:
    assert message_list_problems(value, "chosen") == problems


def test_require_columns() -> None:
    assert require_columns({"prompt": "", "chosen": []}, ["prompt", "chosen"]) == []
    assert require_columns({"prompt": ""}, ["prompt", "chosen", "rejected"]) == [
        "missing column 'chosen' (columns present: prompt)",
        "missing column 'rejected' (columns present: prompt)",
    ]
    assert require_columns({}, ["prompt"]) == ["missing column 'prompt' (columns present: none)"]


def test_check_rows_passes_clean_rows() -> None:
    check_rows([("a:1", GOOD), ("a:2", GOOD)], VALIDATE)


def test_check_rows_says_what_the_caller_did_not_do() -> None:
    with pytest.raises(DataError) as caught:
        check_rows([("a:1", {"messages": []})], VALIDATE, outcome="nothing was sent")
    assert str(caught.value).splitlines()[0] == "1 invalid row(s); nothing was sent:"


def _origins(*origins: str) -> Dataset:
    return Dataset.from_list([{"x": i, ORIGIN: origin} for i, origin in enumerate(origins)])


def test_an_emptied_split_names_its_files_the_counts_and_the_reason() -> None:
    dataset = _origins("/d/pairs.jsonl:1", "/d/pairs.jsonl:2", "hub/x[test] row 0")
    error = empty_split_error("train", dataset, {"chosen == rejected": 40, "no token": 0}, unit="pairs")
    assert str(error) == (
        "train split of /d/pairs.jsonl, hub/x[test]: all 40 pairs dropped (chosen == rejected); "
        "nothing left to train on, nothing was trained"
    )
    error = empty_split_error("eval", dataset, {"chosen == rejected": 3, "no token left": 2}, unit="pairs")
    assert str(error) == (
        "eval split of /d/pairs.jsonl, hub/x[test]: all 5 pairs dropped (3 chosen == rejected, 2 no token left); "
        "nothing left to evaluate, nothing was trained (fix the data, or turn evaluation off: "
        "data.eval_fraction=0 and no eval_path/eval_split)"
    )


def test_an_emptied_split_without_origins_still_names_the_reason() -> None:
    error = empty_split_error("train", Dataset.from_list([{"x": 1}]), {"equal rewards": 2}, unit="groups")
    assert str(error).startswith("train split: all 2 groups dropped (equal rewards)")


# Many rows with the same problem: grouped, with the method's columns and the data option that has them


def test_gpo_on_the_sft_demo_groups_identical_problems_and_suggests_demo_gpo() -> None:
    """method=gpo with data=demo: 1000 rows lack the same two columns, reported as two entries and a hint."""
    from alignment.data.load import resolve_path
    from alignment.methods.gpo.gpo import COLUMNS as GPO_COLUMNS
    from alignment.methods.gpo.gpo import row_problems as gpo_row_problems

    with pytest.raises(DataError) as caught:
        load_source(SourceConfig(path="embedded:train.jsonl"), gpo_row_problems, GPO_COLUMNS)
    train = resolve_path("embedded:train.jsonl")
    present = "(columns present: chosen, messages, prompt, rejected)"
    assert str(caught.value).splitlines() == [
        "1000 invalid row(s); nothing was trained:",
        f"  1000 rows: missing column 'completions' {present}",
        f"    at {train}:1, {train}:2, {train}:3, then {train}:4-1000",
        f"  1000 rows: missing column 'rewards' {present}",
        f"    at {train}:1, {train}:2, {train}:3, then {train}:4-1000",
        "hint: the method reads columns prompt, completions, rewards; the rows lack 'completions', 'rewards'; "
        "data options whose rows have them: data=demo_gpo",
    ]


def test_a_shared_problem_lists_its_rows_as_ranges_and_rare_ones_stay_in_place() -> None:
    bad = {"messages": []}
    rows = [("f.jsonl:1", GOOD), *((f"f.jsonl:{n}", bad) for n in (2, 3, 4, 5, 6, 9, 10, 12))]
    rows += [("g.jsonl:7", {"messages": "hi"}), ("ds[train] row 4", bad), ("ds[train] row 5", bad)]
    with pytest.raises(DataError) as caught:
        check_rows(rows, VALIDATE)
    empty = "column 'messages': expected a non-empty list of {role, content} messages, got list []"
    assert str(caught.value).splitlines() == [
        "11 invalid row(s); nothing was trained:",
        f"  10 rows: {empty}",
        "    at f.jsonl:2, f.jsonl:3, f.jsonl:4, then f.jsonl:5-6, f.jsonl:9-10, f.jsonl:12, ds[train] rows 4-5",
        "  g.jsonl:7: column 'messages': expected a non-empty list of {role, content} messages, got str 'hi'",
    ]


def test_missing_columns_suggest_every_data_option_that_has_them() -> None:
    """Renamed columns count (demo_classification maps question -> text); hub-only options are not read."""
    from alignment.data.validate import data_options_with

    assert data_options_with(["text", "label"]) == [
        "demo_classification",
        "demo_classification_tags",
        "demo_classification_verdict",
    ]
    assert data_options_with(["prompt", "chosen", "rejected"]) == ["demo", "demo_reward"]
    assert data_options_with(["no_such_column"]) == []
    with pytest.raises(DataError, match=r"hint: the rows lack 'x'; rename a column with data.sources"):
        check_rows([("a:1", {})], lambda row: require_columns(row, ["x"]))
