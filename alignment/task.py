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
