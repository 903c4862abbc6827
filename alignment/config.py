"""The typed run object: the root schema, and the one conversion from a composed config to it.

``conf/config.yaml`` composes the groups; each option file starts from a schema that
:func:`alignment.registry.register_configs` stores in Hydra's ConfigStore (``defaults: [/schema/<group>@_here_:
<schema>]``), so every default lives in one dataclass and a typo or a wrong type fails at compose time.
:func:`to_run_config` turns the composed config into :class:`RunConfig` once, in ``launch.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from alignment.data.config import DataConfig
from alignment.distributed import DistributedConfig
from alignment.loggers import LoggerConfig
from alignment.models.config import ModelConfig
from alignment.ranges import bounded, check_ranges
from alignment.task import MethodConfig, TaskConfig, check_best_model


@dataclass
class RunConfig:
    """Everything one run needs; each component receives only its own slice."""

    model: ModelConfig = MISSING
    """Model, tokenizer and adapters."""
    method: TaskConfig = MISSING
    """Training method (a MethodConfig subclass) or data tool, with its settings."""
    data: DataConfig = MISSING
    """Dataset mixture."""
    distributed: DistributedConfig = MISSING
    """Process layout."""
    logger: LoggerConfig = MISSING
    """Metric tracker."""
    seed: int = bounded(42, ge=0, le=2**32 - 1)
    """Seed for model init, dropout and data order (``transformers.set_seed``)."""
    objective: str | None = None
    """Final metric ``launch.py`` returns to a sweeper (``hydra/sweeper=optuna`` optimises it; its direction is
    ``hydra.sweeper.direction``), e.g. ``eval_rewards/accuracies``: a key of the run's ``results.json``, and a run
    without it fails naming the ones it has. None: ``eval_loss``, else ``train_loss``, else nothing."""
    plan: bool = False
    """Check everything a run needs (config, first data rows, model config, memory per device, the sbatch script)
    and exit without training (``python launch.py ... plan=true``)."""


class UnknownKeyError(KeyError):
    """A key was added (``+group.key=value``) that the group's schema does not define."""

    def __init__(self, key: str, schema: type) -> None:
        fields = (
            ", ".join(sorted(f.name for f in dataclasses.fields(schema))) if dataclasses.is_dataclass(schema) else ""
        )
        super().__init__(f"unknown config key {key!r}; {schema.__name__} has: {fields}")
        self.key = key
        """The full dotted key, e.g. ``method.foo``."""
        self.schema = schema
        """The dataclass of the node the key was set on."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError would quote the message


class ConfigError(ValueError):
    """Settings that are each valid but cannot work together (e.g. early stopping without an eval split)."""


def check_known_keys(node: DictConfig | ListConfig, path: str = "") -> None:
    """Reject keys outside the schema; OmegaConf lets ``+key=`` overrides through and ``to_object`` drops them.

    Raises:
        UnknownKeyError: names the full key and the fields the schema has.
    """
    if node._is_none() or node._is_missing():
        return
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            if isinstance(item, DictConfig | ListConfig):
                check_known_keys(item, f"{path}[{i}]")
        return
    schema = OmegaConf.get_type(node)
    known = (
        {f.name for f in dataclasses.fields(schema)}
        if isinstance(schema, type) and dataclasses.is_dataclass(schema)
        else None
    )
    for key in node:
        full = f"{path}.{key!s}" if path else str(key)
        if known is not None and isinstance(schema, type) and key not in known:
            raise UnknownKeyError(full, schema)
        child = node._get_node(key)
        if isinstance(child, DictConfig | ListConfig):
            check_known_keys(child, full)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The one conversion from the composed DictConfig to the typed run object.

    Unknown keys and out-of-range values (:mod:`alignment.ranges`) fail here, naming the full key, before any
    ``__post_init__`` runs and before anything is loaded; so do early-stopping and best-model settings that could
    not work (:func:`~alignment.task.check_best_model`: no evaluation, checkpoints off the evaluation steps).

    Raises:
        UnknownKeyError: a key outside its schema.
        RangeError: a number outside its field's range.
        ConfigError: settings that cannot work together.
    """
    check_known_keys(cfg)
    check_ranges(cfg)
    run_cfg = OmegaConf.to_object(cfg)
    assert isinstance(run_cfg, RunConfig)
    if isinstance(run_cfg.method, MethodConfig):
        try:
            check_best_model(run_cfg.method, evaluation=has_eval_split(run_cfg.data))
        except ValueError as error:
            raise ConfigError(str(error)) from error
    return run_cfg


def has_eval_split(data: DataConfig) -> bool:
    """Whether the mixture will have an eval split: a held-out fraction, or a source's own eval file or split."""
    return data.eval_fraction > 0 or any(s.eval_path is not None or s.eval_split is not None for s in data.sources)
