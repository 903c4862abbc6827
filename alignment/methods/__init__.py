"""Method registry: the only place that maps ``method.name`` to its schema and its ``run`` function.

Adding a method: ``alignment/methods/<name>.py`` (``<Name>Config`` + losses + ``run``), ``conf/method/<name>.yaml``,
``tests/methods/test_<name>.py`` and one line in :data:`METHODS`. A data tool (generation, scoring, dedup) is the
same with ``alignment/tools/<name>.py`` (a :class:`~alignment.methods.common.TaskConfig` schema, not a
``MethodConfig``) and ``tests/tools/test_<name>.py``: tools compose, sweep and go to SLURM like methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignment.methods import classification, cpo, dpo, gpo, orpo, reward, sft, simpo, smpo
from alignment.methods.common import TaskConfig
from alignment.tools import dedup, generate, rejection_sampling, rm_scoring

if TYPE_CHECKING:
    from alignment.config import RunConfig
    from alignment.context import RunContext


@dataclass(frozen=True)
class Method:
    """A method's (or tool's) config schema and its entry point ``run(cfg, ctx) -> final metrics``."""

    schema: type[TaskConfig]
    run: Callable[[RunConfig, RunContext], dict[str, float]]


METHODS: dict[str, Method] = {
    "sft": Method(sft.SftConfig, sft.run),
    "dpo": Method(dpo.DpoConfig, dpo.run),
    "orpo": Method(orpo.OrpoConfig, orpo.run),
    "cpo": Method(cpo.CpoConfig, cpo.run),
    "simpo": Method(simpo.SimpoConfig, simpo.run),
    "smpo": Method(smpo.SmpoConfig, smpo.run),
    "reward": Method(reward.RewardConfig, reward.run),
    "classification": Method(classification.ClassificationConfig, classification.run),
    "gpo": Method(gpo.GpoConfig, gpo.run),
    "generate": Method(generate.GenerateConfig, generate.run),
    "rejection_sampling": Method(rejection_sampling.RejectionSamplingConfig, rejection_sampling.run),
    "rm_scoring": Method(rm_scoring.RmScoringConfig, rm_scoring.run),
    "dedup": Method(dedup.DedupConfig, dedup.run),
}
