"""`velora finetune` under torchrun: two CPU processes on the gloo backend train one adapter with DDP.

What users depend on: the run succeeds, rank 0 alone writes the adapter, checkpoints, metrics and summary;
the recipe's batch_size is the global batch (accumulation is divided by the number of processes); every
rank ends with the same weights and compresses with the same VeLoRA vectors (rank 0's); a batch_size that
cannot be split over the processes is one clear error line.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEMO_TASKS = REPO / "recipes" / "data" / "demo_tasks_train.json"
TIMEOUT = 300

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="torch.distributed with gloo is not available",
    ),
]


def recipe_dict(model_dir: Path, run_dir: Path, **train: object) -> dict:
    return {
        "name": "ddp",
        "model": {"name": str(model_dir), "quantization": "nf4"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": ["qkvogud"]},
        "velora": {"enabled": True, "layers": ["v", "d"], "num_groups": 4},
        "data": {"path": str(DEMO_TASKS), "val_set_size": 8, "cutoff_len": 96, "template": "alpaca"},
        "train": {
            "micro_batch_size": 1,
            "batch_size": 4,
            "max_steps": 3,
            "learning_rate": 1e-2,
            "warmup_steps": 0,
            "logging_steps": 1,
            "save_steps": 2,
            "save_total_limit": 2,
            **train,
        },
        "output": {"dir": str(run_dir)},
    }


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS` (standalone: a free port, so parallel runs don't clash)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COLUMNS="200")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_finetune_under_torchrun_trains_one_adapter(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from velora_cli.config.load import validate_recipe
    from velora_cli.finetune.session import FinetuneSession

    run_dir = tmp_path / "run"
    recipe = recipe_dict(tiny_llama_dir, run_dir)
    path = write_recipe(tmp_path / "ddp.yaml", recipe)

    proc = torchrun(["-m", "velora_cli", "finetune", str(path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    # The plan (printed by rank 0 only) shows the global batch split over the two processes.
    assert log.count("4 = 1 micro x 2 accumulation x 2 processes") == 1, log[-4000:]

    # One adapter, written by rank 0, that PEFT loads onto the unquantised base; training moved lora_B off zero.
    weights = load_file(str(run_dir / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert len(lora_b) == 2 * 7  # 2 layers x 7 projections
    assert all(torch.isfinite(v).all() and v.abs().max() > 0 for v in lora_b.values())
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run_dir)
    name, saved = next(iter(lora_b.items()))
    loaded = dict(model.named_parameters())[name.replace("lora_B.weight", "lora_B.default.weight")]
    assert torch.equal(loaded.detach(), saved)
    assert (run_dir / "velora_projections.safetensors").is_file()
    assert not (run_dir / ".staging").exists()

    # metrics.jsonl: one line per logged step, not one per rank.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert sum("eval_loss" in r for r in records) == 1
    # Throughput counts every rank's tokens once: per log window, tokens/s over rows/s is the window's tokens
    # per row (4 rows per step), so the windows add up to the Trainer's count of tokens across both ranks.
    state = json.loads((run_dir / "checkpoint-3" / "trainer_state.json").read_text())
    windows = [r["tokens_per_second"] / r["samples_per_second"] * 4 for r in records if "loss" in r]
    assert sum(windows) == pytest.approx(state["num_input_tokens_seen"], rel=1e-6)

    # Checkpoints carry both ranks' RNG states (for an exact resume) and rank 0's VeLoRA vectors.
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    checkpoint = run_dir / "checkpoint-3"
    assert {"rng_state_0.pth", "rng_state_1.pth", "velora_projections.safetensors"} <= {
        p.name for p in checkpoint.iterdir()
    }

    # batch_size is the global batch: 3 steps x 4 rows. With accumulation not divided by the 2 processes
    # (4 instead of 2) the Trainer would have gone through twice as many rows per step.
    session = FinetuneSession(validate_recipe(recipe), run_dir)
    session.prepare()
    train_rows = len(session.train_set)
    assert state["global_step"] == 3
    micro_batches_per_rank = math.ceil(train_rows / 2)
    assert state["epoch"] == pytest.approx(3 * 2 / micro_batches_per_rank)  # 3 steps x 2 accumulation
    assert state["epoch"] == pytest.approx(3 * 4 / train_rows, rel=0.02)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stages"]["train"]["status"] == "done"
    assert summary["train"]["steps"] == 3
    assert summary["train"]["before"]["eval_loss"] is not None
    assert summary["train"]["after"]["eval_loss"] is not None


WORKER = """
import json, sys
from pathlib import Path

import torch
import torch.distributed as dist

from velora_cli.config.load import validate_recipe
from velora_cli.finetune.session import FinetuneSession
from velora_cli.engine import velora_layers

session = FinetuneSession(validate_recipe(json.loads(sys.argv[1])), Path(sys.argv[2]))
session.setup()
first = {}  # each VeLoRA layer's v as used by its first training forward
for name, layer in velora_layers(session.model).items():
    layer.register_forward_hook(
        lambda module, args, out, name=name: None if name in first else first.update({name: module.velora_v.clone()})
    )
session.train(resume=False, display=False)
model = session.model
tensors = {
    "v_first_step": torch.cat([first[n] for n in sorted(first)]),
    "v_final": torch.cat([layer.velora_v for _, layer in sorted(velora_layers(model).items())]),
    "lora": torch.cat([p.detach().flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad]),
}
report = {}
for key, tensor in tensors.items():
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    report[key] = {"max_diff": float((parts[0] - parts[1]).abs().max()), "max_abs": float(tensor.abs().max())}
if dist.get_rank() == 0:
    print("REPORT " + json.dumps(report))
dist.destroy_process_group()
"""


def test_ranks_stay_identical_and_share_rank0_velora_vectors(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Each rank sees different rows, so each rank's first batch would give a different VeLoRA v; rank 0's is
    broadcast at init, so every rank compresses its first micro-batch with the v that checkpoints record."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    recipe = recipe_dict(tiny_llama_dir, tmp_path / "run", max_steps=2, save_steps=100)
    proc = torchrun([str(script), json.dumps(recipe), str(tmp_path / "run")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    report = json.loads(line.removeprefix("REPORT "))
    for key in ("v_first_step", "v_final", "lora"):
        assert report[key]["max_abs"] > 0, key
        assert report[key]["max_diff"] == 0.0, (key, report)


def test_batch_not_divisible_by_processes_is_one_error_line(tmp_path: Path, tiny_llama_dir: Path) -> None:
    run_dir = tmp_path / "run"
    path = write_recipe(tmp_path / "ddp.yaml", recipe_dict(tiny_llama_dir, run_dir, batch_size=3))
    proc = torchrun(["-m", "velora_cli", "finetune", str(path)], cwd=tmp_path)
    # torchrun exits 1 whenever a worker fails; the worker's own exit code (2, a usage error) is in its report.
    assert proc.returncode != 0
    assert re.search(r"exitcode\s*:\s*2\b", proc.stderr), proc.stderr[-3000:]
    message = "error: train: batch_size 3 is not a multiple of micro_batch_size x processes = 2"
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert lines == [message]
    assert not re.search(r"\[rank\d\]: Traceback", proc.stderr)  # no worker traceback, only torchrun's report
    assert not run_dir.exists()
