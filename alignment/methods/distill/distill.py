"""Knowledge distillation: a student (the run's ``model``) learns a frozen teacher's token distributions.

Rows are ``messages`` conversations, validated as for SFT. Per counted token (the completion tokens of
``train_on_roles`` by default; ``tokens=all`` counts every token, as the original toolkit did) the loss is

    L = kd_weight * (tau^2) * D(p_T^tau, p_S^tau)  +  ce_weight * CE(p_S, y)

with ``D`` one of :class:`~alignment.methods.distill.losses.Divergence` at the loss temperature ``tau``, summed
over the counted tokens of the whole optimizer step and divided by their number (micro-batch 1 x accumulation 4
gives the gradient of 4 x 1). ``tau^2`` applies by default to the probability divergences (Hinton; the
original's KL) and not to ``soft_cross_entropy``, ``mse`` and ``cosine``; ``temperature_squared`` sets it for all.

Logits are never materialised for the whole batch: the loss is computed from the final hidden states and the two
output heads in token chunks (:mod:`alignment.training.chunked`). The teacher runs in the same process
(``teacher_source=model``), or its outputs come from a disk cache (``teacher_source=cache``): the top-k log-probs
plus a tail bucket (``cache_format=topk``), or its final hidden states (``cache_format=hidden``: exact
full-vocabulary distillation with only the teacher's output head in memory).

Deviations from the original toolkit (seed spec section 5): completion tokens only by default; the JSD in the
right direction; per-token cosine and earth mover's distance; an AB-divergence with a gradient for the student;
SLIM on counted tokens only; the hard-label weight actually applied; gradient-accumulation-correct means; any
distributed backend rather than DeepSpeed only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import TYPE_CHECKING, Any

from alignment.data.validate import RowChecks
from alignment.methods import sft
from alignment.methods.distill.divergences import TAU_SQUARED_LOSSES, TOPK_LOSSES, Divergence
from alignment.models.config import ModelConfig
from alignment.ranges import bounded
from alignment.task import TaskConfig

if TYPE_CHECKING:
    from alignment.config import RunConfig
    from alignment.context import RunContext


class CountedTokens(StrEnum):
    """Which tokens carry the distillation and CE losses."""

    completion = "completion"
    """The tokens of ``train_on_roles`` turns (as SFT)."""
    all = "all"
    """Every token after the first (the original toolkit's behaviour)."""


class TeacherSource(StrEnum):
    """Where the teacher's outputs come from."""

    model = "model"
    """The frozen teacher, in this process."""
    cache = "cache"
    """A disk cache computed once (by ``method=distill_cache`` or on first use) and reused."""


class CacheFormat(StrEnum):
    """What a teacher cache stores per counted token."""

    topk = "topk"
    """The top-k log-probs (normalised over the full vocabulary) and the tail mass as one bucket."""
    hidden = "hidden"
    """The final hidden states: exact full-vocabulary losses with only the teacher's output head loaded."""


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher: any ``model`` option's fields, plus the device it runs on. Frozen; never trained."""

    name_or_path: str = "embedded:smollm2-135m-instruct"
    """Hub id, local folder or ``embedded:<name>``; must share the student's tokenizer."""
    device: str | None = None
    """Device of the teacher's forward (``cuda:1``...); None: the student's. Only its hidden states move."""


@dataclass
class DistillConfig(sft.ConversationConfig):
    """Knowledge distillation from a frozen teacher into the run's model."""

    name: str = "distill"
    """Registry key."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The teacher model."""
    loss: Divergence = Divergence.forward_kl
    """The divergence between teacher and student distributions (see the README's loss table)."""
    temperature: float = bounded(1.0, gt=0)
    """Loss temperature tau: both distributions are softmax(z / tau)."""
    temperature_squared: bool | None = None
    """Multiply the divergence by tau^2; None: yes for probability divergences, no for soft CE, mse, cosine."""
    jsd_beta: float = bounded(0.5, ge=0, le=1)
    """beta of the generalised JSD (0: forward KL, 1: reverse KL, TRL's convention)."""
    skew_alpha: float = bounded(0.1, ge=0, lt=1)
    """alpha of the skew KLs (DistiLLM)."""
    ab_alpha: float = 1.0
    """alpha of the AB-divergence (any real; its limits are handled)."""
    ab_beta: float = 0.5
    """beta of the AB-divergence (any real; its limits are handled)."""
    kd_weight: float = bounded(1.0, ge=0)
    """Weight of the distillation term."""
    ce_weight: float = bounded(1.0, ge=0)
    """Weight of the student's cross-entropy on the hard labels (0: the original's ``--dont_learn_clm``)."""
    hard_label_weighting: bool = False
    """Weight each token's divergence by (1 - p_S(y)) * p_T(y) (temperature-1 probabilities, no gradient)."""
    tokens: CountedTokens = CountedTokens.completion
    """Which tokens count: the completions of ``train_on_roles``, or all."""
    max_length: int = bounded(1024, ge=2)
    """Tokens per sequence; longer conversations are cut at the end."""
    teacher_source: TeacherSource = TeacherSource.model
    """The teacher in this process, or its cached outputs."""
    cache_format: CacheFormat = CacheFormat.topk
    """What a cache stores (``teacher_source=cache`` and ``method=distill_cache``)."""
    cache_topk: int = bounded(64, ge=1)
    """k of the ``topk`` cache format."""
    chunk_size: int = bounded(0, ge=0)
    """Tokens projected through the output heads at once (memory ~ chunk_size x vocabulary); 0: as many as keep
    a chunk's logits at 4M values (16 MiB in fp32), so the loss path's memory does not grow with the vocabulary."""
    chunked: bool = True
    """False computes the loss on full logits (eager; for comparison only)."""

    def __post_init__(self) -> None:
        super().__post_init__()  # ranges and train_on_roles
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("method.kd_weight and method.ce_weight are both 0: nothing would be learned")
        if self.uses_topk_cache:
            if self.loss not in TOPK_LOSSES:
                accepted = ", ".join(sorted(TOPK_LOSSES))
                raise ValueError(
                    f"method.loss={self.loss} needs the teacher's full distribution, which a topk cache does not "
                    f"hold; use method.cache_format=hidden (exact) or teacher_source=model, or one of: {accepted}"
                )
            if self.hard_label_weighting:
                raise ValueError(
                    "method.hard_label_weighting needs the teacher's probability of every label, which a topk cache "
                    "does not hold; use method.cache_format=hidden or teacher_source=model"
                )

    @property
    def uses_topk_cache(self) -> bool:
        """Whether the teacher's outputs are a top-k cache."""
        return self.teacher_source is TeacherSource.cache and self.cache_format is CacheFormat.topk

    @property
    def tau_squared(self) -> bool:
        """Whether the divergence is multiplied by tau^2 (``temperature_squared``, or the loss's default)."""
        if self.temperature_squared is not None:
            return self.temperature_squared
        return self.loss in TAU_SQUARED_LOSSES


def row_checks(method: TaskConfig) -> RowChecks:
    """The rows distillation trains on: SFT's conversations."""
    assert isinstance(method, DistillConfig)
    return RowChecks(partial(sft.row_problems, roles=list(method.train_on_roles)), (sft.COLUMN,))


def tokenize_row(row: Mapping[str, Any], tokenizer: Any, cfg: DistillConfig) -> dict[str, Any]:
    """Token ids and labels of one conversation (``labels`` = every token after the first for ``tokens=all``)."""
    from alignment.data.chat_template import prepare_messages, tokenize_conversation

    messages = prepare_messages(
        row[sft.COLUMN], system_prompt=cfg.system_text(), model_support_system_role=cfg.model_support_system_role
    )
    out = tokenize_conversation(tokenizer, messages, cfg.train_on_roles, cfg.max_length)
    labels = list(out.input_ids) if cfg.tokens is CountedTokens.all else out.labels
    return {"input_ids": out.input_ids, "labels": labels, "truncated": out.truncated}


def run(cfg: RunConfig, ctx: RunContext) -> dict[str, float]:
    """Validate and tokenise the data, check the tokenizers, load teacher and student, distil, save."""
    from alignment.methods.distill.trainer import run_distillation

    return run_distillation(cfg, ctx)
