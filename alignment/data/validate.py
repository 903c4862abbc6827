"""Row validation before training: every bad row is reported with where it is and what was expected.

A validator is a function ``row -> list of problems``; each problem names the column (and the element inside
it) and the reason. :func:`check_rows` runs it over a source and raises one :class:`DataError` that lists
``file:line`` (or ``dataset[split] row N``) for each bad row, so nothing trains on half-valid data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ORIGIN = "_origin"
"""Column added on load: ``file:line`` or ``name[split] row N`` of each row, for error messages and samples."""
RowValidator = Callable[[Mapping[str, Any]], list[str]]
ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED = 20


class DataError(ValueError):
    """A dataset failed validation; the message lists each bad row's location and reason."""


def check_rows(rows: Iterable[tuple[str, Mapping[str, Any]]], validate: RowValidator) -> None:
    """Validate ``(location, row)`` pairs; raise :class:`DataError` listing the first problems found.

    Raises:
        DataError: at least one row failed; the message gives the total count.
    """
    problems: list[str] = []
    bad_rows = 0
    for where, row in rows:
        found = validate(row)
        if found:
            bad_rows += 1
            problems.extend(f"{where}: {problem}" for problem in found)
    if problems:
        shown = "\n  ".join(problems[:MAX_REPORTED])
        more = f"\n  … and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DataError(f"{bad_rows} invalid row(s); nothing was trained:\n  {shown}{more}")


def message_list_problems(value: Any, column: str) -> list[str]:
    """Problems with a ``[{role, content}, ...]`` conversation in ``column``; empty if it is well formed."""
    if not isinstance(value, list) or not value:
        return [f"column {column!r}: expected a non-empty list of {{role, content}} messages, got {_kind(value)}"]
    problems = []
    for i, message in enumerate(value):
        at = f"column {column!r}[{i}]"
        if not isinstance(message, dict):
            problems.append(f"{at}: expected an object with 'role' and 'content', got {_kind(message)}")
            continue
        role = message.get("role")
        if role not in ROLES:
            problems.append(f"{at}.role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = message.get("content")
        if not isinstance(content, str):
            problems.append(f"{at}.content: expected a string, got {_kind(content)}")
    return problems


def require_columns(row: Mapping[str, Any], columns: Iterable[str]) -> list[str]:
    """One problem per missing column."""
    return [
        f"missing column {c!r} (columns present: {', '.join(sorted(row)) or 'none'})" for c in columns if c not in row
    ]


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'…' if len(text) > 40 else ''}"


@dataclass(frozen=True)
class RowChecks:
    """What a method requires of every row: the validator its run applies, and the columns it keeps on load.

    Each method declares one (``row_checks`` in its module, listed in the registry); the run and ``plan=true``
    both use it, so a plan passes exactly the data a real run accepts.
    """

    validate: RowValidator
    """``row -> problems`` (empty when the row is valid)."""
    columns: tuple[str, ...]
    """Columns the method reads; the others are dropped on load."""
