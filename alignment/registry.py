"""Method registry: the only place that maps ``method.name`` to its schema, its row checks and its ``run``.

Adding a training method: ``alignment/methods/<name>.py`` (or ``methods/<family>/<name>.py``: ``<Name>Config``,
losses, ``row_checks``, ``run``), ``conf/method/<name>.yaml``, ``tests/methods/[<family>/]test_<name>.py`` and one
line in :data:`METHODS`. A data tool (generation, scoring, dedup) is the same with ``alignment/tools/<name>.py`` (a
:class:`~alignment.task.TaskConfig` schema, not a ``MethodConfig``) and ``tests/tools/test_<name>.py``: tools
compose, sweep and go to SLURM like methods.

Importing this module (which composing a config does) loads no ML stack: method modules import torch lazily and
their trainers only inside ``run``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.config_store import ConfigStore

from alignment.config import RunConfig
from alignment.data.config import DataConfig
from alignment.distributed import DistributedConfig
from alignment.loggers import LoggerConfig
from alignment.methods import sft
from alignment.methods.distill import distill, distill_cache
from alignment.methods.gpo import gpo
from alignment.methods.pairwise import core, cpo, dpo, orpo, simpo, smpo
from alignment.methods.prompt_opt import prompt_opt
from alignment.methods.seqcls import classification, reward
from alignment.models.config import ModelConfig
from alignment.task import TaskConfig
from alignment.tools import dedup, export, generate, rejection_sampling, rm_scoring

if TYPE_CHECKING:
    from alignment.context import RunContext
    from alignment.data.validate import RowChecks


@dataclass(frozen=True)
class Method:
    """A method's (or tool's) config schema, its row checks and its entry point ``run(cfg, ctx) -> final metrics``."""

    schema: type[TaskConfig]
    run: Callable[[RunConfig, RunContext], dict[str, float]]
    row_checks: Callable[[TaskConfig], RowChecks] | None
    """The validator and columns its ``run`` applies to every row (``plan=true`` applies the same); None for the
    tools, whose rows depend on more than the method config (baskets, the dedup text column)."""


METHODS: dict[str, Method] = {
    "sft": Method(sft.SftConfig, sft.run, sft.row_checks),
    "dpo": Method(dpo.DpoConfig, dpo.run, core.row_checks),
    "orpo": Method(orpo.OrpoConfig, orpo.run, core.row_checks),
    "cpo": Method(cpo.CpoConfig, cpo.run, core.row_checks),
    "simpo": Method(simpo.SimpoConfig, simpo.run, core.row_checks),
    "smpo": Method(smpo.SmpoConfig, smpo.run, core.row_checks),
    "reward": Method(reward.RewardConfig, reward.run, core.row_checks),
    "classification": Method(classification.ClassificationConfig, classification.run, classification.row_checks),
    "gpo": Method(gpo.GpoConfig, gpo.run, gpo.row_checks),
    "distill": Method(distill.DistillConfig, distill.run, distill.row_checks),
    "prompt_opt": Method(prompt_opt.PromptOptConfig, prompt_opt.run, prompt_opt.row_checks),
    "distill_cache": Method(distill_cache.DistillCacheConfig, distill_cache.run, distill.row_checks),
    "generate": Method(generate.GenerateConfig, generate.run, None),
    "rejection_sampling": Method(rejection_sampling.RejectionSamplingConfig, rejection_sampling.run, None),
    "rm_scoring": Method(rm_scoring.RmScoringConfig, rm_scoring.run, None),
    "dedup": Method(dedup.DedupConfig, dedup.run, None),
    "export": Method(export.ExportConfig, export.run, None),
}


def register_configs() -> None:
    """Store the root schema and one schema per group option in Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    store.store(group="schema/model", name="model", node=ModelConfig)
    store.store(group="schema/data", name="data", node=DataConfig)
    store.store(group="schema/distributed", name="distributed", node=DistributedConfig)
    store.store(group="schema/logger", name="logger", node=LoggerConfig)
    for name, method in METHODS.items():
        store.store(group="schema/method", name=name, node=method.schema)


def load_resolved_config(path: Path) -> RunConfig:
    """Load a resolved config file into the typed run object, with the same checks as a composed one."""
    from omegaconf import DictConfig, OmegaConf

    from alignment.config import to_run_config

    loaded = OmegaConf.load(path)
    assert isinstance(loaded, DictConfig), f"{path}: expected a mapping"
    name = OmegaConf.select(loaded, "method.name")
    if name not in METHODS:
        raise KeyError(f"{path}: method.name {name!r} is not registered (known: {', '.join(sorted(METHODS))})")
    schema = OmegaConf.structured(RunConfig)
    schema.method = OmegaConf.structured(METHODS[name].schema)
    merged = OmegaConf.merge(schema, loaded)
    assert isinstance(merged, DictConfig)
    return to_run_config(merged)
