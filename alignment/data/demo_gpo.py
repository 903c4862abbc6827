"""GPO groups from the embedded arithmetic problems: G completions per prompt, rewarded 1 if correct, else 0.

For each problem of :mod:`alignment.data.demo` (the first :data:`NUM_TRAIN` train and :data:`NUM_TEST` test
problems, so train and test never share a problem), G is drawn from 3 to 5 and the number of correct completions
from 1 to G - 1, except for about 15% of the groups that are all wrong or all correct (equal rewards, zero
advantage: they exercise the skip); wrong completions are off by 1, 2 or 10 either way, all distinct.
Deterministic (seeded).
Files: ``gpo_train.jsonl`` and ``gpo_test.jsonl`` next to the demo data; regenerate them with
``python -m alignment.data.demo_gpo`` (a test checks the shipped files match this code).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from alignment.data.demo import DEMO_DIR, Problem, problems

NUM_TRAIN = 300
NUM_TEST = 50
SEED = 4321
GROUP_SIZES = (3, 4, 4, 5)
OFFSETS = (-10, -2, -1, 1, 2, 10)
EQUAL_FRACTION = 0.15
"""Share of groups drawn all wrong or all correct."""
_TEMPLATES = ("What is {q}?", "Compute {q}.", "Calculate {q}.", "{q} = ?")


def gpo_row(problem: Problem, rng: random.Random) -> dict[str, Any]:
    """One group: the question, G answers (correct ones and distinct wrong ones, shuffled) and their 0/1 rewards."""
    size = rng.choice(GROUP_SIZES)
    correct = rng.randint(1, size - 1) if rng.random() > EQUAL_FRACTION else rng.choice((0, size))
    answers = [problem.answer] * correct + [problem.answer + o for o in rng.sample(OFFSETS, size - correct)]
    rng.shuffle(answers)
    return {
        "prompt": [{"role": "user", "content": rng.choice(_TEMPLATES).format(q=problem.expression)}],
        "completions": [[{"role": "assistant", "content": f"{problem.expression} = {a}"}] for a in answers],
        "rewards": [1.0 if a == problem.answer else 0.0 for a in answers],
    }


def write(folder: Path = DEMO_DIR) -> list[Path]:
    """Write ``gpo_train.jsonl`` and ``gpo_test.jsonl``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    train, test = problems()
    written = []
    for split, items in (("train", train[:NUM_TRAIN]), ("test", test[:NUM_TEST])):
        path = folder / f"gpo_{split}.jsonl"
        path.write_text("".join(json.dumps(gpo_row(p, rng)) + "\n" for p in items))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write():
        print(path)
