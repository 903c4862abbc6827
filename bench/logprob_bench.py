"""Per-token log-probs of a packed row: today's full-logits paths against the chunked output head.

The pairwise methods and GPO sum per-token log-probs over a packed row of sequences. Three ways to get them:

* ``full``: the model's own logits at every position of the row (prompt too), fp32 log-softmax, gather: what
  ``pairwise.core.sequence_logps`` did before the chunked head;
* ``kept``: the logits of the counted positions only (``logits_to_keep``), same log-softmax: what
  ``packed.counted_token_logps`` (GPO) did before;
* ``chunked``: final hidden states of the counted positions through the output head a chunk of tokens at a time
  (``alignment.training.chunked.chunked_token_logps``): what both use now.

The row is ``--tokens`` tokens of ``--sequences`` sequences (chosen first, then rejected, as ``PairCollator``
packs pairs), each a prompt of random length and a completion; only completion tokens count. The model is the
embedded tiny random Llama (2 layers, width 64, SmolLM2's 49,152-token vocabulary, tied embeddings), fp32, sdpa.
The loss is sigmoid DPO against a fixed reference, forward and backward. ``--head trainable`` trains every
parameter (full fine-tuning: the tied head/embedding matrix gets a gradient); ``--head frozen`` freezes that matrix
(the rest trains), as LoRA without the head or a frozen head would.

Memory: each (head, path) in its own process, started with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then maps every
block over 64 KiB on its own and returns it when the tensor is freed, so the resident set follows the live tensors).
A peak is the process's resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` just before the
measured region) minus the resident set just before it, after a warm-up step (gradient buffers exist in every path):

* ``loss-path peak``: from the final hidden states (a leaf) to the per-sequence sums, the loss and its backward to
  the hidden states and the head; the model's body is left out (it is the same for every path);
* ``step peak``: a whole training step (body forward, loss, backward).

Tokens/s: one process per head mode, default allocator, the paths taking turns step by step (a change of load on
a shared machine hits them alike); the row's tokens over the median time of ``--steps`` whole training steps
(forward and backward, no optimizer step) after one warm-up round.

Usage:
    python bench/logprob_bench.py                           # 2,048-token rows of 8 sequences, both head modes
    python bench/logprob_bench.py --tokens 8192 --sequences 32 --paths kept chunked
    python bench/logprob_bench.py --threads 1    # less sensitive to other work on a shared machine
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("full", "kept", "chunked")
HEADS = ("trainable", "frozen")
IGNORE_INDEX = -100


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        found = re.search(rf"{field}:\s+(\d+) kB", f.read())
    assert found is not None
    return int(found.group(1)) / 1024


def _peak_of(run: Callable[[], Any]) -> float:
    """MiB the resident set grows above its current size while ``run()`` runs (its peak, not where it ends)."""
    import gc

    gc.collect()
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak resident set) to the current resident set
    run()
    return max(_status_mib("VmHWM") - before, 0.0)


def make_batch(tokens: int, sequences: int, vocab: int, seed: int = 0) -> dict[str, Any]:
    """A packed row as ``PairCollator`` makes it: ``sequences`` of ``tokens // sequences`` tokens, prompts ignored."""
    import torch

    g = torch.Generator().manual_seed(seed)
    length = tokens // sequences
    pairs = sequences // 2
    prompts = torch.randint(length // 8, length // 2, (pairs,), generator=g).tolist() * 2  # a pair shares its prompt
    ids, labels, positions, owners = [], [], [], []
    for index, prompt in enumerate(prompts):
        row = torch.randint(0, vocab, (length,), generator=g).tolist()
        ids += row
        labels += [IGNORE_INDEX] * prompt + row[prompt:]
        positions += list(range(length))
        owners += [index] * length
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
        "sequence_ids": torch.tensor([owners]),
    }


def _dpo(sums: Any, batch: dict[str, Any]) -> Any:
    """Sigmoid DPO (beta 0.1) of the per-sequence sums against a reference of zeros."""
    import torch

    half = int(batch["sequence_ids"].max() + 1) // 2
    return -torch.nn.functional.logsigmoid(0.1 * (sums[:half] - sums[half:])).mean()


def _sums(token_logps: Any, owner: Any, count: int) -> Any:
    import torch

    return torch.zeros(count, dtype=token_logps.dtype).index_add(0, owner, token_logps)


