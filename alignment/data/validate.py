"""Row validation before training: every bad row is reported with where it is and what was expected.

A validator is a function ``row -> list of problems``; each problem names the column (and the element inside
it) and the reason. :func:`check_rows` runs it over a source and raises one :class:`DataError` that lists
``file:line`` (or ``dataset[split] row N``) for each bad row, so nothing trains on half-valid data.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset

ORIGIN = "_origin"
"""Column added on load: ``file:line`` or ``name[split] row N`` of each row, for error messages and samples."""
RowValidator = Callable[[Mapping[str, Any]], list[str]]
ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED = 20
MAX_SOURCES = 3
"""Files an error about a whole split names before it says "and N more"."""
_ORIGIN_SUFFIX = re.compile(r"(:\d+| row \d+)$")
_LOCATION = re.compile(r"^(?P<source>.*?)(?P<sep>:| row )(?P<number>\d+)$")
_MISSING = re.compile(r"missing column '([^']+)'")
SHOWN_LOCATIONS = 3
"""Locations named one by one for a problem that many rows share; the rest are given as ranges."""
MAX_RANGES = 5
"""Ranges of rows named for one shared problem before "and N more range(s)"."""
DATA_CONF = Path(__file__).resolve().parents[2] / "conf" / "data"
"""The ``data=`` options a missing-column error suggests from (absent in an installed package: no suggestion)."""
_NO_EVAL_HINT = " (fix the data, or turn evaluation off: data.eval_fraction=0 and no eval_path/eval_split)"


class DataError(ValueError):
    """A dataset failed validation; the message lists each bad row's location and reason."""


def check_rows(
    rows: Iterable[tuple[str, Mapping[str, Any]]],
    validate: RowValidator,
    *,
    outcome: str = "nothing was trained",
    columns: tuple[str, ...] = (),
) -> None:
    """Validate ``(location, row)`` pairs; raise :class:`DataError` listing the first problems found.

    ``outcome`` says what the caller did not do because of it (a data tool: ``"nothing was sent"``). A problem
    that more than :data:`SHOWN_LOCATIONS` rows share is listed once, with its row count, the first locations and
    then ranges. When rows lack columns, the message names ``columns`` (what the method reads) and the options
    under ``conf/data/`` whose rows have the missing ones.

    Raises:
        DataError: at least one row failed; the message gives the total count.
    """
    problems: list[tuple[str, str]] = []
    bad_rows = 0
    for where, row in rows:
        found = validate(row)
        if found:
            bad_rows += 1
            problems.extend((where, problem) for problem in found)
    if problems:
        entries = _grouped(problems)
        shown = "\n  ".join(entries[:MAX_REPORTED])
        more = f"\n  … and {len(entries) - MAX_REPORTED} more" if len(entries) > MAX_REPORTED else ""
        hint = _missing_columns_hint([problem for _, problem in problems], columns)
        raise DataError(f"{bad_rows} invalid row(s); {outcome}:\n  {shown}{more}{hint}")


def _grouped(problems: list[tuple[str, str]]) -> list[str]:
    """One entry per problem, in order; a problem many rows share becomes one entry at its first occurrence."""
    where_by_problem: dict[str, list[str]] = {}
    for where, problem in problems:
        where_by_problem.setdefault(problem, []).append(where)
    entries = []
    for where, problem in problems:
        wheres = where_by_problem[problem]
        if len(wheres) <= SHOWN_LOCATIONS:
            entries.append(f"{where}: {problem}")
        elif where == wheres[0]:
            first = ", ".join(wheres[:SHOWN_LOCATIONS])
            entries.append(f"{len(wheres)} rows: {problem}\n    at {first}, then {_ranges(wheres[SHOWN_LOCATIONS:])}")
    return entries


