"""``plan=true``: the checks a run makes before training, a memory estimate, the sbatch preview, and no training.

Errors found by the plan must be the errors a real run raises, so the failure tests launch both and compare the
error lines.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from alignment.config import to_run_config
from alignment.plan import ModelShape, check_data, estimate_memory, sbatch_preview
from tests.conftest import launch

QUICK_S = 180
PLAN = ["model=tiny_random", "logger=none", "plan=true"]
SLURM_TARGET = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return f"{result.stdout}\n{result.stderr}"


def _error_lines(out: str, needle: str) -> list[str]:
    """The lines naming ``needle``, without log prefixes (``[time][logger][LEVEL] -``)."""
    return sorted({line.rsplit("] - ", 1)[-1].strip() for line in out.splitlines() if needle in line})


def _nothing_trained(tmp_path: Path) -> None:
    for name in ("model", "checkpoints", "config.yaml", "results.json", "metrics.jsonl", "ranks"):
        assert list(tmp_path.rglob(name)) == [], f"{name} written by a plan"


def _plan_and_run(
    tmp_path: Path, overrides: list[str]
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """The same command with ``plan=true`` (in ``plan/``) and as a real run (in ``real/``)."""
    (tmp_path / "plan").mkdir()
    (tmp_path / "real").mkdir()
    planned = launch([*PLAN, *overrides], cwd=tmp_path / "plan", timeout=QUICK_S)
    return planned, launch([*PLAN[:-1], *overrides], cwd=tmp_path / "real", timeout=QUICK_S)


def test_plan_prints_the_checks_and_the_memory_estimate_without_training(tmp_path: Path) -> None:
    result = launch(
        [*PLAN, "distributed=deepspeed_zero3", "distributed.nproc_per_node=2"],
        cwd=tmp_path,
        timeout=QUICK_S,
    )
    out = _output(result)
    assert result.returncode == 0, out[-4000:]
    # The first 16 rows of the train file and of its eval file.
    assert "embedded:train.jsonl: first 32 rows valid (columns messages)" in out
    assert "LlamaForCausalLM: 3,219,776 parameters, 3,219,776 trainable" in out
    assert "decoder layer LlamaDecoderLayer" in out
    assert "memory per device: backend deepspeed (ZeRO-3), world size 2" in out
    # fp32 on CPU, everything sharded over 2 ranks: 3,219,776 x 4 B / 2 = 6.1 MiB of weights per device.
    assert "parameters      6.1 MiB" in out
    assert "optimizer      12.3 MiB" in out
    assert "local run: no sbatch script; ranks: torchrun --nnodes 1 --nproc-per-node 2" in out
    _nothing_trained(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["method.learning_rat=1"], "learning_rat"),
        (["distributed=fsdp", "distributed.nproc_per_node=2"], "distributed=fsdp needs CUDA"),
        (
            ["distributed=ddp", "distributed.nproc_per_node=2", "distributed.process_group=nccl"],
            "process_group=nccl needs CUDA",
        ),
    ],
    ids=["typo", "fsdp-on-cpu", "nccl-on-cpu"],
)
@pytest.mark.slow
def test_plan_fails_with_the_error_of_a_real_run(tmp_path: Path, overrides: list[str], needle: str) -> None:
    planned, real = _plan_and_run(tmp_path, overrides)
    assert planned.returncode != 0
    assert real.returncode != 0
    plan_errors = _error_lines(_output(planned), needle)
    assert plan_errors, _output(planned)[-3000:]
    assert plan_errors == _error_lines(_output(real), needle)
    _nothing_trained(tmp_path / "plan")


@pytest.mark.slow
def test_plan_names_a_bad_data_row_like_a_real_run(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    bad = {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "2"}]}
    data.write_text(f"{json.dumps(good)}\n{json.dumps(bad)}\n", encoding="utf-8")
    overrides = [f"data.sources=[{{path: '{data}'}}]"]
    planned, real = _plan_and_run(tmp_path, overrides)
    needle = f"{data}:2: column 'messages'[0].role: unknown role 'bot'"
    assert planned.returncode != 0
    # The real run prints the problem in its error block (and once more in the failure record it logs).
    planned_lines = _error_lines(_output(planned), needle)
    assert planned_lines
    assert set(planned_lines) <= set(_error_lines(_output(real), needle))
    _nothing_trained(tmp_path / "plan")


def test_plan_prints_the_sbatch_script_of_the_slurm_launcher(tmp_path: Path) -> None:
    result = launch(
        [
            *PLAN,
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "distributed=ddp",
            "distributed.nproc_per_node=4",
        ],
        cwd=tmp_path,
        timeout=QUICK_S,
    )
    out = _output(result)
    assert result.returncode == 0, out[-4000:]
    assert "== sbatch script (not submitted; the same command with -m submits it)" in out
    assert "#SBATCH --partition=gpu" in out
    assert "submitit.core._submit" in out
    assert not list(tmp_path.rglob(".submitit")), "a plan must not create submitit folders"


def test_plan_of_a_gpu_slurm_job_with_an_unreachable_model(tmp_path: Path) -> None:
    """FSDP on the slurm preset (1 GPU per job) from a CPU machine, with a hub id not in the cache, offline.

    The job has CUDA (no "fsdp needs CUDA"); 8 ranks on 1 GPU is flagged; every part but the model is printed, the
    model part says why it is missing, and the plan exits 1 without a traceback.
    """
    overrides = ["hydra/launcher=slurm", "distributed=fsdp", "distributed.nproc_per_node=8"]
    result = launch([*PLAN, *overrides, "model.name_or_path=someorg/not-cached-model"], cwd=tmp_path, timeout=QUICK_S)
    out = _output(result)
    assert result.returncode == 1, out[-4000:]
    assert "needs CUDA" not in out
    assert "Traceback" not in out
    assert (
        "== warning: launcher mismatch: hydra.launcher.gpus_per_node=1 but distributed.nproc_per_node=8 ranks per "
        "node (use hydra/launcher=slurm_multinode or slurm_tasks, or set hydra.launcher.gpus_per_node=8)"
    ) in out
    assert "embedded:train.jsonl: first 32 rows valid (columns messages)" in out
    assert ("== model unreachable: offline / gated — set HF_TOKEN or point model.name_or_path to a local folder") in out
    assert "#SBATCH --gpus-per-node=1" in out
    assert "plan incomplete: the model could not be read" in out
    _nothing_trained(tmp_path)


# --- pieces ----------------------------------------------------------------------------------------------------

SHAPE = ModelShape("Toy", parameters=1000, trainable=1000, layer_classes=("ToyLayer",))


@pytest.mark.parametrize(
    ("overrides", "cuda", "expected"),
    [
        # fp32 on CPU: 4 B weights, 4 B grads, 8 B Adam moments per parameter.
        (["distributed=ddp", "distributed.nproc_per_node=2"], False, (4000, 4000, 8000, 0)),
        # ZeRO-2 shards gradients and optimizer state, not parameters.
        (["distributed=deepspeed_zero2", "distributed.nproc_per_node=2"], False, (4000, 2000, 4000, 0)),
        # ZeRO-3 shards all three; FSDP likewise.
        (["distributed=deepspeed_zero3", "distributed.nproc_per_node=2"], False, (2000, 2000, 4000, 0)),
        (["distributed=fsdp", "distributed.nproc_per_node=4"], False, (1000, 1000, 2000, 0)),
        # GPU: bf16 weights/grads (2 B) + fp32 master and moments (12 B) for DeepSpeed; offload moves params and
        # optimizer state to CPU RAM: 1000 x 2 / 2 + 1000 x 12 / 2 = 7000 B per rank.
        (["distributed=deepspeed_zero3_offload", "distributed.nproc_per_node=2"], True, (0, 1000, 0, 7000)),
        # FSDP CPU offload keeps everything in CPU RAM (fp32 model, bf16 autocast): 4000 + 4000 + 8000 over 4.
        (["distributed=fsdp_offload", "distributed.nproc_per_node=4", "model.dtype=float32"], True, (0, 0, 0, 4000)),
    ],
)
def test_memory_estimate(compose: Any, overrides: list[str], cuda: bool, expected: tuple[int, ...]) -> None:
    cfg = to_run_config(compose(overrides))
    memory = estimate_memory(SHAPE, cfg, cuda=cuda)
    assert (memory.weights, memory.gradients, memory.optimizer, memory.offloaded) == expected


def test_lora_counts_only_adapters_as_trainable(compose: Any) -> None:
    cfg = to_run_config(compose(["model.lora.enabled=true", "distributed=ddp", "distributed.nproc_per_node=2"]))
    shape = ModelShape("Toy", parameters=1000, trainable=10, layer_classes=())
    memory = estimate_memory(shape, cfg, cuda=False)
    assert (memory.weights, memory.gradients, memory.optimizer) == (4000, 40, 80)


# Every training method with the demo data it trains on (the tools declare no row checks: None in the registry).
METHOD_DATA = {
    "sft": "demo",
    "dpo": "demo",
    "orpo": "demo",
    "cpo": "demo",
    "simpo": "demo",
    "smpo": "demo",
    "reward": "demo_reward",
    "classification": "demo_classification",
    "gpo": "demo_gpo",
    "distill": "demo",
    "distill_cache": "demo",
    "prompt_opt": "demo",
}


def test_every_training_method_declares_its_row_checks() -> None:
    from alignment.registry import METHODS
    from alignment.task import MethodConfig

    training = {name for name, m in METHODS.items() if issubclass(m.schema, MethodConfig)}
    assert training == set(METHOD_DATA)
    assert all(METHODS[name].row_checks is not None for name in training)
    assert all(m.row_checks is None for name, m in METHODS.items() if name not in training)


def _one_source(cfg: Any, rows: list[dict[str, Any]], tmp_path: Path) -> Any:
    """``cfg`` reading ``rows`` from one JSONL file (no eval file), with the demo source's column renames."""
    import dataclasses

    from alignment.data.config import SourceConfig

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    source = SourceConfig(path=str(path), columns=dict(cfg.data.sources[0].columns))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=[source], eval_fraction=0.0))


