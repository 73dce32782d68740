"""The Trainer callbacks `velora finetune` adds: what it watches while a run trains.

- StepGuard: the activation bytes of the first training step (ActivationMeter) and a stop, before the backward
  pass, when the loss is not finite, and before the optimizer step when a gradient is not, so no checkpoint ever
  holds the weights they would produce;
- CheckpointKeeper: a checkpoint is verified finite and complete (VeLoRA vectors included) before it counts, and
  only then are older ones rotated away (the Trainer's own rotation ran before the vectors were written, so a
  kill in between could leave no resumable checkpoint at all);
- RunMonitor: Trainer logs -> metrics.jsonl (strict JSON: a non-finite value is null, named in `non_finite`) and
  the live display (throughput, memory);
- InterruptHandler: Ctrl-C / SIGTERM finish the step, save a checkpoint and stop cleanly.
Forward hooks and callbacks only: the stock transformers Trainer needs no subclass.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from velora_cli.common.device import world_size
from velora_cli.common.errors import TrainingAborted
from velora_cli.common.memstats import memory_stats
from velora_cli.engine import ActivationMeter
from velora_cli.finetune.display import TrainingDisplay
from velora_cli.finetune.sharding import all_finite
from velora_cli.rundir.layout import ADAPTER_WEIGHTS, checkpoint_dirs, resumable_checkpoints

# ------------------------------------------------------------------------------------------------ guards


class StepGuard(TrainerCallback):
    """Hooks on the model's forward, so the stock Trainer needs no subclass: the first training forward is
    measured with the ActivationMeter (what this configuration keeps for backward), and a non-finite loss stops
    the run before its backward pass, so no checkpoint ever holds the weights it would produce."""

    def __init__(self, run_dir: Path, velora: bool) -> None:
        self.run_dir = run_dir
        self.velora = velora
        self.activation_bytes_per_token: float | None = None
        self._meter: ActivationMeter | None = None
        self._tokens = 0
        self._step = 0
        self._handles: list[Any] = []
        self.trained_tokens = 0  # loss-bearing tokens of the training forwards so far (labels not -100)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, always_call=True),
        ]

    def on_step_begin(self, args, state, control, **kwargs):
        self._step = state.global_step + 1

    def on_train_end(self, args, state, control, **kwargs):
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        labels = kwargs.get("labels")
        if labels is not None and module.training and torch.is_grad_enabled():
            self.trained_tokens += int((labels[..., 1:] != -100).sum())  # the shifted targets the loss is taken on
        if self.activation_bytes_per_token is None and module.training and torch.is_grad_enabled():
            mask = kwargs.get("attention_mask")
            self._tokens = int(mask.sum()) if mask is not None else int(kwargs["input_ids"].numel())
            # Totals only: attributing bytes to ops would read the saved tensors of checkpointed regions, and each
            # read recomputes the region (host memory grew without bound on SmolLM2 under checkpointing).
            self._meter = ActivationMeter(module, attribute=False).__enter__()

    def _after(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._meter is not None:
            meter, self._meter = self._meter, None
            meter.__exit__(None, None, None)
            if output is not None:
                self.activation_bytes_per_token = meter.per_token(self._tokens)
        loss = getattr(output, "loss", None)
        if module.training and loss is not None and not torch.isfinite(loss.detach()).all():
            kept = last_good(self.run_dir, self.velora)
            raise TrainingAborted(
                f"loss became {loss.item()} at step {self._step}; training stopped ({kept}). "
                "Lower train.learning_rate or check the data."
            )

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # Under fp16 the gradient scaler owns non-finite gradients: it skips that step and lowers the scale.
        if args.fp16 or model is None:
            return
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if grads and not all_finite(grads):
            raise TrainingAborted(
                f"a gradient became non-finite (NaN/inf) at step {self._step}; training stopped before the optimizer "
                f"step ({last_good(self.run_dir, self.velora)}). Lower train.learning_rate or check the data."
            )


def adapter_is_finite(checkpoint: Path) -> bool:
    """Every tensor of the checkpoint's saved adapter is finite (read back from the file, not trusted)."""
    from safetensors.torch import load_file

    try:
        return all(torch.isfinite(t).all() for t in load_file(str(checkpoint / ADAPTER_WEIGHTS)).values())
    except (OSError, RuntimeError, ValueError):  # unreadable or half-written: not good
        return False