def _ranges(wheres: list[str]) -> str:
    """``file:4-64, other.jsonl:2`` (or ``name[split] rows 4-64``) for locations, consecutive rows merged."""
    spans: list[tuple[str, str, int, int]] = []  # (source, separator, first, last)
    loose: list[str] = []
    for where in wheres:
        match = _LOCATION.match(where)
        if match is None:
            loose.append(where)
            continue
        source, sep, number = match["source"], match["sep"], int(match["number"])
        if spans and spans[-1][:2] == (source, sep) and spans[-1][3] + 1 == number:
            spans[-1] = (source, sep, spans[-1][2], number)
        else:
            spans.append((source, sep, number, number))
    texts = [
        f"{source}{':' if sep == ':' else ' rows '}{first}{f'-{last}' if last > first else ''}"
        for source, sep, first, last in spans
    ] + loose
    more = f" and {len(texts) - MAX_RANGES} more range(s)" if len(texts) > MAX_RANGES else ""
    return ", ".join(texts[:MAX_RANGES]) + more


def _missing_columns_hint(problems: list[str], columns: tuple[str, ...]) -> str:
    """What the method reads and which ``data=`` options have the columns the rows lack; empty if none lack one."""
    missing = list(dict.fromkeys(m[1] for problem in problems if (m := _MISSING.match(problem))))
    if not missing:
        return ""
    reads = f"the method reads columns {', '.join(columns)}; " if columns else ""
    lack = ", ".join(repr(c) for c in missing)
    options = data_options_with(missing)
    suggestion = (
        f"data options whose rows have them: {', '.join(f'data={name}' for name in options)}"
        if options
        else "rename a column with data.sources[i].columns={old: new}"
    )
    return f"\nhint: {reads}the rows lack {lack}; {suggestion}"


def data_options_with(columns: Iterable[str]) -> list[str]:
    """The ``conf/data/`` options (not ``debug/``) whose local sources' first rows have every one of ``columns``.

    Hub sources are not read (no network for an error message): an option with one is left out.
    """
    import yaml

    from alignment.data.load import read_jsonl, resolve_path

    wanted = set(columns)
    found = []
    for path in sorted(DATA_CONF.glob("*.yaml")):
        sources = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("sources") or []
        firsts = []
        for source in sources:
            file = Path(resolve_path(str(source.get("path", ""))))
            if not file.is_file():
                break
            where_row = next(iter(read_jsonl(file)), None)
            if where_row is None:
                break
            renames = source.get("columns") or {}
            firsts.append({renames.get(key, key) for key in where_row[1]})
        if sources and len(firsts) == len(sources) and all(wanted <= first for first in firsts):
            found.append(path.stem)
    return found


def empty_split_error(split: str, dataset: Dataset, dropped: Mapping[str, int], *, unit: str) -> DataError:
    """The error for a split that filtering left without a row: its files, the counts, each reason.

    Args:
        split: ``"train"`` or ``"eval"``.
        dataset: the split before filtering; its :data:`ORIGIN` column names the files (a dataset built in code
            has none, and then no file is named).
        dropped: rows removed per reason, e.g. ``{"chosen == rejected": 40}`` (zero counts are left out).
        unit: what a row is, plural (``"pairs"``).
    """
    sources = _sources(dataset)
    where = f"{split} split of {sources}" if sources else f"{split} split"
    reasons = [(reason, count) for reason, count in dropped.items() if count]
    why = reasons[0][0] if len(reasons) == 1 else ", ".join(f"{count} {reason}" for reason, count in reasons)
    left = "nothing left to train on" if split == "train" else "nothing left to evaluate"
    hint = "" if split == "train" else _NO_EVAL_HINT
    return DataError(f"{where}: all {sum(dropped.values())} {unit} dropped ({why}); {left}, nothing was trained{hint}")


def _sources(dataset: Dataset) -> str:
    """The files (or ``name[split]``) a split's rows came from, in order, from their :data:`ORIGIN`."""
    origins = dataset[ORIGIN] if ORIGIN in dataset.column_names else []
    sources = list(dict.fromkeys(_ORIGIN_SUFFIX.sub("", origin) for origin in origins))
    more = f" and {len(sources) - MAX_SOURCES} more" if len(sources) > MAX_SOURCES else ""
    return ", ".join(sources[:MAX_SOURCES]) + more


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
