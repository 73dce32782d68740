"""DPO activation memory and step time: QLoRA vs + VeLoRA v,d vs + lean + chunked vs + GC, side by side.

Each configuration is a real `method: dpo` session (velora_cli.finetune.session + TRL's DPOTrainer, as `velora
finetune` builds it) on the same model, the same pairs and the same batches:
  qlora                     memory.loss full, lean_ops off, checkpointing none, VeLoRA off
  qlora_velora_vd           + VeLoRA on v_proj and down_proj (the paper's default)
  qlora_velora_vd_lean      + lean ops and memory.loss chunked (for DPO the log-probs always come from TRL's chunked
                            head, so `chunked` changes nothing here; lean ops patch the norms and SwiGLU)
  qlora_velora_vd_lean_gc   + memory.checkpointing all
For each: bytes saved for backward per token of the first step (ActivationMeter over the policy forward and the
reference forward, which saves nothing: it runs without grad), the median forward+backward time (the configurations
take turns step by step, so machine noise hits them alike), and `velora memory-estimate`'s figure for the same
settings (Settings from the session's recipe at the batch's shape) as a ratio to the meter.

Batches hold pairs whose chosen and rejected rows have the same length, and all rows of a batch one length, so there
is no padding (the estimate counts unpadded rows: padding adds an attention mask).

    python benchmarks/dpo_memory.py [--model embedded:smollm2-135m] [--pairs 4] [--steps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from velora_cli.config.load import validate_recipe  # noqa: E402
from velora_cli.config.presets import DEFAULT_MODEL  # noqa: E402
from velora_cli.engine.meter import ActivationMeter  # noqa: E402
from velora_cli.finetune.session import FinetuneSession  # noqa: E402
from velora_cli.memory.arch import recipe_arch  # noqa: E402
from velora_cli.memory.estimate import estimate, settings_from_recipe  # noqa: E402

PAIRS = REPO / "recipes" / "data" / "dpo_pairs_train.json"
STOCK = {"loss": "full", "lean_ops": False, "checkpointing": "none"}
LEAN = {"loss": "chunked", "lean_ops": True, "checkpointing": "none"}
CONFIGS = {
    "qlora": (False, STOCK),
    "qlora_velora_vd": (True, STOCK),
    "qlora_velora_vd_lean": (True, LEAN),
    "qlora_velora_vd_lean_gc": (True, LEAN | {"checkpointing": "all"}),
}


def session(model: str, velora: bool, memory: dict, pairs: int, out: Path) -> FinetuneSession:
    data = {
        "name": "dpo-bench", "method": "dpo", "model": {"name": model},
        "velora": {"enabled": velora, "layers": ["v", "d"], "num_groups": 32},
        "data": {"path": str(PAIRS), "cutoff_len": 128},
        "train": {"micro_batch_size": pairs, "batch_size": pairs, "max_steps": 10, "group_by_length": False},
        "memory": memory, "output": {"dir": str(out)},
    }  # fmt: skip
    s = FinetuneSession(validate_recipe(data), out)
    s.setup()
    s.model.train()  # as Trainer.train() sets it: dropout and recompute are on in training mode only
    return s


def unpadded_batches(dataset, pairs: int, count: int) -> list[list[dict]]:
    """`count` groups of `pairs` rows whose chosen and rejected sequences all have one length."""
    by_length: dict[int, list[dict]] = defaultdict(list)
    for row in dataset:
        if len(row["chosen_ids"]) == len(row["rejected_ids"]):
            by_length[len(row["prompt_ids"]) + len(row["chosen_ids"])].append(row)
    groups = [rows[i : i + pairs] for _, rows in sorted(by_length.items())
              for i in range(0, len(rows) - pairs + 1, pairs)]  # fmt: skip
    if len(groups) < count:
        raise SystemExit(f"only {len(groups)} unpadded batches of {pairs} pairs in {PAIRS}")
    return groups[:count]


def step(s: FinetuneSession, rows: list[dict], measure: bool) -> tuple[float, int, int]:
    """(seconds of forward + backward, bytes saved for backward (measured step only), tokens)."""
    trainer, model = s.trainer, s.model
    inputs = trainer._prepare_inputs(trainer.data_collator(rows))
    assert bool(inputs["attention_mask"].all()), "padded batch"
    started = time.perf_counter()
    saved = 0
    if measure:
        with ActivationMeter(model, attribute=False) as meter:
            loss = trainer.compute_loss(model, inputs)
        saved = meter.total_bytes
    else:
        loss = trainer.compute_loss(model, inputs)
    loss.backward()
    seconds = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    return seconds, saved, int(inputs["attention_mask"].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--pairs", type=int, default=4, help="pairs per micro-batch (2x as many rows)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the metered one")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {name: session(args.model, v, m, args.pairs, Path(tmp) / name) for name, (v, m) in CONFIGS.items()}
        first = next(iter(sessions.values()))
        batches = unpadded_batches(first.train_set, args.pairs, args.steps + 1)
        arch = recipe_arch(first.recipe)
        results: dict[str, dict] = {}
        for name, s in sessions.items():  # the metered step is also the warm-up (VeLoRA's first-batch init)
            _, saved, tokens = step(s, batches[0], measure=True)
            seq = len(batches[0][0]["prompt_ids"]) + len(batches[0][0]["chosen_ids"])
            settings = settings_from_recipe(s.recipe, device=s.device.type)
            settings = type(settings)(**{**settings.__dict__, "batch": args.pairs, "seq": seq})
            predicted = estimate(arch, settings).act.meter_view
            results[name] = {"saved_bytes_per_token": saved / tokens, "estimate_over_meter": predicted / saved,
                             "times": []}  # fmt: skip
            print(f"  {name}: saved {saved / tokens / 1024:.1f} KB/token, estimate/meter {predicted / saved:.3f}",
                  flush=True)  # fmt: skip
        for rows in batches[1:]:
            for name, s in sessions.items():  # round-robin
                results[name]["times"].append(step(s, rows, measure=False)[0])
    base = results["qlora"]
    base_time = statistics.median(base["times"])
    print(f"\n== DPO on {args.model}: {args.pairs} pairs ({2 * args.pairs} rows) x {seq} tokens, "
          f"{first.recipe.model.quantization}, {settings.compute}, {first.device}, {args.steps} timed steps, "
          f"lora dropout {first.recipe.lora.dropout}")  # fmt: skip
    print(f"{'config':26s} {'saved KB/tok':>12s} {'vs qlora':>8s} {'step s':>7s} {'vs qlora':>8s} {'est/meter':>9s}")
    for name, r in results.items():
        r["step_seconds"] = statistics.median(r["times"])
        r["saved_ratio_vs_qlora"] = r["saved_bytes_per_token"] / base["saved_bytes_per_token"]
        r["step_ratio_vs_qlora"] = r["step_seconds"] / base_time
        print(f"{name:26s} {r['saved_bytes_per_token'] / 1024:12.1f} {r['saved_ratio_vs_qlora']:8.3f} "
              f"{r['step_seconds']:7.2f} {r['step_ratio_vs_qlora']:8.3f} {r['estimate_over_meter']:9.3f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
