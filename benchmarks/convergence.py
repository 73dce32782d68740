"""Convergence of QLoRA vs QLoRA + VeLoRA, side by side in one run: same model, data, split, seed and order.

Each configuration trains the same recipe through `velora finetune`'s own training path (FinetuneSession:
transformers' Trainer, PEFT LoRA on a bitsandbytes nf4 base, this project's VeLoRA) for --steps optimizer
steps on real instruction data (../shared/data/instruct/alpaca_libre.json, Alpaca format), then scores the
loss on a fixed held-out split (--val-rows rows chosen by the seed, identical for every configuration).

Configurations (LoRA r=8 alpha=16 dropout=0.05 on all seven projections):
  qlora             nf4 base + LoRA (the baseline)
  qlora_velora_vd   + VeLoRA on v_proj and down_proj (the paper's default), --num-groups sub-tokens per token
  qlora_velora_all  + VeLoRA on all seven projections
  qlora_gc          the baseline with gradient checkpointing (the usual way to save activation memory)
  qlora_velora_vd_lean_chunked, qlora_velora_all_lean_chunked
                    VeLoRA (v,d / all seven) + the exact lean savers of the recipe's memory section: lean RMSNorm
                    and SwiGLU, the chunked loss, no recompute (issue 19's "VeLoRA all + lean + chunked" target)
The other configurations run the stock path (memory.loss: full, lean_ops: false), so the baseline is plain QLoRA.
With --quantization none the base is not quantised (names start with "lora").

Reported per configuration: held-out eval loss (and its difference from the baseline; the project's target
is VeLoRA within 1%), last logged train loss, bytes saved for backward per token (measured by the trainer
on the first step), non-padding tokens/s over the training run and its ratio to the baseline. The
configurations run one after another, so on a shared machine tokens/s is only comparable as a ratio and is
noisy; the load average before/after each configuration is printed so that noise is visible.

    python benchmarks/convergence.py [--steps 30] [--model embedded:smollm2-135m] [--quantization nf4|none]
        [--configs qlora,qlora_velora_vd,qlora_gc] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from velora_cli.common.memstats import human_bytes  # noqa: E402
from velora_cli.config.load import validate_recipe  # noqa: E402
from velora_cli.config.presets import DEFAULT_MODEL  # noqa: E402
from velora_cli.finetune.session import FinetuneSession  # noqa: E402

ALPACA = REPO.parent / "shared" / "data" / "instruct" / "alpaca_libre.json"
CONFIGS = [
    "qlora", "qlora_velora_vd", "qlora_velora_all", "qlora_gc", "qlora_velora_vd_lean_chunked",
    "qlora_velora_all_lean_chunked",
]  # fmt: skip
DEFAULT_CONFIGS = "qlora,qlora_velora_vd,qlora_gc"


def recipe_for(config: str, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    velora: dict[str, Any] = {"enabled": False}
    if config.startswith("qlora_velora"):
        layers = ["v", "d"] if config.startswith("qlora_velora_vd") else ["qkvogud"]
        velora = {"enabled": True, "layers": layers, "num_groups": args.num_groups, "init": "batch_average_once"}
    return {
        "name": config,
        "model": {"name": args.model, "quantization": args.quantization, "compute_dtype": "auto"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["qkvogud"]},
        "velora": velora,
        "data": {
            "path": str(args.data),
            "template": "alpaca",
            "cutoff_len": args.cutoff_len,
            "val_set_size": args.val_rows,
            "skip_bad_rows": True,  # alpaca_libre has 34 rows with an empty output
        },
        "train": {
            "micro_batch_size": args.micro_batch,
            "batch_size": args.batch_size,
            "max_steps": args.steps,
            "learning_rate": args.lr,
            "scheduler": "cosine",
            "warmup_steps": max(1, args.steps // 10),
            "seed": args.seed,
            "gradient_checkpointing": config == "qlora_gc",
            "logging_steps": max(1, args.steps // 5),
            "save_steps": args.steps + 1,  # no checkpoint: writing one is not what is measured
        },
        "output": {"dir": str(run_dir)},
        # through the recipe's memory section, as `velora finetune` applies it (models.apply_memory)
        "memory": {"loss": "chunked", "lean_ops": True, "checkpointing": "none"}
        if config.endswith("_lean_chunked")
        else {"loss": "full", "lean_ops": False},
    }


def untrained_eval_loss(args: argparse.Namespace, root: Path) -> float:
    """The held-out loss of the base model (LoRA B starts at zero), in its own session: evaluation draws from
    the global RNG, and the training sessions must all start from the same RNG state to see the same batches."""
    recipe = validate_recipe(recipe_for(CONFIGS[0], args, root / "untrained"), source="untrained recipe")
    session = FinetuneSession(recipe, root / "untrained")
    session.setup()
    loss = session.evaluate_loss()
    del session
    gc.collect()
    assert loss is not None
    return loss


def run_config(config: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    recipe = validate_recipe(recipe_for(config, args, root / config), source=f"{config} recipe")
    session = FinetuneSession(recipe, root / config)
    plan = session.setup()  # seeds the global RNG: every configuration sees the same init and batch order
    load_before = os.getloadavg()[0]
    result = session.train(resume=False, display=False)
    tokens = int(session.trainer.state.num_input_tokens_seen)
    row = {
        "config": config,
        "steps": result.steps,
        "train_rows": plan.train_rows,
        "val_rows": plan.val_rows,
        "eval_loss": result.eval_loss,
        "train_loss": result.train_loss,
        "activation_bytes_per_token": result.activation_bytes_per_token,
        "velora_saved_bytes_per_token": result.velora_saved_bytes_per_token,
        "train_tokens": tokens,
        "train_seconds": result.seconds,
        "tokens_per_second": tokens / result.seconds,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "compressed_layers": len(plan.compressed_layers),
    }
    del session, result
    gc.collect()
    return row


def print_table(rows: list[dict[str, Any]], untrained: float, args: argparse.Namespace) -> None:
    base = rows[0]
    print(
        f"\nmodel {args.model} ({args.quantization}), {args.steps} steps x {args.batch_size} rows "
        f"(micro-batch {args.micro_batch}), cutoff {args.cutoff_len}, lr {args.lr:g}, seed {args.seed}; "
        f"eval on {base['val_rows']} held-out rows of {args.data.name}; "
        f"eval loss before training {untrained:.4f}"
    )
    print(
        "| config | eval loss | vs " + base["config"] + " | train loss | saved for backward / token "
        "| vs " + base["config"] + " | tokens/s (CPU) | vs " + base["config"] + " | load avg before/after |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        loss_diff = 100 * (r["eval_loss"] / base["eval_loss"] - 1)
        act = r["activation_bytes_per_token"]
        act_ratio = act / base["activation_bytes_per_token"] if act and base["activation_bytes_per_token"] else None
        print(
            f"| {r['config']} | {r['eval_loss']:.4f} | {loss_diff:+.2f}% | {r['train_loss']:.4f} "
            # The meter is off under gradient checkpointing (it cannot see inside checkpointed regions).
            f"| {human_bytes(act) if act else 'not metered'} | {f'{act_ratio:.3f}x' if act_ratio else '-'} "
            f"| {r['tokens_per_second']:.1f} | {r['tokens_per_second'] / base['tokens_per_second']:.2f}x "
            f"| {r['load_before']:.1f} / {r['load_after']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "fp4", "int8", "none"])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4, help="rows per optimizer step")
    parser.add_argument("--cutoff-len", type=int, default=128)
    parser.add_argument("--val-rows", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-groups", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data", type=Path, default=ALPACA)
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    if not args.data.is_file():
        parser.error(f"--data {args.data}: not found (../shared is not beside this checkout?)")

    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="velora-convergence-") as tmp:
        print("held-out loss of the untrained model...", flush=True)
        untrained = untrained_eval_loss(args, Path(tmp))
        for config in configs:
            print(f"[{time.monotonic() - started:7.0f}s] {config}: training {args.steps} steps...", flush=True)
            rows.append(run_config(config, args, Path(tmp)))
            r = rows[-1]
            print(
                f"[{time.monotonic() - started:7.0f}s] {config}: eval loss {r['eval_loss']:.4f}, "
                f"{r['tokens_per_second']:.1f} tokens/s, {r['train_seconds']:.0f} s",
                flush=True,
            )
            if args.json:  # written after every configuration, so a long run that is cut short keeps its rows
                settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
                report = {"settings": settings, "untrained_eval_loss": untrained, "rows": rows}
                args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print_table(rows, untrained, args)


if __name__ == "__main__":
    main()
