"""`train.report_to: [tensorboard]`: the scalars a run logs reach a TensorBoard event file, the same numbers
metrics.jsonl holds; without the package the recipe is refused before any model loads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from velora_cli.common.errors import RecipeError
from velora_cli.finetune.pipeline import run_pipeline

DEMO_DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "demo_tasks_train.json"


def _recipe(tmp_path: Path, model_dir: Path) -> Path:
    recipe = {
        "name": "tb",
        "method": "lora",
        "model": {"name": str(model_dir), "quantization": "none"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"path": str(DEMO_DATA), "cutoff_len": 64},
        "train": {"micro_batch_size": 2, "batch_size": 2, "max_steps": 3, "logging_steps": 1, "save_steps": 3,
                  "report_to": ["tensorboard"]},
        "output": {"dir": str(tmp_path / "run")},
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_scalars_reach_the_event_file(tmp_path: Path, tiny_llama_dir: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_pipeline(_recipe(tmp_path, tiny_llama_dir), overrides=[])
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    losses = {event.step: event.value for event in accumulator.Scalars("train/loss")}
    rates = {event.step: event.value for event in accumulator.Scalars("train/learning_rate")}
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = {r["step"]: r["loss"] for r in logged if "loss" in r}
    assert sorted(losses) == sorted(expected) == [1, 2, 3]
    assert losses == pytest.approx(expected, rel=1e-6)  # float32 in the event file
    assert rates == pytest.approx({r["step"]: r["learning_rate"] for r in logged if "loss" in r}, rel=1e-6)


def test_a_missing_backend_is_a_recipe_error(tmp_path: Path, tiny_llama_dir: Path, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    expected = r"^train.report_to: tensorboard is not installed \(pip install tensorboard\)$"
    with pytest.raises(RecipeError, match=expected):
        run_pipeline(_recipe(tmp_path, tiny_llama_dir), overrides=[])
    assert not (tmp_path / "run").exists()
