"""metrics.jsonl: one strict-JSON object per logging or eval step, appended while a run trains.

Read back leniently (a line cut short by a kill is skipped) and, when a run resumes from checkpoint-N, cut back
to the records of steps <= N, rewritten whole through the staged-write helper: the steps after N are trained
again and would otherwise be logged twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from velora_cli.common.fs import write_text_atomic
from velora_cli.rundir.layout import METRICS_FILE


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records; a line cut short by a kill (or otherwise unreadable) is left out."""
    path = Path(run_dir) / METRICS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep metrics.jsonl's records up to `step` (the checkpoint a run resumes from): the steps after it are
    trained again, and would otherwise be logged twice. Rewritten whole (staged), never edited in place."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = [r for r in read_metrics(run_dir) if r["step"] <= step]
    write_text_atomic(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
