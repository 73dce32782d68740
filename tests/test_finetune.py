"""`velora finetune`: real training steps on a tiny LLaMA and on the embedded model (nf4 + LoRA + VeLoRA, CPU),
the run directory a user gets, resume equivalence, interruption, and the guards around training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from velora_cli.common.errors import RecipeError, TrainingAborted
from velora_cli.config.load import validate_recipe
from velora_cli.finetune.pipeline import run_pipeline
from velora_cli.finetune.session import FinetuneSession

DEMO_DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "demo_tasks_train.json"


def tiny_recipe(model_dir: Path, run_dir: Path, **train) -> dict:
    return {
        "name": "tiny",
        "model": {"name": str(model_dir), "quantization": "nf4"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05},
        "velora": {"layers": ["v", "d"], "num_groups": 8},
        "data": {"path": str(DEMO_DATA), "template": "chat", "cutoff_len": 64, "val_set_size": 8},
        "train": {"micro_batch_size": 2, "batch_size": 4, "max_steps": 4, "learning_rate": 1e-3,
                  "logging_steps": 2, "save_steps": 2, "save_total_limit": 3, **train},
        "output": {"dir": str(run_dir)},
    }  # fmt: skip


def write_recipe(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


@pytest.mark.slow
def test_training_writes_a_complete_run_directory(tmp_path: Path, tiny_llama_dir: Path) -> None:
    run_dir = tmp_path / "run"
    summary = run_pipeline(write_recipe(tmp_path, tiny_recipe(tiny_llama_dir, run_dir)), overrides=[])

    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "recipe.yaml",
                 "velora_projections.safetensors", "metrics.jsonl", "summary.json"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    assert not (run_dir / ".staging").exists()
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (run_dir / "checkpoint-2" / "velora_projections.safetensors").is_file()

    # The adapter is plain PEFT LoRA that PeftModel loads, and training moved lora_B away from zero.
    weights = adapter_weights(run_dir)
    assert all("lora_A" in k or "lora_B" in k for k in weights)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), run_dir)

    vectors = load_file(str(run_dir / "velora_projections.safetensors"))
    v = {k: t for k, t in vectors.items() if k.endswith("velora_v")}
    assert len(v) == 4 and all(abs(t.norm() - 1) < 1e-5 for t in v.values())  # unit vectors
    # 8 sub-tokens per token: v_proj's 64-wide input -> M = 8, down_proj's 128-wide input -> M = 16
    assert {k.split(".")[-4]: t.shape[0] for k, t in v.items()} == {"v_proj": 8, "down_proj": 16}

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_logs] == [1, 2, 4]  # the first step logged too (issue 27: the panel from step 1)
    assert all(r["tokens_per_second"] > 0 and r["memory_bytes"]["peak"] > 0 for r in train_logs)
    assert train_logs[0]["activation_bytes_per_token"] > 0

    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["stages"]["train"]["status"] == "done" and saved["train"]["steps"] == 4
    assert saved["velora"] == summary["velora"] and saved["velora"]["layers"] == ["v_proj", "down_proj"]
    assert saved["train"]["eval_loss"] > 0 and saved["train"]["velora_saved_bytes_per_token"] > 0
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["model"]["name"] == str(tiny_llama_dir)


@pytest.mark.slow
def test_evaluating_before_training_does_not_change_training(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """`velora finetune` scores the validation split and the held-out tasks before training. That must leave the
    run exactly as if it had not: the same batches and dropout masks (global RNG untouched) and gradients still
    flowing through the nf4 layers (bitsandbytes repacks them for an autograd-less CPU kernel after an eval-mode
    forward unless told not to)."""
    data = tiny_recipe(tiny_llama_dir, tmp_path / "evaluated", max_steps=2, save_steps=10)
    data["eval"] = {"heldout": {"enabled": True, "path": str(DEMO_DATA), "limit": 2}}
    run_pipeline(write_recipe(tmp_path, data), overrides=[])  # not --stages train, which skips the held-out scoring

    plain = validate_recipe(tiny_recipe(tiny_llama_dir, tmp_path / "plain", max_steps=2, save_steps=10))
    session = FinetuneSession(plain, tmp_path / "plain")
    session.setup()
    session.train(display=False)
    session.save()

    evaluated, direct = adapter_weights(tmp_path / "evaluated"), adapter_weights(tmp_path / "plain")
    assert any(v.abs().sum() > 0 for k, v in direct.items() if "lora_B" in k)
    for name, tensor in direct.items():
        assert torch.equal(evaluated[name], tensor), name


class CrashAt(TrainerCallback):
    """Simulates a crash (kill -9, power loss) right after step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_with_the_same_adapter(tmp_path: Path, tiny_llama_dir: Path) -> None:
    straight = validate_recipe(tiny_recipe(tiny_llama_dir, tmp_path / "straight", max_steps=6, save_steps=3))
    session = FinetuneSession(straight, tmp_path / "straight")
    session.setup()
    session.train(display=False)
    session.save()

    crashed = validate_recipe(tiny_recipe(tiny_llama_dir, tmp_path / "crashed", max_steps=6, save_steps=3))
    first = FinetuneSession(crashed, tmp_path / "crashed")
    first.setup()
    first.trainer.add_callback(CrashAt(5))
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.train(display=False)
    assert [p.name for p in (tmp_path / "crashed").glob("checkpoint-*")] == ["checkpoint-3"]
    del first

    resumed = FinetuneSession(crashed, tmp_path / "crashed")
    resumed.setup()
    result = resumed.train(resume=True, display=False)
    resumed.save()
    assert result.steps == 6

    a, b = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "crashed")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    va = load_file(str(tmp_path / "straight" / "velora_projections.safetensors"))
    vb = load_file(str(tmp_path / "crashed" / "velora_projections.safetensors"))
    for key in va:
        torch.testing.assert_close(va[key], vb[key])


