"""MMLU results: score loaded data and summarise accuracy per subject, per category and overall.

Overall accuracy pools all questions: the size-weighted mean of the subjects, the paper's "mean 5-shot MMLU
accuracy". The results dict (`summarize`, plus timing and data source from `evaluate_mmlu`) is what
`velora eval --json` and RUN_DIR/eval/mmlu.json hold.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from velora_cli.eval.mmlu_data import CATEGORIES, HUB_DATASET, UNCATEGORIZED, SubjectData, category_of, load_mmlu
from velora_cli.eval.scorer import Prediction, score_mmlu


def accuracy(preds: Sequence[Prediction]) -> dict[str, Any]:
    correct = sum(p.pred == p.gold for p in preds)
    return {"acc": correct / len(preds) if preds else 0.0, "n": len(preds)}


def summarize(predictions: Sequence[Prediction], *, shots: int, split: str, model: str = "") -> dict[str, Any]:
    """The results JSON: accuracy per subject, per category and overall (pooled over all questions)."""
    by_subject: dict[str, list[Prediction]] = defaultdict(list)
    for p in predictions:
        by_subject[p.subject].append(p)
    by_category: dict[str, list[Prediction]] = defaultdict(list)
    for subject, preds in by_subject.items():
        by_category[category_of(subject)] += preds
    order = [*CATEGORIES, UNCATEGORIZED]
    return {
        "model": model,
        "split": split,
        "shots": shots,
        "overall": accuracy(predictions),
        "categories": {c: accuracy(by_category[c]) for c in order if c in by_category},
        "subjects": {s: {**accuracy(by_subject[s]), "category": category_of(s)} for s in sorted(by_subject)},
        "prompts_with_fewer_shots": sum(p.shots < shots for p in predictions),
    }


def evaluate_mmlu(
    model: Any,
    tokenizer: Any,
    *,
    data_dir: Path | None,
    subjects: list[str] | None = None,
    limit: int | None = None,
    shots: int = 5,
    batch_size: int = 8,
    split: str = "test",
    progress: Callable[[int, int], None] | None = None,
    model_name: str = "",
) -> dict[str, Any]:
    """Load MMLU, score `model`, return the results dict (see `summarize`; plus timing and data source)."""
    data = load_mmlu(data_dir, split=split, subjects=subjects, limit=limit, shots=shots)
    return evaluate_loaded(
        model,
        tokenizer,
        data,
        data_dir=data_dir,
        limit=limit,
        shots=shots,
        batch_size=batch_size,
        split=split,
        progress=progress,
        model_name=model_name,
    )[0]


def evaluate_loaded(
    model: Any,
    tokenizer: Any,
    data: dict[str, SubjectData],
    *,
    data_dir: Path | None,
    limit: int | None,
    shots: int,
    batch_size: int,
    split: str,
    progress: Callable[[int, int], None] | None,
    model_name: str,
    on_subject: Callable[[str, list[Prediction]], None] | None = None,
) -> tuple[dict[str, Any], list[Prediction]]:
    start = time.perf_counter()
    predictions = score_mmlu(
        model, tokenizer, data, shots=shots, batch_size=batch_size, progress=progress, on_subject=on_subject
    )
    seconds = time.perf_counter() - start
    result = summarize(predictions, shots=shots, split=split, model=model_name)
    result.update(
        data=str(data_dir) if data_dir is not None else "/".join(HUB_DATASET),
        limit=limit,
        seconds=round(seconds, 2),
        questions_per_second=round(len(predictions) / seconds, 3) if seconds > 0 else None,
    )
    return result, predictions
