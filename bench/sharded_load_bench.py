"""Per-rank memory of loading a model under ZeRO-3: created sharded (``zero.Init``) against whole-then-partitioned.

Two gloo ranks on the CPU (``torch.distributed.run``, one thread each) load a random Llama saved once in fp32
(``--layers``/``--hidden``/``--intermediate``; SmolLM2's 49,152-token vocabulary; by default 48 narrow layers,
620 MB, so that the embedding is 2% of the parameters and the largest tensor 0.7%, near a 70B Llama's 1.5% and
0.3%: what a rank gathers at once while loading stays small next to its share) through
the project's own path: the run's config composed from ``conf/`` with ``distributed=deepspeed_zero3``,
:func:`alignment.training.arguments.sharded_loading` opened as a rank does, then
:func:`alignment.models.load.load_model`. Two modes, each in fresh processes:

* ``whole``: ``load_model(..., sharded=False)``, then a ZeRO-3 DeepSpeed engine partitions the whole copy (what
  every method did before: the model loaded before the TrainingArguments existed, and the Trainer's engine
  partitioned it);
* ``sharded``: ``load_model`` under the run's ``zero.Init`` (what every method does now), then the same engine;
  then the frozen reference: ``load_frozen_copy(..., sharded=True)`` and its own engine
  (:func:`alignment.models.sharded.prepare_frozen`).

Per rank and model: the parameter elements the rank holds after the load (of the whole model's), and its memory
from just before the load until the engine is built, against the whole model's parameter bytes: the peak resident
set (Linux ``VmHWM``, reset with ``/proc/self/clear_refs``; exact), and, sampled every 2 ms, the peak anonymous
memory (the process's own allocations) and the peak file-backed pages (the checkpoint read through ``mmap``; page
cache, which the kernel can drop). The target: each rank holds at most 0.6 of the model's parameter bytes.

On the CPU a sharded load fixes glibc's mmap threshold low while it runs (``alignment.models.sharded``): with
glibc's default the whole-size tensors that ``zero.Init`` creates and frees one module at a time stay in the heap,
and the sharded rows read 1.3-1.9 instead (run-to-run). ``--malloc-mmap-threshold 131072`` sets
``MALLOC_MMAP_THRESHOLD_`` for the whole ranks (the ``whole`` rows too).

Usage:
    python bench/sharded_load_bench.py
    python bench/sharded_load_bench.py --layers 32 --hidden 128 --intermediate 8192   # embedding 6%
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = ("whole", "sharded")


def make_model(out: Path, layers: int, hidden: int, intermediate: int) -> None:
    """A random fp32 Llama with the tiny model's tokenizer (seed 0), saved once as an HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from alignment.models.embedded import resolve

    tiny = resolve("embedded:tiny-random-llama")
    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(out)


def _status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return values


class Sampler:
    """Peak anonymous and file-backed resident memory, sampled every 2 ms on a thread."""

    def __init__(self) -> None:
        self.peaks = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            status = _status()
            for key in self.peaks:
                self.peaks[key] = max(self.peaks[key], status[key])
            time.sleep(0.002)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _engine_config() -> dict[str, Any]:
    """The run's ZeRO-3 config without optimizer (as TRL's ``prepare_deepspeed`` and ours build for a frozen model)."""
    from copy import deepcopy

    from alignment.models import sharded

    config = deepcopy(sharded._RUN.deepspeed.config)
    config.pop("optimizer", None)
    return config


class _Accelerator:
    """What :func:`~alignment.models.sharded.prepare_frozen` reads from the Trainer's accelerator under ZeRO-3."""

    def __init__(self, config: dict[str, Any]) -> None:
        from types import SimpleNamespace

        self.state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config))


