"""GPO training throughput: packed groups (prompt shared, or repeated per completion) vs the original's design.

The original (seed spec §4.3/§4.6) trains one group per batch: the G sequences ``prompt ‖ completion_i`` padded to
the longest, logits kept for the completion span. Ours packs whole groups padding-free into token-budget
micro-batches, and with ``share_prompt`` computes each prompt once for its G completions. Every variant runs the
same loop (AdamW, one optimizer step per micro-batch, :func:`~alignment.methods.gpo.gpo.gpo_loss` with
``prob_weighted`` + ``sequence_mean``, the original's loss) over one epoch of the same groups, each in its own
process so that peak memory is its own. The packed variants run the trainer's own path
(:func:`~alignment.methods.gpo.trainer.policy_loss`: sdpa attention group by group, the LM head a chunk of tokens
at a time with the loss's gradient taken per chunk).

Two more variants show what each part buys (``--variants``): ``shared_dense_mask`` is the shared-prompt row as it
was before, one dense ``(T, T)`` mask over the whole row and the log-probs of the shared packed forward
(:func:`~alignment.training.packed.counted_token_logps`) into one ``gpo_loss``; ``shared_segments`` attends group
by group but keeps that log-prob path.

Reported per variant: real tokens/s, where the real tokens are ``Σ_i (|prompt| + |completion_i|)`` (what a
per-completion forward needs, no padding) divided by the loop's wall time, and its ratio to ``padded_group``; the
tokens the model processed (padding included, the shared prompt counted once) and the real-token fraction of them
(tokens that are not padding / processed); peak memory (RSS on CPU, allocated on GPU) and how much of it the loop
added over the loaded model; the loop's CPU seconds (user + system, all threads: the work, less sensitive than the
wall time to other processes on a shared machine). ``--repeats N`` runs every variant N times, interleaved, and
keeps each one's fastest run.

Usage:
    python bench/gpo_bench.py                          # tiny random model, CPU
    python bench/gpo_bench.py --model smollm2_135m     # the embedded 135M model
    python bench/gpo_bench.py --groups 16 --group-size 8 --repeats 3
    OMP_WAIT_POLICY=PASSIVE python bench/gpo_bench.py --groups 16 --group-size 8   # on a shared machine

On a machine shared with other work, torch's idle OpenMP threads spin while they wait for a descheduled peer, so
the wall time measures the other processes more than the variant (a loop that takes 4 CPU seconds alone took 20 on
2 threads under a load of 4); ``OMP_WAIT_POLICY=PASSIVE`` (or ``--threads 1``) lets them sleep instead.
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
EXTRA = ("shared_dense_mask", "shared_segments")
"""Variants that show what each part of ``packed_shared`` buys (not run by default)."""
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


def _packed_step(model: Any, batch: dict[str, Any], variant: str, settings: dict[str, Any]) -> Any:
    """One packed micro-batch's loss through ``variant``'s path (see the module docstring)."""
    from functools import partial

    from alignment.methods.gpo.gpo import batch_counts, gpo_loss, token_logps
    from alignment.methods.gpo.trainer import policy_loss
    from alignment.training.packed import counted_token_logps, mask_kwargs

    counts = batch_counts(batch)
    if variant in ("packed_repeated", "packed_shared"):
        return policy_loss(model, batch, None, partial(gpo_loss, **settings), counts)[0]
    if variant == "shared_segments":
        logps, sequence = token_logps(model, batch)
    else:  # shared_dense_mask
        segments, groups = batch["segment_ids"][0], batch["group_ids"][0]
        visible = (segments[None, :] < 0) | (segments[:, None] == segments[None, :])
        attention = mask_kwargs(model, ((groups[:, None] == groups[None, :]) & visible).tril()[None, None])
        logps, predicting = counted_token_logps(model, batch, attention)
        sequence = segments[1:][predicting]
    return gpo_loss(logps, None, batch["advantages"], sequence, batch["group_sizes"], counts, **settings).loss


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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
        gpo_loss,
        packed_lengths,
        tokenize_groups,
    )
    from alignment.models.config import ModelConfig
    from alignment.models.load import load_model, load_tokenizer
    from alignment.training.trainer import TokenBudgetBatchSampler

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
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
    processed, unpadded, losses = 0, 0, []
    loaded = _peak_gib()
    cpu, start = _cpu_seconds(), time.perf_counter()
    if args.one == "padded_group":
        for row in rows:
            batch = _padded_batch(row, tokenizer.pad_token_id)
            processed += batch["input_ids"].numel()
            unpadded += int(batch["attention_mask"].sum())
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
        share = args.one != "packed_repeated"
        collate = GroupCollator(share_prompt=share)
        sampler = TokenBudgetBatchSampler(packed_lengths(groups, share_prompt=share), args.max_tokens_per_batch, 0)
        for indices in sampler:
            batch = {k: v.to(device) for k, v in collate([rows[i] for i in indices]).items()}
            processed += batch["input_ids"].numel()
            unpadded += batch["input_ids"].numel()  # packed: no padding
            loss = _packed_step(model, batch, args.one, settings)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    peak = _peak_gib()
    result = {
        "variant": args.one,
        "real_tokens": real,
        "processed_tokens": processed,
        "real_fraction": round(unpadded / processed, 3),
        "steps": len(losses),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "tok_per_s": round(real / wall, 1),
        "peak_gib": round(peak, 2),
        "loop_gib": round(peak - loaded, 2),
        "mean_loss": sum(losses) / len(losses),
    }
    print("RESULT " + json.dumps(result), flush=True)


def _run_variant(args: argparse.Namespace, variant: str, data: Path) -> dict[str, Any]:
    """One variant in a fresh process; its result, or its error's last lines."""
    cmd = [sys.executable, __file__, "--one", variant, "--data", str(data), "--model", args.model]
    cmd += ["--max-length", str(args.max_length), "--max-tokens-per-batch", str(args.max_tokens_per_batch)]
    cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"variant": variant, "error": proc.stderr.strip().splitlines()[-3:]}
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


