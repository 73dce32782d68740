"""MMLU scoring speed: velora's cached-prefix batched path vs the straightforward per-question evaluation.

Both paths score the same questions with the same model and prompts in one process; subjects alternate between
the two paths (fast, then reference, subject by subject) so that load changes on a shared machine hit both alike.
Prints questions/second of each, the speed-up, the share of identical predictions and the largest difference
in a letter's log-likelihood.

    python benchmarks/mmlu_speed.py --data-dir ../shared/data/mmlu --limit 8
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from velora_cli.eval.command import load_eval_model
from velora_cli.eval.mmlu_data import load_mmlu
from velora_cli.eval.scorer import Prediction, score_mmlu

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SUBJECTS = "astronomy,philosophy,high_school_geography,marketing"  # one per category


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument(
        "--data-dir", type=Path, default=os.environ.get("VELORA_MMLU_DIR", REPO.parent / "shared/data/mmlu")
    )
    parser.add_argument("--subjects", default=DEFAULT_SUBJECTS)
    parser.add_argument("--limit", type=int, default=8, help="questions per subject")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    model, tokenizer, description = load_eval_model(args.model)
    data = load_mmlu(args.data_dir, subjects=args.subjects.split(","), limit=args.limit, shots=args.shots)
    with torch.inference_mode():  # first-call overheads (allocator, kernels) are paid before timing
        model(input_ids=torch.tensor([tokenizer("warm up").input_ids], device=model.device))

    fast: list[Prediction] = []
    slow: list[Prediction] = []
    seconds = {"fast": 0.0, "reference": 0.0}
    for subject, subject_data in data.items():
        for name, out in (("fast", fast), ("reference", slow)):
            start = time.perf_counter()
            out += score_mmlu(
                model, tokenizer, {subject: subject_data}, shots=args.shots, batch_size=args.batch_size,
                reference=name == "reference",
            )  # fmt: skip
            seconds[name] += time.perf_counter() - start

    n = len(fast)
    same = sum(f.pred == s.pred for f, s in zip(fast, slow, strict=True))
    max_diff = max(abs(a - b) for f, s in zip(fast, slow, strict=True) for a, b in zip(f.loglik, s.loglik, strict=True))
    figures = {
        "model": description,
        "device": str(next(model.parameters()).device),
        "threads": torch.get_num_threads(),
        "subjects": list(data),
        "questions": n,
        "shots": args.shots,
        "batch_size": args.batch_size,
        "fast_questions_per_s": n / seconds["fast"],
        "reference_questions_per_s": n / seconds["reference"],
        "speedup": seconds["reference"] / seconds["fast"],
        "identical_predictions": same / n,
        "max_abs_loglik_diff": max_diff,
        "fast_acc": sum(p.pred == p.gold for p in fast) / n,
        "reference_acc": sum(p.pred == p.gold for p in slow) / n,
    }
    print(f"model {description} on {figures['device']} ({figures['threads']} threads), {n} questions, "
          f"{args.shots}-shot, subjects {','.join(data)}")  # fmt: skip
    print(f"reference (full prompt per question): {figures['reference_questions_per_s']:.3f} questions/s")
    print(f"fast (cached prefix, batch {args.batch_size}):       {figures['fast_questions_per_s']:.3f} questions/s")
    print(f"speed-up: {figures['speedup']:.2f}x")
    print(f"identical predictions: {same}/{n} ({100 * same / n:.1f}%), max |d loglik| {max_diff:.2e}")
    print(f"accuracy: fast {100 * figures['fast_acc']:.1f}%, reference {100 * figures['reference_acc']:.1f}%")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
