"""Faults `velora finetune` must survive: kill -9 at several points, then a rerun that ends exactly where an
uninterrupted run ends (same adapter, bit for bit; metrics.jsonl with every step once; a right summary.json);
non-finite losses, gradients and weights; two processes on one run directory; a disk that fills up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from velora_cli.common.errors import TrainingAborted
from velora_cli.config.load import validate_recipe
from velora_cli.finetune.callbacks import RunMonitor
from velora_cli.finetune.session import FinetuneSession

TESTS = Path(__file__).resolve().parent
DEMO_DATA = TESTS.parent / "recipes" / "data" / "demo_tasks_train.json"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def recipe_data(model_dir: Path, run_dir: Path, **train) -> dict:
    return {
        "name": "faults",
        "model": {"name": str(model_dir), "quantization": "nf4"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05},
        "velora": {"layers": ["v", "d"], "num_groups": 8},
        "data": {"path": str(DEMO_DATA), "template": "chat", "cutoff_len": 64, "val_set_size": 4},
        # save_total_limit 1: the rotation must never remove the only complete checkpoint
        "train": {"micro_batch_size": 2, "batch_size": 2, "max_steps": 6, "learning_rate": 1e-3,
                  "logging_steps": 1, "save_steps": 2, "save_total_limit": 1, **train},
        "output": {"dir": str(run_dir)},
        "export": {"enabled": True, "dtype": "bf16"},
    }  # fmt: skip


def write_recipe(directory: Path, data: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def velora(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "velora_cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)  # fmt: skip


def killed_at(point: str, step: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TESTS / "fault_child.py"), point, str(step), "--", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys(), a
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"{a.name}: {key} differs"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]  # strict: raises


def leftovers(run_dir: Path) -> list[str]:
    """Hidden staging files and directories, and checkpoints that are not complete (the lock file and the ownership
    markers, rundir.ownership, are velora's on purpose)."""
    from velora_cli.rundir.ownership import EXPORT_MARKER, RUN_MARKER

    hidden = [p.name for p in run_dir.rglob(".*") if p.name not in (".velora.lock", RUN_MARKER, EXPORT_MARKER)]
    partial = [p.name for p in run_dir.glob("checkpoint-*") if not (p / "trainer_state.json").is_file()
               or not (p / "velora_projections.safetensors").is_file()]  # fmt: skip
    return hidden + partial


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run (train + export), by the same command in the same kind of process."""
    base = tmp_path_factory.mktemp("reference")
    run_dir = base / "run"
    result = velora("finetune", str(write_recipe(base, recipe_data(tiny_llama_dir, run_dir))))
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "step"),
    [("step", 3), ("checkpoint", 4), ("vectors", 4), ("final", 6), ("export", 0)],
    ids=["during-step-3", "writing-checkpoint-4", "checkpoint-4-before-vectors", "after-last-checkpoint",
         "during-export"],
)  # fmt: skip
def test_kill_9_then_rerun_ends_like_an_uninterrupted_run(
    point: str, step: int, reference: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, recipe_data(tiny_llama_dir, run_dir))
    killed = killed_at(point, step, "finetune", str(recipe))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    rerun = velora("finetune", str(recipe))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Traceback" not in rerun.stderr
    assert "7/6" not in rerun.stderr + rerun.stdout  # no step past the last

    assert_same_tensors(run_dir / "adapter_model.safetensors", reference / "adapter_model.safetensors")
    assert_same_tensors(run_dir / "velora_projections.safetensors", reference / "velora_projections.safetensors")
    assert_same_tensors(run_dir / "merged" / "model.safetensors", reference / "merged" / "model.safetensors")
    records = metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # each step once, in order
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"]["steps"] == 6
    assert {k: v["status"] for k, v in summary["stages"].items()} == {"train": "done", "export": "done"}
    assert summary["train"]["train_loss"] == [r["loss"] for r in records if "loss" in r][-1]
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-6"]
    assert leftovers(run_dir) == [] and not any(p.name.startswith(".merged") for p in run_dir.iterdir())

    again = velora("finetune", str(recipe))  # a finished run: nothing to do, nothing rewritten
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr
    assert json.loads((run_dir / "summary.json").read_text()) == summary


# ------------------------------------------------------------------------------------------- non-finite values


class PoisonGradients(TrainerCallback):
    """From step `step` on, every gradient of one lora_B weight is NaN (the loss stays finite)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            param = next(p for n, p in model.named_parameters() if "lora_B" in n)
            param.register_hook(lambda grad: grad * float("nan"))


class PoisonWeights(TrainerCallback):
    """NaN into one lora_B weight right after optimizer step `step`, before that step's checkpoint is written."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))


def _session(tiny_llama_dir: Path, run_dir: Path, callback: TrainerCallback) -> FinetuneSession:
    recipe = validate_recipe(recipe_data(tiny_llama_dir, run_dir, save_total_limit=3))
    session = FinetuneSession(recipe, run_dir)
    session.setup()
    session.trainer.add_callback(callback)
    return session


def _finite(checkpoint: Path) -> bool:
    return all(torch.isfinite(t).all() for t in tensors(checkpoint / "adapter_model.safetensors").values())


def test_nan_gradient_stops_before_the_optimizer_step(tiny_llama_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    session = _session(tiny_llama_dir, run_dir, PoisonGradients(3))
    with pytest.raises(TrainingAborted, match=r"gradient became non-finite \(NaN/inf\) at step 3") as info:
        session.train(display=False)
    assert f"last good checkpoint: {run_dir / 'checkpoint-2'}" in str(info.value)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    assert _finite(run_dir / "checkpoint-2")
    assert all(torch.isfinite(p).all() for p in session.model.parameters() if p.requires_grad)  # never stepped
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2]


def test_non_finite_weights_never_reach_a_checkpoint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    session = _session(tiny_llama_dir, run_dir, PoisonWeights(4))
    with pytest.raises(TrainingAborted, match=r"adapter weights are not finite \(NaN/inf\) at step 4") as info:
        session.train(display=False)
    assert f"last good checkpoint: {run_dir / 'checkpoint-2'}" in str(info.value)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2"]  # checkpoint-4 discarded
    assert _finite(run_dir / "checkpoint-2")


def test_non_finite_metrics_are_strict_json_null_with_a_flag(tmp_path: Path) -> None:
    class State:
        is_world_process_zero, global_step, epoch, num_input_tokens_seen = True, 3, 0.5, 0

    class Guard:
        activation_bytes_per_token, trained_tokens = None, 0

    monitor = RunMonitor(tmp_path / "metrics.jsonl", None, torch.device("cpu"), Guard())
    args = SimpleNamespace(train_batch_size=2, gradient_accumulation_steps=1)
    monitor.on_log(args, State(), None, logs={"loss": float("nan"), "grad_norm": float("inf"), "learning_rate": 1e-3})
    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=pytest.fail)
    assert record["loss"] is None and record["grad_norm"] is None and record["learning_rate"] == 1e-3
    assert record["non_finite"] == ["loss", "grad_norm"]


# ----------------------------------------------------------------------------------------------- concurrency


@pytest.mark.slow
def test_a_second_process_on_the_same_run_dir_stops_at_once(tiny_llama_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, recipe_data(tiny_llama_dir, run_dir, max_steps=2000, save_steps=1000))
    first = subprocess.Popen([sys.executable, "-m", "velora_cli", "finetune", str(recipe)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "metrics.jsonl").is_file() and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.3)
        started = time.monotonic()
        second = velora("finetune", str(recipe))
        seconds = time.monotonic() - started
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert lines == [f"error: {run_dir}: in use by another velora process (pid {first.pid}); wait for it to "
                         "finish or stop it"], second.stderr  # fmt: skip
        assert seconds < 60  # interpreter start-up and imports; no checks, no model
        assert first.poll() is None  # the first one goes on
    finally:
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=240)
    assert first.returncode == 130, stderr
    steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaving


# ------------------------------------------------------------------------------------------------- full disk


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tiny_disk, tiny_llama_dir: Path,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    disk = tiny_disk(2)  # MiB: the checkpoints fit, the final adapter + tokenizer (~3.5 MB) does not
    run_dir = disk / "run"
    recipe = write_recipe(tmp_path, recipe_data(tiny_llama_dir, run_dir, max_steps=2))
    result = velora("finetune", str(recipe))
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors[0].startswith(f"error: {run_dir}: no space left on the device"), result.stderr
    assert result.stderr.rstrip().endswith(errors[0])  # the last word, after the plan and the steps
    assert leftovers(run_dir) == []
    assert not (run_dir / ".staging").exists()
    import shutil

    assert shutil.disk_usage(disk).free > 512 * 1024  # the partial files were removed, the space is back
