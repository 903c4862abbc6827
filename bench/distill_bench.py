"""Distillation loss path: peak memory and tokens/s, chunked against eager (full logits).

The loss path is what follows the two models' final hidden states: both output heads, the divergence and the
student's cross-entropy, forward and backward (``alignment.methods.distill.trainer.make_objective`` through
``alignment.training.chunked``). The bodies are left out: they are the same for both paths. Shapes are those of
the tiny random Llama (width 64) with SmolLM2's 49,152-token vocabulary, unless ``--vocab`` says otherwise.

Each measurement runs in its own process; "extra peak" is the process's peak memory during the loss path minus
its memory just before (RSS on CPU, allocated bytes on CUDA). Tokens/s is counted tokens over the median of
``--repeats`` forward+backward passes.

Usage:
    python bench/distill_bench.py                                 # 512 / 2048 / 8192 tokens, V = 49,152
    python bench/distill_bench.py --tokens 2048 --vocab 16384 49152 131072 --paths chunked   # vocabulary growth
    python bench/distill_bench.py --device cuda                   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(path: str, tokens: int, vocab: int, width: int, loss: str, repeats: int, device: str) -> dict[str, Any]:
    """One loss path's extra peak memory (MiB) and tokens/s, in this process."""
    import torch

    sys.path.insert(0, str(ROOT))
    from alignment.methods.distill.distill import DistillConfig
    from alignment.methods.distill.divergences import Divergence
    from alignment.methods.distill.trainer import make_objective
    from alignment.training.chunked import OutputHead, chunked_head_loss, eager_head_loss

    torch.manual_seed(0)
    dev = torch.device(device)
    hidden = torch.randn(tokens, width, device=dev, requires_grad=True)
    weight = (torch.randn(vocab, width, device=dev) * 0.05).requires_grad_(True)
    teacher_hidden = torch.randn(tokens, width, device=dev)
    teacher_head = OutputHead(torch.randn(vocab, width, device=dev) * 0.05)
    labels = torch.randint(0, vocab, (tokens,), device=dev)
    cfg = DistillConfig(loss=Divergence(loss))
    objective = make_objective(cfg, labels, {"hidden": teacher_hidden}, teacher_head)

    def step() -> None:
        head = OutputHead(weight)
        if path == "chunked":
            total, _ = chunked_head_loss(hidden, head, objective)
        else:
            total, _ = eager_head_loss(hidden, head, objective)
        total.backward()
        hidden.grad = None
        weight.grad = None

    step()  # warm-up (allocator, kernels); the gradient buffers exist from here on in both paths
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mib()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "path": path,
        "tokens": tokens,
        "vocab": vocab,
        "extra_peak_mib": max(peak - before, 0.0),
        "tokens_per_s": tokens / statistics.median(times),
    }


def main() -> None:
    """Run every (path, tokens, vocab) in its own process and print a table with the chunked/eager ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--loss", default="forward_kl")
    parser.add_argument("--paths", nargs="+", default=["eager", "chunked"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        path, tokens, vocab = args.one.split(",")
        result = measure(path, int(tokens), int(vocab), args.width, args.loss, args.repeats, args.device)
        print(json.dumps(result))
        return
    rows = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            for path in args.paths:
                command = [sys.executable, __file__, "--one", f"{path},{tokens},{vocab}", "--width", str(args.width)]
                command += ["--loss", args.loss, "--repeats", str(args.repeats), "--device", args.device]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    rows.append({"path": path, "tokens": tokens, "vocab": vocab, "error": done.stderr.strip()[-200:]})
                    continue
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"loss path of {args.loss} + CE, width {args.width}, {args.device}, median of {args.repeats}")
    print("| vocab | tokens | path | extra peak MiB | tokens/s | peak vs eager | time vs eager |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['vocab']} | {row['tokens']} | {row['path']} | failed: {row['error']} | | | |")
            continue
        eager = next(
            (r for r in rows if r["path"] == "eager" and r["tokens"] == row["tokens"] and r["vocab"] == row["vocab"]),
            None,
        )
        ratio_mem = ratio_time = ""
        if eager is not None and "error" not in eager:
            ratio_mem = f"{row['extra_peak_mib'] / max(eager['extra_peak_mib'], 1e-9):.3f}"
            ratio_time = f"{eager['tokens_per_s'] / row['tokens_per_s']:.2f}x"
        print(
            f"| {row['vocab']} | {row['tokens']} | {row['path']} | {row['extra_peak_mib']:.0f} | "
            f"{row['tokens_per_s']:.0f} | {ratio_mem} | {ratio_time} |"
        )


if __name__ == "__main__":
    main()