def _measure(what: str, load: Any) -> dict[str, Any]:
    """Run ``load()`` (returns the model after the load and the engine) and measure it."""
    from alignment.models.sharded import LOADS, parameter_numel

    before = _status()
    Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
    with Sampler() as sampler:
        model, engine = load()
    after = _status()
    numels = [parameter_numel(p) for p in model.parameters()]
    record = LOADS[-1]
    return {
        "what": what,
        "local_after_load": record.param_numel_local / record.param_numel_full,
        "load_peak_rss": ((record.rss_peak or 0) - record.rss_before) / record.param_bytes_full,
        "full_mib": record.param_bytes_full / 2**20,
        "peak_rss": (after["VmHWM"] - before["VmRSS"]) / record.param_bytes_full,
        "peak_anon": (sampler.peaks["RssAnon"] - before["RssAnon"]) / record.param_bytes_full,
        "peak_file": (sampler.peaks["RssFile"] - before["RssFile"]) / record.param_bytes_full,
        "anon_after": (after["RssAnon"] - before["RssAnon"]) / record.param_bytes_full,
        "local_in_engine": sum(local for local, _ in numels) / sum(full for _, full in numels),
        "engine": type(engine).__name__,
    }


def worker(mode: str, model_dir: str, out: str) -> None:
    """One rank: the run's sharded loading opened as a rank does, then the mode's loads, written to ``out``."""
    import deepspeed  # type: ignore[import-untyped]
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir
    from transformers import AutoTokenizer

    from alignment.config import to_run_config
    from alignment.context import RunContext
    from alignment.models.frozen import load_frozen_copy
    from alignment.models.load import load_model
    from alignment.models.sharded import prepare_frozen
    from alignment.registry import register_configs
    from alignment.training.arguments import sharded_loading

    overrides = [
        "model=tiny_random",
        f"model.name_or_path={model_dir}",
        "model.dtype=float32",
        "logger=none",
        "distributed=deepspeed_zero3",
        "distributed.nproc_per_node=2",
    ]
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = to_run_config(compose("config", overrides=overrides))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, sharded_loading(cfg, RunContext(Path(tmp), "bench", None)):
        config = _engine_config()

        def policy() -> tuple[Any, Any]:
            model = load_model(cfg.model, tokenizer, sharded=mode == "sharded")
            engine, *_ = deepspeed.initialize(model=model, config=config)
            return model, engine

        rows.append(_measure("policy", policy))
        if mode == "sharded":

            def reference() -> tuple[Any, Any]:
                model = load_frozen_copy(cfg.model, tokenizer, sharded=True)
                return model, prepare_frozen(model, _Accelerator(config))

            rows.append(_measure("reference", reference))
    rank = dist.get_rank()
    Path(out, f"{mode}-{rank}.json").write_text(json.dumps([{"rank": rank, "mode": mode, **r} for r in rows]))


def _launch(mode: str, model_dir: Path, out: Path, malloc: int | None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    if malloc is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(malloc)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [__file__, "--worker", mode, str(model_dir), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"{mode} ranks failed:\n{result.stderr[-4000:]}")


def main() -> None:
    """Save the model once, run each mode's 2 ranks, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=16384)
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, help="MALLOC_MMAP_THRESHOLD_ of the ranks")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, out = Path(tmp) / "model", Path(tmp) / "out"
        out.mkdir()
        make_model(model_dir, args.layers, args.hidden, args.intermediate)
        for mode in MODES:
            _launch(mode, model_dir, out, args.malloc_mmap_threshold)
        rows = [row for path in sorted(out.glob("*.json")) for row in json.loads(path.read_text())]
    rows.sort(key=lambda r: (MODES.index(r["mode"]), r["what"] != "policy", r["rank"]))
    threshold = args.malloc_mmap_threshold
    print(
        f"ZeRO-3, 2 gloo ranks, CPU: random Llama {args.layers}x{args.hidden} (intermediate {args.intermediate}), "
        f"fp32, {rows[0]['full_mib']:.0f} MiB of parameters; glibc mmap threshold "
        f"{'default (dynamic)' if threshold is None else threshold}"
    )
    print(
        "fractions of the whole model's parameter bytes; 'load:' from_pretrained alone, the others from just before "
        "the load until the engine is built"
    )
    header = ("mode", "model", "rank", "local after load", "load: peak RSS", "peak RSS", "peak anon", "peak file")
    header += ("anon after",)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [r["mode"], r["what"], str(r["rank"]), f"{r['local_after_load']:.2f}"]
        cells += [f"{r[key]:.2f}" for key in ("load_peak_rss", "peak_rss", "peak_anon", "peak_file", "anon_after")]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
