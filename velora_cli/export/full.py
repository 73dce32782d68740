"""Export of a run without adapters (method full / pretrain): its final weights written as a plain model folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from velora_cli.common.device import dtype_name
from velora_cli.common.errors import UsageError
from velora_cli.common.fs import staged_dir
from velora_cli.export.options import check_target, default_out, quiet_transformers
from velora_cli.models.load import (
    first_line,
)
from velora_cli.rundir.layout import (
    ADAPTER_CONFIG,
    MODEL_CONFIG,
    RECIPE_FILE,
    read_run_recipe,
)
from velora_cli.rundir.ownership import EXPORT_MARKER, claim


def full_model_dir(run_dir: Path, checkpoint: int | None) -> Path | None:
    """A method full/pretrain run holds a whole model (config.json, no adapter): where, or None."""
    path = run_dir / f"checkpoint-{checkpoint}" if checkpoint is not None else run_dir
    has_model = (path / MODEL_CONFIG).is_file() and not (path / ADAPTER_CONFIG).is_file()
    return path if has_model and (run_dir / RECIPE_FILE).is_file() else None


def export_full(run_dir: Path, out: Path | None, dtype: torch.dtype, checkpoint: int | None, shard: int, force: bool,
                recipe=None):
    """A full/pretrain run: nothing to merge; the model is loaded in `dtype` and saved again (models/full.py)."""
    from velora_cli.export.card import full_model_card

    recipe = recipe or read_run_recipe(run_dir)
    target = Path(out) if out is not None else default_out(run_dir, checkpoint, False)
    check_target(target, run_dir, force)
    recipe_text = (run_dir / RECIPE_FILE).read_text(encoding="utf-8")
    card = full_model_card(recipe, recipe_text, run_dir, dtype_name(dtype))
    with quiet_transformers():
        return export_full_model(full_model_dir(run_dir, checkpoint), target, dtype, shard, card)


def export_full_model(model_dir: Path, target: Path, dtype: torch.dtype, shard_bytes: int, card: str) -> Path:
    """Copy a full/pretrain run's model (RUN_DIR or checkpoint-N) to `target` in `dtype`: load, save, staged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{model_dir}: cannot load the trained model: {first_line(exc)}") from exc
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise UsageError(f"{model_dir}: weight {name} is not finite (NaN/inf); the run diverged")
    with staged_dir(target) as staging:
        claim(staging, EXPORT_MARKER)
        model.config.use_cache = True
        model.save_pretrained(staging, max_shard_size=shard_bytes)
        tokenizer_dir = model_dir if (model_dir / "tokenizer_config.json").is_file() else model_dir.parent
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(staging)
        (staging / "README.md").write_text(card, encoding="utf-8")
        if (model_dir / "generation_config.json").is_file() and not (staging / "generation_config.json").exists():
            shutil.copy2(model_dir / "generation_config.json", staging / "generation_config.json")
    return target
