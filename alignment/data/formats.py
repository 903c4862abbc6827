"""Data formats users already have, converted at load into the columns the methods read.

A source is read in one format (``data.sources[i].format``); ``auto`` detects it from the columns (and, for
preference rows, the value types) of the source's first :data:`DETECT_ROWS` rows, after ``columns`` renames. Every
row is checked in its own format first, so a problem names the row's own column (``column 'conversations'[2].from:
unknown speaker 'bot'``); the converted row then goes through the method's validator, whose problems end in
``(after converting the <format> row)``. Both run before any sampling, so the error still names ``file:line``.

| format | columns read | gives |
| --- | --- | --- |
| ``native`` | the method's own | the row unchanged |
| ``sharegpt`` | ``conversations`` (``from``/``value``), optional ``system`` | ``messages`` |
| ``alpaca`` | ``instruction``, ``output``; optional ``input``, ``system``, ``history`` | ``messages`` |
| ``prompt_completion`` | ``prompt``, ``completion`` (strings or message lists) | ``messages`` |
| ``preference`` | ``chosen``, ``rejected``, ``prompt`` (strings or message lists) | the three as message lists |
| ``text`` | ``text`` (TRL language modelling) | ``text`` |

Columns a format does not read pass through (``margin``, ids), so the method still sees them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from alignment.data.config import SourceFormat
from alignment.data.validate import DataError, RowValidator, message_list_problems, require_columns

log = logging.getLogger(__name__)

DETECT_ROWS = 16
"""Rows from the start of a source's train part whose columns ``format: auto`` looks at."""

SHAREGPT_ROLES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    # LLaMA-Factory's tool turns: the model's call is its own output; the tool's answer is input to it.
    "function_call": "assistant",
    "function": "tool",
    "observation": "tool",
    "tool": "tool",
}
"""ShareGPT ``from`` values and the role each becomes; any other value is an error naming these."""

ALPACA_JOIN = "\n"
"""Between ``instruction`` and a non-empty ``input`` in the user turn (as LLaMA-Factory and xtuner join them)."""

Message = dict[str, str]


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _optional_string(row: Mapping[str, Any], column: str) -> list[str]:
    value = row.get(column)
    if value is None or isinstance(value, str):
        return []
    return [f"column {column!r}: expected a string or null, got {_kind(value)}"]


def _required_string(row: Mapping[str, Any], column: str) -> list[str]:
    if isinstance(row[column], str):
        return []
    return [f"column {column!r}: expected a string, got {_kind(row[column])}"]


def _rest(row: Mapping[str, Any], read: Collection[str]) -> dict[str, Any]:
    """The columns a format does not read, passed through."""
    return {key: value for key, value in row.items() if key not in read}


# --- ShareGPT -------------------------------------------------------------------------------------------------------


def _sharegpt_turn_problems(turn: Any, at: str) -> list[str]:
    if not isinstance(turn, dict):
        return [f"{at}: expected an object with 'from' and 'value', got {_kind(turn)}"]
    problems = []
    speaker = turn.get("from")
    if speaker not in SHAREGPT_ROLES:
        accepted = ", ".join(SHAREGPT_ROLES)
        problems.append(f"{at}.from: unknown speaker {speaker!r} (accepted: {accepted})")
    if not isinstance(turn.get("value"), str):
        problems.append(f"{at}.value: expected a string, got {_kind(turn.get('value'))}")
    return problems


def sharegpt_problems(row: Mapping[str, Any]) -> list[str]:
    """Problems of a ShareGPT row: ``conversations`` of ``{from, value}`` turns, an optional string ``system``."""
    problems = require_columns(row, ["conversations"])
    if problems:
        return problems
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        return [f"column 'conversations': expected a non-empty list of {{from, value}} turns, got {_kind(turns)}"]
    for i, turn in enumerate(turns):
        problems += _sharegpt_turn_problems(turn, f"column 'conversations'[{i}]")
    problems += _optional_string(row, "system")
    if not problems and row.get("system") and turns[0]["from"] == "system":
        problems.append("column 'system' and a system turn in 'conversations'[0]: give the system prompt once")
    return problems


def sharegpt_to_messages(row: Mapping[str, Any]) -> dict[str, Any]:
    """``conversations`` → ``messages`` (roles per :data:`SHAREGPT_ROLES`); a ``system`` column becomes turn 0."""
    messages = [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]
    if row.get("system"):
        messages.insert(0, {"role": "system", "content": row["system"]})
    return {**_rest(row, ("conversations", "system")), "messages": messages}


# --- Alpaca ---------------------------------------------------------------------------------------------------------


