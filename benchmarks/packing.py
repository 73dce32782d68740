"""Packing vs padded batches, side by side in one run: trained tokens/s and held-out loss at equal trained tokens.

Two sessions of `velora finetune`'s own training path (FinetuneSession: the recipe's model, nf4 + LoRA + VeLoRA v,d,
the data pipeline and collator) on the same rows, split and seed: one unpacked (padded micro-batches,
train.group_by_length as the recipe default), one with data.packing. Their optimizer steps are interleaved step by
step - one unpacked step, then packed steps until the packed session has trained at least as many tokens - so load
on a shared machine hits both alike, and both end at (nearly) equal trained tokens, where each is scored on the
same held-out rows (unpacked, the Trainer's evaluation loss). Each session's optimizer and scheduler are the
Trainer's own (create_optimizer_and_scheduler), stepped here by hand so the two can alternate; the scheduler is
constant after warmup by default, so equal trained tokens see the same learning rate (a cosine schedule would
decay over different step counts).

Reported: trained tokens (labels scored by the loss), real tokens (not padding), steps, seconds of step time,
trained tokens/s and its ratio (the issue's target: packed >= 1.6x), held-out loss and its difference (target
within 1%).

    python benchmarks/packing.py [--steps 40] [--cutoff-len 512] [--micro-batch 8] [--batch-size 16]
        [--packed-micro-batch 2] [--packed-batch-size 4] [--no-group-by-length]
        [--data ../shared/data/instruct/alpaca_libre.json] [--json out.json]
    python benchmarks/packing.py --steps 2 --micro-batch 2 --batch-size 2 --val-rows 4   # a quick check it runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from velora_cli.formats import IGNORE_INDEX  # noqa: E402
from velora_cli.models import DEFAULT_MODEL  # noqa: E402
from velora_cli.recipe import validate_recipe  # noqa: E402
from velora_cli.train import FinetuneSession  # noqa: E402

ALPACA = REPO.parent / "shared" / "data" / "instruct" / "alpaca_libre.json"


def recipe_for(packing: bool, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    return {
        "name": "packed" if packing else "unpacked",
        "model": {"name": args.model, "quantization": "nf4", "compute_dtype": "auto"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["qkvogud"]},
        "velora": {"enabled": True, "layers": ["v", "d"], "num_groups": 32},
        "data": {"path": str(args.data), "template": "alpaca", "cutoff_len": args.cutoff_len, "packing": packing,
                 "val_set_size": args.val_rows, "skip_bad_rows": True},  # alpaca_libre: 34 rows have no output
        "train": {"micro_batch_size": args.packed_micro_batch if packing else args.micro_batch,
                  "batch_size": args.packed_batch_size if packing else args.batch_size, "max_steps": args.steps,
                  "learning_rate": args.lr, "scheduler": args.scheduler, "warmup_steps": args.warmup,
                  "seed": args.seed, "save_steps": 1 << 20, "group_by_length": args.group_by_length},
        "output": {"dir": str(run_dir)},
    }  # fmt: skip


def real_tokens(batch: dict[str, Any]) -> int:
    """Tokens that are not padding: the attention mask's, or up to the last non-zero position of a packed row
    (packed rows are right-padded with position 0)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    positions = batch["position_ids"]
    index = torch.arange(1, positions.shape[1] + 1)
    return int(((positions != 0) * index).max(dim=1).values.sum())


