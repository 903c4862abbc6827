"""The prompt basket: validation names file:line and the key, nulls count as absent, the demo is reproducible."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from alignment.data.basket import DEMO_BASKET, BasketFields, demo_basket_rows, load_basket, load_baskets
from alignment.data.config import DataConfig, SourceConfig
from alignment.data.validate import DataError

USER = [{"role": "user", "content": "What is 2 + 2?"}]


def write(tmp_path: Path, rows: list[Any], name: str = "basket.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_shipped_demo_matches_its_generator_and_loads() -> None:
    expected = "".join(json.dumps(row) + "\n" for row in demo_basket_rows())
    assert DEMO_BASKET.read_text(encoding="utf-8") == expected, "stale: run python -m alignment.data.basket"
    rows = load_basket("embedded:basket.jsonl")
    assert len(rows) == 24
    assert len({r.id for r in rows}) == 24
    assert any(r.follow_up_prompt for r in rows)
    assert any(r.system_prompt for r in rows)
    assert all(r.correct_answer is not None and r.origin.endswith(f":{i + 1}") for i, r in enumerate(rows))


def test_row_fields_and_passthrough(tmp_path: Path) -> None:
    row = {
        "id": 7,
        "prompt": USER,
        "system_prompt": "Be brief.",
        "follow_up_prompt": [{"role": "user", "content": "Why?"}],
        "response_format": {"type": "json_object"},
        "correct_answer": "4",
        "category": "math",
    }
    (loaded,) = load_basket(write(tmp_path, [row]))
    assert (loaded.id, loaded.prompt, loaded.system_prompt) == (7, USER, "Be brief.")
    assert loaded.follow_up_prompt == [{"role": "user", "content": "Why?"}]
    assert loaded.response_format == {"type": "json_object"}
    assert loaded.correct_answer == "4"
    # Prompt, system prompt and follow-up are consumed; everything else (the id included) passes through.
    assert loaded.passthrough == {
        "id": 7,
        "response_format": {"type": "json_object"},
        "correct_answer": "4",
        "category": "math",
    }


def test_nulls_count_as_absent(tmp_path: Path) -> None:
    row = {"id": "a", "prompt": USER, "system_prompt": None, "follow_up_prompt": None, "response_format": None}
    (loaded,) = load_basket(write(tmp_path, [row]))
    assert loaded.system_prompt is None
    assert loaded.follow_up_prompt is None
    assert loaded.response_format is None
    assert loaded.correct_answer is None


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({"id": "x"}, r"missing column 'prompt'"),
        ({"prompt": USER}, r"missing id column 'id'"),
        ({"id": True, "prompt": USER}, r"column 'id': expected a string or integer id, got bool"),
        ({"id": "x", "prompt": [*USER, {"role": "assistant", "content": "4"}]}, r"'prompt': the last message is the"),
        ({"id": "x", "prompt": []}, r"column 'prompt': expected a non-empty list"),
        ({"id": "x", "prompt": [{"role": "robot", "content": "hi"}]}, r"'prompt'\[0\]\.role: unknown role 'robot'"),
        (
            {"id": "x", "prompt": USER, "follow_up_prompt": [{"role": "assistant", "content": "4"}]},
            r"'follow_up_prompt': the last message is the assistant's",
        ),
        ({"id": "x", "prompt": USER, "system_prompt": ["a"]}, r"column 'system_prompt': expected a string, got list"),
        ({"id": "x", "prompt": USER, "response_format": "json"}, r"column 'response_format': expected an object"),
    ],
)
def test_bad_row_names_file_line_and_key(tmp_path: Path, bad: dict[str, Any], expected: str) -> None:
    path = write(tmp_path, [{"id": "ok", "prompt": USER}, bad])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: ") + ".*" + expected):
        load_basket(path)


def test_a_null_id_is_reported_as_null_not_missing(tmp_path: Path) -> None:
    path = write(tmp_path, [{"id": "ok", "prompt": USER}, {"id": None, "prompt": USER}])
    with pytest.raises(DataError) as caught:
        load_basket(path)
    assert f"{path}:2: column 'id': the id is null (every row needs a unique string or integer id)" in str(caught.value)
    assert "missing" not in str(caught.value)


def test_bad_basket_rows_say_nothing_was_sent_not_trained(tmp_path: Path) -> None:
    path = write(tmp_path, [{"id": "a"}])
    with pytest.raises(DataError) as caught:
        load_basket(path)
    assert str(caught.value).splitlines()[0] == "1 invalid row(s); nothing was sent:"
    path = write(tmp_path, [{"id": "a", "prompt": USER}, '{"id": "b", "prompt": '])
    with pytest.raises(DataError) as caught:
        load_basket(path)
    assert str(caught.value) == f"{path}:2:23: malformed JSON: Expecting value"


def test_duplicate_ids_name_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, [{"id": "a", "prompt": USER}, {"id": "b", "prompt": USER}, {"id": "a", "prompt": USER}])
    with pytest.raises(DataError, match=re.escape(f"{path}:3: duplicate id 'a'") + r".*" + re.escape(f"{path}:1")):
        load_basket(path)


def test_integer_and_string_ids_are_different(tmp_path: Path) -> None:
    assert [r.id for r in load_basket(write(tmp_path, [{"id": 1, "prompt": USER}, {"id": "1", "prompt": USER}]))] == [
        1,
        "1",
    ]


def test_malformed_json_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, [{"id": "a", "prompt": USER}, '{"id": "b", "prompt": '])
    with pytest.raises(DataError, match=re.escape(f"{path}:2:") + r"\d+: malformed JSON"):
        load_basket(path)


def test_every_bad_row_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, [{"id": "a"}, {"id": "b", "prompt": USER}, {"prompt": USER}])
    with pytest.raises(DataError) as caught:
        load_basket(path)
    assert f"{path}:1:" in str(caught.value)
    assert f"{path}:3:" in str(caught.value)
    assert f"{path}:2:" not in str(caught.value)


def test_renamed_fields_and_column_renames(tmp_path: Path) -> None:
    path = write(tmp_path, [{"uid": "q1", "question": USER, "sys": "Be brief."}])
    fields = BasketFields(id="uid", prompt="messages", system_prompt="sys")
    (row,) = load_basket(path, fields, columns={"question": "messages"})
    assert (row.id, row.prompt, row.system_prompt, row.passthrough) == ("q1", USER, "Be brief.", {"uid": "q1"})
    with pytest.raises(DataError, match=r"missing column 'messages'"):
        load_basket(path, fields)


def test_missing_file_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_basket(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no rows"):
        load_basket(write(tmp_path, []))


def test_baskets_from_data_sources(tmp_path: Path) -> None:
    first = write(tmp_path, [{"id": "a", "prompt": USER}], "one.jsonl")
    second = write(tmp_path, [{"id": "b", "prompt": USER}], "two.jsonl")
    rows = load_baskets(
        DataConfig(sources=[SourceConfig(path=str(first)), SourceConfig(path=str(second))]), BasketFields()
    )
    assert [r.id for r in rows] == ["a", "b"]
    clash = write(tmp_path, [{"id": "a", "prompt": USER}], "three.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{clash}:1: duplicate id 'a' (first at {first}:1)")):
        load_baskets(DataConfig(sources=[SourceConfig(path=str(first)), SourceConfig(path=str(clash))]), BasketFields())
    with pytest.raises(ValueError, match="unset sample_fraction"):
        load_baskets(DataConfig(sources=[SourceConfig(path=str(first), sample_fraction=0.5)]), BasketFields())
    with pytest.raises(ValueError, match="local JSONL file"):
        load_baskets(DataConfig(sources=[SourceConfig(path="org/hub-dataset")]), BasketFields())