def _history_problems(history: Any) -> list[str]:
    if history is None:
        return []
    if not isinstance(history, list):
        return [f"column 'history': expected a list of [user, assistant] pairs, got {_kind(history)}"]
    return [
        f"column 'history'[{i}]: expected a [user, assistant] pair of strings, got {_kind(pair)} {pair!r:.60}"
        for i, pair in enumerate(history)
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(text, str) for text in pair))
    ]


def alpaca_problems(row: Mapping[str, Any]) -> list[str]:
    """Problems of an Alpaca row: string ``instruction``/``output``, optional ``input``/``system``/``history``."""
    problems = require_columns(row, ["instruction", "output"])
    if problems:
        return problems
    problems = _required_string(row, "instruction") + _required_string(row, "output")
    problems += _optional_string(row, "input") + _optional_string(row, "system") + _history_problems(row.get("history"))
    if not problems and not (row["instruction"].strip() or (row.get("input") or "").strip()):
        problems.append("columns 'instruction' and 'input': both empty; the user turn needs text")
    return problems


def alpaca_to_messages(row: Mapping[str, Any]) -> dict[str, Any]:
    """``[system] + history pairs + user (instruction, then input) + assistant (output)`` as ``messages``."""
    messages: list[Message] = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    for user, assistant in row.get("history") or []:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    prompt = ALPACA_JOIN.join(text for text in (row["instruction"], row.get("input")) if text)
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return {**_rest(row, ("instruction", "input", "output", "system", "history")), "messages": messages}


# --- TRL's standard formats: prompt/completion, preference, text ----------------------------------------------------


def _turns_problems(value: Any, column: str) -> list[str]:
    """A string (one turn) or a message list; the list's own problems named by its column."""
    if isinstance(value, str):
        return []
    if isinstance(value, list):
        return message_list_problems(value, column)
    return [f"column {column!r}: expected a string or a list of {{role, content}} messages, got {_kind(value)}"]


def _as_turns(value: str | list[Message], role: str) -> list[Message]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def prompt_completion_problems(row: Mapping[str, Any]) -> list[str]:
    """Problems of a prompt/completion row (TRL's standard or conversational form)."""
    problems = require_columns(row, ["prompt", "completion"])
    if problems:
        return problems
    return _turns_problems(row["prompt"], "prompt") + _turns_problems(row["completion"], "completion")


def prompt_completion_to_messages(row: Mapping[str, Any]) -> dict[str, Any]:
    """A string prompt becomes a user turn, a string completion an assistant turn; lists are used as they are."""
    messages = _as_turns(row["prompt"], "user") + _as_turns(row["completion"], "assistant")
    return {**_rest(row, ("prompt", "completion")), "messages": messages}


def preference_problems(row: Mapping[str, Any]) -> list[str]:
    """Problems of a preference row: ``chosen``/``rejected`` (and ``prompt``), each a string or a message list."""
    problems = require_columns(row, ["chosen", "rejected"])
    if problems:
        return problems
    for column in ("prompt", "chosen", "rejected"):
        if column in row and row[column] is not None:
            problems += _turns_problems(row[column], column)
    strings = [c for c in ("chosen", "rejected") if isinstance(row[c], str)]
    if not problems and row.get("prompt") is None and strings:
        problems.append(
            f"missing column 'prompt': string {'/'.join(repr(c) for c in strings)} need one (only message lists "
            "can share their start as an implicit prompt)"
        )
    return problems


def preference_to_conversations(row: Mapping[str, Any]) -> dict[str, Any]:
    """Strings become one turn each (prompt: user; chosen, rejected: assistant); message lists are kept."""
    converted = {
        "chosen": _as_turns(row["chosen"], "assistant"),
        "rejected": _as_turns(row["rejected"], "assistant"),
        "prompt": _as_turns(row["prompt"], "user") if row.get("prompt") is not None else None,
    }
    return {**_rest(row, converted), **converted}


def text_problems(row: Mapping[str, Any]) -> list[str]:
    """Problems of a language-modelling row: a string ``text``."""
    return require_columns(row, ["text"]) or _required_string(row, "text")


