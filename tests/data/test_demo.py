"""The shipped arithmetic demo data: reproducible from code, disjoint splits, correct answers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from alignment.data import demo

ANSWER = re.compile(r"(\d+) ([-+*]) (\d+) = (-?\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def read_rows(split: str) -> list[dict[str, Any]]:
    path = demo.DEMO_DIR / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_shipped_files_match_the_generator(tmp_path: Path) -> None:
    written = demo.write(tmp_path)
    assert [p.name for p in written] == ["train.jsonl", "test.jsonl"]
    for path in written:
        assert path.read_bytes() == (demo.DEMO_DIR / path.name).read_bytes(), (
            f"{path.name} is stale: run python -m alignment.data.demo"
        )


@pytest.mark.parametrize(("split", "count"), [("train", demo.NUM_TRAIN), ("test", demo.NUM_TEST)])
def test_every_answer_is_correct(split: str, count: int) -> None:
    rows = read_rows(split)
    assert len(rows) == count
    for row in rows:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        match = ANSWER.fullmatch(assistant["content"])
        assert match, assistant["content"]
        a, op, b, result = match.groups()
        assert OPS[op](int(a), int(b)) == int(result), assistant["content"]
        assert f"{a} {op} {b}" in user["content"]


def test_train_and_test_problems_are_disjoint() -> None:
    def expressions(split: str) -> set[str]:
        return {row["messages"][1]["content"].split(" = ")[0] for row in read_rows(split)}

    train, test = expressions("train"), expressions("test")
    assert len(train) == demo.NUM_TRAIN
    assert len(test) == demo.NUM_TEST
    assert train.isdisjoint(test)


def test_problems_are_deterministic_and_distinct() -> None:
    train, test = demo.problems()
    assert demo.problems() == (train, test)
    assert len(set(train) | set(test)) == demo.NUM_TRAIN + demo.NUM_TEST
    assert demo.problems(seed=demo.SEED + 1) != (train, test)


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_pair_prefers_the_correct_answer_to_a_wrong_one(split: str) -> None:
    for row in read_rows(split):
        assert row["prompt"] == row["messages"][:1]
        assert row["chosen"] == row["messages"][1:]
        chosen, rejected = (
            ANSWER.fullmatch(row["chosen"][0]["content"]),
            ANSWER.fullmatch(row["rejected"][0]["content"]),
        )
        assert chosen
        assert rejected
        assert chosen.groups()[:3] == rejected.groups()[:3]  # same problem
        assert int(rejected.group(4)) - int(chosen.group(4)) in (-10, -2, -1, 1, 2, 10)
