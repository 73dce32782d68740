"""The plan of a finetune session (what will train, on what, with which memory choice) and what training returns."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from velora_cli.common.device import world_size
from velora_cli.config.description import RunDescription
from velora_cli.config.recipe import Recipe
from velora_cli.data.load import DataCounts


@contextlib.contextmanager
def rng_preserved():
    """Run a block without moving the Python, NumPy and torch (CPU + CUDA) random streams.

    The evaluation before training draws from them (the Trainer's eval loop), which would otherwise make a
    fresh run's batch order and dropout masks depend on whether a validation split or held-out set exists.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        yield
    random.setstate(py_state)
    np.random.set_state(np_state)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    interrupted: bool
    train_loss: float | None
    eval_loss: float | None
    tokens_per_second: float | None
    activation_bytes_per_token: float | None
    velora_saved_bytes_per_token: float
    peak_memory: dict[str, Any]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["run_dir"] = str(self.run_dir)
        return out


@dataclass
class Plan:
    """What a run will do: printed by --dry-run and at the start of training."""

    recipe: Recipe
    run_dir: Path
    train_rows: int  # examples (packed: several per sequence)
    sequences: int  # rows of the training set the Trainer batches (packed sequences, or the examples)
    val_rows: int
    counts: DataCounts  # format, rows skipped, truncated, dropped
    train_tokens: int
    steps: int
    gradient_accumulation: int
    compressed_layers: list[str]
    memory_choice: str | None = None  # the planner's reason, when memory.checkpointing was auto
    lean: bool = True  # the memory techniques went through apply_lean (LLaMA family)
    kernels: str = ""  # which implementation the lean loss and ops run on (Liger / Cut Cross-Entropy / torch)

    def memory_line(self) -> str:
        m = self.recipe.memory
        if not self.lean:
            gc = "on" if self.recipe.train.gradient_checkpointing else "off"
            return f"stock path (lean techniques need LLaMA-family blocks); gradient checkpointing {gc}"
        text = f"loss {m.loss}, lean ops {'on' if m.lean_ops else 'off'}, checkpointing {m.checkpointing}"
        text += ", offload" if m.offload else ""
        text += f" [{self.kernels}]" if self.kernels else ""
        return text + (f" (planner: {self.memory_choice})" if self.memory_choice else "")

    def lines(self) -> list[tuple[str, str]]:
        r = self.recipe
        grouping = (
            f"num_groups={r.velora.num_groups}" if r.velora.num_groups else f"subtoken_size={r.velora.subtoken_size}"
        )
        velora = "off"
        if r.velora.enabled:
            layers = ", ".join(r.velora.module_names)
            velora = f"{len(self.compressed_layers)} layers ({layers}), {grouping}, init={r.velora.init}"
            velora += f", scale={r.velora.scale:g}"
        double = " + double quant" if r.model.double_quant and r.model.quantization in ("nf4", "fp4") else ""
        lora_targets = ", ".join(r.lora.module_names)
        lora = f"r={r.lora.r} alpha={r.lora.alpha:g} dropout={r.lora.dropout:g} on {lora_targets}"
        model = f"{r.model.name} ({r.model.quantization}{double})"
        if r.full:  # method full/pretrain: no adapter, every weight trains
            lora = f"none: method {r.method}, every weight trains"
            model = RunDescription.of(r).model_text
            if r.train.optimizer_in_backward:
                lora += "; optimizer steps in backward (no gradient clipping)"
        return [
            ("method", RunDescription.of(r).method),
            ("model", model),
            ("LoRA", lora),
            ("VeLoRA", velora),
            (
                "data",
                f"{r.data.path}: {'streamed' if r.data.streaming else self.train_rows} train / {self.val_rows} val rows"
                + ("" if r.data.streaming else f", {self.train_tokens} train tokens")
                + self.counts.describe(r.data, self.sequences),
            ),
            (
                "batch",
                f"{r.train.batch_size} = {r.train.micro_batch_size} micro x {self.gradient_accumulation} accumulation"
                + (f" x {world_size()} processes ({r.distributed.strategy.upper()})" if world_size() > 1 else ""),
            ),
            (
                "steps",
                f"{self.steps} (lr {r.train.learning_rate:g}, {r.train.scheduler}, warmup {r.train.warmup_steps})",
            ),
            ("memory", self.memory_line()),
            ("run dir", str(self.run_dir)),
        ]
