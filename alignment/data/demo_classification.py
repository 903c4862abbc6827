"""The embedded classification demo: the arithmetic problems of :mod:`alignment.data.demo`, labelled three ways.

Each row holds every view of one problem, and ``conf/data/demo_classification*.yaml`` pick one by renaming columns
to the ``text``/``label`` pair ``method=classification`` reads:

* ``question`` -> ``operation`` (multiclass: ``addition``, ``subtraction``, ``multiplication``), the learning check;
* ``conversation`` (the question and an answer, a message list) -> ``verdict`` (binary: ``correct``/``incorrect``,
  half of the answers off by 1, 2 or 10);
* ``question`` -> ``tags`` (multilabel: any of ``negative``, ``even``, ``over_100`` describing the exact result).

Files: ``classification_train.jsonl`` (400 rows) and ``classification_test.jsonl`` (100 held-out rows), from the demo
task's train and test problems. Regenerate them with ``python -m alignment.data.demo_classification``; a test checks
the shipped files match this code.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from alignment.data.demo import DEMO_DIR, Problem, problems, wrong_answer

NUM_TRAIN = 400
SEED = 4321
OPERATIONS = {"+": "addition", "-": "subtraction", "*": "multiplication"}
_TEMPLATES = ("What is {q}?", "Compute {q}.", "Calculate {q}.", "{q} = ?")


def tags(result: int) -> list[str]:
    """Properties of a result: ``negative``, ``even``, ``over_100`` (in that order, those that hold)."""
    found = {"negative": result < 0, "even": result % 2 == 0, "over_100": result > 100}
    return [name for name, holds in found.items() if holds]


def classification_row(problem: Problem, rng: random.Random) -> dict[str, Any]:
    """Every labelled view of one problem."""
    question = rng.choice(_TEMPLATES).format(q=problem.expression)
    correct = rng.random() < 0.5
    answer = problem.answer if correct else wrong_answer(problem, rng)
    return {
        "question": question,
        "operation": OPERATIONS[problem.op],
        "conversation": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": f"{problem.expression} = {answer}"},
        ],
        "verdict": "correct" if correct else "incorrect",
        "tags": tags(problem.answer),
    }


def write(folder: Path = DEMO_DIR) -> list[Path]:
    """Write ``classification_train.jsonl`` and ``classification_test.jsonl``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    train, test = problems()
    written = []
    for split, items in (("train", train[:NUM_TRAIN]), ("test", test)):
        path = folder / f"classification_{split}.jsonl"
        path.write_text("".join(json.dumps(classification_row(p, rng)) + "\n" for p in items))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write():
        print(path)
