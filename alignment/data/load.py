"""One source to a validated ``datasets.Dataset`` (train and optional eval part), with row origins kept.

JSONL is read line by line (not through pyarrow) so that a malformed line or a bad row is reported as
``file:line``; hub and ``save_to_disk`` datasets are reported as ``name[split] row N``. Every row is validated
before any sampling, so a bad row anywhere fails the run before training starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from alignment.data.config import JSON_SUFFIXES, SourceConfig
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
    """Yield ``(file:line, object)`` per non-blank line.

    Raises:
        DataError: a line is not valid JSON or not a JSON object (file:line:column named).
    """
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}:{err.colno}: malformed JSON: {err.msg}; nothing was trained") from err
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
            yield where, row


def _renamed(row: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    return {columns.get(key, key): value for key, value in row.items()}


def _from_jsonl(path: Path, cfg: SourceConfig, validate: RowValidator, keep: tuple[str, ...]) -> Dataset:
    if not path.is_file():
        raise FileNotFoundError(f"data source {cfg.path!r}: no such file {path}")
    rows = [(where, _renamed(row, cfg.columns)) for where, row in read_jsonl(path)]
    if not rows:
        raise DataError(f"{path}: no rows")
    check_rows(rows, validate)
    # Validation has checked the required columns; an optional one a row lacks (e.g. ``margin``) becomes null.
    return Dataset.from_list([{**{c: row.get(c) for c in keep}, ORIGIN: where} for where, row in rows])


def _from_arrow(
    dataset: Dataset, label: str, cfg: SourceConfig, validate: RowValidator, keep: tuple[str, ...]
) -> Dataset:
    dataset = dataset.rename_columns({k: v for k, v in cfg.columns.items() if k in dataset.column_names})
    check_rows(((f"{label} row {i}", row) for i, row in enumerate(dataset)), validate)
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
    """Load, rename, validate and keep only the ``keep`` columns (plus the origin) of one source."""
    path = resolve_path(cfg.path)
    if path.endswith(JSON_SUFFIXES):
        train = _from_jsonl(Path(path), cfg, validate, keep)
        eval_part = _from_jsonl(Path(resolve_path(cfg.eval_path)), cfg, validate, keep) if cfg.eval_path else None
        return SourceSplits(train, eval_part)
    label = f"{cfg.path}[{cfg.split}]"
    train = _from_arrow(_hf_split(cfg, cfg.split), label, cfg, validate, keep)
    eval_part = None
    if cfg.eval_split is not None:
        eval_label = f"{cfg.path}[{cfg.eval_split}]"
        eval_part = _from_arrow(_hf_split(cfg, cfg.eval_split), eval_label, cfg, validate, keep)
    return SourceSplits(train, eval_part)
