"""GPU benchmark: our SFT, DPO, SMPO and GPO with the project's defaults against plain TRL, on the anchor's work.

The work is that of ``../shared/bench/gpu_anchor.py`` (the plain-TRL numbers of issue 16): a random-init model of
the Llama-3.2-1B shape (1.24 B parameters, vocabulary 128,256, tied embeddings; bf16 on a GPU), a word-level
tokenizer over synthetic words ``t<i>``, lengths drawn from the anchor's seeded generator (SFT: 64 texts of
128-2000 words; pairs: 32 with prompts of 64-512 and completions of 64-700 words; the same rows, token for token),
batch 4, max length 2048, one epoch from the same saved initial weights. Wall time = construction (tokenisation,
model and reference loading, reference log-probs where precomputed) + training, as in the anchor; the final save
of our runs is skipped (the anchor saves nothing).

Variants, each in its own process (peak memory is its own), in this order so that a run cut short by ``--budget``
still has its ratios:

| variant | what runs | ratio against |
| --- | --- | --- |
| ``trl_sft`` | TRL ``SFTTrainer``, its defaults (the anchor's ``sft_default``) | |
| ``sft`` | ``method=sft``, the project's defaults | ``trl_sft`` |
| ``trl_dpo`` | TRL ``DPOTrainer``, its defaults (reference forward every step; ``dpo_default``) | |
| ``dpo`` | ``method=dpo``, the project's defaults | ``trl_dpo`` |
| ``smpo`` | ``method=smpo``, the project's defaults (reference-free) | ``trl_dpo`` |
| ``padded_gpo`` | one group per batch, its G sequences padded (the original's design, ``bench/gpo_bench.py``) | |
| ``gpo`` | ``method=gpo``, the project's defaults (groups packed, prompt shared) | ``padded_gpo`` |

Ours run through the project's own path: a config composed from ``conf/`` with overrides (``model.name_or_path``
the saved initial model, ``data.sources`` the rows, batch 4, max length 2048, one epoch, lr 1e-5, no evaluation or
checkpoints), then ``METHODS[name].run``. Everything else is the project's default, Liger included (``model.liger:
auto``: on where CUDA, the liger-kernel package and a Llama kernel are present), flash-attention 2 where flash-attn
runs (``model.attn_implementation: auto``; sdpa for GPO's shared prompts) and padding-free SFT batches (plain TRL
keeps its own defaults: sdpa, padded). The GPO groups have the pairs'
lengths: ``--groups`` prompts of 64-512 words with ``--group-size`` completions of 64-700 words and random rewards.

Columns:
* real tokens: the dataset's tokens, no padding: SFT text + EOS; per pair both sides' prompt + completion + EOS;
  per group Σ_i (prompt + completion_i + EOS), what a per-completion forward needs (a shared prompt is computed
  once but counted per completion, as in ``bench/gpo_bench.py``);
* tok/s: real tokens / wall (construction + train), the anchor's measure; train tok/s: real tokens / the
  trainer's own ``train_runtime`` (the padded GPO loop has no trainer: its loop time);
* MFU = 6 · N · (tok/s) / peak, N = every parameter (the tied embedding once), peak = 989e12 bf16 dense FLOP/s of
  an H100 SXM. No attention term (at these ~1k-token sequences it adds about 3%) and only the real tokens count as
  work: padding, reference forwards and recomputation do not (a shared prompt is credited per completion);
* peak GiB: ``torch.cuda.max_memory_allocated`` (CPU: peak RSS of the process);
* real frac: non-pad positions / positions the policy's embedding saw in training forwards (grad on, train mode).

Usage:
    python bench/gpu_bench.py                     # the full run (a GPU; estimated 4-5 min on an H100)
    python bench/gpu_bench.py --budget 420        # stop starting variants after 420 s in all
    python bench/gpu_bench.py --tiny              # CPU: 2-layer model, vocabulary 1024, few rows, max length 512
    python bench/gpu_bench.py --variants trl_sft,sft --sft-rows 128
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
VARIANTS = ("trl_sft", "sft", "trl_dpo", "dpo", "smpo", "padded_gpo", "gpo")
BASELINE = {"sft": "trl_sft", "dpo": "trl_dpo", "smpo": "trl_dpo", "gpo": "padded_gpo"}
PEAK_FLOPS = 989e12
"""H100 SXM dense bf16 tensor-core FLOP/s."""
SIZES: dict[str, dict[str, Any]] = {
    "1b": {  # Llama-3.2-1B shape, as the anchor
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 1024,
        "tie_word_embeddings": True,
    },
}
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}{% endfor %}"
)
"""Content only, EOS after assistant turns: renders a row into exactly the anchor's tokens (text + EOS)."""


