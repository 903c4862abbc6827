"""The prompt basket ("vi-basket"): JSONL prompts for batched generation, rejection sampling and RM scoring.

One JSON object per line (field names are configurable through :class:`BasketFields`):

* ``id`` (required, string or integer, unique): the key outputs are resumed and deduplicated by;
* ``prompt`` (required): ``[{role, content}, ...]``, the dialogue so far; its last message is not the assistant's;
* ``system_prompt`` (optional string): prepended as a system message; wins over a global system prompt;
* ``follow_up_prompt`` (optional message list): appended after the model's first answer for a second turn;
* ``response_format`` (optional object): OpenAI ``response_format``, e.g. ``{"type": "json_object"}``;
* ``correct_answer`` (optional, any): a reference answer, used by RM scoring as a hint;
* any other key: passed through to the outputs.

A null optional value counts as absent. The whole file is validated before anything is sent, and each problem is
reported as ``file:line`` with the key and what was expected (see :mod:`alignment.data.validate`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignment.data.config import JSON_SUFFIXES, DataConfig
from alignment.data.validate import DataError, check_rows, message_list_problems

DEMO_BASKET = Path(__file__).parent / "demo" / "basket.jsonl"
NUM_DEMO_ROWS = 24


@dataclass
class BasketFields:
    """Names of the basket's columns (the defaults are the vi-basket names)."""

    id: str = "id"
    """Unique row key (string or integer); outputs are resumed by it."""
    prompt: str = "prompt"
    """Message list sent to the model; its last message must not be the assistant's."""
    system_prompt: str = "system_prompt"
    """Per-row system prompt (string); takes precedence over the global one."""
    follow_up_prompt: str = "follow_up_prompt"
    """Messages appended after the first answer to request a second generated turn."""
    response_format: str = "response_format"
    """OpenAI ``response_format`` object sent with the request."""
    correct_answer: str = "correct_answer"
    """Reference answer (any JSON value), passed through; RM scoring uses it as a hint."""


@dataclass(frozen=True)
class BasketRow:
    """One validated basket row."""

    id: str | int
    """The row key."""
    prompt: list[dict[str, Any]]
    """Messages to send, last one not from the assistant."""
    system_prompt: str | None
    """Row system prompt, None when absent or null."""
    follow_up_prompt: list[dict[str, Any]] | None
    """Second-turn messages, None when absent or null."""
    response_format: dict[str, Any] | None
    """``response_format`` to send, None when absent or null."""
    correct_answer: Any
    """Reference answer, None when absent or null."""
    passthrough: dict[str, Any]
    """Every input key except the prompt, system-prompt and follow-up fields (the id is kept, under its name)."""
    origin: str
    """``file:line`` of the row."""


def _conversation_problems(value: Any, column: str) -> list[str]:
    problems = message_list_problems(value, column)
    if not problems and value[-1].get("role") == "assistant":
        problems.append(f"column {column!r}: the last message is the assistant's; the model answers after it")
    return problems


def _id_problems(row: Mapping[str, Any], fields: BasketFields) -> list[str]:
    if fields.id not in row:
        return [f"missing id column {fields.id!r} (every row needs a unique string or integer id)"]
    if row[fields.id] is None:
        return [f"column {fields.id!r}: the id is null (every row needs a unique string or integer id)"]
    value = row[fields.id]
    if isinstance(value, bool) or not isinstance(value, str | int):
        return [f"column {fields.id!r}: expected a string or integer id, got {type(value).__name__} {value!r}"]
    if isinstance(value, str) and not value.strip():
        return [f"column {fields.id!r}: the id is an empty string"]
    return []


def row_problems(row: Mapping[str, Any], fields: BasketFields) -> list[str]:
    """Everything wrong with one basket row (empty when it is valid); duplicate ids are checked across rows."""
    problems = _id_problems(row, fields)
    if row.get(fields.prompt) is None:
        problems.append(f"missing column {fields.prompt!r} (a non-empty list of {{role, content}} messages)")
    else:
        problems.extend(_conversation_problems(row[fields.prompt], fields.prompt))
    if row.get(fields.follow_up_prompt) is not None:
        problems.extend(_conversation_problems(row[fields.follow_up_prompt], fields.follow_up_prompt))
    system = row.get(fields.system_prompt)
    if system is not None and not isinstance(system, str):
        problems.append(f"column {fields.system_prompt!r}: expected a string, got {type(system).__name__}")
    response_format = row.get(fields.response_format)
    if response_format is not None and not (isinstance(response_format, dict) and "type" in response_format):
        problems.append(
            f"column {fields.response_format!r}: expected an object with a 'type' key "
            f'(e.g. {{"type": "json_object"}}), got {json.dumps(response_format)[:60]}'
        )
    return problems


def _duplicate_ids(rows: list[tuple[str, dict[str, Any]]], fields: BasketFields) -> list[str]:
    first_seen: dict[tuple[type, str | int], str] = {}
    problems = []
    for where, row in rows:
        value = row.get(fields.id)
        if isinstance(value, bool) or not isinstance(value, str | int):
            continue
        key = (type(value), value)
        if key in first_seen:
            problems.append(f"{where}: duplicate id {value!r} in column {fields.id!r} (first at {first_seen[key]})")
        else:
            first_seen[key] = where
    return problems