def unchanged(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row as it is (``native`` and ``text``)."""
    return dict(row)


def no_problems(row: Mapping[str, Any]) -> list[str]:
    """``native`` rows are checked by the method's validator alone."""
    return []


# --- the table, detection and resolution ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RowFormat:
    """One format: the columns it gives and its two row functions (check in its own terms, then convert)."""

    name: SourceFormat
    """The ``data.sources[i].format`` value."""
    gives: tuple[str, ...]
    """Columns the conversion produces; empty for ``native``, which gives whatever the rows hold."""
    problems: Callable[[Mapping[str, Any]], list[str]]
    """``row -> problems`` named by the row's own columns; ``convert`` may assume there are none."""
    convert: Callable[[Mapping[str, Any]], dict[str, Any]]
    """``row -> row`` in the project's columns; the columns it does not read pass through."""
    note: str = ""
    """Said when the format gives nothing the method reads."""

    def validator(self, validate: RowValidator) -> RowValidator:
        """The row's problems in this format; when it has none, the method's problems with the converted row."""
        if self.name is SourceFormat.native:
            return validate
        suffix = "" if self.convert is unchanged else f" (after converting the {self.name.value} row)"

        def check(row: Mapping[str, Any]) -> list[str]:
            return self.problems(row) or [problem + suffix for problem in validate(self.convert(row))]

        return check


FORMATS: dict[SourceFormat, RowFormat] = {
    SourceFormat.native: RowFormat(SourceFormat.native, (), no_problems, unchanged),
    SourceFormat.sharegpt: RowFormat(SourceFormat.sharegpt, ("messages",), sharegpt_problems, sharegpt_to_messages),
    SourceFormat.alpaca: RowFormat(SourceFormat.alpaca, ("messages",), alpaca_problems, alpaca_to_messages),
    SourceFormat.prompt_completion: RowFormat(
        SourceFormat.prompt_completion, ("messages",), prompt_completion_problems, prompt_completion_to_messages
    ),
    SourceFormat.preference: RowFormat(
        SourceFormat.preference, ("prompt", "chosen", "rejected"), preference_problems, preference_to_conversations
    ),
    SourceFormat.text: RowFormat(
        SourceFormat.text,
        ("text",),
        text_problems,
        unchanged,
        note="plain text has no user or assistant turns to train on",
    ),
}
"""Every format but ``auto``, which :func:`detect` resolves to one of these."""


def detect(rows: Sequence[Mapping[str, Any]]) -> SourceFormat:
    """The format of rows by their columns, first match wins (README "Data formats").

    ``messages`` → native; ``conversations`` → sharegpt; ``instruction`` + ``output`` → alpaca; ``chosen`` +
    ``rejected`` with a string among ``prompt``/``chosen``/``rejected`` → preference (all message lists: native);
    ``prompt`` + ``completion`` without ``label`` (TRL's unpaired preference) → prompt_completion; ``text`` without
    ``label`` (the classification columns) → text; anything else → native.
    """
    columns = {key for row in rows for key in row}
    if "messages" in columns:
        return SourceFormat.native
    if "conversations" in columns:
        return SourceFormat.sharegpt
    if {"instruction", "output"} <= columns:
        return SourceFormat.alpaca
    if {"chosen", "rejected"} <= columns:
        strings = any(isinstance(row.get(c), str) for row in rows for c in ("prompt", "chosen", "rejected"))
        return SourceFormat.preference if strings else SourceFormat.native
    if {"prompt", "completion"} <= columns and "label" not in columns:
        return SourceFormat.prompt_completion
    if "text" in columns and "label" not in columns:
        return SourceFormat.text
    return SourceFormat.native


def _giving(columns: Collection[str]) -> str:
    names = [f.name.value for f in FORMATS.values() if not f.gives or set(f.gives) & set(columns)]
    return ", ".join(names)


def _reads_nothing(row_format: RowFormat, rows: Sequence[Mapping[str, Any]], keep: Collection[str]) -> bool:
    """Whether the rows, converted, hold none of the columns the method reads.

    Rows that cannot be converted are left to the row checks, which name their line.
    """
    converted = [row_format.convert(row) for row in rows if not row_format.problems(row)]
    return bool(converted and keep) and not {key for row in converted for key in row} & set(keep)


def resolve_format(
    setting: SourceFormat, rows: Sequence[Mapping[str, Any]], *, source: str, keep: Collection[str]
) -> RowFormat:
    """The format a source is read in: ``setting``, or the one :func:`detect` finds in its first rows.

    Args:
        setting: ``data.sources[i].format``.
        rows: the first rows of the source's train part (after ``columns`` renames); only the first
            :data:`DETECT_ROWS` are looked at.
        source: the source's path, for the error.
        keep: the columns the method reads (empty: no check).

    Raises:
        DataError: the first rows, converted, hold none of the columns the method reads; the message names the
            formats that give them.
    """
    detected = setting is SourceFormat.auto
    name = detect(rows[:DETECT_ROWS]) if detected else setting
    found = FORMATS[name]
    how = "detected from its columns" if detected else "set by data.sources[].format"
    if name is not SourceFormat.native and _reads_nothing(found, rows[:DETECT_ROWS], keep):
        gives = ", ".join(repr(c) for c in found.gives)
        wanted = ", ".join(repr(c) for c in keep)
        note = f"; {found.note}" if found.note else ""
        raise DataError(
            f"data source {source!r}: its rows are in the {name.value} format ({how}), which gives {gives}{note}; "
            f"this method reads {wanted}, which these formats give: {_giving(keep)} (README: Data formats)"
        )
    log.info("data source %s: %s format (%s)", source, name.value, how)
    return found
