"""Training: the setup -> train -> save lifecycle of `velora finetune`, on transformers' Trainer.

The Trainer brings gradient accumulation, schedulers, optimizer/RNG checkpointing, resume with the same data
order and DDP under torchrun. This module adds what it lacks for this tool:
- checkpoints written atomically (staged, then renamed) and carrying the VeLoRA projection vectors;
- a non-finite loss stops the run before its backward pass, so the last checkpoint stays good;
- Ctrl-C saves a checkpoint and exits cleanly; CUDA OOM is explained with the memory estimate;
- the live display, metrics.jsonl, and the activation bytes measured on the first step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import rotate_checkpoints

from velora_cli import runs as rundir
from velora_cli.data import load_records, make_collator, split_validation, tokenize_records
from velora_cli.device import default_device, dtype_name
from velora_cli.errors import RecipeError, TrainingAborted, UsageError
from velora_cli.memstats import human_bytes, memory_stats, reset_peak
from velora_cli.models import build_training_model
from velora_cli.recipe import Recipe, dump_recipe
from velora_cli.report import TrainingDisplay
from velora_cli.velora import load_velora_state_dict, velora_layers, velora_state_dict
from velora_cli.velora.meter import ActivationMeter

STAGING = ".staging"


@contextlib.contextmanager
def rng_preserved():
    """Run a block without moving the Python, NumPy and torch (CPU + CUDA) random streams.

    The evaluation before training draws from them (the Trainer's eval loop), which would otherwise make a
    fresh run's batch order and dropout masks depend on whether a validation split or held-out set exists.
    """
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        yield
    random.setstate(py_state)
    np.random.set_state(np_state)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ------------------------------------------------------------------------------------------------ trainer


class VeloraTrainer(Trainer):
    """Trainer with atomic checkpoints that include VeLoRA vectors, a finite-loss guard and a first-step meter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._staging_root: Path | None = None
        self.activation_bytes_per_token: float | None = None
        # The meter cannot see inside non-reentrant checkpointed regions, and wrapping them in its
        # saved-tensor hooks made host memory grow without bound (17 GB on SmolLM2 at 4 x 128 tokens).
        self.measure_activations = not getattr(self.model, "is_activation_checkpointing", False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.measure_activations and self.activation_bytes_per_token is None and model.training:
            # Measured once, on the real first batch: what this configuration keeps for backward.
            with ActivationMeter(model) as meter:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.activation_bytes_per_token = meter.per_token(int(inputs["attention_mask"].sum()))
        else:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if model.training and not torch.isfinite(loss.detach()).all():
            last = rundir.checkpoints(Path(self.args.output_dir))
            kept = f"last good checkpoint: {last[-1]}" if last else "no checkpoint was written yet"
            raise TrainingAborted(
                f"loss became {loss.item()} at step {self.state.global_step + 1}; training stopped ({kept}). "
                "Lower train.learning_rate or check the data."
            )
        return result

    def _get_output_dir(self, trial) -> str:
        return str(self._staging_root) if self._staging_root is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write checkpoint-N into a staging dir, add the VeLoRA vectors, then rename it into place."""
        # TODO(split): rename into place with runs.staged_dir (the one staged-write helper)
        run_dir = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        self._staging_root = run_dir / STAGING
        if self.args.should_save:
            shutil.rmtree(self._staging_root / name, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            staged = run_dir / STAGING / name
            save_velora_vectors(self.accelerator.unwrap_model(model), staged)
            target = run_dir / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staged, target)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
            )
        self.accelerator.wait_for_everyone()


def save_velora_vectors(model: torch.nn.Module, directory: Path) -> None:
    from safetensors.torch import save_file

    state = velora_state_dict(model)
    if state:
        save_file(state, str(directory / rundir.VELORA_VECTORS))


def load_velora_vectors(model: torch.nn.Module, directory: Path) -> bool:
    from safetensors.torch import load_file

    path = directory / rundir.VELORA_VECTORS
    if not path.is_file() or not velora_layers(model):
        return False
    load_velora_state_dict(model, load_file(str(path)))
    return True


# ---------------------------------------------------------------------------------------------- callbacks


class RunMonitor(TrainerCallback):
    """Turns Trainer logs into records (throughput, memory) for metrics.jsonl and the display."""

    def __init__(self, metrics_path: Path, display: TrainingDisplay | None, device: torch.device, trainer_ref):
        self.metrics_path = metrics_path
        self.display = display
        self.device = device
        self.trainer_ref = trainer_ref
        self.last_time = time.monotonic()
        self.last_tokens = 0
        self.last_step = 0
        self.history: list[dict[str, Any]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time, self.last_tokens, self.last_step = (
            time.monotonic(),
            state.num_input_tokens_seen,
            state.global_step,
        )
        if self.display and state.is_world_process_zero:
            self.display.step = state.global_step
            self.display.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.display and state.is_world_process_zero:
            self.display.tick(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
            if key in logs:
                record[key] = float(logs[key])
        now = time.monotonic()
        if "loss" in logs and state.global_step > self.last_step:
            elapsed = max(now - self.last_time, 1e-9)
            tokens = state.num_input_tokens_seen - self.last_tokens
            steps = state.global_step - self.last_step
            record["tokens_per_second"] = tokens / elapsed  # num_input_tokens_seen is already summed over ranks
            record["samples_per_second"] = (
                steps * args.train_batch_size * args.gradient_accumulation_steps * world_size() / elapsed
            )
            self.last_time, self.last_tokens, self.last_step = now, state.num_input_tokens_seen, state.global_step
        stats = memory_stats(self.device)
        record["memory_bytes"] = stats.as_dict()
        record["memory"] = stats.short()
        trainer = self.trainer_ref()
        if trainer is not None and trainer.activation_bytes_per_token is not None:
            record["activation_bytes_per_token"] = trainer.activation_bytes_per_token
        self.history.append(record)
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({k: v for k, v in record.items() if k != "memory"}) + "\n")
        if self.display:
            self.display.update(record)

    def on_train_end(self, args, state, control, **kwargs):
        if self.display and state.is_world_process_zero:
            self.display.stop()


class InterruptHandler(TrainerCallback):
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, save a checkpoint, stop cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _request(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.requested = True

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._request)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ------------------------------------------------------------------------------------------------ session


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
    train_rows: int
    val_rows: int
    skipped_rows: int
    train_tokens: int
    steps: int
    gradient_accumulation: int
    compressed_layers: list[str]

    def lines(self) -> list[tuple[str, str]]:
        # TODO(split): describe model / LoRA / VeLoRA with runs.RunDescription.of(recipe) (one run description)
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
        return [
            ("model", f"{r.model.name} ({r.model.quantization}{double})"),
            ("LoRA", f"r={r.lora.r} alpha={r.lora.alpha:g} dropout={r.lora.dropout:g} on {lora_targets}"),
            ("VeLoRA", velora),
            (
                "data",
                f"{r.data.path}: {self.train_rows} train / {self.val_rows} val rows"
                + (f" ({self.skipped_rows} bad rows skipped)" if self.skipped_rows else "")
                + f", {self.train_tokens} train tokens, template={r.data.template}",
            ),
            (
                "batch",
                f"{r.train.batch_size} = {r.train.micro_batch_size} micro x {self.gradient_accumulation} accumulation"
                + (f" x {world_size()} processes" if world_size() > 1 else ""),
            ),
            (
                "steps",
                f"{self.steps} (lr {r.train.learning_rate:g}, {r.train.scheduler}, warmup {r.train.warmup_steps})",
            ),
            ("gradient checkpointing", "on" if r.train.gradient_checkpointing else "off"),
            ("run dir", str(self.run_dir)),
        ]


def velora_saving_per_token(model: torch.nn.Module, dtype: torch.dtype) -> float:
    """Bytes per token VeLoRA avoids storing: each compressed layer would keep its D-wide input (and, with
    dropout, a D-wide mask of the same dtype on CPU / bool on CUDA) but keeps D/M projections instead."""
    elem = torch.finfo(dtype).bits // 8
    saved = 0.0
    for layer in velora_layers(model).values():
        depth = layer.in_features
        mask = 0 if layer.dropout_p == 0 else depth * (1 if layer.weight.is_cuda else elem)
        saved += depth * elem + mask - depth / layer.subtoken_size * elem
    return saved


class FinetuneSession:
    """setup() builds data, model and trainer (validating everything before writing anything);
    train() runs or resumes; save() writes the adapter and its companions atomically into the run dir."""

    def __init__(self, recipe: Recipe, run_dir: Path, extra_callbacks: list[TrainerCallback] | None = None):
        self.recipe = recipe
        self.run_dir = run_dir
        self.device = default_device()
        self.extra_callbacks = extra_callbacks or []
        self.model = self.tokenizer = self.trainer = None
        self.train_set = self.val_set = None
        self.plan: Plan | None = None
        self.compressed: list[str] = []

    # -- setup
    def gradient_accumulation(self) -> int:
        t = self.recipe.train
        per_step = t.micro_batch_size * world_size()
        if t.batch_size % per_step:
            raise RecipeError(
                f"train.batch_size={t.batch_size} is not a multiple of micro_batch_size x processes = {per_step}"
            )
        return t.batch_size // per_step

    def setup_data(self) -> None:
        from velora_cli.models import load_tokenizer, resolve_model

        d = self.recipe.data
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(resolve_model(self.recipe.model.name), self.recipe.model.trust_remote_code)
        loaded = load_records(d.path, d.split, d.skip_bad_rows)
        train_rows, val_rows = split_validation(loaded.records, d.val_set_size, self.recipe.train.seed)
        if d.val_path:
            val_rows = load_records(d.val_path, "validation", d.skip_bad_rows).records
        self.val_records, self.skipped = val_rows, loaded.skipped
        self.train_set = tokenize_records(train_rows, self.tokenizer, d)
        self.val_set = tokenize_records(val_rows, self.tokenizer, d) if val_rows else None

    def total_steps(self) -> int:
        t = self.recipe.train
        if t.max_steps:
            return t.max_steps
        # The Trainer's own count: whole optimizer steps per epoch (a partial accumulation still steps), times epochs.
        batches = math.ceil(len(self.train_set) / (t.micro_batch_size * world_size()))
        return math.ceil(t.epochs * max(1, math.ceil(batches / self.gradient_accumulation())))

    def setup(self) -> Plan:
        from transformers import set_seed

        accumulation = self.gradient_accumulation()
        self.setup_data()
        set_seed(self.recipe.train.seed)  # LoRA's A init draws from the global RNG: same seed, same adapter start
        self.model, self.tokenizer, self.compressed = build_training_model(self.recipe, self.device, self.tokenizer)
        self.plan = Plan(
            recipe=self.recipe,
            run_dir=self.run_dir,
            train_rows=len(self.train_set),
            val_rows=len(self.val_set) if self.val_set is not None else 0,
            skipped_rows=self.skipped,
            train_tokens=int(sum(self.train_set["length"])),
            steps=self.total_steps(),
            gradient_accumulation=accumulation,
            compressed_layers=self.compressed,
        )
        self.interrupt = InterruptHandler()
        self.trainer = VeloraTrainer(
            model=self.model,
            args=self.training_arguments(),
            train_dataset=self.train_set,
            eval_dataset=self.val_set,
            data_collator=make_collator(self.tokenizer, on_gpu=self.device.type == "cuda"),
            callbacks=[self.interrupt, *self.extra_callbacks],
        )
        self.trainer.remove_callback(PrinterCallback)  # RunMonitor and the display report instead
        return self.plan

    def evaluate_loss(self) -> float | None:
        """Mean loss on the validation rows (None without a validation split)."""
        if self.val_set is None:
            return None
        return float(self.trainer.evaluate()["eval_loss"])

    def training_arguments(self) -> TrainingArguments:
        t = self.recipe.train
        compute = self._compute()
        has_eval = self.val_set is not None and t.eval_steps is not None
        return TrainingArguments(
            output_dir=str(self.run_dir),
            per_device_train_batch_size=t.micro_batch_size,
            per_device_eval_batch_size=t.micro_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation(),
            num_train_epochs=t.epochs,
            max_steps=t.max_steps or -1,
            learning_rate=t.learning_rate,
            lr_scheduler_type=t.scheduler,
            warmup_steps=t.warmup_steps,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            optim=t.optimizer,
            seed=t.seed,
            data_seed=t.seed,
            logging_steps=t.logging_steps,
            eval_strategy="steps" if has_eval else "no",
            eval_steps=t.eval_steps if has_eval else None,
            save_strategy="steps",
            save_steps=t.save_steps,
            save_total_limit=t.save_total_limit,
            report_to=list(t.report_to) or "none",
            # No bf16 autocast: the frozen base already runs in bf16 and PEFT runs the fp32 adapters in fp32 (it casts
            # their input), the layout the memory model counts. fp16 needs the flag for its gradient scaler.
            bf16=False,
            fp16=self.device.type == "cuda" and compute == torch.float16,
            train_sampling_strategy="group_by_length" if t.group_by_length else "random",
            include_num_input_tokens_seen="non_padding",
            use_cpu=self.device.type == "cpu",
            ddp_backend="gloo" if self.device.type == "cpu" and world_size() > 1 else None,
            ddp_find_unused_parameters=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
            log_level="warning",
            save_only_model=False,
        )

    # -- train
    def train(self, resume: bool = True, display: bool = True) -> TrainResult:
        import weakref

        assert self.plan is not None, "call setup() first"
        resume_from = None
        checkpoints = rundir.checkpoints(self.run_dir) if resume else []
        if checkpoints:
            resume_from = checkpoints[-1]
            load_velora_vectors(self.model, resume_from)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not checkpoints:
            (self.run_dir / rundir.METRICS_FILE).unlink(missing_ok=True)  # a fresh run starts a fresh log
        viewer = None
        if display and is_main_process():
            notes = {
                "model": f"{self.recipe.model.name} ({self.recipe.model.quantization}, {dtype_name(self._compute())})"
            }
            if self.compressed:
                notes["VeLoRA"] = f"{len(self.compressed)} layers compressed"
            viewer = TrainingDisplay(self.recipe.name or self.run_dir.name, self.plan.steps, notes)
        interrupt = self.interrupt
        monitor = RunMonitor(self.run_dir / rundir.METRICS_FILE, viewer, self.device, weakref.ref(self.trainer))
        self.trainer.add_callback(monitor)
        saving = velora_saving_per_token(self.model, self._compute())
        if viewer and saving:
            viewer.notes["VeLoRA saves"] = f"{human_bytes(saving)}/token of activations"
        reset_peak(self.device)
        started = time.monotonic()
        try:
            output = self.trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except torch.OutOfMemoryError as exc:
            raise TrainingAborted(self._oom_message()) from exc
        finally:
            interrupt.restore()
            if viewer:
                viewer.stop()
        seconds = time.monotonic() - started
        eval_loss = None if interrupt.requested else self.evaluate_loss()
        losses = [h["loss"] for h in monitor.history if "loss" in h]
        speeds = [h["tokens_per_second"] for h in monitor.history if "tokens_per_second" in h]
        return TrainResult(
            run_dir=self.run_dir,
            steps=self.trainer.state.global_step,
            interrupted=interrupt.requested,
            train_loss=losses[-1] if losses else float(output.training_loss),
            eval_loss=eval_loss,
            tokens_per_second=sum(speeds) / len(speeds) if speeds else None,
            activation_bytes_per_token=self.trainer.activation_bytes_per_token,
            velora_saved_bytes_per_token=saving,
            peak_memory=memory_stats(self.device).as_dict(),
            seconds=seconds,
        )

    def _compute(self) -> torch.dtype:
        from velora_cli.device import compute_dtype

        return compute_dtype(self.recipe.model.compute_dtype, self.device)

    def _oom_message(self) -> str:
        t = self.recipe.train
        return (
            f"CUDA out of memory at micro_batch_size={t.micro_batch_size}, cutoff_len={self.recipe.data.cutoff_len}. "
            "See `velora memory-estimate` for this recipe; lower train.micro_batch_size (raise gradient accumulation "
            "via batch_size), lower data.cutoff_len, enable velora or train.gradient_checkpointing."
        )

    # -- save
    def save(self, result: TrainResult) -> None:
        """Adapter, tokenizer, resolved recipe, VeLoRA vectors: staged, then renamed into the run dir."""
        # TODO(split): stage through runs.staged / runs.staged_dir (the one staged-write helper)
        if not is_main_process():
            return
        staging = self.run_dir / STAGING / "final"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        model = self.trainer.accelerator.unwrap_model(self.model) if self.trainer else self.model
        model.save_pretrained(staging)
        self.tokenizer.save_pretrained(staging)
        (staging / rundir.RECIPE_FILE).write_text(dump_recipe(self.recipe), encoding="utf-8")
        save_velora_vectors(model, staging)
        for item in staging.iterdir():
            target = self.run_dir / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
        shutil.rmtree(self.run_dir / STAGING, ignore_errors=True)


def check_trainable(recipe: Recipe) -> None:
    """Combinations that cannot train, caught before any weights are loaded."""
    if recipe.model.quantization != "none":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise RecipeError(
                f"model.quantization={recipe.model.quantization!r} needs bitsandbytes, which is not installed"
            )
    if recipe.train.optimizer in ("paged_adamw_8bit", "paged_adamw_32bit") and not torch.cuda.is_available():
        raise UsageError(f"train.optimizer={recipe.train.optimizer!r} needs CUDA; use adamw_torch on CPU")