def to_row(row: Mapping[str, Any], fields: BasketFields, origin: str) -> BasketRow:
    """Build a :class:`BasketRow` from a row that passed :func:`row_problems`."""
    dropped = {fields.prompt, fields.system_prompt, fields.follow_up_prompt}
    return BasketRow(
        id=row[fields.id],
        prompt=list(row[fields.prompt]),
        system_prompt=row.get(fields.system_prompt),
        follow_up_prompt=row.get(fields.follow_up_prompt),
        response_format=row.get(fields.response_format),
        correct_answer=row.get(fields.correct_answer),
        passthrough={k: v for k, v in row.items() if k not in dropped},
        origin=origin,
    )


def load_basket(
    path: str | Path, fields: BasketFields | None = None, columns: Mapping[str, str] | None = None
) -> list[BasketRow]:
    """Read and validate a basket JSONL (``embedded:basket.jsonl`` is the shipped demo).

    Args:
        path: the JSONL file.
        fields: column names; the vi-basket defaults when None.
        columns: renames applied to each row first, ``{name_in_file: name_expected}``.

    Raises:
        FileNotFoundError: no such file.
        DataError: lists ``file:line`` and the reason of every bad row (duplicate ids name the first occurrence).
    """
    from alignment.data.load import read_jsonl, resolve_path  # imports datasets: not at compose time

    fields = fields or BasketFields()
    resolved = Path(resolve_path(str(path)))
    if not resolved.is_file():
        raise FileNotFoundError(f"prompt basket {str(path)!r}: no such file {resolved}")
    rows = [(where, {(columns or {}).get(k, k): v for k, v in row.items()}) for where, row in read_jsonl(resolved)]
    if not rows:
        raise DataError(f"{resolved}: the basket has no rows")
    check_rows(rows, lambda row: row_problems(row, fields), outcome="nothing was sent")
    duplicates = _duplicate_ids(rows, fields)
    if duplicates:
        raise DataError(f"{len(duplicates)} duplicate id(s); nothing was sent:\n  " + "\n  ".join(duplicates[:20]))
    return [to_row(row, fields, where) for where, row in rows]


def load_baskets(data: DataConfig, fields: BasketFields) -> list[BasketRow]:
    """Every ``data.sources`` entry as a basket JSONL, concatenated; ids must be unique across them.

    Raises:
        ValueError: a source is not a JSONL file, or sets a sampling/eval option that a basket does not use.
        DataError: a bad row, or an id repeated across sources.
    """
    rows: list[BasketRow] = []
    for source in data.sources:
        unused = [
            name
            for name in ("sample_fraction", "sampling_weight", "eval_path", "eval_split")
            if getattr(source, name) is not None
        ]
        if not source.path.endswith(JSON_SUFFIXES) or unused:
            raise ValueError(
                f"data source {source.path!r}: a prompt basket is a local JSONL file read in full"
                + (f"; unset {', '.join(unused)}" if unused else "")
            )
        rows.extend(load_basket(source.path, fields, source.columns))
    seen: dict[tuple[type, str | int], str] = {}
    for row in rows:
        key = (type(row.id), row.id)
        if key in seen:
            raise DataError(f"{row.origin}: duplicate id {row.id!r} (first at {seen[key]}); ids must be unique")
        seen[key] = row.origin
    return rows


def demo_basket_rows() -> list[dict[str, Any]]:
    """The shipped demo basket: held-out arithmetic problems with their answers.

    Every third row has a system prompt and every fourth a follow-up turn; a ``category`` column passes through.
    """
    from alignment.data.demo import problems

    _, test = problems()
    rows = []
    for i, problem in enumerate(test[:NUM_DEMO_ROWS]):
        row: dict[str, Any] = {
            "id": f"demo-{i:03d}",
            "prompt": [{"role": "user", "content": f"What is {problem.expression}?"}],
            "correct_answer": str(problem.answer),
            "category": {"+": "addition", "-": "subtraction", "*": "multiplication"}[problem.op],
        }
        if i % 3 == 1:
            row["system_prompt"] = "Answer with the equation only, e.g. 2 + 2 = 4."
        if i % 4 == 2:
            row["follow_up_prompt"] = [{"role": "user", "content": "Check your answer and state it again."}]
        rows.append(row)
    return rows


def write_demo_basket(path: Path = DEMO_BASKET) -> Path:
    """Write :func:`demo_basket_rows` as JSONL (``python -m alignment.data.basket``)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in demo_basket_rows()), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_demo_basket())


def basket_system_prompt(global_system_prompt: str | None, system_prompt_file: str | None) -> str | None:
    """A tool's prompt for basket rows without their own: inline, or the text of a file (not both)."""
    from alignment.data.chat_template import system_prompt_text

    names = ("method.global_system_prompt", "method.system_prompt_file")
    return system_prompt_text(global_system_prompt, system_prompt_file, names=names)