def full_logits_sums(model: Any, batch: dict[str, Any], hidden: Any = None) -> Any:
    """Today's pairwise path: logits of every position; ``hidden`` (the row's final states) skips the body."""
    from alignment.training.packed import attention_kwargs

    if hidden is None:
        attention = attention_kwargs(model, batch["position_ids"], batch["sequence_ids"])
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], **attention}
        logits = model(**inputs, use_cache=False).logits[0, :-1].float()
    else:
        logits = model.get_output_embeddings()(hidden[0, :-1]).float()
    targets = batch["labels"][0, 1:]
    mask = targets != IGNORE_INDEX
    token_logps = logits.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1) - logits.logsumexp(-1)
    return _sums(token_logps * mask, batch["sequence_ids"][0, 1:], int(batch["sequence_ids"].max()) + 1)


def kept_logits_sums(model: Any, batch: dict[str, Any], hidden: Any = None) -> Any:
    """Today's GPO path: logits of the counted positions only (``logits_to_keep``), fp32 log-softmax."""
    from alignment.training.packed import attention_kwargs

    targets = batch["labels"][0, 1:]
    predicting = (targets != IGNORE_INDEX).nonzero().flatten()
    if hidden is None:
        attention = attention_kwargs(model, batch["position_ids"], batch["sequence_ids"])
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], **attention}
        logits = model(**inputs, use_cache=False, logits_to_keep=predicting).logits[0].float()
    else:
        logits = model.get_output_embeddings()(hidden[0, predicting]).float()
    token_logps = logits.gather(-1, targets[predicting][:, None]).squeeze(-1) - logits.logsumexp(-1)
    owner = batch["sequence_ids"][0, 1:][predicting]
    return _sums(token_logps, owner, int(batch["sequence_ids"].max()) + 1)


def chunked_sums(model: Any, batch: dict[str, Any], hidden: Any = None, chunk_size: int = 0) -> Any:
    """The chunked path (``pairwise.core.sequence_logps``'s forward); ``hidden`` skips the body."""
    from alignment.methods.pairwise.core import sequence_logps
    from alignment.training.chunked import head_token_logps

    if hidden is None and chunk_size == 0:
        logps = sequence_logps(model, batch)
        import torch

        return torch.cat([logps.chosen, logps.rejected])
    if hidden is None:
        from alignment.training.chunked import final_hidden_states
        from alignment.training.packed import attention_kwargs

        attention = attention_kwargs(model, batch["position_ids"], batch["sequence_ids"])
        hidden = final_hidden_states(
            model, input_ids=batch["input_ids"], position_ids=batch["position_ids"], **attention
        )
    targets = batch["labels"][0, 1:]
    predicting = (targets != IGNORE_INDEX).nonzero().flatten()
    token_logps = head_token_logps(model, hidden[0, predicting], targets[predicting], chunk_size=chunk_size)
    owner = batch["sequence_ids"][0, 1:][predicting]
    return _sums(token_logps, owner, int(batch["sequence_ids"].max()) + 1)


def _setup(head: str, tokens: int, sequences: int, threads: int) -> tuple[Any, dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)

    sys.path.insert(0, str(ROOT))
    from alignment.models.embedded import resolve

    model = AutoModelForCausalLM.from_pretrained(
        resolve("embedded:tiny-random-llama"), dtype=torch.float32, attn_implementation="sdpa"
    )
    model.train()
    if head == "frozen":
        model.get_output_embeddings().weight.requires_grad_(False)  # tied: the input embeddings too
    return model, make_batch(tokens, sequences, model.config.vocab_size)


def _step(model: Any, batch: dict[str, Any], path: str, chunk_size: int, hidden: Any = None) -> float:
    """Sums, DPO loss and its backward (``hidden``: from those final states, without the body)."""
    sums = {"full": full_logits_sums, "kept": kept_logits_sums, "chunked": chunked_sums}[path]
    extra = {"chunk_size": chunk_size} if path == "chunked" else {}
    loss = _dpo(sums(model, batch, hidden=hidden, **extra), batch)
    loss.backward()
    return float(loss)


