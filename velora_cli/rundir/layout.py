"""Run directories: their layout, the one staged-write helper, the typed run summary and the run listing.

Owns where every file of a finetune run lives, how any file or directory the tool writes is put in place (staged
beside its target, then renamed, so readers never see half of it), `RunSummary` (summary.json, written and read
only here: what a run cost and how good it is, one dataclass per part; the description of the run's method is
description.py's), and the data behind `velora runs`.

RUN_DIR/
  adapter_config.json, adapter_model.safetensors   the PEFT adapter (PeftModel.from_pretrained loads it)
  tokenizer files
  recipe.yaml                  the resolved recipe (model.name is the base model reference)
  velora_projections.safetensors   the VeLoRA projection vectors (velora.state.VECTORS_FILE)
  metrics.jsonl                one JSON object per logging / eval step
  summary.json                 what the run cost and how good it is
  checkpoint-N/                Trainer checkpoints (adapter + optimizer + RNG + VeLoRA vectors)
  eval/mmlu.json               MMLU results
  merged/                      the merged export (default location)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from velora_cli.common.errors import UsageError
from velora_cli.config.load import load_recipe
from velora_cli.config.recipe import Recipe
from velora_cli.engine.config import VECTORS_FILE


def read_run_recipe(run_dir: Path) -> Recipe:
    """The resolved recipe a run was trained with (RUN_DIR/recipe.yaml)."""
    path = run_dir / RECIPE_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir}: {RECIPE_FILE} missing; is this a velora run directory?")
    return load_recipe(path)


ADAPTER_CONFIG = "adapter_config.json"

ADAPTER_WEIGHTS = "adapter_model.safetensors"

RECIPE_FILE = "recipe.yaml"

METRICS_FILE = "metrics.jsonl"

SUMMARY_FILE = "summary.json"

MMLU_FILE = "eval/mmlu.json"

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

MODEL_CONFIG = "config.json"  # a full/pretrain run (or its checkpoint) holds a whole model, not an adapter

TRAINER_STATE = "trainer_state.json"  # transformers' Trainer writes it last into each checkpoint


# An FSDP checkpoint with distributed.fsdp.state_dict: sharded holds every rank's shards here (accelerate's name,
# torch.distributed.checkpoint's layout) instead of an adapter or model.
SHARDED_WEIGHTS = "pytorch_model_fsdp_0"


def has_weights(path: Path) -> bool:
    """An adapter (qlora/lora) or a whole model (full/pretrain) was saved here."""
    return (path / ADAPTER_CONFIG).is_file() or (path / MODEL_CONFIG).is_file()


def checkpoint_has_weights(path: Path) -> bool:
    """A checkpoint holds its weights whole (as has_weights) or as FSDP shards."""
    return has_weights(path) or (path / SHARDED_WEIGHTS).is_dir()


def is_run_dir(path: Path) -> bool:
    return has_weights(path) and (path / RECIPE_FILE).is_file()


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-N directory, complete or not, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("checkpoint-*") if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (staging dirs never match the name pattern)."""
    return [p for _, p in checkpoint_dirs(run_dir) if checkpoint_has_weights(p)]


def checkpoint_step(path: Path) -> int | None:
    """The global step a checkpoint's trainer_state.json records; None when it is missing or half-written."""
    try:
        step = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8")).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def resumable_checkpoints(run_dir: Path, velora: bool = False) -> list[Path]:
    """Checkpoints a run can resume from, oldest first. The Trainer writes trainer_state.json last (a kill while
    writing it leaves JSON that does not parse) and the VeloraCallback adds the projection vectors after it, so a
    checkpoint killed half-way fails one of these checks."""
    return [
        path
        for path in checkpoints(run_dir)
        if checkpoint_step(path) is not None and (not velora or (path / VECTORS_FILE).is_file())
    ]


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


def latest_run(root: Path = Path("runs")) -> Path:
    """The most recently written run directory under `root` (for commands that default to it)."""
    runs = [p for p in root.glob("*") if p.is_dir() and is_run_dir(p)] if root.is_dir() else []
    if not runs:
        raise UsageError(f"no finished run found under {root}/; pass --model or run `velora finetune` first")
    return max(runs, key=lambda p: (p / RECIPE_FILE).stat().st_mtime)
