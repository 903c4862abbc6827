"""Hard-prompt learning checks for ``method=prompt_opt``: a planted prompt, the arithmetic demo, a reward model.

* ``planted``: a small random Llama (SmolLM2's tokenizer, weights drawn with ``initializer_range=0.1`` so that
  the system prompt visibly changes its predictions) answers 24 user turns with 8 tokens *sampled* under a known
  system prompt p*. The prompt is optimised from a neutral start on 16 of them; on the other 8 it reports the
  held-out completion cross-entropy with no system prompt, with p*, with the starting prompt, and with the learned
  prompt's text (re-tokenised, as a user would paste it).
* ``arithmetic``: the embedded SmolLM2-135M-Instruct, frozen, on the demo's ``What is a + b?`` problems; a 16-token
  system prompt is learned for the SFT loss of the answers; held-out loss with no prompt, the starting prompt and
  the learned one, and greedy exact match with no prompt and with the learned one.
* ``reward``: see ``tests/methods/prompt_opt/test_prompt_opt.py`` (a reward model trained in the test).

Usage:
    python bench/prompt_opt_learning.py planted                       # both estimators, both logit kinds
    python bench/prompt_opt_learning.py arithmetic --steps 20
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PLANTED = " zebra quantum violin marble harbor"
"""The system prompt the planted targets are sampled under."""


@dataclass
class Outcome:
    """Held-out completion cross-entropy (nats per token) of each prompt, and the learned prompt's text."""

    setting: str
    no_prompt: float
    planted: float
    start: float
    learned: float
    learned_text: str
    exact_match_none: float = float("nan")
    exact_match_learned: float = float("nan")