@pytest.mark.parametrize("method", sorted(METHOD_DATA))
def test_plan_and_a_real_run_agree_on_good_and_bad_rows(
    compose: Any, method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan's data check and the run's loader accept the same rows and reject a bad one with the same error."""
    from alignment.context import RunContext
    from alignment.data.load import read_jsonl, resolve_path
    from alignment.data.validate import DataError
    from alignment.models import load
    from alignment.registry import METHODS

    cfg = to_run_config(compose([f"method={method}", f"data={METHOD_DATA[method]}", "model=tiny_random"]))
    good = [row for _, row in itertools.islice(read_jsonl(Path(resolve_path(cfg.data.sources[0].path))), 8)]
    assert check_data(_one_source(cfg, good, tmp_path))  # the plan passes the method's own demo rows

    bad = _one_source(cfg, [*good, {"unrelated": 1}], tmp_path)
    with pytest.raises(DataError) as planned:
        check_data(bad)
    loaded: list[str] = []
    monkeypatch.setattr(
        load, "load_model", lambda *a, **k: loaded.append("model") or (_ for _ in ()).throw(AssertionError)
    )
    with pytest.raises(DataError) as real:
        METHODS[method].run(bad, RunContext(tmp_path / "run", "run", None))
    assert f"rows.jsonl:{len(good) + 1}" in str(planned.value)
    assert _problem_lines(str(planned.value)) == _problem_lines(str(real.value))
    assert loaded == []  # rejected before any weights load


def _problem_lines(message: str) -> list[str]:
    return [line.strip() for line in message.splitlines() if "rows.jsonl:" in line]


def test_sbatch_preview_renders_the_launcher_params(tmp_path: Path) -> None:
    launcher = {
        "_target_": SLURM_TARGET,
        "submitit_folder": str(tmp_path / ".submitit" / "%j"),
        "nodes": 2,
        "tasks_per_node": 1,
        "gpus_per_node": 8,
        "timeout_min": 60,
        "partition": "gpu",
        "max_num_timeout": 3,
        "name": "launch",
    }
    script = sbatch_preview(launcher)
    assert script is not None
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu", "#SBATCH --time=60"):
        assert line in script
    assert not (tmp_path / ".submitit").exists()
    assert sbatch_preview({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}) is None


def test_plan_reads_a_json_array_with_a_byte_order_mark_like_a_real_run(compose: Any, tmp_path: Path) -> None:
    """The plan reads data through the run's reader.

    A ``.json`` array (BOM and all) passes, and a bad element is named by the line it starts on.
    """
    import dataclasses

    from alignment.data.config import SourceConfig
    from alignment.data.validate import DataError

    cfg = to_run_config(compose(["method=sft", "model=tiny_random"]))
    rows = [{"messages": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]}] * 2
    path = tmp_path / "rows.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode("utf-8"))
    arrays = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=[SourceConfig(path=str(path))]))
    assert check_data(arrays) == [f"{path}: first 2 rows valid (columns messages)"]
    path.write_text(json.dumps([*rows, {"messages": []}], indent=1), encoding="utf-8")
    with pytest.raises(DataError) as caught:
        check_data(arrays)
    starts = [n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1) if line == " {"]
    assert f"{path}:{starts[-1]}: column 'messages': expected a non-empty list" in str(caught.value)
