"""Training: the setup -> train -> save lifecycle of `velora finetune`, on transformers' Trainer.

The Trainer brings gradient accumulation, schedulers, optimizer/RNG checkpointing, resume with the same data
order and DDP under torchrun. This module adds what it lacks for this tool:
- the VeLoRA projection vectors in every checkpoint (the engine's VeloraCallback), and resume only from
  checkpoints that were written completely; checkpoint rotation only once the new one is complete and finite;
- a non-finite loss or gradient stops the run before it reaches the weights, so the last checkpoint stays good;
- resume bookkeeping: metrics.jsonl cut back to the checkpoint's step (no step logged twice), leftovers of a
  killed process removed, a checkpoint at the final step finishes the run without the Trainer's extra step; a disk
  filling up is one line, with the partial checkpoint removed; Ctrl-C saves a checkpoint and exits cleanly; CUDA
  OOM is explained with the memory estimate; the live display, metrics.jsonl, the activation bytes of step one.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

from velora_cli.common import fs
from velora_cli.common.device import compute_dtype, default_device, dtype_name, is_main_process, world_size
from velora_cli.common.errors import RecipeError, TrainingAborted, UsageError, VeloraError
from velora_cli.common.memstats import human_bytes, memory_stats, reset_peak
from velora_cli.config.description import RunDescription
from velora_cli.config.load import dump_recipe
from velora_cli.config.preference import PREFERENCE_METHODS
from velora_cli.config.recipe import Recipe
from velora_cli.data.load import DataCounts, make_collator
from velora_cli.data.training import TrainingData
from velora_cli.engine import VeloraCallback, load_velora_vectors, save_velora_vectors, velora_saving_per_token
from velora_cli.finetune.callbacks import CheckpointKeeper, InterruptHandler, RunMonitor, StepGuard
from velora_cli.finetune.display import TrainingDisplay
from velora_cli.finetune.plan import Plan, TrainResult
from velora_cli.finetune.prepare import Prepared, prepare
from velora_cli.finetune.sharding import ShardingTrainer, fsdp_arguments, full_state_dict, resumable_shards
from velora_cli.models.build import build_training_model, lean_kernels
from velora_cli.models.full import load_full_checkpoint
from velora_cli.rundir import layout as runs
from velora_cli.rundir import verify
from velora_cli.rundir.metrics import read_metrics, truncate_metrics

STAGING = ".staging"


class FinetuneSession:
    """setup() builds data, model and trainer (checking all before writing); train() runs or resumes; save()."""

    def __init__(self, recipe: Recipe, run_dir: Path, device: torch.device | None = None):
        self._requested = recipe  # the recipe as loaded; prepare() settles the one it trains with
        self.run_dir = run_dir
        self.device = device or default_device()  # a dry run passes the recipe's target device
        self.prepared: Prepared | None = None
        self.model = self.trainer = None
        self.plan: Plan | None = None
        self.compressed: list[str] = []

    @property
    def recipe(self) -> Recipe:
        """The recipe as it trains once prepared (finetune.prepare), the loaded one before."""
        return self.prepared.recipe if self.prepared is not None else self._requested

    def prepare(self) -> Prepared:
        """Model reference, tokenizer, data and the recipe as trained, resolved once (by the pre-flight in a
        `velora finetune`, or here on first use)."""
        if self.prepared is None:
            self.gradient_accumulation()  # a batch size that does not divide fails before the data is read
            self.prepared = prepare(self._requested, self.device)
        return self.prepared

    @property
    def tokenizer(self):
        return self.prepared.tokenizer if self.prepared is not None else None

    @property
    def data(self) -> TrainingData:
        return self.prepare().data

    @property
    def train_set(self):
        return self.data.train_set

    @property
    def val_set(self):
        return self.data.val_set

    @property
    def counts(self) -> DataCounts:
        return self.data.counts

    # -- setup
    def gradient_accumulation(self) -> int:
        try:
            return self.recipe.train.accumulation(world_size())
        except ValueError as exc:
            raise RecipeError(f"train: {exc}") from None

    def total_steps(self) -> int:
        t = self.recipe.train
        if t.max_steps:
            return t.max_steps
        if not self.data.sized:
            raise RecipeError("data.streaming reads an endless stream: set train.max_steps")
        # The Trainer's own count: whole optimizer steps per epoch (a partial accumulation still steps), times epochs.
        batches = math.ceil(len(self.train_set) / (t.micro_batch_size * world_size()))
        return math.ceil(t.epochs * max(1, math.ceil(batches / self.gradient_accumulation())))

    def setup(self) -> Plan:
        prepared = self.prepare()
        accumulation = self.gradient_accumulation()
        set_seed(self.recipe.train.seed)  # LoRA's A init draws from the global RNG: same seed, same adapter start
        if self.recipe.full:
            from velora_cli.models.full import build_full_model

            self.model, self.compressed = build_full_model(self.recipe, self.device, prepared.source, prepared.config)
        else:
            self.model, self.compressed = build_training_model(self.recipe, self.device, prepared.source)
        # Which implementation the lean loss and ops run on; None: the stock path (not a LLaMA-family model).
        kernels = lean_kernels(self.recipe, self.device) if prepared.lean else None
        data = prepared.data
        self.plan = Plan(
            recipe=self.recipe,
            run_dir=self.run_dir,
            train_rows=data.counts.examples,
            sequences=len(data.train_set) if data.sized else 0,
            val_rows=len(data.val_set) if data.val_set is not None else 0,
            counts=data.counts,
            train_tokens=int(sum(data.train_set["length"])) if data.sized else 0,
            steps=self.total_steps(),
            gradient_accumulation=accumulation,
            compressed_layers=self.compressed,
            memory_choice=prepared.memory_choice,
            lean=kernels is not None,
            kernels=kernels or "",
        )
        self.interrupt = InterruptHandler()
        self.guard = StepGuard(self.run_dir, velora=bool(self.compressed))
        self.keeper = CheckpointKeeper(self.run_dir, self.recipe.train.save_total_limit, bool(self.compressed))
        # CheckpointKeeper after VeloraCallback: it checks the checkpoint once the vectors are in it.
        callbacks = [VeloraCallback(), self.guard, self.interrupt, self.keeper]
        if self.recipe.method in PREFERENCE_METHODS:  # TRL's DPOTrainer (finetune/preference.py)
            from velora_cli.finetune.preference import make_dpo_trainer

            self.trainer = make_dpo_trainer(self, callbacks)
        else:
            self.trainer = self.make_trainer(
                model=self.model,
                args=self.training_arguments(),
                train_dataset=data.train_set,
                eval_dataset=data.val_set,
                data_collator=make_collator(self.tokenizer, on_gpu=self.device.type == "cuda"),
                callbacks=callbacks,
            )
        self.trainer.remove_callback(PrinterCallback)  # RunMonitor and the display report instead
        if self.recipe.train.optimizer_in_backward:
            from velora_cli.finetune.layerwise import layerwise_for_trainer

            if world_size() > 1:
                raise UsageError("train.optimizer_in_backward runs in a single process (no DDP)")
            fused = self.recipe.train.optimizer == "adamw_torch_fused"
            self.trainer.optimizer = layerwise_for_trainer(self.trainer, fused=fused)
        return self.plan

    @property
    def sharded(self) -> bool:
        """FSDP2: several processes, and the recipe (as prepared: auto resolved) asks for fsdp."""
        return self.recipe.distributed.shards()

    def make_trainer(self, **kwargs) -> Trainer:
        return ShardingTrainer(**kwargs) if self.sharded else Trainer(**kwargs)

    def evaluate_loss(self) -> float | None:
        """Mean loss on the validation rows (None without a validation split)."""
        if self.val_set is None:
            return None
        return float(self.trainer.evaluate()["eval_loss"])

    def training_arguments(self, kind: type[TrainingArguments] = TrainingArguments, **extra) -> TrainingArguments:
        """The recipe's TrainingArguments (`kind`: a subclass such as TRL's DPOConfig, given its `extra` fields)."""
        t = self.recipe.train
        compute = self._compute()
        has_eval = self.val_set is not None and t.eval_steps is not None
        sharding = {}
        if self.sharded:
            sharding = fsdp_arguments(self.recipe, self.model, self.prepared.config)
        return kind(
            **sharding,
            output_dir=str(self.run_dir),
            per_device_train_batch_size=t.micro_batch_size,
            per_device_eval_batch_size=t.micro_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation(),
            num_train_epochs=t.epochs,
            max_steps=t.max_steps or -1,
            learning_rate=t.learning_rate,
            lr_scheduler_type="cosine_with_min_lr" if t.scheduler == "cosine" and t.min_lr_ratio else t.scheduler,
            lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio} if t.scheduler == "cosine" and t.min_lr_ratio else {},
            warmup_steps=t.warmup_steps,
            weight_decay=t.weight_decay,
            max_grad_norm=0.0 if t.optimizer_in_backward else t.max_grad_norm,  # no global norm exists
            optim=t.optimizer,
            seed=t.seed,
            data_seed=t.seed,
            logging_steps=t.logging_steps,
            logging_first_step=True,  # loss, lr and speed on the panel from step 1, not from the first logging step
            eval_strategy="steps" if has_eval else "no",
            eval_steps=t.eval_steps if has_eval else None,
            save_strategy="steps",
            save_steps=t.save_steps,
            save_total_limit=None,  # CheckpointKeeper rotates, once the new checkpoint is complete
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
            prediction_loss_only=True,  # evaluation wants the loss only: the chunked loss returns no logits
            log_level="warning",
            save_only_model=False,
            **extra,
        )

    # -- train
    def prepare_run_dir(self, resume: bool) -> Path | None:
        """Clean what a killed process left, cut metrics.jsonl back to the checkpoint resumed from; return it."""
        velora = bool(self.compressed)
        complete, damaged = verify.sound_checkpoints(self.run_dir, velora) if resume else ([], [])
        if self.sharded:  # a last-step checkpoint of shards is retrained from the one before (finetune.sharding)
            complete = resumable_shards(complete, self.recipe, self.plan.steps)
        resume_from = complete[-1] if complete else None
        if is_main_process():
            moved = {path: verify.set_aside(path) for path, _ in damaged}  # kept for the user, out of the way
            if line := verify.resume_line(resume_from, damaged, moved):
                print(line, file=sys.stderr, flush=True)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.run_dir / STAGING, ignore_errors=True)
            if resume:  # a checkpoint killed half-way cannot be resumed from, and would count in the rotation
                for _, path in runs.checkpoint_dirs(self.run_dir):
                    if path not in complete:
                        shutil.rmtree(path, ignore_errors=True)
            if resume_from is None:
                (self.run_dir / runs.METRICS_FILE).unlink(missing_ok=True)  # a fresh run starts a fresh log
            else:
                truncate_metrics(self.run_dir, runs.checkpoint_step(resume_from) or 0)
        return resume_from

    def train(self, resume: bool = True, display: bool = True) -> TrainResult:
        assert self.plan is not None, "call setup() first"
        resume_from = self.prepare_run_dir(resume)
        done_step = runs.checkpoint_step(resume_from) if resume_from else None
        if done_step is not None and done_step >= self.plan.steps:
            return self._finish_from(resume_from, done_step)
        viewer = None
        if display and is_main_process():
            described = RunDescription.of(self.recipe)
            notes = {"model": f"{described.base_model} ({described.how}, {dtype_name(self._compute())})",
                     "method": described.method}  # fmt: skip
            if self.compressed:
                notes["VeLoRA"] = f"{len(self.compressed)} layers compressed"
            viewer = TrainingDisplay(self.recipe.name or self.run_dir.name, self.plan.steps, notes)
        interrupt = self.interrupt
        monitor = RunMonitor(self.run_dir / runs.METRICS_FILE, viewer, self.device, self.guard)
        self.trainer.add_callback(monitor)
        saving = velora_saving_per_token(self.model)  # predicted from dtypes now; measured after training
        if viewer and saving:
            viewer.notes["VeLoRA saves"] = f"{human_bytes(saving)}/token of activations"
        reset_peak(self.device)
        started = time.monotonic()
        try:
            self.trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except torch.OutOfMemoryError as exc:
            raise TrainingAborted(self._oom_message()) from exc
        except BaseException as exc:
            self._remove_incomplete_checkpoints()
            full = fs.disk_full(exc)
            if full is not None:
                raise VeloraError(
                    f"{self.run_dir}: no space left on the device ({full}); the partial checkpoint was removed. "
                    "Free space and run the same command again to resume."
                ) from None
            raise
        finally:
            interrupt.restore()
            if viewer:
                if saving:  # the figure summary.json records, measured now that VeLoRA has initialised
                    measured = velora_saving_per_token(self.model)
                    viewer.notes["VeLoRA saves"] = f"{human_bytes(measured)}/token of activations"
                viewer.stop()
        seconds = time.monotonic() - started
        eval_loss = None if interrupt.requested else self.evaluate_loss()
        return self._result(self.trainer.state.global_step, interrupt.requested, eval_loss, seconds)

    def _finish_from(self, checkpoint: Path, step: int) -> TrainResult:
        """The run reached its last step and saved it before it was stopped: load that checkpoint's adapter (and
        VeLoRA vectors) instead of training, so the rerun ends exactly where an uninterrupted run would."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        if self.recipe.full:  # the checkpoint holds the whole model
            load_full_checkpoint(self.model, checkpoint)
        else:
            set_peft_model_state_dict(self.model, load_file(str(checkpoint / runs.ADAPTER_WEIGHTS)))
        load_velora_vectors(self.model, checkpoint)
        self.trainer.state.global_step = step
        return self._result(step, False, self.evaluate_loss(), 0.0)

    def _result(self, steps: int, interrupted: bool, eval_loss: float | None, seconds: float) -> TrainResult:
        # From metrics.jsonl, not this process's log alone: a resumed run reports the whole run.
        history = read_metrics(self.run_dir)
        losses = [h["loss"] for h in history if h.get("loss") is not None]
        speeds = [h["tokens_per_second"] for h in history if h.get("tokens_per_second") is not None]
        return TrainResult(
            run_dir=self.run_dir,
            steps=steps,
            interrupted=interrupted,
            train_loss=losses[-1] if losses else None,
            eval_loss=eval_loss,
            tokens_per_second=sum(speeds) / len(speeds) if speeds else None,
            activation_bytes_per_token=self.guard.activation_bytes_per_token,
            velora_saved_bytes_per_token=velora_saving_per_token(self.model),
            peak_memory=memory_stats(self.device).as_dict(),
            seconds=seconds,
        )

    def _remove_incomplete_checkpoints(self) -> None:
        if is_main_process():
            complete = runs.resumable_checkpoints(self.run_dir, bool(self.compressed))
            for _, path in runs.checkpoint_dirs(self.run_dir):
                if path not in complete:
                    shutil.rmtree(path, ignore_errors=True)

    def _compute(self) -> torch.dtype:
        return compute_dtype(self.recipe.model.compute_dtype, self.device)

    def _oom_message(self) -> str:
        t = self.recipe.train
        return (
            f"CUDA out of memory at micro_batch_size={t.micro_batch_size}, cutoff_len={self.recipe.data.cutoff_len}. "
            "See `velora memory-estimate` for this recipe; lower train.micro_batch_size (raise gradient accumulation "
            "via batch_size), lower data.cutoff_len, enable velora or train.gradient_checkpointing."
        )

    # -- save
    def save(self) -> None:
        """Adapter, tokenizer, resolved recipe, VeLoRA vectors: staged, then renamed into the run dir."""
        # Not one staged rename: the files join an existing directory (checkpoints, metrics), so each is renamed in.
        model = self.trainer.accelerator.unwrap_model(self.trainer.model) if self.trainer else self.model
        # DPO from an adapter: TRL's frozen reference copy ("ref") is not part of the result
        extra: dict = {"selected_adapters": ["default"]} if "ref" in getattr(model, "peft_config", {}) else {}
        if self.sharded:  # every rank sends its shards; rank 0 writes the same files a single process would
            extra["state_dict"] = full_state_dict(model)
            if not self.recipe.full:
                extra["selected_adapters"] = ["default"]
        if not is_main_process():
            return
        staging = self.run_dir / STAGING / "final"
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            model.save_pretrained(staging, **extra)
            self.tokenizer.save_pretrained(staging)
            recipe_text = dump_recipe(self.recipe)
            (staging / runs.RECIPE_FILE).write_text(recipe_text, encoding="utf-8")
            if not self.recipe.full:
                from velora_cli.export.card import make_adapter_portable

                make_adapter_portable(staging, self.recipe, recipe_text, self.run_dir)
            save_velora_vectors(model, staging)
            for item in staging.iterdir():
                target = self.run_dir / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(item, target)
        except BaseException as exc:
            full = fs.disk_full(exc)
            if full is not None:
                raise VeloraError(
                    f"{self.run_dir}: no space left on the device ({full}) while saving the adapter; nothing "
                    "half-written was kept. Free space and run the same command again."
                ) from None
            raise
        finally:
            shutil.rmtree(self.run_dir / STAGING, ignore_errors=True)
