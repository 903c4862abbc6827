"""The one mapping from a run's settings to HF ``TrainingArguments``: field names, schedules, precision, backends.

``training_kwargs`` is checked field by field against a method config where every shared field differs from
its default; ``training_args`` on configs composed from ``conf/`` exactly as a run composes them.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainingArguments

from alignment.config import to_run_config
from alignment.context import RunContext
from alignment.distributed import DistributedConfig
from alignment.methods.sft import SftConfig
from alignment.task import IntervalStrategy, MethodConfig, SchedulerType
from alignment.training.arguments import auto_bf16, training_args, training_kwargs

# --- training_kwargs ------------------------------------------------------------------------------------------------

# Our field -> HF TrainingArguments name, where they differ.
HF_NAMES = {"gradient_checkpointing": "activation_checkpointing"}


def _non_default_method_config() -> SftConfig:
    return SftConfig(
        learning_rate=3e-4,
        lr_scheduler_type=SchedulerType.cosine_with_min_lr,
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=0.1,
        weight_decay=0.01,
        max_grad_norm=0.5,
        optim="sgd",
        num_train_epochs=2.0,
        max_steps=7,
        per_device_train_batch_size=3,
        per_device_eval_batch_size=5,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        eval_strategy=IntervalStrategy.epoch,
        eval_steps=0.5,
        eval_on_start=False,
        save_strategy=IntervalStrategy.no,
        save_steps=3,
        save_total_limit=1,
        logging_steps=2,
        bf16=False,
        fp16=False,
        dataloader_num_workers=1,
        resume_from_checkpoint="/some/checkpoint-2",
    )


def test_training_kwargs_maps_every_shared_field_with_hf_names() -> None:
    from trl import SFTConfig as TrlSFTConfig

    cfg = _non_default_method_config()
    kwargs = training_kwargs(cfg, DistributedConfig(), output_dir="/tmp/out", seed=5, run_name="r")
    # Not HF arguments: the registry key, what the runner does with checkpoints after a finished run, and the
    # early-stopping callback's settings (train_and_save).
    not_hf = ("name", "keep_checkpoints", "early_stopping_patience", "early_stopping_threshold")
    shared = [f.name for f in fields(MethodConfig) if f.name not in not_hf]
    for name in shared:
        value = getattr(cfg, name)
        expected = value.value if isinstance(value, IntervalStrategy | SchedulerType) else value
        assert kwargs[HF_NAMES.get(name, name)] == expected, name
    assert {"output_dir": "/tmp/out", "seed": 5, "run_name": "r"}.items() <= kwargs.items()
    assert set(kwargs) == {HF_NAMES.get(n, n) for n in shared} | {"output_dir", "seed", "run_name", "use_cpu"}
    args = TrlSFTConfig(**{**kwargs, "use_cpu": True})  # every name is one HF accepts, and the values survive
    assert args.gradient_checkpointing is True
    assert args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert args.resume_from_checkpoint == "/some/checkpoint-2"
    assert (args.learning_rate, args.per_device_train_batch_size, args.max_steps) == (3e-4, 3, 7)


@pytest.mark.parametrize(
    ("schedule", "extra"),
    [
        (SchedulerType.cosine_with_min_lr, {"min_lr_rate": 0.1}),
        (SchedulerType.warmup_stable_decay, {"num_decay_steps": 2}),
    ],
)
def test_schedules_that_need_kwargs_get_them(schedule: SchedulerType, extra: dict[str, Any]) -> None:
    from transformers import get_scheduler

    kwargs = training_kwargs(
        SftConfig(lr_scheduler_type=schedule, lr_scheduler_kwargs=extra),
        DistributedConfig(),
        output_dir="o",
        seed=0,
        run_name="r",
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(
        kwargs["lr_scheduler_type"],
        optimizer,
        num_warmup_steps=0,
        num_training_steps=10,
        scheduler_specific_kwargs=kwargs["lr_scheduler_kwargs"],
    )
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] < 1.0


def test_training_kwargs_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    kwargs = training_kwargs(SftConfig(bf16=None), DistributedConfig(), output_dir="o", seed=0, run_name="r")
    assert kwargs["bf16"] is False
    assert kwargs["use_cpu"] is True
    assert (
        training_kwargs(SftConfig(bf16=True), DistributedConfig(), output_dir="o", seed=0, run_name="r")["bf16"] is True
    )


def test_training_kwargs_auto_bf16_on_gpu_yields_to_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    auto = training_kwargs(SftConfig(), DistributedConfig(), output_dir="o", seed=0, run_name="r")
    assert (auto["bf16"], auto["use_cpu"]) == (True, False)
    # HF rejects bf16 together with fp16, so automatic bf16 must step aside when fp16 is asked for.
    assert (
        training_kwargs(SftConfig(fp16=True), DistributedConfig(), output_dir="o", seed=0, run_name="r")["bf16"]
        is False
    )
    assert auto_bf16(None, fp16=False) is True


# --- training_args --------------------------------------------------------------------------------------------------

TINY = [
    "model=tiny_random",
    "logger=none",
    "method.eval_strategy=steps",
    "method.eval_steps=3",
    "method.eval_on_start=true",
]


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without CUDA, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _args(compose: Any, tmp_path: Path, overrides: list[str], **kwargs: Any) -> Any:
    return training_args(to_run_config(compose(TINY + overrides)), RunContext(tmp_path, "r", None), **kwargs)


def test_training_args_without_eval_data_turn_evaluation_off(compose: Any, tmp_path: Path, cpu: None) -> None:
    args = _args(compose, tmp_path, ["seed=11"], evaluation=False)
    assert type(args) is TrainingArguments
    assert args.eval_strategy == "no"
    assert args.eval_on_start is False
    assert (args.output_dir, args.run_name, args.seed) == (str(tmp_path / "checkpoints"), "r", 11)
    assert args.report_to == []  # logger=none


def test_training_args_with_eval_data_keep_the_methods_evaluation(compose: Any, tmp_path: Path, cpu: None) -> None:
    args = _args(compose, tmp_path, [], evaluation=True)
    assert args.eval_strategy == "steps"
    assert args.eval_steps == 3
    assert args.eval_on_start is True


def _recorded(**kwargs: Any) -> dict[str, Any]:
    """The keywords an args class would receive.

    A real ``TrainingArguments`` with a ``ddp_backend`` sets up its process group when built, which needs the rank
    environment only a launched rank has.
    """
    return kwargs


def test_training_args_take_the_backend_from_the_cfg_passed_in(compose: Any, tmp_path: Path, cpu: None) -> None:
    ddp = ["distributed=ddp", "distributed.nproc_per_node=2", "distributed.timeout_s=77"]
    first = _args(compose, tmp_path, ddp, evaluation=False, args_class=_recorded)
    single = _args(compose, tmp_path, [], evaluation=False, args_class=_recorded)
    again = _args(compose, tmp_path, ddp, evaluation=False, args_class=_recorded)
    assert {"ddp_backend": "gloo", "ddp_timeout": 77, "ddp_bucket_cap_mb": 25}.items() <= first.items()
    assert not {k for k in single if k.startswith("ddp_")}  # a single process gets no backend arguments
    assert again == first  # nothing of the first call stayed behind
    assert first["use_cpu"] is True


def test_training_args_honour_the_args_class_and_extra_kwargs(compose: Any, tmp_path: Path, cpu: None) -> None:
    from trl import SFTConfig as TrlSFTConfig

    args = _args(
        compose, tmp_path, [], evaluation=False, args_class=TrlSFTConfig, max_length=77, remove_unused_columns=False
    )
    assert type(args) is TrlSFTConfig
    assert (args.max_length, args.remove_unused_columns) == (77, False)
    assert args.eval_strategy == "no"  # the toggle applies to the TRL config as well
