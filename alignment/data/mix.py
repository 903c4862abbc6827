"""A :class:`DataConfig` mixture to one train and one eval dataset (seeded, reproducible)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from datasets import Dataset, concatenate_datasets, interleave_datasets

from alignment.data.config import DataConfig, SourceConfig
from alignment.data.load import SourceSplits, load_source
from alignment.data.validate import RowValidator

log = logging.getLogger(__name__)


@dataclass
class Splits:
    """The mixed train set and the (possibly empty) eval set."""

    train: Dataset
    eval: Dataset | None


def _subsample(dataset: Dataset, fraction: float | None, seed: int) -> Dataset:
    if fraction is None or fraction == 1:
        return dataset
    keep = max(1, int(len(dataset) * fraction))
    return dataset.shuffle(seed=seed).select(range(keep))


def _split_source(cfg: SourceConfig, loaded: SourceSplits, eval_fraction: float, seed: int) -> SourceSplits:
    train, eval_part = loaded.train, loaded.eval
    if eval_part is None and eval_fraction > 0 and len(train) > 1:
        parts = train.train_test_split(test_size=eval_fraction, seed=seed)
        train, eval_part = parts["train"], parts["test"]
    train = _subsample(train, cfg.sample_fraction, seed)
    if eval_part is not None:
        eval_part = _subsample(eval_part, cfg.sample_fraction, seed)
    return SourceSplits(train, eval_part)


def _mix_train(cfg: DataConfig, parts: list[Dataset]) -> Dataset:
    if len(parts) == 1 and cfg.sources[0].sampling_weight is None:
        return parts[0]
    if cfg.sources[0].sampling_weight is None:
        return concatenate_datasets(parts)
    weights = [s.sampling_weight or 0.0 for s in cfg.sources]
    probabilities = [w / sum(weights) for w in weights]
    strategy = "first_exhausted" if cfg.num_train_samples is None else "all_exhausted"
    mixed = interleave_datasets(parts, probabilities, seed=cfg.seed, stopping_strategy=strategy)
    if cfg.num_train_samples is None:
        return mixed
    if len(mixed) < cfg.num_train_samples:
        log.warning("data.num_train_samples=%d but the mixture yields %d rows", cfg.num_train_samples, len(mixed))
    return mixed.select(range(min(cfg.num_train_samples, len(mixed))))


def build_splits(cfg: DataConfig, validate: RowValidator, columns: tuple[str, ...]) -> Splits:
    """Load and validate every source, hold out / subsample each, then mix train and eval."""
    split_sources = [
        _split_source(source, load_source(source, validate, columns), cfg.eval_fraction, cfg.seed)
        for source in cfg.sources
    ]
    train = _mix_train(cfg, [s.train for s in split_sources])
    evals = [s.eval for s in split_sources if s.eval is not None and len(s.eval) > 0]
    eval_set = concatenate_datasets(evals) if evals else None
    if eval_set is not None and cfg.max_eval_samples is not None and len(eval_set) > cfg.max_eval_samples:
        eval_set = eval_set.shuffle(seed=cfg.seed).select(range(cfg.max_eval_samples))
    log.info(
        "data: %d train rows, %d eval rows from %d source(s)",
        len(train),
        len(eval_set or []),
        len(cfg.sources),
    )
    return Splits(train, eval_set)