class Stepper:
    """One session's model, batches, optimizer and scheduler, advanced one optimizer step at a time."""

    def __init__(self, packing: bool, args: argparse.Namespace, root: Path) -> None:
        recipe = validate_recipe(recipe_for(packing, args, root / str(packing)), source="benchmark recipe")
        self.session = FinetuneSession(recipe, root / str(packing))
        self.plan = self.session.setup()  # seeds the global RNG: both sessions start from the same adapter
        trainer = self.session.trainer
        trainer.create_optimizer_and_scheduler(num_training_steps=args.steps)  # packed: fewer (see above)
        self.optimizer, self.scheduler = trainer.optimizer, trainer.lr_scheduler
        self.batches = iter(trainer.get_train_dataloader())
        self.loader = trainer.get_train_dataloader
        self.accumulation = self.session.gradient_accumulation()
        self.model = self.session.model.train()
        self.trained = self.real = self.steps = 0
        self.seconds = 0.0

    def _next(self) -> dict[str, Any]:
        try:
            return next(self.batches)
        except StopIteration:  # a new epoch
            self.batches = iter(self.loader())
            return next(self.batches)

    def step(self) -> None:
        micro = [self._next() for _ in range(self.accumulation)]
        items = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)  # the Trainer's count
        started = time.perf_counter()
        for batch in micro:
            self.model(**batch, num_items_in_batch=items).loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.seconds += time.perf_counter() - started
        self.trained += items
        self.real += sum(real_tokens(b) for b in micro)
        self.steps += 1

    def result(self) -> dict[str, Any]:
        return {"steps": self.steps, "trained_tokens": self.trained, "real_tokens": self.real,
                "seconds": round(self.seconds, 2), "trained_tokens_per_s": self.trained / self.seconds,
                "sequences": self.plan.sequences, "examples": self.plan.train_rows,
                "eval_loss": self.session.evaluate_loss()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=ALPACA)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of the unpacked session")
    parser.add_argument("--cutoff-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    # A packed row holds several examples: a smaller packed batch keeps the tokens per optimizer step (and so the
    # number of updates at equal trained tokens) close to the unpacked run's; default: the same batch in rows.
    parser.add_argument("--packed-micro-batch", type=int)
    parser.add_argument("--packed-batch-size", type=int)
    parser.add_argument("--val-rows", type=int, default=64)
    # the recipe default (on) already removes most padding; off: batches in data order, as most trainers do
    parser.add_argument("--no-group-by-length", dest="group_by_length", action="store_false")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--scheduler", default="constant_with_warmup")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.packed_micro_batch = args.packed_micro_batch or args.micro_batch
    args.packed_batch_size = args.packed_batch_size or args.batch_size
    if not args.data.is_file():
        sys.exit(f"data not found: {args.data} (../shared is not beside the checkout?)")
    with tempfile.TemporaryDirectory(prefix="velora-packing-") as tmp:
        unpacked, packed = Stepper(False, args, Path(tmp)), Stepper(True, args, Path(tmp))
        load_before = os.getloadavg()[0]
        for _ in range(args.steps):
            unpacked.step()
            while packed.trained < unpacked.trained:
                packed.step()
        rows = {"unpacked": unpacked.result(), "packed": packed.result()}
    u, p = rows["unpacked"], rows["packed"]
    packed_shape = f"{args.packed_micro_batch} x {args.packed_batch_size // args.packed_micro_batch}"
    print(f"\n{args.model}, {args.data.name}, cutoff {args.cutoff_len}, micro-batch x accumulation "
          f"{args.micro_batch} x {args.batch_size // args.micro_batch} (packed {packed_shape}), lr {args.lr:g} "
          f"({args.scheduler}), group_by_length {args.group_by_length}, seed {args.seed}, "
          f"{args.val_rows} held-out rows; "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| batches | examples / sequences | steps | trained tokens | real tokens | seconds | trained tokens/s "
          "| held-out loss |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['examples']} / {r['sequences']} | {r['steps']} | {r['trained_tokens']} "
              f"| {r['real_tokens']} | {r['seconds']:.1f} | {r['trained_tokens_per_s']:.1f} | {r['eval_loss']:.4f} |")
    print(f"packed / unpacked: trained tokens/s {p['trained_tokens_per_s'] / u['trained_tokens_per_s']:.2f}x, "
          f"held-out loss {100 * (p['eval_loss'] / u['eval_loss'] - 1):+.2f}%")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **rows}, indent=1))


if __name__ == "__main__":
    main()
