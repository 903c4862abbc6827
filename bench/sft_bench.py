"""SFT throughput and memory: our SFT (chunked loss; the whole run) against plain TRL ``SFTTrainer``, same work.

Every variant trains one epoch on the same tokenised conversations (our chat-template tokenisation, loss on the
assistant turns), packed best-fit-decreasing into ``--max-length``-token padding-free rows, with the same
``TrainingArguments`` (built by our ``training_args`` from one composed config) and the same model start:

* ``trl``: TRL's ``SFTTrainer`` as it comes. TRL 1.16 already avoids full logits: its fused LM head scores tiles of
  4,096 tokens x 32,768 words (on CPU every position, counted or not) and projects each tile again in backward;
* ``trl_full_logits``: the same trainer with the model's own loss (HF ``Trainer.compute_loss``): the
  ``(tokens, V)`` logits of every position in fp32, what SFT cost before TRL's fused head;
* ``ours_trainer``: our :class:`~alignment.methods.sft_trainer.ChunkedSFTTrainer` on that data, nothing else:
  counted positions only, a few thousand tokens' logits at a time, gradients taken in forward;
* ``ours_run``: ``alignment.methods.sft.run``, the whole method (row validation, tokenisation, our callbacks and
  metrics file, the final save) on a composed config. ``ours_run`` over ``ours_trainer`` is the framework's
  overhead on identical training work; over ``trl`` it is what a user sees against plain TRL;
* ``ours_run_block_mask``: ``ours_run`` with padding-free rows attended through HF's ``T x T`` block mask (what
  TRL and our SFT did before the rows were attended conversation by conversation under sdpa).

Each variant runs in its own process. Reported: real tokens/s (tokens of the packed rows over the trainer's
``train_runtime``), the real-token fraction of the tokens the model processed, peak RSS, the extra peak during
training (peak minus RSS just before ``train()``: the loss path's memory on a model this small) and the train loss,
which must agree across variants (the same work). ``--repeats`` runs each variant that many times and keeps the
fastest (the machine is shared).

``--layout`` picks the batches: ``packed`` (the above), ``padding_free`` (``--batch-size`` conversations per
micro-batch concatenated into one row; ours attends each conversation on its own under sdpa, TRL through a
block mask over the row) or ``padded`` (``--batch-size`` conversations padded to the longest).

Usage:
    python bench/sft_bench.py                          # tiny random Llama (vocabulary 49,152), 2,048-token rows
    python bench/sft_bench.py --layout padded --batch-size 8 --variants trl,ours_run
    python bench/sft_bench.py --model smollm2_135m --layout padding_free --batch-size 8 --variants ours_run
    python bench/sft_bench.py --variants trl,ours_run --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("trl", "trl_full_logits", "ours_trainer", "ours_run", "ours_run_block_mask")
LAYOUTS = ("packed", "padding_free", "padded")
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")
WORDS += ("lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau")


def make_conversations(path: Path, count: int, seed: int = 0) -> None:
    """Write ``count`` conversations: a user turn of 16-160 words and an assistant answer of 32-600 words."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    with path.open("w") as handle:
        for _ in range(count):
            messages = [{"role": "user", "content": text(16, 160)}, {"role": "assistant", "content": text(32, 600)}]
            handle.write(json.dumps({"messages": messages}) + "\n")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class _Timed:
    """Wraps a trainer's ``train``: the RSS just before it and the process CPU seconds it took."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.before_gib = 0.0
        self.cpu_s = 0.0
        self._train = trainer.train
        trainer.train = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.before_gib = _rss_gib()
        start = _cpu_s()
        result = self._train(*args, **kwargs)
        self.cpu_s = _cpu_s() - start
        return result


def _config(args: argparse.Namespace, data: Path) -> Any:
    from hydra import compose, initialize_config_dir

    from alignment.config import to_run_config
    from alignment.registry import register_configs

    register_configs()
    overrides = [
        f"model={args.model}",
        "method=sft",
        "logger=none",
        f"data.sources=[{{path: '{data}'}}]",
        "data.eval_fraction=0",
        f"method.per_device_train_batch_size={args.batch_size}",
        f"method.max_length={args.max_length}",
        f"method.packing={str(args.layout == 'packed').lower()}",
        f"method.padding_free={str(args.layout == 'padding_free').lower()}",
        "method.num_train_epochs=1",
        "method.save_strategy=no",
        "method.eval_strategy=no",
        "method.num_generation_samples=0",
        "method.logging_steps=1000",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return to_run_config(compose("config", overrides=overrides))


def _full_logits_class() -> Any:
    from transformers import Trainer
    from trl import SFTTrainer

    class FullLogitsSFTTrainer(SFTTrainer):  # type: ignore[misc]
        """TRL's trainer with the model's own loss over the full logits (HF ``Trainer.compute_loss``)."""

        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return FullLogitsSFTTrainer


def _train_trainer(cfg: Any, workdir: Path, variant: str) -> tuple[_Timed, dict[str, float]]:
    """Build the variant's trainer the way ``sft.run`` builds ours (same data, arguments, model) and train."""
    from trl import SFTConfig, SFTTrainer

    from alignment.context import RunContext
    from alignment.data.mix import build_splits
    from alignment.methods import sft
    from alignment.methods.sft_trainer import ChunkedSFTTrainer
    from alignment.models.load import load_model, load_tokenizer
    from alignment.training.arguments import training_args

    method = cfg.method
    checks = sft.row_checks(method)
    splits = build_splits(cfg.data, checks.validate, checks.columns)
    tokenizer = load_tokenizer(cfg.model)
    train = sft._tokenize(splits.train, tokenizer, method, "train")
    model = load_model(cfg.model, tokenizer)
    ctx = RunContext(workdir, "bench", None)
    args = training_args(
        cfg,
        ctx,
        evaluation=False,
        args_class=SFTConfig,
        max_length=method.max_length if method.packing else None,  # as sft.run passes it
        packing=method.packing,
        padding_free=method.padding_free,
    )
    trainer_class = {"trl": SFTTrainer, "trl_full_logits": _full_logits_class(), "ours_trainer": ChunkedSFTTrainer}
    timed = _Timed(trainer_class[variant](model=model, args=args, train_dataset=train, processing_class=tokenizer))
    metrics = dict(timed.trainer.train().metrics)
    return timed, metrics