class DivergeAfter(TrainerCallback):
    """Makes the weights blow up at the start of the step after `step`, as a diverging run would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("inf"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = validate_recipe(tiny_recipe(tiny_llama_dir, tmp_path / "run", max_steps=6, save_steps=1))
    session = FinetuneSession(recipe, tmp_path / "run")
    session.setup()
    session.trainer.add_callback(DivergeAfter(2))
    with pytest.raises(TrainingAborted, match=r"loss became (nan|inf) at step 3; training stopped") as info:
        session.train(display=False)
    assert f"last good checkpoint: {tmp_path / 'run' / 'checkpoint-2'}" in str(info.value)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert all(torch.isfinite(t).all() for t in adapter_weights(tmp_path / "run" / "checkpoint-2").values())


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_the_rerun_resumes(tmp_path: Path, tiny_llama_dir: Path) -> None:
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_llama_dir, run_dir, max_steps=400, save_steps=1000,
                                                logging_steps=1))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "velora_cli", "finetune", str(recipe)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stderr and "Run the same command again to resume" in stderr
    checkpoints = list(run_dir.glob("checkpoint-*"))
    assert len(checkpoints) == 1
    step = int(checkpoints[0].name.split("-")[1])
    assert 2 <= step < 400

    rerun = subprocess.run(
        [sys.executable, "-m", "velora_cli", "finetune", str(recipe), "--max-steps", str(step + 2)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((run_dir / "summary.json").read_text())["train"]["steps"] == step + 2
    steps_logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"loss"' in x]
    assert steps_logged[-2:] == [step + 1, step + 2]  # continued, not restarted


def test_dry_run_validates_shapes_and_writes_nothing(tmp_path: Path, tiny_llama_dir: Path) -> None:
    run_dir = tmp_path / "run"
    data = tiny_recipe(tiny_llama_dir, run_dir)
    plan = run_pipeline(write_recipe(tmp_path, data), overrides=[], dry_run=True)
    assert plan["steps"] == 4 and plan["estimated_total_bytes"] > 0
    assert not run_dir.exists()
    with pytest.raises(RecipeError, match=r"^velora\.num_groups=6: layer .*v_proj has input depth 64, which"):
        run_pipeline(write_recipe(tmp_path, data), overrides=["velora.num_groups=6"], dry_run=True)
    with pytest.raises(RecipeError, match=r"^lora\.target_modules=\['c_attn'\]: Target modules \{'c_attn'\} not found"):
        run_pipeline(write_recipe(tmp_path, data), overrides=["lora.target_modules=[c_attn]", "velora.enabled=false"],
                     dry_run=True)  # fmt: skip
    assert not run_dir.exists()


def test_batch_size_must_split_over_processes(tmp_path: Path, tiny_llama_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    recipe = validate_recipe(tiny_recipe(tiny_llama_dir, tmp_path / "run"))
    with pytest.raises(RecipeError, match="train: batch_size 4 is not a multiple of micro_batch_size x processes = 6"):
        FinetuneSession(recipe, tmp_path / "run").setup()


@pytest.mark.slow
def test_gradient_checkpointing_trains_with_the_totals_meter(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """train.gradient_checkpointing is memory.checkpointing: all, applied per layer by apply_lean (non-reentrant);
    the first-step meter (attribute=False) sees each layer's kept input."""
    recipe = validate_recipe(tiny_recipe(tiny_llama_dir, tmp_path / "run", max_steps=2, gradient_checkpointing=True))
    assert recipe.memory.checkpointing == "all"
    session = FinetuneSession(recipe, tmp_path / "run")
    session.setup()
    layers = session.model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    result = session.train(display=False)
    assert result.steps == 2 and result.activation_bytes_per_token


@pytest.mark.slow
def test_embedded_model_trains_with_nf4_and_velora(tmp_path: Path, embedded_model_dir: Path) -> None:
    data = tiny_recipe(embedded_model_dir, tmp_path / "run", max_steps=2, micro_batch_size=1, batch_size=1,
                       logging_steps=1, save_steps=10)  # fmt: skip
    data["model"]["name"] = "embedded:smollm2-135m"
    data["velora"]["num_groups"] = 32
    data["data"]["val_set_size"] = 0
    recipe = validate_recipe(data)
    session = FinetuneSession(recipe, tmp_path / "run")
    session.setup()
    assert len(session.compressed) == 60  # v_proj and down_proj of 30 layers
    assert type(session.model.base_model.model.model.layers[0].self_attn.v_proj.base_layer).__name__ == "Linear4bit"
    result = session.train(display=False)
    session.save()
    assert result.steps == 2 and result.train_loss is not None and result.train_loss == result.train_loss
    assert result.activation_bytes_per_token and result.velora_saved_bytes_per_token > 0
    assert any(v.abs().sum() > 0 for k, v in adapter_weights(tmp_path / "run").items() if "lora_B" in k)
