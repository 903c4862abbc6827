"""The embedded demo task: arithmetic with verifiable answers, generated deterministically.

Every problem ``a op b`` has one correct answer, so the same problems give SFT conversations (the answer in a
fixed format), and later preference pairs (correct vs wrong answer), GPO groups (completions rewarded by
correctness) and classification rows (is this equation right?). Train and test problems never overlap.

One row per problem holds every view of it, so ``data=demo`` serves every method: ``messages`` for SFT and
``prompt``/``chosen``/``rejected`` for the pairwise methods (the correct equation against one off by 1, 2 or 10);
each method keeps only its own columns. Files: ``train.jsonl`` (1000 rows) and ``test.jsonl`` (100 held-out rows).
Regenerate them with ``python -m alignment.data.demo``; a test checks the shipped files match this code.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO_DIR = Path(__file__).parent / "demo"
NUM_TRAIN = 1000
NUM_TEST = 100
SEED = 1234
_TEMPLATES = ("What is {q}?", "Compute {q}.", "Calculate {q}.", "{q} = ?")


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem with its exact answer."""

    a: int
    op: str
    b: int

    @property
    def expression(self) -> str:
        """The problem as written, e.g. ``27 + 82``."""
        return f"{self.a} {self.op} {self.b}"

    @property
    def answer(self) -> int:
        """The exact result."""
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]


def problems(seed: int = SEED) -> tuple[list[Problem], list[Problem]]:
    """Distinct problems split into (train, test): 2-digit sums and differences, 2-digit times 1-digit."""
    rng = random.Random(seed)
    pool: set[Problem] = set()
    while len(pool) < NUM_TRAIN + NUM_TEST:
        op = rng.choice("+-*")
        b = rng.randint(2, 9) if op == "*" else rng.randint(10, 99)
        pool.add(Problem(rng.randint(10, 99), op, b))
    ordered = sorted(pool, key=lambda p: (p.a, p.op, p.b))
    rng.shuffle(ordered)
    return ordered[:NUM_TRAIN], ordered[NUM_TRAIN:]


def wrong_answer(problem: Problem, rng: random.Random) -> int:
    """A plausible wrong answer: off by 1, 2 or 10 either way (the mistakes small models make)."""
    return problem.answer + rng.choice((-10, -2, -1, 1, 2, 10))


def demo_row(problem: Problem, rng: random.Random) -> dict[str, Any]:
    """Every view of one problem: ``messages`` (SFT) and ``prompt``/``chosen``/``rejected`` (pairs)."""
    question = [{"role": "user", "content": rng.choice(_TEMPLATES).format(q=problem.expression)}]
    correct = [{"role": "assistant", "content": f"{problem.expression} = {problem.answer}"}]
    wrong = [{"role": "assistant", "content": f"{problem.expression} = {wrong_answer(problem, rng)}"}]
    return {"messages": question + correct, "prompt": question, "chosen": correct, "rejected": wrong}


def write(folder: Path = DEMO_DIR) -> list[Path]:
    """Write ``train.jsonl`` and ``test.jsonl``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    written = []
    for split, items in zip(("train", "test"), problems(), strict=True):
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(demo_row(p, rng)) + "\n" for p in items))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write():
        print(path)