def _train_run(cfg: Any, workdir: Path) -> tuple[_Timed, dict[str, float]]:
    """Our whole SFT run; its trainer is caught (and its ``train`` timed) at ``train_and_save``."""
    import alignment.training.checkpoint as checkpoint
    from alignment.context import RunContext
    from alignment.methods import sft

    caught: list[_Timed] = []
    real = checkpoint.train_and_save

    def spy(trainer: Any, **kwargs: Any) -> dict[str, float]:
        caught.append(_Timed(trainer))
        return real(trainer, **kwargs)

    checkpoint.train_and_save = spy  # type: ignore[assignment]
    metrics = sft.run(cfg, RunContext(workdir, "bench", None))
    return caught[0], metrics


def run_one(args: argparse.Namespace) -> None:
    """Run one variant in this process and print its JSON result line."""
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(args, Path(args.data))
        if args.one == "ours_run_block_mask":  # padding-free rows through HF's T x T block mask, as TRL's
            import alignment.methods.sft_trainer as sft_trainer

            sft_trainer.padding_free_attention = lambda model, inputs: {}  # type: ignore[assignment]
        if args.one.startswith("ours_run"):
            timed, metrics = _train_run(cfg, Path(tmp))
        else:
            timed, metrics = _train_trainer(cfg, Path(tmp), args.one)
        peak = _peak_gib()
        trainer = timed.trainer
        real = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
        processed = sum(batch["input_ids"].numel() for batch in trainer.get_train_dataloader())
    out = {
        "variant": args.one,
        "rows": len(trainer.train_dataset),
        "real_fraction": round(real / max(processed, 1), 3),
        "tok_per_cpu_s": round(real / timed.cpu_s, 1),
        "tok_per_s": round(real / metrics["train_runtime"], 1),
        "cpu_s": round(timed.cpu_s, 2),
        "wall_s": metrics["train_runtime"],
        "peak_gib": round(peak, 2),
        "extra_gib": round(max(peak - timed.before_gib, 0.0), 2),
        "loss": metrics["train_loss"],
    }
    print("RESULT " + json.dumps(out), flush=True)


def _measure(args: argparse.Namespace, variant: str, data: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", variant, "--data", str(data), "--threads", str(args.threads)]
    cmd += ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--layout", args.layout]
    cmd += ["--model", args.model]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"variant": variant, "error": proc.stderr.strip().splitlines()[-1:]}
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


def _ratio(results: dict[str, dict[str, Any]], a: str, b: str) -> str:
    if a not in results or b not in results or "error" in results[a] or "error" in results[b]:
        return "n/a"
    return f"{results[a]['tok_per_cpu_s'] / results[b]['tok_per_cpu_s']:.3f}"


COLUMNS = {
    "tok/cpu-s": "tok_per_cpu_s",
    "tok/s": "tok_per_s",
    "real frac": "real_fraction",
    "peak GiB": "peak_gib",
    "extra GiB": "extra_gib",
    "cpu s": "cpu_s",
    "wall s": "wall_s",
    "loss": "loss",
}


def main() -> None:
    """Run every variant in a subprocess (``--repeats`` times, least CPU time kept) and print the table and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--model", default="tiny_random", help="a conf/model option, e.g. smollm2_135m")
    parser.add_argument("--batch-size", type=int, default=1, help="rows (packed) or conversations per micro-batch")
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="packed",
        help="packed rows (default), padding-free micro-batches of --batch-size conversations, or padded ones",
    )
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "conversations.jsonl"
        make_conversations(data, args.conversations)
        for _ in range(args.repeats):
            for variant in args.variants.split(","):
                result = _measure(args, variant, data)
                best = results.get(variant)
                if best is None or "error" in best or ("error" not in result and result["cpu_s"] < best["cpu_s"]):
                    results[variant] = result
    first = next((r for r in results.values() if "error" not in r), {})
    print(
        f"\nmodel={args.model} on cpu, {args.threads} torch thread(s); {args.conversations} "
        f"conversations, layout {args.layout} ({first.get('rows', '?')} rows of <= {args.max_length} tokens), "
        f"{args.batch_size} row(s)/step, one epoch; least CPU time of {args.repeats}"
    )
    print(f"{'variant':<16}" + "".join(f"{name:>11}" for name in COLUMNS))
    for r in results.values():
        if "error" in r:
            print(f"{r['variant']:<16} ERROR {r['error']}")
            continue
        cells = [f"{r[key]:.4f}" if key == "loss" else str(r[key]) for key in COLUMNS.values()]
        print(f"{r['variant']:<16}" + "".join(f"{cell:>11}" for cell in cells))
    print(
        f"tokens per CPU-second, ratios: ours_trainer/trl {_ratio(results, 'ours_trainer', 'trl')}, "
        f"ours_trainer/trl_full_logits {_ratio(results, 'ours_trainer', 'trl_full_logits')}, "
        f"ours_run/trl {_ratio(results, 'ours_run', 'trl')}, "
        f"ours_run/ours_trainer {_ratio(results, 'ours_run', 'ours_trainer')} (framework overhead: 1 - this)"
    )


if __name__ == "__main__":
    main()