def make_planted_model(out: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide random Llama with SmolLM2's tokenizer, weights drawn at ``initializer_range=0.1``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from alignment.models.embedded import resolve

    path = resolve("embedded:tiny-random-llama")
    config = LlamaConfig.from_pretrained(path)
    config.initializer_range = 0.1
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out


def planted_rows(model_path: Path, count: int = 24, new_tokens: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` conversations whose assistant turn is sampled from the model under the planted system prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    rows = []
    for i in range(count):
        user = f"Tell me about item {i}."
        messages = [{"role": "system", "content": PLANTED}, {"role": "user", "content": user}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True)
        answer = tokenizer.decode(out[0, ids["input_ids"].size(1) :], skip_special_tokens=True)
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    return rows


def completion_ce(model_path: Path | str, rows: list[dict[str, Any]], system: str | None) -> float:
    """Token-mean cross-entropy of the assistant turns of ``rows`` with ``system`` as the system message."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.data.chat_template import IGNORE_INDEX, tokenize_conversation

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for row in rows:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + row["messages"]
        encoded = tokenize_conversation(tokenizer, messages, ["assistant"], 4096)
        ids = torch.tensor([encoded.input_ids])
        labels = torch.tensor(encoded.labels[1:])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        keep = labels != IGNORE_INDEX
        total += float(-logp[keep].gather(-1, labels[keep][:, None]).sum())
        count += int(keep.sum())
    return total / count


def setting_overrides(setting: str) -> list[str]:
    """``estimator/logits[/logit_scale[/noise_scale]]`` (``pez/cosine``, ``gumbel/dot/1/0``) as overrides."""
    parts = setting.split("/")
    names = ["estimator", "logits", "logit_scale", "gumbel_noise_scale"]
    return [f"method.{name}={value}" for name, value in zip(names, parts, strict=False)]


def optimise(overrides: list[str], out: Path) -> dict[str, Any]:
    """Run ``method=prompt_opt`` in this process with ``overrides``; the run's metrics and ``prompts.json``."""
    from hydra import compose, initialize_config_dir

    from alignment.config import to_run_config
    from alignment.context import RunContext
    from alignment.methods.prompt_opt.trainer import run_prompt_opt
    from alignment.registry import register_configs

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = to_run_config(compose("config", overrides=["method=prompt_opt", "logger=none", *overrides]))
    out.mkdir(parents=True, exist_ok=True)
    metrics = run_prompt_opt(cfg, RunContext(output_dir=out, name=out.name, group=None))
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"metrics": metrics, "prompts": json.loads((out / "prompts.json").read_text()), "history": history}


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def planted_check(workdir: Path, setting: str, *, steps: int = 30, lr: float = 0.05) -> Outcome:
    """Optimise a 5-token prompt on targets sampled under the planted prompt; held-out cross-entropies."""
    model = workdir / "planted_model"
    if not (model / "config.json").exists():
        make_planted_model(model)
    train, held_out = workdir / "planted_train.jsonl", workdir / "planted_eval.jsonl"
    if not held_out.exists():
        rows = planted_rows(model)
        _write(train, rows[:16])
        _write(held_out, rows[16:])
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    run = optimise(
        [
            f"model.name_or_path={model}",
            "model.dtype=float32",
            f"data.sources=[{{path:'{train}',eval_path:'{held_out}'}}]",
            "method.num_prompts=2",
            "method.prompt_len=5",
            *setting_overrides(setting),
            f"method.max_steps={steps}",
            "method.per_device_train_batch_size=8",
            f"method.learning_rate={lr}",
            "method.lr_scheduler_type=constant",
            "method.logging_steps=5",
            f"method.eval_steps={max(steps // 3, 1)}",
            "method.save_strategy=no",
        ],
        workdir / f"run_{setting.replace('/', '_')}",
    )
    start = min(
        v
        for k, v in run["history"][0].items()
        if k.startswith("eval_prompt_") and k.endswith("_loss") and "slot" not in k
    )
    best = run["prompts"]["best"]
    return Outcome(
        setting,
        no_prompt=completion_ce(model, rows, None),
        planted=completion_ce(model, rows, PLANTED),
        start=start,
        learned=completion_ce(model, rows, best["text"]),
        learned_text=best["text"],
    )


def exact_match(model_path: Path | str, rows: list[dict[str, Any]], system: str | None, new_tokens: int = 12) -> float:
    """Greedy answers to the rows' last user turn equal to the reference (stripped), with ``system`` as system."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    prompts = [
        tokenizer.apply_chat_template(
            ([{"role": "system", "content": system}] if system is not None else []) + row["messages"][:-1],
            tokenize=False,
            add_generation_prompt=True,
        )
        for row in rows
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].size(1) :], skip_special_tokens=True)
    hits = [a.strip() == row["messages"][-1]["content"].strip() for a, row in zip(answers, rows, strict=True)]
    return sum(hits) / len(hits)


def _start_loss(history: list[dict[str, Any]]) -> float:
    """The best prompt's held-out loss at the step-0 evaluation (the starting prompts)."""
    first = history[0]
    return min(v for k, v in first.items() if k.startswith("eval_prompt_") and k.endswith("_loss") and "slot" not in k)


def arithmetic_check(
    workdir: Path,
    setting: str,
    *,
    steps: int = 12,
    lr: float = 0.05,
    prompt_len: int = 16,
    batch: int = 8,
    evaluations: int = 2,
    with_exact_match: bool = True,
) -> Outcome:
    """A ``prompt_len``-token system prompt for the frozen SmolLM2 on the arithmetic demo; held-out numbers."""
    from alignment.data.demo import DEMO_DIR
    from alignment.models.embedded import resolve

    train, held_out = workdir / "arith_train.jsonl", workdir / "arith_eval.jsonl"
    for source, target, count in (("train.jsonl", train, steps * batch), ("test.jsonl", held_out, 16)):
        lines = (DEMO_DIR / source).read_text(encoding="utf-8").splitlines()[:count]
        target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    run = optimise(
        [
            "model=smollm2_135m",
            "model.dtype=float32",
            f"data.sources=[{{path:'{train}',eval_path:'{held_out}'}}]",
            "method.num_prompts=1",
            f"method.prompt_len={prompt_len}",
            *setting_overrides(setting),
            f"method.max_steps={steps}",
            f"method.per_device_train_batch_size={batch}",
            "method.per_device_eval_batch_size=16",
            f"method.learning_rate={lr}",
            "method.lr_scheduler_type=constant",
            "method.logging_steps=4",
            f"method.eval_steps={max(steps // evaluations, 1)}",
            "method.save_strategy=no",
        ],
        workdir / f"arith_{setting.replace('/', '_')}",
    )
    best = run["prompts"]["best"]
    model = resolve("embedded:smollm2-135m-instruct")
    return Outcome(
        setting,
        no_prompt=run["history"][0]["eval_no_prompt_loss"],
        planted=float("nan"),
        start=_start_loss(run["history"]),
        learned=best["held_out_loss"],
        learned_text=best["text"],
        exact_match_none=exact_match(model, rows, None) if with_exact_match else float("nan"),
        exact_match_learned=exact_match(model, rows, best["text"]) if with_exact_match else float("nan"),
    )


@dataclass
class RewardOutcome:
    """Held-out pairwise accuracy and Bradley-Terry loss of the frozen reward model, without and with the prompt."""

    setting: str
    accuracy_none: float
    accuracy_learned: float
    loss_none: float
    loss_learned: float
    learned_text: str


WORDS = ("apple", "banana")
"""The two answers of the controllable pairs; the system message says which one is preferred."""


def controllable_pairs(count: int, prefer: str | None, *, start: int = 0) -> list[dict[str, Any]]:
    """Pairs whose preferred answer names the fruit the system message asks for (``prefer`` None: alternate)."""
    rows = []
    for i in range(start, start + count):
        want = prefer or WORDS[i % 2]
        other = WORDS[1 - WORDS.index(want)]
        prompt = [
            {"role": "system", "content": f"Prefer answers about {want}."},
            {"role": "user", "content": f"Say something about item {i}."},
        ]
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": f"I like {want} number {i}."}],
                "rejected": [{"role": "assistant", "content": f"I like {other} number {i}."}],
            }
        )
    return rows


def train_reward_model(workdir: Path, steps: int = 60) -> Path:
    """A controllable reward model: a small random Llama (as the planted check's) trained by ``method=reward``.

    The preferred answer depends on the system message (``Prefer answers about apple.`` or ``... banana.``).
    """
    from hydra import compose, initialize_config_dir

    from alignment.config import to_run_config
    from alignment.context import RunContext
    from alignment.methods.seqcls.reward import run
    from alignment.registry import register_configs

    out = workdir / "rm"
    if (out / "model" / "config.json").exists():
        return out / "model"
    train = _write(workdir / "rm_train.jsonl", controllable_pairs(400, None))
    held_out = _write(workdir / "rm_eval.jsonl", controllable_pairs(64, None, start=1000))
    overrides = [
        "method=reward",
        f"model.name_or_path={make_planted_model(workdir / 'rm_base', seed=1)}",
        "model.dtype=float32",
        "logger=none",
        f"data.sources=[{{path:'{train}',eval_path:'{held_out}'}}]",
        f"method.max_steps={steps}",
        "method.learning_rate=1e-3",
        "method.per_device_train_batch_size=16",
        "method.eval_strategy=no",
        "method.save_strategy=no",
        "method.logging_steps=25",
    ]
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = to_run_config(compose("config", overrides=overrides))
    out.mkdir(parents=True, exist_ok=True)
    run(cfg, RunContext(output_dir=out, name=out.name, group=None))
    return out / "model"


def reward_check(workdir: Path, setting: str, *, steps: int = 20, lr: float = 0.05) -> RewardOutcome:
    """Learn an 8-token system prompt for the frozen controllable reward model on pairs of one preference.

    The pairs' system messages are removed (the prompt replaces them), so without a prompt the reward model cannot
    know which fruit is wanted; the preference learned is the one it gets more often wrong without a system message.
    """
    from alignment.models.seqcls import load_reward_model, score_conversations

    rm = train_reward_model(workdir)
    model, tokenizer = load_reward_model(str(rm), dtype="float32", device="cpu")
    rows = {want: controllable_pairs(96, want, start=2000) for want in WORDS}

    def no_prompt_accuracy(pairs: list[dict[str, Any]]) -> float:
        chosen = score_conversations(model, tokenizer, [p["prompt"][1:] + p["chosen"] for p in pairs])
        rejected = score_conversations(model, tokenizer, [p["prompt"][1:] + p["rejected"] for p in pairs])
        return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)

    want = min(WORDS, key=lambda w: no_prompt_accuracy(rows[w][64:]))
    train = _write(workdir / "po_train.jsonl", rows[want][:64])
    held_out = _write(workdir / "po_eval.jsonl", rows[want][64:])
    run = optimise(
        [
            f"model.name_or_path={rm}",
            "model.dtype=float32",
            f"data.sources=[{{path:'{train}',eval_path:'{held_out}'}}]",
            "method.objective=reward",
            "method.num_prompts=2",
            "method.prompt_len=8",
            *setting_overrides(setting),
            f"method.max_steps={steps}",
            "method.per_device_train_batch_size=8",
            "method.per_device_eval_batch_size=32",
            f"method.learning_rate={lr}",
            "method.lr_scheduler_type=constant",
            "method.logging_steps=5",
            f"method.eval_steps={max(steps // 2, 1)}",
            "method.save_strategy=no",
        ],
        workdir / f"reward_{setting.replace('/', '_')}",
    )
    final = [entry for entry in run["history"] if "eval_best_prompt" in entry]
    best = min(final, key=lambda entry: entry["eval_loss"])
    index = int(best["eval_best_prompt"])
    return RewardOutcome(
        f"{setting} (prefer {want})",
        accuracy_none=best["eval_no_prompt_accuracy"],
        accuracy_learned=best[f"eval_prompt_{index}_accuracy"],
        loss_none=best["eval_no_prompt_loss"],
        loss_learned=best[f"eval_prompt_{index}_loss"],
        learned_text=run["prompts"]["best"]["text"],
    )


def main() -> None:
    """Run a check and print a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["planted", "arithmetic", "reward"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--settings", nargs="+", default=["gumbel/dot", "gumbel/cosine", "pez/cosine"], help="estimator/logits[/scale]"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for setting in args.settings:
            check = {"planted": planted_check, "arithmetic": arithmetic_check, "reward": reward_check}[args.check]
            results.append(check(Path(tmp), setting, steps=args.steps, lr=args.lr))  # type: ignore[operator]
            print(json.dumps(asdict(results[-1])), flush=True)
    if args.check == "reward":
        print(
            "| setting | accuracy no prompt | accuracy learned | BT loss no prompt | BT loss learned | learned text |"
        )
        print("|---|---|---|---|---|---|")
        for r in results:
            row = [r.setting, f"{r.accuracy_none:.3f}", f"{r.accuracy_learned:.3f}", f"{r.loss_none:.3f}"]
            print("| " + " | ".join([*row, f"{r.loss_learned:.3f}", repr(r.learned_text)]) + " |")
        return
    print(
        "| setting | CE no prompt | CE planted p* | CE start | CE learned | exact match none | learned | learned text |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        row = [r.setting, f"{r.no_prompt:.3f}", f"{r.planted:.3f}", f"{r.start:.3f}", f"{r.learned:.3f}"]
        row += [f"{r.exact_match_none:.2f}", f"{r.exact_match_learned:.2f}"]
        print("| " + " | ".join([*row, repr(r.learned_text)]) + " |")


if __name__ == "__main__":
    main()
