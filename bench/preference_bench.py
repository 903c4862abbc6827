"""Preference-training throughput: our DPO and SMPO (packed, padding-free) against plain TRL ``DPOTrainer``.

Same model start, same pairs, same batch size, one epoch, for every variant. Each variant runs in its own
process so peak memory is its own. Reported: real tokens/s (prompt + completion tokens of both sides, no
padding, divided by the trainer's train wall time), the real-token fraction of the tokens the model actually
processed (TRL pads each batch to its longest sequence; we pack), and peak memory (RSS on CPU, allocated on GPU).

Usage:
    python bench/preference_bench.py                       # tiny random model, CPU table
    python bench/preference_bench.py --model smollm2_135m  # the embedded 135M model
Pairs are synthetic conversations of varied length (seeded), so padding matters as it does in real data.
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
VARIANTS = ("trl_dpo", "ours_dpo", "ours_dpo_precomputed", "ours_smpo")
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")
WORDS += ("lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau")


def make_pairs(path: Path, count: int, seed: int = 0) -> None:
    """Write ``count`` conversational pairs with prompts of 16-160 words and completions of 8-200 words."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    with path.open("w") as handle:
        for _ in range(count):
            row = {
                "prompt": [{"role": "user", "content": text(16, 160)}],
                "chosen": [{"role": "assistant", "content": text(8, 200)}],
                "rejected": [{"role": "assistant", "content": text(8, 200)}],
            }
            handle.write(json.dumps(row) + "\n")


def _peak_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _real_tokens(dataset: Any) -> int:
    return sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in dataset)


def _run_trl(args: argparse.Namespace, data: Path, workdir: Path) -> dict[str, Any]:
    import torch
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    from alignment.models.config import ModelConfig
    from alignment.models.load import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path=_model_path(args.model))
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    cuda = torch.cuda.is_available()
    config = DPOConfig(
        output_dir=str(workdir),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        learning_rate=1e-6,
        beta=0.1,
        max_length=args.max_length,
        save_strategy="no",
        report_to="none",
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=False,
        disable_tqdm=True,
        logging_steps=1000,
        seed=0,
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=load_dataset("json", data_files=str(data))["train"],
        processing_class=tokenizer,
    )
    processed = sum(batch["input_ids"].numel() for batch in trainer.get_train_dataloader())
    real = sum(int(batch["attention_mask"].sum()) for batch in trainer.get_train_dataloader())
    result = trainer.train()
    wall = result.metrics["train_runtime"]
    return {"real_tokens": real, "processed_tokens": processed, "wall_s": wall, "loss": result.training_loss}


def _model_path(name: str) -> str:
    return {"tiny_random": "embedded:tiny-random-llama", "smollm2_135m": "embedded:smollm2-135m-instruct"}[name]


def _run_ours(args: argparse.Namespace, data: Path, workdir: Path, method: str, extra: list[str]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir

    import alignment.methods.pairwise.core as pairwise
    from alignment.config import to_run_config
    from alignment.context import RunContext
    from alignment.registry import METHODS, register_configs

    register_configs()
    overrides = [
        f"model={args.model}",
        f"method={method}",
        "logger=none",
        f"data.sources=[{{path: '{data}'}}]",
        "data.eval_fraction=0",
        f"method.per_device_train_batch_size={args.batch_size}",
        f"method.max_length={args.max_length}",
        "method.save_strategy=no",
        "method.eval_strategy=no",
        "method.logging_steps=1000",
        *extra,
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = to_run_config(compose("config", overrides=overrides))
    metrics = METHODS[method].run(cfg, RunContext(workdir, "bench", None))
    # One epoch over every pair; packing processes exactly the real tokens, no padding.
    from datasets import load_dataset

    from alignment.models.load import load_tokenizer

    pairs = load_dataset("json", data_files=str(data))["train"]
    real = _real_tokens(pairwise.tokenize_pairs(pairs, load_tokenizer(cfg.model), args.max_length))
    return {
        "real_tokens": real,
        "processed_tokens": real,
        "wall_s": metrics["train_runtime"],
        "loss": metrics["train_loss"],
    }


def run_one(args: argparse.Namespace) -> None:
    """Run one variant in this process and print its JSON result line."""
    data = Path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.one == "trl_dpo":
            out = _run_trl(args, data, workdir)
        elif args.one == "ours_dpo_precomputed":
            os.environ["ALIGNMENT_CACHE_DIR"] = tmp
            out = _run_ours(args, data, workdir, "dpo", ["method.reference=precomputed"])
        else:
            out = _run_ours(args, data, workdir, args.one.removeprefix("ours_"), [])
    out.update(variant=args.one, peak_gib=round(_peak_gib(), 2), tok_per_s=round(out["real_tokens"] / out["wall_s"], 1))
    out["real_fraction"] = round(out["real_tokens"] / max(out["processed_tokens"], 1), 3)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    """Run every variant in a subprocess and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_random", choices=["tiny_random", "smollm2_135m"])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        make_pairs(data, args.pairs)
        results = []
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--one", variant, "--data", str(data)]
            cmd += ["--model", args.model, "--pairs", str(args.pairs), "--batch-size", str(args.batch_size)]
            cmd += ["--max-length", str(args.max_length)]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)}
            )
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                results.append({"variant": variant, "error": proc.stderr.strip().splitlines()[-1:]})
            else:
                results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    print(f"\nmodel={args.model} pairs={args.pairs} pairs/step={args.batch_size} (one epoch) device=", end="")
    import torch

    print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    print(f"{'variant':<24}{'real tok/s':>12}{'real frac':>11}{'peak GiB':>10}{'wall s':>9}{'loss':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<24} ERROR {r['error']}")
            continue
        print(
            f"{r['variant']:<24}{r['tok_per_s']:>12}{r['real_fraction']:>11}{r['peak_gib']:>10}"
            f"{r['wall_s']:>9.2f}{r['loss']:>9.4f}"
        )


if __name__ == "__main__":
    main()