def last_good(run_dir: Path, velora: bool) -> str:
    """'last good checkpoint: PATH' for the newest complete checkpoint whose adapter is finite."""
    for path in reversed(resumable_checkpoints(run_dir, velora)):
        if adapter_is_finite(path):
            return f"last good checkpoint: {path}"
    return "no good checkpoint was written yet"


class CheckpointKeeper(TrainerCallback):
    """Runs after VeloraCallback's on_save: a checkpoint whose weights are not finite is deleted and the run stops;
    a complete one is kept, and only then are checkpoints beyond `keep` (oldest first) and leftovers of
    incomplete saves removed."""

    def __init__(self, run_dir: Path, keep: int, velora: bool) -> None:
        self.run_dir, self.keep, self.velora = Path(run_dir), keep, velora

    def on_save(self, args, state, control, model=None, **kwargs):
        trainable = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        finite = all_finite(trainable)  # every rank: under FSDP each holds a shard of the weights
        current = self.run_dir / f"checkpoint-{state.global_step}"
        if not finite:
            if state.is_world_process_zero:
                shutil.rmtree(current, ignore_errors=True)
            raise TrainingAborted(
                f"the adapter weights are not finite (NaN/inf) at step {state.global_step}; its checkpoint was "
                f"discarded and training stopped ({last_good(self.run_dir, self.velora)})"
            )
        if not state.is_world_process_zero:
            return
        complete = resumable_checkpoints(self.run_dir, self.velora)
        if current not in complete:
            return  # not written (another rank's turn, or save failed): rotate nothing
        for path in complete[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)
        for step, path in checkpoint_dirs(self.run_dir):
            if path not in complete and step < state.global_step:
                shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- callbacks


# Trainer log keys -> metrics.jsonl fields; the rewards are DPO's (TRL's DPOTrainer logs them, per logging window)
LOGGED = {key: key for key in ("loss", "eval_loss", "learning_rate", "grad_norm")} | {
    "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
    "eval_rewards/accuracies": "eval_reward_accuracy", "eval_rewards/margins": "eval_reward_margin",
}  # fmt: skip


class RunMonitor(TrainerCallback):
    """Turns Trainer logs into records (throughput, memory) for metrics.jsonl and the display."""

    def __init__(self, metrics_path: Path, display: TrainingDisplay | None, device: torch.device, guard: StepGuard):
        self.metrics_path = metrics_path
        self.display = display
        self.device = device
        self.guard = guard
        self.last_time = time.monotonic()
        self.last_tokens = 0
        self.last_trained = 0
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
        if state.global_step >= state.max_steps:
            control.should_log = True  # the last step is logged: the final panel and train_loss are its figures
        if self.display and state.is_world_process_zero:
            self.display.tick(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        non_finite = []
        for key, name in LOGGED.items():
            if key in logs:
                value = float(logs[key])
                # JSON has no NaN/inf (json.dumps would write the invalid token NaN): null, and say which.
                record[name] = value if math.isfinite(value) else None
                if not math.isfinite(value):
                    non_finite.append(name)
        if non_finite:
            record["non_finite"] = non_finite
        now = time.monotonic()
        if "loss" in logs and state.global_step > self.last_step:
            elapsed = max(now - self.last_time, 1e-9)
            tokens = state.num_input_tokens_seen - self.last_tokens
            steps = state.global_step - self.last_step
            record["tokens_per_second"] = tokens / elapsed  # num_input_tokens_seen is already summed over ranks
            record["samples_per_second"] = (
                steps * args.train_batch_size * args.gradient_accumulation_steps * world_size() / elapsed
            )
            # Loss-bearing tokens (no prompt, no padding) of this process's micro-batches; under DDP each rank
            # trains as many batches, so the world's rate is this one's times the ranks.
            trained = self.guard.trained_tokens - self.last_trained
            record["trained_tokens_per_second"] = trained * world_size() / elapsed
            self.last_time, self.last_tokens, self.last_step = now, state.num_input_tokens_seen, state.global_step
            self.last_trained = self.guard.trained_tokens
        stats = memory_stats(self.device)
        record["memory_bytes"] = stats.as_dict()
        record["memory"] = stats.short()
        if self.guard.activation_bytes_per_token is not None:
            record["activation_bytes_per_token"] = self.guard.activation_bytes_per_token
        self.history.append(record)
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({k: v for k, v in record.items() if k != "memory"}, allow_nan=False) + "\n")
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
