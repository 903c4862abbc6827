"""What the ``method`` group selects: the schema every method and data tool extends.

The fields below are the one place where the method-agnostic training defaults live (HF names). Each method's
config extends :class:`MethodConfig` and adds only its own knobs; :func:`alignment.training.arguments.training_args`
turns the shared part into ``transformers.TrainingArguments`` (or a TRL config that extends it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from omegaconf import MISSING

from alignment.ranges import bounded


class IntervalStrategy(StrEnum):
    """When to evaluate or save (HF ``IntervalStrategy``)."""

    no = "no"
    steps = "steps"
    epoch = "epoch"


class SchedulerType(StrEnum):
    """Learning-rate schedule (a subset of HF ``SchedulerType``)."""

    linear = "linear"
    cosine = "cosine"
    cosine_with_min_lr = "cosine_with_min_lr"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    warmup_stable_decay = "warmup_stable_decay"


class TaskFailedError(RuntimeError):
    """A method or tool failed after producing a summary worth keeping (a data tool whose rows failed).

    The runner records :attr:`metrics` in ``results.json`` beside the error, as a finished run's would be.
    """

    def __init__(self, message: str, metrics: Mapping[str, float]) -> None:
        super().__init__(message)
        self.metrics = dict(metrics)
        """The run's summary metrics up to the failure."""


@dataclass
class TaskConfig:
    """What the ``method`` group selects: a training method (:class:`MethodConfig`) or a data tool."""

    name: str = MISSING
    """Registry key of the method or tool (``alignment.registry.METHODS``); set by each schema."""


@dataclass
class MethodConfig(TaskConfig):
    """Method-agnostic training settings; names and meanings follow ``transformers.TrainingArguments``."""

    learning_rate: float = bounded(2e-5, gt=0)
    """Peak learning rate."""
    lr_scheduler_type: SchedulerType = SchedulerType.linear
    """Shape of the learning-rate schedule after warm-up."""
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra schedule arguments; ``cosine_with_min_lr`` needs ``min_lr_rate`` (or ``min_lr``) and
    ``warmup_stable_decay`` needs ``num_decay_steps`` (``+method.lr_scheduler_kwargs.min_lr_rate=0.1``)."""
    warmup_steps: float = bounded(0.0, ge=0)
    """Linear warm-up: an integer step count, or a float in [0, 1) as a fraction of all steps."""
    weight_decay: float = bounded(0.0, ge=0)
    """AdamW decoupled weight decay."""
    max_grad_norm: float = bounded(1.0, ge=0)
    """Gradient clipping norm (0 disables)."""
    optim: str = "adamw_torch"
    """HF optimizer name (``adamw_torch``, ``adamw_torch_fused`` on GPU, ``adamw_8bit`` with bitsandbytes…)."""
    num_train_epochs: float = bounded(1.0, gt=0)
    """Epochs over the train split; ignored when ``max_steps`` > 0."""
    max_steps: int = bounded(-1, ge=1, sentinel=-1, means="use num_train_epochs")
    """Optimizer steps to run; -1 means use ``num_train_epochs``."""
    per_device_train_batch_size: int = bounded(8, ge=1)
    """Sequences per device per micro-batch."""
    per_device_eval_batch_size: int = bounded(8, ge=1)
    """Sequences per device per evaluation batch (also the generation batch)."""
    gradient_accumulation_steps: int = bounded(1, ge=1)
    """Micro-batches per optimizer step."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute (HF ``activation_checkpointing``)."""
    eval_strategy: IntervalStrategy = IntervalStrategy.steps
    """When to evaluate (loss on the eval split, sample generations)."""
    eval_steps: float | None = bounded(0.25, gt=0)
    """Steps between evaluations (a float < 1 is a fraction of all steps); None uses ``logging_steps``."""
    eval_on_start: bool = True
    """Evaluate before the first step, so every run records a before/after."""
    save_strategy: IntervalStrategy = IntervalStrategy.steps
    """When to write a resumable checkpoint."""
    save_steps: float = bounded(500.0, gt=0)
    """Steps between checkpoints (a float < 1 is a fraction of all steps)."""
    save_total_limit: int | None = bounded(2, ge=1)
    """Keep at most this many checkpoints (oldest deleted first)."""
    logging_steps: float = bounded(10.0, gt=0)
    """Steps between metric logs."""
    bf16: bool | None = None
    """bf16 mixed precision; None turns it on only on a CUDA device with bf16 support when fp16 is off (never on
    CPU)."""
    fp16: bool = False
    """fp16 mixed precision (GPUs without bf16)."""
    dataloader_num_workers: int = bounded(0, ge=0)
    """Worker processes per dataloader."""
    keep_checkpoints: bool = False
    """Keep ``checkpoints/`` after the run finishes; they exist to resume an interrupted run, ``model/`` holds the
    result, and a full-model checkpoint with optimizer state is ~3x the model's size."""
    resume_from_checkpoint: str | None = None
    """``checkpoint-<step>`` folder to resume from (weights, optimizer, scheduler, RNG and data position); run with
    the same settings as the interrupted run."""
    early_stopping_patience: int | None = bounded(None, ge=0)
    """Stop training after this many evaluations in a row without an improvement of ``metric_for_best_model``
    (HF ``EarlyStoppingCallback``); None or 0: off. Needs evaluations: an eval split and an ``eval_strategy``."""
    early_stopping_threshold: float = bounded(0.0, ge=0)
    """Least change of ``metric_for_best_model`` over the best value so far that counts as an improvement."""
    metric_for_best_model: str | None = None
    """Eval metric that early stopping and ``load_best_model_at_end`` compare, by its HF name (``eval_loss``,
    ``eval_exact_match``, ``eval_rewards/accuracies``...; the ``eval_`` prefix may be left out); None:
    ``eval_loss`` when either is on."""
    greater_is_better: bool | None = None
    """Whether a larger ``metric_for_best_model`` is better; None: false for a name ending in ``loss``, else true."""
    load_best_model_at_end: bool = False
    """Save the best evaluated checkpoint's weights as ``model/`` instead of the last step's. Needs a checkpoint at
    every evaluation: ``save_strategy`` equal to ``eval_strategy`` and ``save_steps`` a multiple of ``eval_steps``."""


