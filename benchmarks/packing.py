"""Packing vs padded batches, side by side in one run: one epoch over the same rows, trained tokens/s and held-out loss.

Three sessions of `velora finetune`'s own training path (FinetuneSession: the recipe's model, nf4 + LoRA + VeLoRA v,d,
the data pipeline, collator and attention) on the same training rows, split and seed, each for exactly one epoch:
  padded   micro-batches in random order, padded to their longest row (what most trainers do by default)
  grouped  train.group_by_length (the recipe default): rows of similar length batched together, little padding
  packed   data.packing: examples packed into rows of cutoff_len tokens, attention kept inside each example
One epoch of the same rows means every session trains exactly the same tokens (asserted), so trained tokens/s
compares the time each needs for the same work, and the held-out loss is scored after the same examples (the
issue's "equal trained tokens"). Their optimizer steps are interleaved - always the session that has trained the
fewest tokens so far steps next - so load on a shared machine hits all three alike. Each session's optimizer and
scheduler are the Trainer's own (create_optimizer_and_scheduler over its own step count), stepped here by hand.

A packed row of 512 tokens holds ~5.6 Alpaca examples (314 examples in 56 rows at the defaults; mean ~70 tokens
with the alpaca template, plus the best-fit remainder), so the packed default of 3 rows per step trains about as
many examples per optimizer step as the padded sessions' 16 rows: the sessions make about the same number of
updates (19 and 20 at the defaults), and the held-out losses compare equal tokens AND equal updates.

Reported: optimizer steps, processed tokens (padding included), seconds of step time, trained tokens/s and the
packed session's ratios to the other two (the issue's target: >= 1.6x unpacked), the held-out loss per scored token
(the same rows in the same batches for every session) and the difference (target within 1%).

    python benchmarks/packing.py [--rows 320] [--cutoff-len 512] [--micro-batch 8] [--batch-size 16]
        [--packed-micro-batch 3] [--packed-batch-size 3] [--data ../shared/data/instruct/alpaca_libre.json]
        [--json out.json]
    python benchmarks/packing.py --rows 24 --micro-batch 4 --batch-size 4 --packed-micro-batch 1 \
        --packed-batch-size 1 --val-rows 4   # a quick check that it runs
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

from velora_cli.config.load import validate_recipe  # noqa: E402
from velora_cli.config.presets import DEFAULT_MODEL  # noqa: E402
from velora_cli.data.formats import IGNORE_INDEX  # noqa: E402
from velora_cli.finetune.session import FinetuneSession  # noqa: E402

ALPACA = REPO.parent / "shared" / "data" / "instruct" / "alpaca_libre.json"


SESSIONS = {"padded": {"packing": False, "group_by_length": False},
            "grouped": {"packing": False, "group_by_length": True},
            "packed": {"packing": True, "group_by_length": False}}  # fmt: skip


def recipe_for(name: str, args: argparse.Namespace, data: Path, run_dir: Path) -> dict[str, Any]:
    packing, group_by_length = SESSIONS[name]["packing"], SESSIONS[name]["group_by_length"]
    return {
        "name": name,
        "model": {"name": args.model, "quantization": "nf4", "compute_dtype": "auto"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["qkvogud"]},
        "velora": {"enabled": True, "layers": ["v", "d"], "num_groups": 32},
        "data": {"path": str(data), "template": "alpaca", "cutoff_len": args.cutoff_len, "packing": packing,
                 "val_set_size": args.val_rows, "skip_bad_rows": True},  # alpaca_libre: 34 rows have no output
        "train": {"micro_batch_size": args.packed_micro_batch if packing else args.micro_batch,
                  "batch_size": args.packed_batch_size if packing else args.batch_size, "epochs": 1,
                  "learning_rate": args.lr, "scheduler": args.scheduler, "warmup_steps": args.warmup,
                  "seed": args.seed, "save_steps": 1 << 20, "group_by_length": group_by_length},
        "output": {"dir": str(run_dir)},
    }  # fmt: skip


class Stepper:
    """One session's model, its epoch of micro-batches, optimizer and scheduler, advanced one optimizer step at a
    time."""

    def __init__(self, name: str, args: argparse.Namespace, data: Path, root: Path) -> None:
        recipe = validate_recipe(recipe_for(name, args, data, root / name), source=f"benchmark recipe {name}")
        self.name = name
        self.session = FinetuneSession(recipe, root / name)
        self.plan = self.session.setup()  # seeds the global RNG: every session starts from the same adapter
        trainer = self.session.trainer
        micro = list(trainer.get_train_dataloader())  # one epoch, in the Trainer's own order
        accumulation = self.session.gradient_accumulation()
        self.chunks = [micro[i : i + accumulation] for i in range(0, len(micro), accumulation)]
        trainer.create_optimizer_and_scheduler(num_training_steps=len(self.chunks))
        self.optimizer, self.scheduler = trainer.optimizer, trainer.lr_scheduler
        self.model = self.session.model.train()
        self.trained = self.processed = self.steps = 0
        self.seconds = 0.0

    @property
    def done(self) -> bool:
        return self.steps == len(self.chunks)

    def step(self) -> None:
        micro = self.chunks[self.steps]
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
        self.processed += sum(b["input_ids"].numel() for b in micro)
        self.steps += 1

    def result(self) -> dict[str, Any]:
        return {"steps": self.steps, "trained_tokens": self.trained, "processed_tokens": self.processed,
                "real_tokens": self.plan.train_tokens, "seconds": round(self.seconds, 2),
                "trained_tokens_per_s": self.trained / self.seconds, "sequences": self.plan.sequences,
                "examples": self.plan.train_rows, "eval_loss": self.heldout_loss()}  # fmt: skip

    @torch.no_grad()
    def heldout_loss(self, batch_size: int = 8) -> float:
        """Mean loss per scored token over the held-out rows (unpacked), in batches of the same size for every
        session: the Trainer's eval_loss averages per batch, so sessions with different micro-batch sizes would
        weight the same rows differently."""
        rows, collate = self.session.val_set, self.session.trainer.data_collator
        total = tokens = 0.0
        self.model.eval()
        for start in range(0, len(rows), batch_size):
            batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
            scored = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += self.model(**batch, num_items_in_batch=scored).loss.item() * scored  # loss = sum / scored
            tokens += scored
        self.model.train()
        return total / tokens


def subset(source: Path, rows: int, out: Path) -> Path:
    """The first `rows` records of an Alpaca JSON file (the held-out rows are split off these)."""
    out.write_text(json.dumps(json.loads(source.read_text(encoding="utf-8"))[:rows]), encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=ALPACA)
    parser.add_argument("--rows", type=int, default=320, help="training rows (one epoch each); plus --val-rows")
    parser.add_argument("--cutoff-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--packed-micro-batch", type=int, default=3)
    parser.add_argument("--packed-batch-size", type=int, default=3)
    parser.add_argument("--val-rows", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--scheduler", default="constant_with_warmup")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"data not found: {args.data} (../shared is not beside the checkout?)")
    with tempfile.TemporaryDirectory(prefix="velora-packing-") as tmp:
        data = subset(args.data, args.rows + args.val_rows, Path(tmp) / "rows.json")
        sessions = [Stepper(name, args, data, Path(tmp)) for name in SESSIONS]
        load_before = os.getloadavg()[0]
        while not all(s.done for s in sessions):
            min((s for s in sessions if not s.done), key=lambda s: s.trained).step()
        rows = {s.name: s.result() for s in sessions}
    trained = {r["trained_tokens"] for r in rows.values()}
    assert len(trained) == 1, f"the sessions trained different tokens: {trained}"
    print(f"\n{args.model}, {args.data.name} (first {args.rows} + {args.val_rows} rows), cutoff {args.cutoff_len}, "
          f"micro-batch x accumulation {args.micro_batch} x {args.batch_size // args.micro_batch} (packed "
          f"{args.packed_micro_batch} x {args.packed_batch_size // args.packed_micro_batch}), lr {args.lr:g} "
          f"({args.scheduler}), seed {args.seed}, one epoch; "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| batches | examples / sequences | steps | trained tokens | processed tokens | seconds | trained tokens/s "
          "| held-out loss |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['examples']} / {r['sequences']} | {r['steps']} | {r['trained_tokens']} "
              f"| {r['processed_tokens']} | {r['seconds']:.1f} | {r['trained_tokens_per_s']:.1f} "
              f"| {r['eval_loss']:.4f} |")  # fmt: skip
    p = rows["packed"]
    for other in ("padded", "grouped"):
        o = rows[other]
        print(f"packed / {other}: trained tokens/s {p['trained_tokens_per_s'] / o['trained_tokens_per_s']:.2f}x, "
              f"held-out loss {100 * (p['eval_loss'] / o['eval_loss'] - 1):+.2f}%")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **rows}, indent=1))


if __name__ == "__main__":
    main()
