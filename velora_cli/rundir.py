"""The run directory: the one place that knows its layout.

RUN_DIR/
  adapter_config.json, adapter_model.safetensors   the PEFT adapter (PeftModel.from_pretrained loads it)
  tokenizer files
  recipe.yaml                  the resolved recipe (model.name is the base model reference)
  velora_projections.safetensors   the frozen VeLoRA projection vectors
  metrics.jsonl                one JSON object per logging / eval step
  summary.json                 what the run cost and how good it is
  checkpoint-N/                Trainer checkpoints (adapter + optimizer + RNG + VeLoRA vectors)
  eval/mmlu.json               MMLU results
  merged/                      the merged export (default location)
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from velora_cli.errors import UsageError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RECIPE_FILE = "recipe.yaml"
VELORA_VECTORS = "velora_projections.safetensors"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MMLU_FILE = "eval/mmlu.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def is_run_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and (path / RECIPE_FILE).is_file()


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (staging dirs never match the name pattern)."""
    found = [(int(m.group(1)), p) for p in run_dir.glob("checkpoint-*") if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found) if (p / ADAPTER_CONFIG).is_file()]


def adapter_dir(run_dir: Path, checkpoint: int | None = None) -> Path:
    """Where the adapter to load lives: the final one, or checkpoint-N. UsageError if absent."""
    if checkpoint is not None:
        path = run_dir / f"checkpoint-{checkpoint}"
        if not (path / ADAPTER_CONFIG).is_file():
            have = ", ".join(p.name for p in checkpoints(run_dir)) or "none"
            raise UsageError(f"{run_dir}: no adapter in checkpoint-{checkpoint} (checkpoints: {have})")
        return path
    if not (run_dir / ADAPTER_CONFIG).is_file():
        raise UsageError(f"{run_dir}: no adapter found ({ADAPTER_CONFIG} missing); is this a finished finetune run?")
    return run_dir


def read_recipe(run_dir: Path):
    """The resolved recipe a run was trained with."""
    from velora_cli.recipe import load_recipe

    path = run_dir / RECIPE_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir}: {RECIPE_FILE} missing; is this a velora run directory?")
    return load_recipe(path)


def latest_run(root: Path = Path("runs")) -> Path:
    """The most recently written run directory under `root` (for commands that default to it)."""
    runs = [p for p in root.glob("*") if p.is_dir() and is_run_dir(p)] if root.is_dir() else []
    if not runs:
        raise UsageError(f"no finished run found under {root}/; pass --model or run `velora finetune` first")
    return max(runs, key=lambda p: (p / ADAPTER_CONFIG).stat().st_mtime)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path` and rename it, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
