"""Writes the DPO demo's preference pairs from the demo's own instruction tasks (make_demo_tasks.py).

How the pairs are made (no model, no human rating): each task's prompt is its instruction (and input) as one user
turn; `chosen` is the task's reference answer; `rejected` is the answer of another task of the same family (same
instruction wording once numbers are left out) that differs from it, drawn with a fixed seed: a plausible answer of
the right shape that is wrong for this question. The held-out pairs come from the held-out tasks, so no prompt is
shared with training.

    python recipes/data/make_dpo_pairs.py   # rewrites dpo_pairs_train.json and dpo_pairs_eval.json
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path


def family(task: dict[str, str]) -> str:
    """The generator a task came from: the first four words of its instruction that hold no digit ('What is 85 minus
    49? ...' -> 'What is minus Reply')."""
    words = [w for w in task["instruction"].split() if not any(c.isdigit() for c in w)]
    return " ".join(words[:4])


def pairs(tasks: list[dict[str, str]], seed: int) -> list[dict[str, list[dict[str, str]]]]:
    rng = random.Random(seed)
    answers: dict[str, list[str]] = defaultdict(list)
    for task in tasks:
        answers[family(task)].append(task["output"])
    out = []
    for task in tasks:
        wrong = [a for a in answers[family(task)] if a != task["output"]]
        if not wrong:
            continue
        question = task["instruction"] + (f"\n\n{task['input']}" if task["input"] else "")
        out.append({
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": task["output"]}],
            "rejected": [{"role": "assistant", "content": rng.choice(wrong)}],
        })  # fmt: skip
    return out


def main() -> None:
    here = Path(__file__).resolve().parent
    for source, target, seed in (("demo_tasks_train.json", "dpo_pairs_train.json", 1),
                                 ("demo_tasks_eval.json", "dpo_pairs_eval.json", 2)):  # fmt: skip
        tasks = json.loads((here / source).read_text(encoding="utf-8"))
        rows = pairs(tasks, seed)
        (here / target).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        print(f"{target}: {len(rows)} pairs from {len(tasks)} tasks")


if __name__ == "__main__":
    main()