# --- the anchor's data and model ----------------------------------------------------------------------------------


def _words(rng: random.Random, count: int, vocab: int) -> str:
    return " ".join(f"t{rng.randrange(vocab - 3)}" for _ in range(count))


def sft_texts(count: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[str]:
    """The anchor's SFT texts (same generator, same order of draws)."""
    rng = random.Random(seed)
    lengths = [rng.randint(lo, hi) for _ in range(count)]
    return [_words(rng, n, vocab) for n in lengths]


def pair_texts(count: int, prompt: tuple[int, int], answer: tuple[int, int], vocab: int) -> list[tuple[str, ...]]:
    """The anchor's (prompt, chosen, rejected) texts (same generator, same order of draws)."""
    rng = random.Random(0)
    rows = []
    for _ in range(count):
        p, c, r = rng.randint(*prompt), rng.randint(*answer), rng.randint(*answer)
        rows.append((_words(rng, p, vocab), _words(rng, c, vocab), _words(rng, r, vocab)))
    return rows


def group_rows(count: int, size: int, prompt: tuple[int, int], answer: tuple[int, int], vocab: int) -> list[Any]:
    """Groups with the pairs' lengths: a prompt, ``size`` completions, random rewards."""
    rng = random.Random(1)
    rows = []
    for _ in range(count):
        text = _words(rng, rng.randint(*prompt), vocab)
        answers = [_words(rng, rng.randint(*answer), vocab) for _ in range(size)]
        rows.append((text, answers, [rng.random() for _ in range(size)]))
    return rows


def _ntok(text: str) -> int:
    return len(text.split())


def write_data(args: argparse.Namespace, folder: Path) -> dict[str, int]:
    """Write the rows for TRL (plain text) and for us (conversations); return each kind's real tokens."""
    vocab = SIZES[args.size]["vocab_size"]
    scale = args.max_length / 2048
    sft = sft_texts(args.sft_rows, int(128 * scale), int(2000 * scale), vocab)
    spans = ((int(64 * scale), int(512 * scale)), (int(64 * scale), int(700 * scale)))
    pairs = pair_texts(args.pairs, *spans, vocab)
    groups = group_rows(args.groups, args.group_size, *spans, vocab)

    def user(text: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": text}]

    def assistant(text: str) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": text}]

    files: dict[str, list[dict[str, Any]]] = {
        "trl_sft": [{"text": t} for t in sft],
        "sft": [{"messages": assistant(t)} for t in sft],
        "trl_dpo": [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs],
        "pairs": [{"prompt": user(p), "chosen": assistant(c), "rejected": assistant(r)} for p, c, r in pairs],
        "groups": [
            {"prompt": user(p), "completions": [assistant(a) for a in answers], "rewards": rewards}
            for p, answers, rewards in groups
        ],
    }
    for name, rows in files.items():
        with (folder / f"{name}.jsonl").open("w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    return {
        "sft": sum(_ntok(t) + 1 for t in sft),
        "pairs": sum(2 * _ntok(p) + _ntok(c) + _ntok(r) + 2 for p, c, r in pairs),
        "groups": sum(_ntok(p) + _ntok(a) + 1 for p, answers, _ in groups for a in answers),
    }


def make_model(size: str, folder: Path) -> int:
    """Random-init weights (seed 0) and the word-level tokenizer with :data:`CHAT_TEMPLATE`; returns the params."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = SIZES[size]["vocab_size"]
    words = {f"t{i}": i for i in range(vocab - 3)}
    words.update({"<pad>": vocab - 3, "<eos>": vocab - 2, "<unk>": vocab - 1})
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # type: ignore[assignment]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    config = LlamaConfig(
        **SIZES[size],
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(config)
    model.to(dtype=torch.bfloat16 if cuda else torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    if cuda:
        torch.cuda.empty_cache()  # the variants run in their own processes: leave them the memory
    return params


# --- one variant, in its own process ------------------------------------------------------------------------------


class Meter:
    """Wall time from construction to the end of ``Trainer.train``, and the positions the policy's embedding saw."""

    def __init__(self, pad_id: int) -> None:
        import torch

        self.pad_id = pad_id
        self.start = time.perf_counter()
        self.train_end: float | None = None
        self.positions = 0
        self.real: Any = 0
        torch.nn.modules.module.register_module_forward_pre_hook(self._count)

    def _count(self, module: Any, args: Any) -> None:
        import torch

        if isinstance(module, torch.nn.Embedding) and module.training and torch.is_grad_enabled() and args:
            ids = args[0]
            self.positions += ids.numel()
            self.real = self.real + (ids != self.pad_id).sum()  # on the device: no sync per forward

    def wrap_train(self) -> None:
        """Note when ``Trainer.train`` returns, and skip the final model save (not part of the measured work)."""
        from transformers import Trainer

        train = Trainer.train

        def timed(trainer: Any, *args: Any, **kwargs: Any) -> Any:
            out = train(trainer, *args, **kwargs)
            self.train_end = time.perf_counter()
            return out

        Trainer.train = timed  # type: ignore[method-assign]
        Trainer.save_model = lambda *args, **kwargs: None  # type: ignore[method-assign]

    def result(self, train_runtime: float) -> dict[str, Any]:
        """Wall, train runtime, real-token fraction and peak memory of this process."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**30
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        end = self.train_end if self.train_end is not None else time.perf_counter()
        return {
            "wall_s": round(end - self.start, 2),
            "train_s": round(train_runtime, 2),
            "peak_gib": round(peak, 2),
            "real_fraction": round(float(self.real) / max(self.positions, 1), 3),
        }


PRELOAD = (
    "datasets",
    "transformers",
    "trl",
    "hydra",
    "alignment.registry",
    "alignment.models.load",
    "alignment.methods.pairwise.trainer",
    "alignment.methods.gpo.trainer",
    "alignment.methods.sft_trainer",
)
"""Imported before the clock starts (the anchor's imports are not timed either; our runs import inside ``run``)."""


def _warm_up() -> None:
    """Import the libraries and start CUDA (context, cuBLAS) before the clock: each variant is a fresh process."""
    import importlib

    import torch

    for module in PRELOAD:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError:  # renamed or moved: then it is imported (and timed) inside the run
            print(f"warm-up: no module {module}", file=sys.stderr)
    if torch.cuda.is_available():
        x = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
        (x @ x).sum().item()
        torch.cuda.reset_peak_memory_stats()


def run_trl(args: argparse.Namespace, model_dir: Path, data: Path, out: Path) -> dict[str, Any]:
    """TRL's SFTTrainer or DPOTrainer with its defaults, set up as the anchor sets it up."""
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    meter = Meter(json.loads((model_dir / "config.json").read_text())["pad_token_id"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cuda = torch.cuda.is_available()
    common: dict[str, Any] = {
        "output_dir": str(out),
        "per_device_train_batch_size": args.batch_size,
        "num_train_epochs": 1,
        "learning_rate": 1e-5,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": [],
        "bf16": cuda,
        "use_cpu": not cuda,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": 0,
        "model_init_kwargs": {"dtype": torch.bfloat16 if cuda else torch.float32, "attn_implementation": "sdpa"},
    }
    rows = load_dataset("json", data_files=str(data))["train"]
    trainer: Any
    if args.one == "trl_sft":
        config = SFTConfig(max_length=args.max_length, dataset_text_field="text", **common)
        trainer = SFTTrainer(model=str(model_dir), args=config, train_dataset=rows, processing_class=tokenizer)
    else:
        config = DPOConfig(max_length=args.max_length, beta=0.1, **common)
        trainer = DPOTrainer(model=str(model_dir), args=config, train_dataset=rows, processing_class=tokenizer)
    result = trainer.train()
    meter.train_end = time.perf_counter()
    return {**meter.result(result.metrics["train_runtime"]), "loss": result.training_loss}


def run_ours(args: argparse.Namespace, model_dir: Path, data: Path, out: Path) -> dict[str, Any]:
    """``METHODS[name].run`` on a config composed from ``conf/`` with the bench's overrides."""
    from hydra import compose, initialize_config_dir

    from alignment.config import to_run_config
    from alignment.context import RunContext
    from alignment.registry import METHODS, register_configs

    meter = Meter(json.loads((model_dir / "config.json").read_text())["pad_token_id"])
    meter.wrap_train()
    method = "sft" if args.one == "warmup" else args.one
    overrides = [
        "model=tiny_random",
        f"model.name_or_path='{model_dir}'",
        f"method={method}",
        "logger=none",
        f"data.sources=[{{path: '{data}'}}]",
        "data.eval_fraction=0",
        f"method.max_length={args.max_length}",
        "method.num_train_epochs=1",
        "method.learning_rate=1e-5",
        "method.logging_steps=10",
        "method.save_strategy=no",
        "method.eval_strategy=no",
    ]
    if method != "gpo":  # GPO's micro-batches are token budgets of whole groups (its default)
        overrides.append(f"method.per_device_train_batch_size={args.batch_size}")
    if method == "sft":
        overrides.append("method.num_generation_samples=0")
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = to_run_config(compose("config", overrides=overrides))
    metrics = METHODS[method].run(cfg, RunContext(out, "bench", None))
    return {**meter.result(metrics["train_runtime"]), "loss": metrics["train_loss"]}


def run_padded_gpo(args: argparse.Namespace, model_dir: Path, data: Path, out: Path) -> dict[str, Any]:
    """One group per batch, G rows padded to the longest, completion logits only (``bench/gpo_bench.py``)."""
    import torch
    from datasets import load_dataset
    from gpo_bench import _padded_batch, _padded_logps  # bench/ is this script's folder

    from alignment.methods.gpo.gpo import (
        AdvantageScale,
        GpoLossType,
        GroupCounts,
        TokenAggregation,
        gpo_loss,
        tokenize_groups,
    )
    from alignment.models.config import ModelConfig
    from alignment.models.load import load_model, load_tokenizer

    meter = Meter(json.loads((model_dir / "config.json").read_text())["pad_token_id"])
    cfg = ModelConfig(name_or_path=str(model_dir))
    tokenizer = load_tokenizer(cfg)
    groups, _ = tokenize_groups(
        load_dataset("json", data_files=str(data))["train"],
        tokenizer,
        max_length=args.max_length,
        scale=AdvantageScale.group,
        epsilon=1e-4,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(cfg, tokenizer).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    settings: dict[str, Any] = {"loss_type": GpoLossType.grpo, "aggregation": TokenAggregation.sequence_mean}
    losses = []
    start = time.perf_counter()
    for row in groups:
        batch = {
            k: v.to(device) if torch.is_tensor(v) else v for k, v in _padded_batch(row, tokenizer.pad_token_id).items()
        }
        logps, sequence = _padded_logps(model, batch)
        size = len(row["completion_ids"])
        sizes = torch.full((size,), float(size), device=device)
        advantages = torch.tensor(row["advantages"], device=device)
        counts = GroupCounts(1.0, float(logps.numel()))
        loss = gpo_loss(logps, None, advantages, sequence, sizes, counts, kl_beta=0.0, **settings).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    loop = time.perf_counter() - start
    meter.train_end = time.perf_counter()
    return {**meter.result(loop), "loss": float(torch.stack(losses).mean())}


DATA = {"trl_sft": "trl_sft", "sft": "sft", "trl_dpo": "trl_dpo", "dpo": "pairs", "smpo": "pairs"}
DATA.update(padded_gpo="groups", gpo="groups", warmup="warmup")
"""The rows file (``<workdir>/<name>.jsonl``) of each variant."""


def run_one(args: argparse.Namespace) -> None:
    """Run ``args.one`` in this process and print its JSON result line."""
    workdir = Path(args.workdir)
    data = workdir / f"{DATA[args.one]}.jsonl"
    _warm_up()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        if args.one.startswith("trl_"):
            out = run_trl(args, workdir / "model", data, Path(tmp))
        elif args.one == "padded_gpo":
            out = run_padded_gpo(args, workdir / "model", data, Path(tmp))
        else:
            out = run_ours(args, workdir / "model", data, Path(tmp))
    print("RESULT " + json.dumps(out), flush=True)


# --- the driver ---------------------------------------------------------------------------------------------------


def _row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['variant']:<11} {r['error']}"
    ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
    return (
        f"{r['variant']:<11}{r['real_tokens']:>9}{r['wall_s']:>8.1f}{r['tok_per_s']:>10.0f}{r['train_tok_per_s']:>10.0f}"
        f"{r['mfu_pct']:>7.1f}{r['peak_gib']:>9.2f}{r['real_fraction']:>7.3f}{ratio:>8}{r['loss']:>9.4f}"
    )


HEADER = (
    f"{'variant':<11}{'tokens':>9}{'wall s':>8}{'tok/s':>10}{'train/s':>10}{'MFU %':>7}{'peak GiB':>9}"
    f"{'real':>7}{'vs base':>8}{'loss':>9}"
)


def _launch(args: argparse.Namespace, variant: str, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", variant, "--workdir", args.workdir]
    cmd += ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRL_EXPERIMENTAL_SILENCE": "1", "WANDB_DISABLED": "true"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"stopped at the budget ({timeout:.0f} s left)"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {"variant": variant, "error": f"ERROR {tail[-400:]}"}
    return {"variant": variant, **json.loads(lines[-1].removeprefix("RESULT "))}


def main() -> None:
    """Build the model and the rows once, run every variant in a subprocess, print each result as it comes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU-sized: the 2-layer model and few rows")
    parser.add_argument("--sft-rows", type=int, help="SFT texts (default 64; --tiny 16)")
    parser.add_argument("--pairs", type=int, help="preference pairs (default 32; --tiny 8)")
    parser.add_argument("--groups", type=int, help="GPO groups (default 16; --tiny 4)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, help="default 2048 (--tiny 512); row lengths scale with it")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run; later variants skip")
    parser.add_argument("--workdir", default=None, help="model, rows and outputs (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="also write the results here as JSON")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return
    started = time.perf_counter()
    args.size = "tiny" if args.tiny else "1b"
    for name, full, tiny in (("sft_rows", 64, 16), ("pairs", 32, 8), ("groups", 16, 4), ("max_length", 2048, 512)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = args.workdir or tmp
        drive(args, started)


def drive(args: argparse.Namespace, started: float) -> None:
    """Write model and data under ``args.workdir``, then run the variants and print the table."""
    import importlib.util

    import torch

    workdir = Path(args.workdir)
    (workdir / "model").mkdir(parents=True, exist_ok=True)
    params = make_model(args.size, workdir / "model")
    tokens = write_data(args, workdir)
    kinds = {"trl_sft": "sft", "sft": "sft", "trl_dpo": "pairs", "dpo": "pairs", "smpo": "pairs"}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    liger = "present" if importlib.util.find_spec("liger_kernel") else "absent"
    print(
        f"device={device} torch={torch.__version__} liger-kernel={liger} model={args.size} ({params:,} "
        f"params) batch={args.batch_size} max_length={args.max_length} rows: sft={args.sft_rows} "
        f"pairs={args.pairs} groups={args.groups}x{args.group_size}; real tokens: {tokens}",
        flush=True,
    )
    if torch.cuda.is_available():  # Triton/Liger kernels compile into the on-disk cache outside any timing
        with (workdir / "warmup.jsonl").open("w") as handle:
            handle.writelines(
                json.dumps({"messages": [{"role": "assistant", "content": "t1 t2 t3"}]}) + "\n" for _ in range(8)
            )
        warm = _launch(args, "warmup", _left(args, started))
        print(f"warm-up: {warm.get('error', 'done')}", flush=True)
    print(HEADER, flush=True)
    results: list[dict[str, Any]] = []
    for variant in args.variants.split(","):
        left = _left(args, started)
        if left < 20:
            result: dict[str, Any] = {"variant": variant, "error": "skipped: --budget spent"}
        else:
            result = _launch(args, variant, left)
        if "error" not in result:
            real = tokens[kinds.get(variant, "groups")]
            result.update(real_tokens=real, tok_per_s=real / result["wall_s"])
            result.update(train_tok_per_s=real / max(result["train_s"], 1e-9))
            result["mfu_pct"] = 100 * 6 * params * result["tok_per_s"] / PEAK_FLOPS
            base = next((r for r in results if r["variant"] == BASELINE.get(variant) and "error" not in r), None)
            if base is not None:
                result["ratio"] = result["tok_per_s"] / base["tok_per_s"]
        results.append(result)
        print(_row(result), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    total = time.perf_counter() - started
    print(f"(MFU = 6 x {params:.4g} params x tok/s / 989e12, the H100 bf16 dense peak; total {total:.0f} s)")


def _left(args: argparse.Namespace, started: float) -> float:
    if args.budget is None:
        return 3600.0
    return args.budget - (time.perf_counter() - started)


if __name__ == "__main__":
    main()