def measure_memory(path: str, head: str, tokens: int, sequences: int, chunk_size: int, threads: int) -> dict[str, Any]:
    """Loss-path and whole-step peaks (MiB) of one path in this process, with its loss and gradient norm."""
    import torch

    from alignment.training.chunked import final_hidden_states
    from alignment.training.packed import attention_kwargs

    model, batch = _setup(head, tokens, sequences, threads)
    loss = _step(model, batch, path, chunk_size)  # warm-up: gradient buffers exist from here on
    grad_norm = float(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm())
    attention = attention_kwargs(model, batch["position_ids"], batch["sequence_ids"])
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], **attention}
        hidden = final_hidden_states(model, **inputs).requires_grad_(True)

    def loss_path() -> None:
        _step(model, batch, path, chunk_size, hidden)
        hidden.grad = None

    return {
        "loss_peak_mib": _peak_of(loss_path),
        "step_peak_mib": _peak_of(lambda: _step(model, batch, path, chunk_size)),
        "counted": int((batch["labels"][0, 1:] != IGNORE_INDEX).sum()),
        "loss": loss,
        "grad_norm": grad_norm,
    }


def measure_speed(
    paths: list[str], head: str, tokens: int, sequences: int, steps: int, chunk: int, threads: int
) -> dict[str, Any]:
    """Median whole-step time of each path, in this process, the paths taking turns step by step."""
    model, batch = _setup(head, tokens, sequences, threads)
    times: dict[str, list[float]] = {path: [] for path in paths}
    for round_ in range(steps + 1):  # round 0 is the warm-up
        for path in paths:
            model.zero_grad(set_to_none=False)
            start = time.perf_counter()
            _step(model, batch, path, chunk)
            if round_:
                times[path].append(time.perf_counter() - start)
    return {path: tokens / statistics.median(t) for path, t in times.items()}


def main() -> None:
    """Run every (head, path) in its own process and print the table with ratios to today's paths."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=0, help="tokens per chunk; 0: 4M logits per chunk")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default (all cores)")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, head, *paths = args.one.split(",")
        if kind == "memory":
            out = measure_memory(paths[0], head, args.tokens, args.sequences, args.chunk_size, args.threads)
        else:
            out = measure_speed(paths, head, args.tokens, args.sequences, args.steps, args.chunk_size, args.threads)
        print(json.dumps(out))
        return
    shape = ["--tokens", str(args.tokens), "--sequences", str(args.sequences), "--chunk-size", str(args.chunk_size)]
    shape += ["--threads", str(args.threads)]
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for head in args.heads:
        for path in args.paths:
            # A fixed mmap threshold: glibc then maps every block over 64 KiB on its own and unmaps it when the
            # tensor is freed, so the resident set follows the live tensors instead of the allocator's free lists.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            rows[head, path] = _child([f"memory,{head},{path}", *shape], env)
        speed = _child([f"speed,{head},{','.join(args.paths)}", "--steps", str(args.steps), *shape], dict(os.environ))
        for path in args.paths:
            rows[head, path]["tokens_per_s"] = speed.get(path, float("nan"))
            rows[head, path].setdefault("error", speed.get("error"))
    _print_table(args, rows)


def _child(arguments: list[str], env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--one", *arguments], capture_output=True, text=True, check=False, cwd=ROOT, env=env
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-300:]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _print_table(args: argparse.Namespace, rows: dict[tuple[str, str], dict[str, Any]]) -> None:
    counted = next((r["counted"] for r in rows.values() if "counted" in r), "?")
    print(
        f"tiny random Llama (V=49,152, width 64), fp32, CPU; {args.tokens}-token row of {args.sequences} sequences "
        f"({counted} counted tokens); tokens/s: median of {args.steps} steps; chunk size {args.chunk_size or 'auto'}; "
        f"{args.threads or 'default'} threads"
    )
    print("| head | path | loss-path peak MiB | / full | / kept | step peak MiB | tokens/s | / full | / kept | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (head, path), row in rows.items():
        if row.get("error"):
            print(f"| {head} | {path} | failed: {row['error']} |")
            continue
        ratios = []
        for base in ("full", "kept"):
            ref = rows.get((head, base), {})
            ok = "loss_peak_mib" in ref and not ref.get("error")
            ratios.append(f"{row['loss_peak_mib'] / max(ref['loss_peak_mib'], 1e-9):.3f}" if ok else "")
            ratios.append(f"{row['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ok else "")
        memory = f"{row['loss_peak_mib']:.0f} | {ratios[0]} | {ratios[2]} | {row['step_peak_mib']:.0f}"
        speed = f"{row['tokens_per_s']:.0f} | {ratios[1]} | {ratios[3]}"
        print(f"| {head} | {path} | {memory} | {speed} | {row['loss']:.6f} |")


if __name__ == "__main__":
    main()
