"""Schema of the ``data`` config group: a mixture of sources with the same columns."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from omegaconf import MISSING

from alignment.ranges import bounded, check_fields

JSON_SUFFIXES = (".jsonl", ".json")


class SourceFormat(StrEnum):
    """How a source's rows are laid out; converted on load (:mod:`alignment.data.formats`, README "Data formats")."""

    auto = "auto"
    """Detect it from the columns of the source's first rows."""
    native = "native"
    """The method's own columns (``messages``; ``prompt``/``chosen``/``rejected`` message lists; …), unchanged."""
    sharegpt = "sharegpt"
    """``conversations`` of ``{from, value}`` turns (human/gpt/system/…), optional ``system`` → ``messages``."""
    alpaca = "alpaca"
    """``instruction``/``input``/``output``, optional ``system`` and ``history`` pairs → ``messages``."""
    prompt_completion = "prompt_completion"
    """TRL's ``prompt``/``completion`` (strings or message lists) → ``messages``."""
    preference = "preference"
    """TRL's ``prompt``/``chosen``/``rejected`` with strings → message lists."""
    text = "text"
    """TRL's language-modelling ``text`` column, kept as it is."""


@dataclass
class SourceConfig:
    """One dataset of a mixture: a local JSONL file, a ``save_to_disk`` folder, or an HF hub dataset."""

    path: str = MISSING
    """``*.jsonl`` file, ``save_to_disk`` folder, hub id, or ``embedded:<file>`` for the shipped demo data."""
    name: str | None = None
    """Hub dataset configuration name."""
    split: str = "train"
    """Split to train on (hub and ``save_to_disk`` sources)."""
    eval_split: str | None = None
    """Split to evaluate on; None holds out ``data.eval_fraction`` of the train split instead."""
    eval_path: str | None = None
    """JSONL file to evaluate on (JSONL sources); None holds out ``data.eval_fraction``."""
    sample_fraction: float | None = bounded(None, gt=0, le=1)
    """Keep this fraction (0, 1] of the source, train and eval alike, seeded. Exclusive with sampling_weight."""
    sampling_weight: float | None = bounded(None, gt=0)
    """Relative probability of drawing from this source when interleaving (all sources must set one)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Renames applied on load, ``{name_in_source: name_the_method_expects}``."""
    format: SourceFormat = SourceFormat.auto
    """Row layout, converted on load after the renames and before validation (README "Data formats"); ``auto``
    detects it from the first rows. The eval file or split is read in the same format."""

    def __post_init__(self) -> None:
        check_fields(self, f"data.sources[{self.path!r}]")
        if self.sample_fraction is not None and self.sampling_weight is not None:
            raise ValueError(f"data source {self.path}: set sample_fraction or sampling_weight, not both")
        is_file = self.path.endswith(JSON_SUFFIXES)
        if self.eval_path is not None and not is_file:
            raise ValueError(f"data source {self.path}: eval_path is for JSONL sources; use eval_split")
        if self.eval_split is not None and is_file:
            raise ValueError(f"data source {self.path}: eval_split is for hub/save_to_disk sources; use eval_path")


@dataclass
class DataConfig:
    """A mixture: sources are concatenated (optionally subsampled) or interleaved by ``sampling_weight``."""

    sources: list[SourceConfig] = MISSING
    """The datasets to mix; they must provide the same columns after ``columns`` renames."""
    eval_fraction: float = bounded(0.05, ge=0, lt=1)
    """Fraction held out for evaluation from sources without an eval split (0 disables it)."""
    max_eval_samples: int | None = bounded(256, ge=1)
    """Cap on evaluation rows after mixing (None: no cap)."""
    num_train_samples: int | None = bounded(None, ge=1)
    """Rows to draw when interleaving by sampling_weight (smaller sources repeat until every source was seen);
    None stops when the first source is exhausted."""
    seed: int = bounded(42, ge=0)
    """Seed for hold-out splits, subsampling and interleaving."""

    def __post_init__(self) -> None:
        check_fields(self, "data")
        weighted = [s.sampling_weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            raise ValueError("data.sources: set sampling_weight on every source or on none")
