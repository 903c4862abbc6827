"""Reward-model pairs from the embedded arithmetic problems: the answer to the question beats an answer to another.

For each problem of :mod:`alignment.data.demo` (the first :data:`NUM_TRAIN` train problems and all the test ones,
so train and test never share a problem), ``chosen`` is the problem's correct equation and ``rejected`` is the
correct equation of a *different* problem of the same split with the same operation (a distractor). Both answers
are true statements with the same operator, so the preference is relevance, not arithmetic: a reward model ranks
the pair right by checking that the operands in the answer are the ones the question asks about (copy matching),
which a small pretrained model learns from a few dozen pairs. Whether ``c`` in ``a op b = c`` is right is *not*
what this data teaches; the ``data=demo`` pairs (answers off by 1, 2 or 10) ask that, and a 135M model stays near
chance on them within a CPU budget. Deterministic (seeded).
Files: ``reward_train.jsonl`` (400 pairs) and ``reward_test.jsonl`` (100 held-out pairs) next to the demo data;
regenerate them with ``python -m alignment.data.demo_reward`` (a test checks the shipped files match this code).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from alignment.data.demo import DEMO_DIR, Problem, problems

NUM_TRAIN = 400
SEED = 2468
_TEMPLATES = ("What is {q}?", "Compute {q}.", "Calculate {q}.", "{q} = ?")


def equation(problem: Problem) -> list[dict[str, str]]:
    """The assistant turn stating ``a op b = answer`` (always a true equation)."""
    return [{"role": "assistant", "content": f"{problem.expression} = {problem.answer}"}]


def reward_row(problem: Problem, distractor: Problem, rng: random.Random) -> dict[str, Any]:
    """One pair: the question about ``problem``, its equation (chosen), ``distractor``'s equation (rejected)."""
    question = [{"role": "user", "content": rng.choice(_TEMPLATES).format(q=problem.expression)}]
    return {"prompt": question, "chosen": equation(problem), "rejected": equation(distractor)}


def pairs(items: list[Problem], rng: random.Random) -> list[dict[str, Any]]:
    """A pair per problem, each rejected answer drawn from the other problems of ``items`` with the same operation."""
    rows = []
    for problem in items:
        others = [p for p in items if p.op == problem.op and p != problem]
        rows.append(reward_row(problem, rng.choice(others), rng))
    return rows


def write(folder: Path = DEMO_DIR) -> list[Path]:
    """Write ``reward_train.jsonl`` and ``reward_test.jsonl``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    train, test = problems()
    written = []
    for split, items in (("train", train[:NUM_TRAIN]), ("test", test)):
        path = folder / f"reward_{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in pairs(items, rng)))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write():
        print(path)
