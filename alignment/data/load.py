"""One source to a validated ``datasets.Dataset`` (train and optional eval part), with row origins kept.

JSONL is read line by line (not through pyarrow) so that a malformed line or a bad row is reported as
``file:line``; hub and ``save_to_disk`` datasets are reported as ``name[split] row N``. Rows in another format
(ShareGPT, Alpaca, TRL's; :mod:`alignment.data.formats`) are converted here, each checked in its own format first.
Every row is validated before any sampling, so a bad row anywhere fails the run before training starts.
"""

from __future__ import annotations

import codecs
import itertools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from alignment.data.config import JSON_SUFFIXES, SourceConfig, SourceFormat
from alignment.data.formats import DETECT_ROWS, RowFormat, resolve_format
from alignment.data.validate import ORIGIN, DataError, RowValidator, check_rows

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_DIR = Path(__file__).parent / "demo"


@dataclass
class SourceSplits:
    """A loaded source: the train part, and an eval part when the source has one."""

    train: Dataset
    eval: Dataset | None


def resolve_path(path: str) -> str:
    """Map ``embedded:<file>`` to the demo data shipped inside the package; pass anything else through."""
    if path.startswith(EMBEDDED_PREFIX):
        return str(EMBEDDED_DIR / path.removeprefix(EMBEDDED_PREFIX))
    return path


def read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(file:line, object)`` per row: one JSON object per non-blank line, or one JSON array of objects.

    The array form is read from ``.json`` files only (each row named by the line its element starts on). The file
    is UTF-8, with or without a byte-order mark. Lines are read one at a time, so the first rows of a large file
    cost only those rows.

    Raises:
        DataError: bytes that are not UTF-8, malformed JSON, or a row that is not a JSON object (``file:line``, and
            the column where there is one).
    """
    with path.open("rb") as handle:
        head: list[bytes] = []  # up to the first non-blank line, which tells an array from lines
        for raw in handle:
            head.append(raw)
            if raw.removeprefix(codecs.BOM_UTF8).strip():
                break
        start = b"".join(head).removeprefix(codecs.BOM_UTF8)
        if path.suffix == ".json" and start.lstrip().startswith(b"["):
            yield from _json_array_rows(path, _decode(start + handle.read(), path, 1))
            return
        for number, raw in enumerate(itertools.chain(head, handle), start=1):
            line = _decode(raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw, path, number)
            if line.strip():
                yield f"{path}:{number}", _json_object(line.rstrip("\r\n"), path, number)


_JSON_FILE_HINT = " (a .json data file holds one JSON object per line, or one JSON array of objects)"
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _decode(raw: bytes, path: Path, first_line: int) -> str:
    """UTF-8 text of ``raw`` (which starts on ``first_line`` of ``path``).

    Raises:
        DataError: a byte sequence that is not UTF-8, named by line and (character) column.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + raw.count(b"\n", 0, err.start)
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        column = len(raw[line_start : err.start].decode("utf-8", errors="replace")) + 1
        raise DataError(
            f"{path}:{line}:{column}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save the file as UTF-8"
        ) from None


def _json_object(line: str, path: Path, number: int) -> dict[str, Any]:
    """One line's JSON object; the line has no line break, so an error at its end points there, not at column 1."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        hint = _JSON_FILE_HINT if path.suffix == ".json" else ""
        if not hint and number == 1 and line.lstrip().startswith("["):
            hint = " (a .jsonl file holds one JSON object per line; a JSON array of rows goes in a .json file)"
        raise DataError(f"{path}:{number}:{err.colno}: malformed JSON: {err.msg}{hint}") from err
    if not isinstance(row, dict):
        raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
    return row


def _json_array_rows(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The objects of a JSON array that is the whole of ``text``, each named by the line its element starts on."""
    decoder = json.JSONDecoder()

    def skip(pos: int) -> int:
        match = _JSON_WHITESPACE.match(text, pos)
        return match.end() if match else pos

    def fail(pos: int, msg: str) -> DataError:
        err = json.JSONDecodeError(msg, text, pos)
        return DataError(f"{path}:{err.lineno}:{err.colno}: malformed JSON: {msg}")

    pos = skip(skip(0) + 1)  # past the opening bracket
    line, counted = 1, 0
    closed = text.startswith("]", pos)
    while not closed:
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise fail(err.pos, err.msg) from err
        line, counted = line + text.count("\n", counted, pos), pos
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: expected a JSON object per array element, got {type(row).__name__}")
        yield f"{path}:{line}", row
        pos = skip(end)
        if not text.startswith((",", "]"), pos):
            raise fail(pos, "Expecting ',' or ']' after an array element")
        closed = text[pos] == "]"
        if not closed:
            pos = skip(pos + 1)
    pos = skip(pos + 1)  # past the closing bracket
    if pos < len(text):
        raise fail(pos, "extra data after the array")


