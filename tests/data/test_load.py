"""One source to train/eval datasets: JSONL, ``save_to_disk`` folders, ``embedded:`` paths, column renames."""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset, DatasetDict

from alignment.data import demo
from alignment.data import load as loading
from alignment.data.config import SourceConfig
from alignment.data.load import EMBEDDED_DIR, ORIGIN, load_source, resolve_path
from alignment.data.validate import DataError
from alignment.methods.sft import row_problems

COLUMNS = ("messages",)
VALIDATE = partial(row_problems, roles=["assistant"])


def conversation(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_jsonl_with_eval_path(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": conversation(i)} for i in range(5)])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"messages": conversation(i)} for i in range(100, 103)])
    loaded = load_source(SourceConfig(path=str(train), eval_path=str(evaluation)), VALIDATE, COLUMNS)

    assert loaded.train.column_names == ["messages", ORIGIN]
    assert loaded.train["messages"] == [conversation(i) for i in range(5)]
    assert loaded.train[ORIGIN] == [f"{train}:{line}" for line in range(1, 6)]
    assert loaded.eval is not None
    assert loaded.eval["messages"] == [conversation(i) for i in range(100, 103)]
    assert loaded.eval[ORIGIN] == [f"{evaluation}:{line}" for line in range(1, 4)]


def test_jsonl_without_eval_path_has_no_eval_part(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": conversation(0)}])
    assert load_source(SourceConfig(path=str(train)), VALIDATE, COLUMNS).eval is None


def test_columns_are_renamed_and_extra_columns_dropped(tmp_path: Path) -> None:
    rows = [{"conversation": conversation(i), "id": i, "source": "x"} for i in range(3)]
    path = write_jsonl(tmp_path / "renamed.jsonl", rows)
    loaded = load_source(SourceConfig(path=str(path), columns={"conversation": "messages"}), VALIDATE, COLUMNS)
    assert loaded.train.column_names == ["messages", ORIGIN]
    assert loaded.train["messages"] == [conversation(i) for i in range(3)]


def test_without_the_rename_the_column_is_missing(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "renamed.jsonl", [{"conversation": conversation(0)}])
    with pytest.raises(DataError, match="missing column 'messages'"):
        load_source(SourceConfig(path=str(path)), VALIDATE, COLUMNS)


def _save_dict(folder: Path, splits: dict[str, list[dict[str, Any]]]) -> Path:
    DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(str(folder))
    return folder


def test_save_to_disk_dataset_dict_with_split_and_eval_split(tmp_path: Path) -> None:
    folder = _save_dict(
        tmp_path / "dict",
        {
            "train_sft": [{"chat": conversation(i), "score": i} for i in range(4)],
            "test_sft": [{"chat": conversation(i), "score": i} for i in range(10, 12)],
            "other": [{"chat": conversation(99), "score": 0}],
        },
    )
    cfg = SourceConfig(path=str(folder), split="train_sft", eval_split="test_sft", columns={"chat": "messages"})
    loaded = load_source(cfg, VALIDATE, COLUMNS)

    assert loaded.train.column_names == ["messages", ORIGIN]
    assert loaded.train["messages"] == [conversation(i) for i in range(4)]
    assert loaded.train[ORIGIN] == [f"{folder}[train_sft] row {i}" for i in range(4)]
    assert loaded.eval is not None
    assert loaded.eval["messages"] == [conversation(i) for i in range(10, 12)]
    assert loaded.eval[ORIGIN] == [f"{folder}[test_sft] row {i}" for i in range(2)]


def test_save_to_disk_unknown_split(tmp_path: Path) -> None:
    folder = _save_dict(tmp_path / "dict", {"train": [{"messages": conversation(0)}]})
    with pytest.raises(KeyError, match="no split 'validation' \\(has train\\)"):
        load_source(SourceConfig(path=str(folder), eval_split="validation"), VALIDATE, COLUMNS)


def test_save_to_disk_single_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "single"
    Dataset.from_list([{"messages": conversation(i)} for i in range(3)]).save_to_disk(str(folder))
    loaded = load_source(SourceConfig(path=str(folder)), VALIDATE, COLUMNS)
    assert loaded.train[ORIGIN] == [f"{folder}[train] row {i}" for i in range(3)]
    assert loaded.eval is None


def test_save_to_disk_single_dataset_has_no_eval_split(tmp_path: Path) -> None:
    # Without this check the same rows would be returned as the eval split: evaluation on training data.
    folder = tmp_path / "single"
    Dataset.from_list([{"messages": conversation(i)} for i in range(3)]).save_to_disk(str(folder))
    with pytest.raises(KeyError, match="single saved Dataset has no split 'test'"):
        load_source(SourceConfig(path=str(folder), eval_split="test"), VALIDATE, COLUMNS)


def test_embedded_path_resolves_to_the_shipped_demo() -> None:
    assert resolve_path("embedded:test.jsonl") == str(EMBEDDED_DIR / "test.jsonl")
    assert Path(resolve_path("embedded:test.jsonl")).is_file()
    assert resolve_path("data/x.jsonl") == "data/x.jsonl"
    assert resolve_path("HuggingFaceTB/smoltalk") == "HuggingFaceTB/smoltalk"


def test_embedded_source_loads() -> None:
    cfg = SourceConfig(path="embedded:test.jsonl", eval_path="embedded:test.jsonl")
    loaded = load_source(cfg, VALIDATE, COLUMNS)
    assert len(loaded.train) == demo.NUM_TEST
    assert loaded.eval is not None
    assert len(loaded.eval) == demo.NUM_TEST
    assert loaded.train[ORIGIN][0] == f"{EMBEDDED_DIR / 'test.jsonl'}:1"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_source(SourceConfig(path=str(tmp_path / "absent.jsonl")), VALIDATE, COLUMNS)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        load_source(SourceConfig(path=str(path)), VALIDATE, COLUMNS)


# --- bytes that are not what we expect ----------------------------------------------------------------------


def test_bytes_that_are_not_utf8_name_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"messages": conversation(0)})
    path.write_bytes((good + "\n" + '{"messages": "caf\u00e9"}' + "\n").encode("latin-1"))
    with pytest.raises(DataError) as caught:
        load_source(SourceConfig(path=str(path)), VALIDATE, COLUMNS)
    assert str(caught.value) == f"{path}:2:18: not UTF-8 text (byte 0xe9); save the file as UTF-8"


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    rows = [{"messages": conversation(i)} for i in range(2)]
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
    loaded = load_source(SourceConfig(path=str(path)), VALIDATE, COLUMNS)
    assert loaded.train["messages"] == [conversation(0), conversation(1)]
    assert loaded.train[ORIGIN] == [f"{path}:1", f"{path}:2"]


def test_a_json_file_holding_an_array_is_read_with_each_element_s_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    rows = [{"messages": conversation(i)} for i in range(3)]
    path.write_bytes(b"\xef\xbb\xbf\n" + json.dumps(rows, indent=2).encode("utf-8"))
    loaded = load_source(SourceConfig(path=str(path)), VALIDATE, COLUMNS)
    assert loaded.train["messages"] == [conversation(i) for i in range(3)]
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    starts = [number for number, line in enumerate(lines, start=1) if line == "  {"]
    assert loaded.train[ORIGIN] == [f"{path}:{n}" for n in starts]


def test_a_bad_element_of_a_json_array_is_named_by_its_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"messages": conversation(0)}, {"conversation": []}], indent=2), encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_source(SourceConfig(path=str(path)), VALIDATE, COLUMNS)
    starts = [n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1) if line == "  {"]
    assert f"{path}:{starts[-1]}: missing column 'messages'" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[\n  {"messages": []},\n  {"messages": [}\n]\n', ":3:17: malformed JSON: Expecting value"),
        ('[\n  {"messages": []}\n  {"messages": []}\n]\n', ":3:3: malformed JSON: Expecting ',' or ']'"),
        ('[\n  {"messages": []},\n  [1, 2]\n]\n', ":3: expected a JSON object per array element, got list"),
        ('[\n  {"messages": []}\n]\n{"messages": []}\n', ":4:1: malformed JSON: extra data after the array"),
        ('[\n  {"messages": []},\n', ":3:1: malformed JSON: Expecting value"),
    ],
)
def test_a_malformed_json_array_names_line_and_column(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "rows.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_source(SourceConfig(path=str(path)), VALIDATE, COLUMNS)
    assert str(caught.value).startswith(f"{path}{expected}"), str(caught.value)


def test_a_json_file_that_is_neither_lines_nor_an_array_says_what_is_expected(tmp_path: Path) -> None:
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps({"rows": [{"messages": conversation(0)}]}, indent=2), encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_source(SourceConfig(path=str(path)), VALIDATE, COLUMNS)
    assert str(caught.value).startswith(f"{path}:1:2: malformed JSON: Expecting property name")
    assert "one JSON object per line, or one JSON array of objects" in str(caught.value)


def test_a_jsonl_file_holding_an_array_says_where_arrays_go(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps([{"messages": conversation(0)}], indent=2), encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_source(SourceConfig(path=str(path)), VALIDATE, COLUMNS)
    assert str(caught.value) == (
        f"{path}:1:2: malformed JSON: Expecting value (a .jsonl file holds one JSON object per line; a JSON array of "
        "rows goes in a .json file)"
    )


def test_an_empty_hub_split_fails_like_an_empty_file(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = Dataset.from_list([{"messages": conversation(0)}])
    splits = {"train": rows, "test": rows.select([])}
    monkeypatch.setattr(loading, "load_dataset", lambda path, name, split: splits[split])
    with pytest.raises(DataError, match=re.escape("org/chats[test]: no rows")):
        load_source(SourceConfig(path="org/chats", eval_split="test"), VALIDATE, COLUMNS)
