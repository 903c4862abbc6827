"""GPO training throughput: packed groups (prompt shared, or repeated per completion) vs the original's design.

The original (seed spec §4.3/§4.6) trains one group per batch: the G sequences ``prompt ‖ completion_i`` padded to
the longest, logits kept for the completion span. Ours packs whole groups padding-free into token-budget
micro-batches, and with ``share_prompt`` computes each prompt once for its G completions. Every variant runs the
same loop (AdamW, one optimizer step per micro-batch, :func:`~alignment.methods.gpo.gpo.gpo_loss` with
``prob_weighted`` + ``sequence_mean``, the original's loss) over one epoch of the same groups, each in its own
process so that peak memory is its own.

Reported: real tokens/s, where the real tokens are ``Σ_i (|prompt| + |completion_i|)`` (what a per-completion
forward needs, no padding) divided by the loop's wall time; the tokens the model actually processed (padding
included, the shared prompt counted once); peak memory (RSS on CPU, allocated on GPU).

Usage:
    python bench/gpo_bench.py                          # tiny random model, CPU
    python bench/gpo_bench.py --model smollm2_135m     # the embedded 135M model
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
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("padded_group", "packed_repeated", "packed_shared")
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu")


def make_groups(path: Path, count: int, group_size: int, seed: int = 0) -> None:
    """``count`` groups: prompts of 16-160 words, ``group_size`` completions of 4-80 words, random rewards."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    with path.open("w") as handle:
        for _ in range(count):
            row = {
                "prompt": [{"role": "user", "content": text(16, 160)}],
                "completions": [[{"role": "assistant", "content": text(4, 80)}] for _ in range(group_size)],
                "rewards": [rng.random() for _ in range(group_size)],
            }
            handle.write(json.dumps(row) + "\n")


def _peak_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _padded_batch(row: dict[str, Any], pad_id: int) -> dict[str, Any]:
    """One group as the original builds it: G rows ``prompt ‖ completion``, right-padded, completion logits only."""
    import torch

    from alignment.data.chat_template import IGNORE_INDEX

    prompt = row["prompt_ids"]
    sequences = [prompt + ids for ids in row["completion_ids"]]
    labels = [[IGNORE_INDEX] * len(prompt) + lab for lab in row["completion_labels"]]
    longest = max(len(s) for s in sequences)
    return {
        "input_ids": torch.tensor([s + [pad_id] * (longest - len(s)) for s in sequences]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in sequences]),
        "labels": torch.tensor([lab + [IGNORE_INDEX] * (longest - len(lab)) for lab in labels]),
        "keep": max(len(ids) for ids in row["completion_ids"]) + 1,
    }


def _padded_logps(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    from alignment.data.chat_template import IGNORE_INDEX

    logits = (
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=batch["keep"])
        .logits[:, :-1]
        .float()
    )
    targets = batch["labels"][:, -batch["keep"] + 1 :]
    mask = targets != IGNORE_INDEX
    logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    rows = mask.nonzero()[:, 0]
    return logps[mask], rows


def run_one(args: argparse.Namespace) -> None:
    """Run one variant in this process and print its JSON result line."""
    import torch
    from datasets import load_dataset

    from alignment.methods.gpo.gpo import (
        AdvantageScale,
        GpoLossType,
        GroupCollator,
        GroupCounts,
        TokenAggregation,
        batch_counts,
        gpo_loss,
        packed_lengths,
        token_logps,
        tokenize_groups,
    )
    from alignment.models.config import ModelConfig
    from alignment.models.load import load_model, load_tokenizer
    from alignment.training.trainer import TokenBudgetBatchSampler

    torch.manual_seed(0)
    name = {"tiny_random": "embedded:tiny-random-llama", "smollm2_135m": "embedded:smollm2-135m-instruct"}
    cfg = ModelConfig(name_or_path=name[args.model])
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer).train()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    groups, _ = tokenize_groups(
        load_dataset("json", data_files=args.data)["train"],
        tokenizer,
        max_length=args.max_length,
        scale=AdvantageScale.group,
        epsilon=1e-4,
    )
    rows = list(groups)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    settings = {"loss_type": GpoLossType.prob_weighted, "aggregation": TokenAggregation.sequence_mean, "kl_beta": 0.0}
    real = sum(packed_lengths(groups, share_prompt=False))
    processed, losses = 0, []
    start = time.perf_counter()
    if args.one == "padded_group":
        for row in rows:
            batch = _padded_batch(row, tokenizer.pad_token_id)
            processed += batch["input_ids"].numel()
            logps, sequence = _padded_logps(
                model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            )
            sizes = torch.full((len(row["completion_ids"]),), float(len(row["completion_ids"])), device=device)
            advantages = torch.tensor(row["advantages"], device=device)
            out = gpo_loss(logps, None, advantages, sequence, sizes, GroupCounts(1.0, float(logps.numel())), **settings)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(out.loss.detach()))
    else:
        share = args.one == "packed_shared"
        collate = GroupCollator(share_prompt=share)
        sampler = TokenBudgetBatchSampler(packed_lengths(groups, share_prompt=share), args.max_tokens_per_batch, 0)
        for indices in sampler:
            batch = {k: v.to(device) for k, v in collate([rows[i] for i in indices]).items()}
            processed += batch["input_ids"].numel()
            logps, sequence = token_logps(model, batch)
            out = gpo_loss(
                logps, None, batch["advantages"], sequence, batch["group_sizes"], batch_counts(batch), **settings
            )
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(out.loss.detach()))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    result = {
        "variant": args.one,
        "real_tokens": real,
        "processed_tokens": processed,
        "steps": len(losses),
        "wall_s": round(wall, 2),
        "tok_per_s": round(real / wall, 1),
        "peak_gib": round(_peak_gib(), 2),
        "mean_loss": sum(losses) / len(losses),
    }
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    """Run every variant in a subprocess and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_random", choices=["tiny_random", "smollm2_135m"])
    parser.add_argument("--groups", type=int, default=48)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-tokens-per-batch", type=int, default=4096)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "groups.jsonl"
        make_groups(data, args.groups, args.group_size)
        results = []
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--one", variant, "--data", str(data), "--model", args.model]
            cmd += ["--max-length", str(args.max_length), "--max-tokens-per-batch", str(args.max_tokens_per_batch)]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                results.append({"variant": variant, "error": proc.stderr.strip().splitlines()[-3:]})
            else:
                results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"\nmodel={args.model} groups={args.groups} G={args.group_size} budget={args.max_tokens_per_batch} "
        f"(one epoch) device={device}"
    )
    print(f"{'variant':<18}{'real tok/s':>12}{'processed':>11}{'real':>9}{'steps':>7}{'peak GiB':>10}{'wall s':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<18} ERROR {r['error']}")
            continue
        print(
            f"{r['variant']:<18}{r['tok_per_s']:>12}{r['processed_tokens']:>11}{r['real_tokens']:>9}{r['steps']:>7}"
            f"{r['peak_gib']:>10}{r['wall_s']:>9.2f}"
        )


if __name__ == "__main__":
    main()