def main() -> None:
    """Run every variant in a subprocess (``--repeats`` rounds, interleaved) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_random", choices=["tiny_random", "smollm2_135m"])
    parser.add_argument("--groups", type=int, default=48)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-tokens-per-batch", type=int, default=4096)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS + EXTRA)}")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all variants; each keeps its fastest")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return
    variants = args.variants.split(",")
    best: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "groups.jsonl"
        make_groups(data, args.groups, args.group_size)
        for _ in range(args.repeats):
            for variant in variants:
                result = _run_variant(args, variant, data)
                kept = best.get(variant)
                if kept is None or "error" in kept or ("error" not in result and result["wall_s"] < kept["wall_s"]):
                    best[variant] = result
    _print_table(args, [best[v] for v in variants])


def _print_table(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    threads = args.threads or torch.get_num_threads()
    print(
        f"\nmodel={args.model} groups={args.groups} G={args.group_size} budget={args.max_tokens_per_batch} "
        f"(one epoch, best of {args.repeats}) device={device} threads={threads}"
    )
    base = next((r["tok_per_s"] for r in results if r["variant"] == "padded_group" and "error" not in r), None)
    header = f"{'variant':<18}{'real tok/s':>11}{'x padded':>9}{'processed':>10}{'real frac':>10}{'steps':>6}"
    print(header + f"{'peak GiB':>9}{'loop GiB':>9}{'wall s':>8}{'cpu s':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<18} ERROR {r['error']}")
            continue
        ratio = f"{r['tok_per_s'] / base:.2f}" if base else "-"
        print(
            f"{r['variant']:<18}{r['tok_per_s']:>11.0f}{ratio:>9}{r['processed_tokens']:>10}{r['real_fraction']:>10.2f}"
            f"{r['steps']:>6}{r['peak_gib']:>9.2f}{r['loop_gib']:>9.2f}{r['wall_s']:>8.2f}{r['cpu_s']:>8.2f}"
        )


if __name__ == "__main__":
    main()
