"""The one mapping from a run's settings to ``transformers.TrainingArguments`` (or a TRL config extending it).

:func:`training_kwargs` is pure: the method's shared fields (HF names), the run's seed and names, and the
``distributed`` backend's keywords (:func:`alignment.distributed.trainer_kwargs`, passed explicitly, never read
from process state). :func:`training_args` builds the arguments object every method's ``run`` uses, with the
no-eval toggle and the tracker settings applied once. :func:`sharded_loading` builds the run's ZeRO-3 arguments
before any model loads, so that the models are created sharded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar, overload

from transformers import TrainingArguments

from alignment.distributed import (
    DistributedBackend,
    DistributedConfig,
    cuda_available,
    process_group_backend,
    trainer_kwargs,
)
from alignment.loggers import interactive_console, report_to
from alignment.models.sharded import run_sharding
from alignment.task import IntervalStrategy, MethodConfig, best_model_metric, check_best_model

if TYPE_CHECKING:
    from alignment.config import RunConfig
    from alignment.context import RunContext

ArgsT = TypeVar("ArgsT", bound=TrainingArguments)


def auto_bf16(flag: bool | None, *, fp16: bool) -> bool:
    """The bf16 setting: an explicit flag, else on only for a CUDA device with bf16 and no fp16."""
    if flag is not None:
        return flag
    # HF rejects bf16 and fp16 together, so an explicit fp16 wins over the automatic choice.
    import torch

    return not fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def training_kwargs(
    cfg: MethodConfig, distributed: DistributedConfig, *, output_dir: str, seed: int, run_name: str
) -> dict[str, Any]:
    """Keyword arguments for an HF/TRL ``*Config`` from the shared settings of a method and the run's backend.

    Raises:
        DistributedSetupError: the ``distributed`` backend cannot run on this machine.
    """
    return {
        "output_dir": output_dir,
        "run_name": run_name,
        "seed": seed,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": cfg.lr_scheduler_type.value,
        "lr_scheduler_kwargs": dict(cfg.lr_scheduler_kwargs),
        "warmup_steps": cfg.warmup_steps,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "optim": cfg.optim,
        "num_train_epochs": cfg.num_train_epochs,
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "per_device_eval_batch_size": cfg.per_device_eval_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        # The new HF name: ``gradient_checkpointing`` is a deprecated alias in transformers 5 (FutureWarning).
        "activation_checkpointing": cfg.gradient_checkpointing,
        "eval_strategy": cfg.eval_strategy.value,
        "eval_steps": cfg.eval_steps,
        "eval_on_start": cfg.eval_on_start and cfg.eval_strategy is not IntervalStrategy.no,
        "save_strategy": cfg.save_strategy.value,
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "logging_steps": cfg.logging_steps,
        "bf16": auto_bf16(cfg.bf16, fp16=cfg.fp16),
        "fp16": cfg.fp16,
        "use_cpu": not _cuda(),
        "dataloader_num_workers": cfg.dataloader_num_workers,
        "resume_from_checkpoint": cfg.resume_from_checkpoint,
        # Early stopping itself is a callback (alignment.training.checkpoint.train_and_save); these say what it and
        # load_best_model_at_end compare.
        "metric_for_best_model": best_model_metric(cfg),
        "greater_is_better": cfg.greater_is_better,
        "load_best_model_at_end": cfg.load_best_model_at_end,
        # DDP / FSDP / DeepSpeed arguments of the run's ``distributed`` backend (empty for a single process).
        **trainer_kwargs(distributed),
    }


@overload
def training_args(
    cfg: RunConfig, ctx: RunContext, *, evaluation: bool, args_class: type[ArgsT], **extra: Any
) -> ArgsT: ...


@overload
def training_args(cfg: RunConfig, ctx: RunContext, *, evaluation: bool, **extra: Any) -> TrainingArguments: ...


def training_args(
    cfg: RunConfig,
    ctx: RunContext,
    *,
    evaluation: bool,
    args_class: type[TrainingArguments] = TrainingArguments,
    **extra: Any,
) -> TrainingArguments:
    """The run's training arguments: checkpoints under ``ctx``, trackers from ``cfg.logger``, eval off without data.

    Args:
        cfg: the run (its ``method`` must be a :class:`~alignment.task.MethodConfig`).
        ctx: where the run writes.
        evaluation: whether there is an eval split; without one, evaluation (and eval-on-start) is off.
        args_class: ``TrainingArguments`` or a TRL config class extending it (``SFTConfig``).
        **extra: method-specific arguments (``remove_unused_columns``, ``max_length``...).

    Raises:
        ValueError: early stopping or ``load_best_model_at_end`` without an eval split (the config promised one,
            but the data left none) or with settings that could not work.
    """
    method = cfg.method
    assert isinstance(method, MethodConfig)
    check_best_model(method, evaluation=evaluation)
    kwargs = training_kwargs(
        method, cfg.distributed, output_dir=str(ctx.checkpoint_dir), seed=cfg.seed, run_name=ctx.name
    )
    if not evaluation:
        kwargs.update(eval_strategy="no", eval_on_start=False)
    # Off without a terminal (SLURM .out files, pipes): the train and eval bars would interleave as \r-lines there.
    kwargs.update(disable_tqdm=not interactive_console())
    return args_class(**kwargs, report_to=report_to(cfg.logger), **extra)


@contextmanager
def sharded_loading(cfg: RunConfig, ctx: RunContext) -> Iterator[None]:
    """While open, this rank's models load sharded under the run's backend (:mod:`alignment.models.sharded`).

    transformers creates a model under ZeRO-3's ``zero.Init`` only while a ``TrainingArguments`` with that config is
    alive, and the methods load their models before building theirs. So for ZeRO-3 and FSDP2 this builds the run's
    arguments first (the same DeepSpeed config the method's arguments hold, batch sizes and precision filled from
    the method; the process group set up). For ZeRO-3 it joins DeepSpeed's communication to that process group
    (``zero.Init`` reads the world size there, and would otherwise see 1 and reject the batch sizes) and hands the
    config to the loads that ask for it; for FSDP2 the loads set accelerate's rank-0 loading flags
    (``distributed.fsdp.cpu_ram_efficient_loading``). Every load is recorded while this is open (the rank record's
    ``loads``).
    """
    dist, method = cfg.distributed, cfg.method
    zero3 = dist.backend is DistributedBackend.deepspeed and dist.deepspeed.stage == 3
    fsdp = dist.backend is DistributedBackend.fsdp and dist.fsdp.cpu_ram_efficient_loading
    config = None
    if (zero3 or fsdp) and isinstance(method, MethodConfig):
        kwargs = training_kwargs(method, dist, output_dir=str(ctx.checkpoint_dir), seed=cfg.seed, run_name=ctx.name)
        args = TrainingArguments(**kwargs, report_to=[])
        if zero3:
            import deepspeed  # type: ignore[import-untyped]
            from transformers.integrations import deepspeed as hf_deepspeed

            deepspeed.init_distributed(dist_backend=process_group_backend(dist, cuda=cuda_available()))
            config = args.hf_deepspeed_config
            # Active only around the loads that ask for it; the method's own arguments activate theirs as usual.
            hf_deepspeed.unset_hf_deepspeed_config()  # type: ignore[no-untyped-call]
    with run_sharding(config, fsdp=fsdp):
        yield
