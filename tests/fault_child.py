"""`velora` with a SIGKILL at a chosen point, for tests/test_faults.py: no cleanup code of ours gets to run.

    python tests/fault_child.py POINT STEP -- finetune RECIPE ...

POINT: step (mid-step STEP, after backward, before the optimizer step), checkpoint (checkpoint-STEP half-written:
adapter and optimizer saved, trainer_state.json not), vectors (checkpoint-STEP's trainer_state.json written, the
VeLoRA vectors not yet), final (every checkpoint written, before the final adapter is saved), export (the merged
weights staged, before the tokenizer and card), none (no kill).
"""

from __future__ import annotations

import os
import signal
import sys

from transformers import Trainer, TrainerCallback

import velora_cli.export.merge
import velora_cli.finetune.session
from velora_cli.cli import main

POINT, STEP = sys.argv[1], int(sys.argv[2])
ARGS = sys.argv[sys.argv.index("--") + 1 :]


def die(*_args, **_kwargs) -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if POINT == "step" and state.global_step + 1 == STEP:
            die()

    def on_save(self, args, state, control, **kwargs):
        if POINT == "vectors" and state.global_step == STEP:
            die()


_setup = velora_cli.finetune.session.FinetuneSession.setup


def setup(self):
    plan = _setup(self)
    self.trainer.callback_handler.callbacks.insert(0, KillAt())  # before VeloraCallback's on_save
    return plan


velora_cli.finetune.session.FinetuneSession.setup = setup
_save_rng_state = Trainer._save_rng_state


def save_rng_state(self, output_dir):
    if POINT == "checkpoint" and self.state.global_step == STEP:
        die()
    return _save_rng_state(self, output_dir)


Trainer._save_rng_state = save_rng_state
if POINT == "final":
    velora_cli.finetune.session.FinetuneSession.save = die
if POINT == "export":
    velora_cli.export.merge._save_tokenizer = die

main(ARGS)