def _renamed(row: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    return {columns.get(key, key): value for key, value in row.items()}


def _jsonl_rows(path: Path, cfg: SourceConfig) -> list[tuple[str, dict[str, Any]]]:
    if not path.is_file():
        raise FileNotFoundError(f"data source {cfg.path!r}: no such file {path}")
    rows = [(where, _renamed(row, cfg.columns)) for where, row in read_jsonl(path)]
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _from_jsonl(
    rows: list[tuple[str, dict[str, Any]]], row_format: RowFormat, validate: RowValidator, keep: tuple[str, ...]
) -> Dataset:
    check_rows(rows, row_format.validator(validate), columns=keep)
    converted = [(where, row_format.convert(row)) for where, row in rows]
    # Validation has checked the required columns; an optional one a row lacks (e.g. ``margin``) becomes null.
    return Dataset.from_list([{**{c: row.get(c) for c in keep}, ORIGIN: where} for where, row in converted])


def _renamed_split(dataset: Dataset, label: str, cfg: SourceConfig) -> Dataset:
    if len(dataset) == 0:
        raise DataError(f"{label}: no rows")
    return dataset.rename_columns({k: v for k, v in cfg.columns.items() if k in dataset.column_names})


def _from_arrow(
    dataset: Dataset, label: str, row_format: RowFormat, validate: RowValidator, keep: tuple[str, ...]
) -> Dataset:
    rows = ((f"{label} row {i}", row) for i, row in enumerate(dataset))
    check_rows(rows, row_format.validator(validate), columns=keep)
    if row_format.name is not SourceFormat.native:
        # In memory: a save_to_disk folder or the hub cache is never written to.
        dataset = dataset.map(
            row_format.convert, remove_columns=dataset.column_names, keep_in_memory=True, desc="Converting"
        )
    dataset = dataset.select_columns([c for c in keep if c in dataset.column_names])
    for column in (c for c in keep if c not in dataset.column_names):
        dataset = dataset.add_column(column, [None] * len(dataset))
    return dataset.add_column(ORIGIN, [f"{label} row {i}" for i in range(len(dataset))])


def _hf_split(cfg: SourceConfig, split: str) -> Dataset:
    path = Path(cfg.path)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = load_from_disk(str(path))
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise KeyError(f"data source {cfg.path!r}: no split {split!r} (has {', '.join(loaded)})")
            return loaded[split]
        if split != cfg.split:
            # A single saved Dataset has no splits; returning it again would evaluate on the training rows.
            raise KeyError(f"data source {cfg.path!r}: a single saved Dataset has no split {split!r}; unset eval_split")
        return loaded
    return load_dataset(cfg.path, cfg.name, split=split)


def load_source(cfg: SourceConfig, validate: RowValidator, keep: tuple[str, ...]) -> SourceSplits:
    """Load, rename, convert from the source's format, validate and keep only the ``keep`` columns (plus the origin).

    The format (``cfg.format``, or the one detected in the first rows of the train part) applies to the eval part
    too.
    """
    path = resolve_path(cfg.path)
    if path.endswith(JSON_SUFFIXES):
        rows = _jsonl_rows(Path(path), cfg)
        row_format = resolve_format(cfg.format, [row for _, row in rows[:DETECT_ROWS]], source=cfg.path, keep=keep)
        train = _from_jsonl(rows, row_format, validate, keep)
        eval_part = None
        if cfg.eval_path:
            eval_part = _from_jsonl(_jsonl_rows(Path(resolve_path(cfg.eval_path)), cfg), row_format, validate, keep)
        return SourceSplits(train, eval_part)
    label = f"{cfg.path}[{cfg.split}]"
    dataset = _renamed_split(_hf_split(cfg, cfg.split), label, cfg)
    first = list(dataset.select(range(min(DETECT_ROWS, len(dataset)))))
    row_format = resolve_format(cfg.format, first, source=cfg.path, keep=keep)
    train = _from_arrow(dataset, label, row_format, validate, keep)
    eval_part = None
    if cfg.eval_split is not None:
        eval_label = f"{cfg.path}[{cfg.eval_split}]"
        eval_set = _renamed_split(_hf_split(cfg, cfg.eval_split), eval_label, cfg)
        eval_part = _from_arrow(eval_set, eval_label, row_format, validate, keep)
    return SourceSplits(train, eval_part)
