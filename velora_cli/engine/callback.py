"""VeloraCallback: VeLoRA under any transformers Trainer (TRL's SFTTrainer included), without a subclass.

The projection vectors are not in the adapter or the model's state dict (see layer.py), so the Trainer's own
checkpoints do not carry them. The callback writes them beside every checkpoint (`on_save`) and, when a run
resumes (`on_train_begin` with a non-zero step), restores them before the first forward, from
`resume_from` / `args.resume_from_checkpoint` / `output_dir/checkpoint-<step>`, in that order. A resume whose
checkpoint has no vectors is an error, not a silent re-initialisation from another batch.

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[VeloraCallback()])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from velora_cli.engine.inject import velora_layers
from velora_cli.engine.state import VECTORS_FILE, load_velora_vectors, save_velora_vectors


def checkpoint_dir(args: TrainingArguments, state: TrainerState) -> Path:
    """Where the Trainer writes the checkpoint of the current step (its own naming: checkpoint-<global_step>)."""
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


class VeloraCallback(TrainerCallback):
    """Saves VeLoRA's projection vectors with every Trainer checkpoint and restores them on resume."""

    def __init__(self, resume_from: str | os.PathLike[str] | None = None) -> None:
        self.resume_from = resume_from
        self.restored_from: Path | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        if state.global_step == 0 or model is None or not velora_layers(model):
            return
        candidates = [self.resume_from, getattr(args, "resume_from_checkpoint", None), checkpoint_dir(args, state)]
        for candidate in candidates:
            if isinstance(candidate, (str, os.PathLike)) and load_velora_vectors(model, candidate):
                self.restored_from = Path(candidate)
                return
        raise FileNotFoundError(
            f"resuming at step {state.global_step}, but no {VECTORS_FILE} was found in "
            f"{checkpoint_dir(args, state)}; pass VeloraCallback(resume_from=CHECKPOINT_DIR)"
        )

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        directory = checkpoint_dir(args, state)
        if state.is_world_process_zero and model is not None and directory.is_dir():
            save_velora_vectors(model, directory)
