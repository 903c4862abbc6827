"""What the method tests share: capturing the models a run loads, running a method, reading its logs, and settings.

The ``loaded`` fixture (``tests/methods/conftest.py``) wraps ``load_model`` so a test sees every model a ``run``
trains, with a copy of its parameters taken right after loading.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignment.config import to_run_config
from alignment.context import RunContext
from alignment.methods.pairwise.core import PairLogps

# One optimizer step of plain SGD on the given rows, nothing else (add ``method=…`` and the data).
ONE_SGD_STEP = [
    "model=tiny_random",
    "logger=none",
    "data.eval_fraction=0",
    "method.max_steps=1",
    "method.logging_steps=1",
    "method.optim=sgd",
    "method.learning_rate=1.0",
    "method.max_grad_norm=0",
    "method.save_strategy=no",
    "method.eval_strategy=no",
    "method.max_length=512",
]
# Two steps and an evaluation on a few demo pairs (add ``method=…``).
TINY_DEMO_PAIRS = [
    "model=tiny_random",
    "logger=none",
    "data=demo",
    "data.num_train_samples=8",
    "data.max_eval_samples=4",
    "method.max_steps=2",
    "method.per_device_train_batch_size=2",
    "method.per_device_eval_batch_size=4",
    "method.logging_steps=1",
    "method.save_strategy=no",
    "method.max_length=128",
]


def tiny_model(path: str, attn: str = "sdpa") -> Any:
    """The tiny random Llama in fp32 and eval mode, with the given attention implementation."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()


def sgd_step_args(out: Path, **overrides: Any) -> Any:
    """``TrainingArguments`` for one step of plain SGD (lr 1, no clipping, constant schedule) on CPU, no saving."""
    from transformers import TrainingArguments

    settings: dict[str, Any] = {
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_steps": 1,
        "learning_rate": 1.0,
        "optim": "sgd",
        "max_grad_norm": 0.0,
        "lr_scheduler_type": "constant",
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "remove_unused_columns": False,
        "prediction_loss_only": True,
    }
    return TrainingArguments(**{**settings, **overrides})


def trainable(model: Any) -> dict[str, torch.Tensor]:
    """A copy of the parameters that require grad."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@dataclass
class Loaded:
    """Every model the runs of a test load, in order (a run's policy before its reference copy), with starting weights.

    ``model``, ``initial``, ``frozen`` and ``trainable()`` refer to the latest model loaded.
    """

    models: list[Any] = field(default_factory=list)
    initials: list[dict[str, torch.Tensor]] = field(default_factory=list)
    frozens: list[dict[str, torch.Tensor]] = field(default_factory=list)

    @property
    def model(self) -> Any:
        """The latest model loaded."""
        return self.models[-1]

    @property
    def initial(self) -> dict[str, torch.Tensor]:
        """The latest model's trainable parameters right after loading."""
        return self.initials[-1]

    @property
    def frozen(self) -> dict[str, torch.Tensor]:
        """The latest model's frozen parameters right after loading."""
        return self.frozens[-1]

    def trainable(self) -> dict[str, torch.Tensor]:
        """The latest model's trainable parameters now."""
        return trainable(self.model)

    def keep(self, model: Any) -> Any:
        """Record a freshly loaded model and return it."""
        self.models.append(model)
        self.initials.append(trainable(model))
        self.frozens.append({n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad})
        return model


def run_method(
    run: Callable[[Any, RunContext], dict[str, float]], compose: Any, out: Path, overrides: list[str]
) -> dict[str, float]:
    """Compose ``overrides``, convert once, and call a method's ``run`` with ``out`` as the run directory."""
    cfg = to_run_config(compose(overrides))
    return run(cfg, RunContext(output_dir=out, name=out.name, group=None))


def read_logs(out: Path) -> list[dict[str, Any]]:
    """The entries of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def pair_row(prompt: str, chosen: str, rejected: str) -> dict[str, Any]:
    """A preference row with one user turn and one assistant answer per side."""
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as JSON lines and return the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def mean_logps(chosen: list[float], rejected: list[float], *, chosen_tokens: int, rejected_tokens: int) -> PairLogps:
    """Pairs whose mean log-probs are the given values, as sums over the given token counts (float64, with grad)."""
    n = len(chosen)
    return PairLogps(
        torch.tensor([chosen_tokens * c for c in chosen], dtype=torch.float64, requires_grad=True),
        torch.tensor([rejected_tokens * r for r in rejected], dtype=torch.float64, requires_grad=True),
        torch.full((n,), float(chosen_tokens), dtype=torch.float64),
        torch.full((n,), float(rejected_tokens), dtype=torch.float64),
    )


def bench_module(name: str) -> Any:
    """``bench/<name>.py`` imported as a module (the learning checks the tests share with the bench scripts)."""
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location(name, root / "bench" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