def tracks_best_model(cfg: MethodConfig) -> bool:
    """Whether the run compares evaluations: early stopping or ``load_best_model_at_end`` is on."""
    return bool(cfg.early_stopping_patience) or cfg.load_best_model_at_end


def best_model_metric(cfg: MethodConfig) -> str | None:
    """``metric_for_best_model``, defaulting to ``eval_loss`` when the run compares evaluations."""
    if cfg.metric_for_best_model is None and tracks_best_model(cfg):
        return "eval_loss"
    return cfg.metric_for_best_model


def _step_kind(steps: float) -> str:
    return "a fraction of the run" if steps < 1 else "a step count"


def _save_steps_problem(cfg: MethodConfig) -> str | None:
    """Why the checkpoints of ``steps`` saving do not fall on evaluations (HF's ``load_best_model_at_end`` rule)."""
    save, evaluate = cfg.save_steps, cfg.eval_steps if cfg.eval_steps is not None else cfg.logging_steps
    given = f"method.save_steps={save:g} and method.eval_steps={evaluate:g}"
    if (save < 1) != (evaluate < 1):
        return f"{given}: one is {_step_kind(save)}, the other {_step_kind(evaluate)}; give both the same way"
    # Fractions compared in millionths, as HF does, so 0.5 is a multiple of 0.25 despite binary floats.
    scale = 1_000_000 if save < 1 else 1
    if round(save * scale) % round(evaluate * scale):
        return f"{given}: save_steps must be a multiple of eval_steps (e.g. method.save_steps={evaluate:g})"
    return None


def best_model_problems(cfg: MethodConfig, *, evaluation: bool) -> list[str]:
    """What keeps early stopping or ``load_best_model_at_end`` from working; empty when both are off.

    Args:
        cfg: the method's settings.
        evaluation: whether the run has an eval split.
    """
    if not tracks_best_model(cfg):
        return []
    asked = []
    if cfg.early_stopping_patience:
        asked.append(f"method.early_stopping_patience={cfg.early_stopping_patience}")
    if cfg.load_best_model_at_end:
        asked.append("method.load_best_model_at_end=true")
    wanted = " and ".join(asked)
    problems = []
    if cfg.eval_strategy is IntervalStrategy.no:
        problems.append(f"{wanted} compares evaluations, but method.eval_strategy=no (set steps or epoch)")
    if not evaluation:
        problems.append(
            f"{wanted} compares evaluations, but there is no eval split (data.eval_fraction=0 and no source sets "
            "eval_path or eval_split)"
        )
    if cfg.load_best_model_at_end and cfg.eval_strategy is not IntervalStrategy.no:
        if cfg.save_strategy is not cfg.eval_strategy:
            problems.append(
                f"method.load_best_model_at_end=true needs a checkpoint at every evaluation: method.save_strategy="
                f"{cfg.save_strategy.value} must equal method.eval_strategy={cfg.eval_strategy.value}"
            )
        elif cfg.save_strategy is IntervalStrategy.steps and (problem := _save_steps_problem(cfg)):
            problems.append(f"method.load_best_model_at_end=true needs a checkpoint at every evaluation: {problem}")
    return problems


def check_best_model(cfg: MethodConfig, *, evaluation: bool) -> None:
    """Raise on the :func:`best_model_problems` of a method's settings, before anything loads.

    Raises:
        ValueError: every problem found, ``; ``-separated.
    """
    problems = best_model_problems(cfg, evaluation=evaluation)
    if problems:
        raise ValueError("; ".join(problems))
