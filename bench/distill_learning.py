"""Distillation learning check: a SmolLM2 student with most layers dropped learns back from the full SmolLM2.

Teacher: the embedded SmolLM2-135M-Instruct. Student: the same model keeping ``--keep-layers`` of its 30 decoder
layers (evenly spaced, initialised from the teacher's), so both share the tokenizer. On held-out demo
conversations, before and after a short ``method=distill`` run, it reports the token-mean forward
KL(teacher || student) and the student's top-1 agreement with the teacher over the completion tokens, and exact
match of greedy answers on the arithmetic (8 held-out problems).

Usage:
    python bench/distill_learning.py                                  # forward_kl, reverse_kl, jsd, earth_mover
    python bench/distill_learning.py --losses jsd --steps 40
``tests/methods/distill/test_distill.py`` runs :func:`learning_check` for ``forward_kl`` and ``jsd``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TEACHER = "embedded:smollm2-135m-instruct"


@dataclass
class Outcome:
    """Held-out numbers before and after distillation."""

    loss: str
    kl_before: float
    kl_after: float
    agreement_before: float
    agreement_after: float
    exact_match_before: float
    exact_match_after: float


def make_student(out: Path, keep_layers: int) -> Path:
    """SmolLM2 with ``keep_layers`` evenly spaced decoder layers, saved with its tokenizer to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.models.embedded import resolve

    path = resolve(TEACHER)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    layers = model.model.layers
    keep = sorted({round(i * (len(layers) - 1) / max(keep_layers - 1, 1)) for i in range(keep_layers)})
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out


def _batch(tokenizer: Any, rows: list[dict[str, Any]]) -> tuple[Any, Any, Any]:
    """Right-padded ids, attention mask and the counted (completion) positions of ``rows``, shifted by one."""
    import torch

    from alignment.data.chat_template import IGNORE_INDEX, tokenize_conversation

    encoded = [tokenize_conversation(tokenizer, row["messages"], ["assistant"], 1024) for row in rows]
    longest = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(rows), longest), int(tokenizer.pad_token_id))
    mask = torch.zeros_like(ids)
    counted = torch.zeros((len(rows), longest - 1), dtype=torch.bool)
    for i, e in enumerate(encoded):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
        counted[i, : len(e.labels) - 1] = torch.tensor(e.labels[1:]) != IGNORE_INDEX
    return ids, mask, counted


def _completion_logp(path: str, ids: Any, mask: Any, counted: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1][counted], -1)


def held_out_kl(student_path: Path, rows: list[dict[str, Any]], teacher: Any = None) -> tuple[float, float, Any]:
    """Token-mean forward KL(teacher || student) and top-1 agreement over the completion tokens of ``rows``.

    Returns the teacher's log-probs too, to pass back in as ``teacher`` (computed once per check).
    """
    from transformers import AutoTokenizer

    from alignment.models.embedded import resolve

    tokenizer = AutoTokenizer.from_pretrained(student_path)
    ids, mask, counted = _batch(tokenizer, rows)
    if teacher is None:
        teacher = _completion_logp(resolve(TEACHER), ids, mask, counted)
    student = _completion_logp(str(student_path), ids, mask, counted)
    kl = float((teacher.exp() * (teacher - student)).sum(-1).mean())
    agreement = float((teacher.argmax(-1) == student.argmax(-1)).float().mean())
    return kl, agreement, teacher


def exact_match(model_path: Path, rows: list[dict[str, Any]], max_new_tokens: int = 8) -> float:
    """Greedy answers to the rows' last user turn equal to the reference answer (stripped), as a fraction."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    prompts = [
        tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True) for row in rows
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].size(1) :], skip_special_tokens=True)
    hits = [a.strip() == row["messages"][-1]["content"].strip() for a, row in zip(answers, rows, strict=True)]
    return sum(hits) / len(hits)


def learning_check(
    loss: str, workdir: Path, *, steps: int = 8, keep_layers: int = 6, with_exact_match: bool = False
) -> Outcome:
    """Distil the layer-dropped student with ``loss``; held-out KL, agreement (and exact match) before and after."""
    from hydra import compose, initialize_config_dir

    from alignment.config import to_run_config
    from alignment.context import RunContext
    from alignment.methods.distill.trainer import run_distillation
    from alignment.registry import register_configs

    student = workdir / "student"
    if not (student / "config.json").exists():
        make_student(student, keep_layers)
    eval_file = workdir / "eval.jsonl"
    train_file = workdir / "train.jsonl"
    if not eval_file.exists():
        _demo_split(train_file, eval_file, train_rows=4 * steps)
    rows = [json.loads(line) for line in eval_file.read_text(encoding="utf-8").splitlines()]
    kl_before, agreement_before, teacher = held_out_kl(student, rows)
    out = workdir / f"run_{loss}"
    overrides = [
        "model=smollm2_135m",
        f"model.name_or_path={student}",
        "model.dtype=float32",
        "logger=none",
        "method=distill",
        f"method.loss={loss}",
        f"data.sources=[{{path:'{train_file}'}}]",
        "data.eval_fraction=0",
        f"method.max_steps={steps}",
        "method.per_device_train_batch_size=4",
        "method.learning_rate=2e-4",
        "method.lr_scheduler_type=constant",
        "method.warmup_steps=0",
        "method.logging_steps=1",
        "method.eval_strategy=no",
        "method.save_strategy=no",
        "method.ce_weight=0",
    ]
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = to_run_config(compose("config", overrides=overrides))
    out.mkdir(parents=True, exist_ok=True)
    run_distillation(cfg, RunContext(output_dir=out, name=out.name, group=None))
    kl_after, agreement_after, _ = held_out_kl(out / "model", rows, teacher)
    before = exact_match(student, rows) if with_exact_match else float("nan")
    after = exact_match(out / "model", rows) if with_exact_match else float("nan")
    return Outcome(loss, kl_before, kl_after, agreement_before, agreement_after, before, after)


def _demo_split(train: Path, evaluation: Path, train_rows: int, eval_rows: int = 8) -> None:
    """The first rows of the embedded arithmetic demo's train and test files."""
    from alignment.data.demo import DEMO_DIR

    for source, target, count in (("train.jsonl", train, train_rows), ("test.jsonl", evaluation, eval_rows)):
        lines = (DEMO_DIR / source).read_text(encoding="utf-8").splitlines()[:count]
        target.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    """Run the check for each loss and print a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", nargs="+", default=["forward_kl", "reverse_kl", "jsd", "earth_mover"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--keep-layers", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            learning_check(loss, Path(tmp), steps=args.steps, keep_layers=args.keep_layers, with_exact_match=True)
            for loss in args.losses
        ]
    print("| loss | KL(T||S) before | after | top-1 agreement before | after | exact match before | after |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.loss} | {r.kl_before:.3f} | {r.kl_after:.3f} | {r.agreement_before:.3f} | {r.agreement_after:.3f} "
            f"| {r.exact_match_before:.3f} | {r.exact_match_after:.3f} |"
        )
    print(json.dumps([asdict(r) for r in results]))


if __name__ == "__main__":
    main()
