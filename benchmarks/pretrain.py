"""Pre-training from scratch with VeLoRA in full mode (the paper's section 4.5), side by side in one process.

A LLaMA of ~20M parameters (GaLore's 60M shape scaled down: hidden 256, MLP 688, 4 heads, 8 layers, SmolLM2's
49k-token tokenizer, tied embeddings) is built by `velora finetune`'s own code (methods.build_full_model, method
pretrain: the same seed gives every configuration the same initial weights) and trained for --steps steps on the
same batches of packed 128-token blocks (corpus.load_text_sets, as the CLI packs text) of the instruction, input and
output fields of ../shared/data/instruct/alpaca_libre.json joined as plain text; 200 documents are held out.
Configurations:
  full             every weight trains, nothing compressed (the baseline)
  full_velora_vd   + VeLoRA on v_proj and down_proj ({v: 32, d: 43}: sub-tokens of 8 and 16, as the 60M script)
  full_velora_all  + VeLoRA on all seven projections (32 groups on 256-wide inputs, 43 on down_proj)
  full_gc          the baseline with gradient checkpointing (non-reentrant, every layer)
The configurations take turns step by step (the order rotating every step), so the machine's noise hits them alike;
each step is AdamW (lr 3e-3, cosine to 10% after a 10% warm-up, gradient clipping at 1.0, the Trainer's defaults
otherwise). The first step of each is metered, not timed: activation bytes per token saved for backward
(ActivationMeter totals; under checkpointing only what the checkpointed layers keep, their inputs). Reported:
held-out perplexity (the CLI's eval.perplexity on the held-out blocks), activation bytes/token, median seconds per
step, and the ratios to full and to full_gc. Then memory-estimate's figures for LLaMA-60M/130M/7B at batch 1 (the
paper's Table 7 setting; 256 tokens). Skips the training without ../shared.

    python benchmarks/pretrain.py [--steps 200] [--json out.json]

At 200 steps: ~20-30 minutes on 2 quiet CPU cores (a round of the four steps takes ~5-8 s there; GC's step is the
longest), ~2 minutes of that tokenising, building and scoring. `--steps 3 --rows 600` checks it end to end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data" / "instruct" / "alpaca_libre.json"
CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256, intermediate_size=688,
              num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=8, max_position_embeddings=1024,
              rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=49152, use_cache=False)  # fmt: skip
CONFIGS = {
    "full": {"velora": {"enabled": False}},
    "full_velora_vd": {"velora": {"layers": ["v", "d"], "num_groups": {"v": 32, "d": 43}, "scale": 1.5}},
    "full_velora_all": {"velora": {"layers": list("qkvogud"), "num_groups": {"q": 32, "k": 32, "v": 32, "o": 32,
                                                                              "g": 32, "u": 32, "d": 43}}},
    "full_gc": {"velora": {"enabled": False}, "gc": True},
}  # fmt: skip
BLOCK, BATCH, LR, HELD_OUT = 128, 8, 3e-3, 200


@dataclass
class Run:
    name: str
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    saved_bytes: int = 0
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def write_text(rows: int, out: Path) -> Path:
    """The instruction data as plain-text documents (one per row), in the .jsonl layout `data.format: text` reads."""
    records = json.loads(SHARED.read_text(encoding="utf-8"))[:rows]
    with out.open("w", encoding="utf-8") as f:
        for r in records:
            text = "\n".join(x for x in (r.get("instruction"), r.get("input"), r.get("output")) if x)
            f.write(json.dumps({"text": text}) + "\n")
    return out


def recipe_for(name: str, work: Path, text: Path, steps: int) -> Any:
    from velora_cli.recipe import validate_recipe

    cfg = CONFIGS[name]
    return validate_recipe({
        "name": name, "method": "pretrain",
        "model": {"config": str(work / "model"), "tokenizer": "embedded:smollm2-135m", "compute_dtype": "fp32"},
        "velora": {"init": "batch_average_once", **cfg["velora"]},
        "data": {"path": str(text), "format": "text", "cutoff_len": BLOCK, "val_set_size": HELD_OUT},
        "train": {"micro_batch_size": BATCH, "batch_size": BATCH, "max_steps": steps, "learning_rate": LR,
                  "min_lr_ratio": 0.1, "warmup_steps": max(1, steps // 10), "seed": 0, "weight_decay": 0.0,
                  "gradient_checkpointing": cfg.get("gc", False)},
        "output": {"dir": str(work / name)},
    })  # fmt: skip


def build(name: str, recipe: Any, tokenizer, steps: int) -> Run:
    from transformers import get_scheduler, set_seed

    from velora_cli.methods import build_full_model

    set_seed(recipe.train.seed)  # as FinetuneSession.setup: the fresh initialisation draws from the global RNG
    model = build_full_model(recipe, torch.device("cpu"), tokenizer)[0]
    model.train()
    t = recipe.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=t.warmup_steps,
                              num_training_steps=steps,
                              scheduler_specific_kwargs={"min_lr_rate": t.min_lr_ratio})  # fmt: skip
    return Run(name, model, optimizer, scheduler)


def step(run: Run, ids: torch.Tensor, measure: bool = False) -> None:
    from velora_cli.velora.meter import ActivationMeter

    start = time.perf_counter()
    if measure:  # totals only: attribution would re-run checkpointed regions
        with ActivationMeter(run.model, attribute=False) as meter:
            loss = run.model(input_ids=ids, labels=ids).loss
        run.saved_bytes = meter.total_bytes
    else:
        loss = run.model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if not measure:
        run.times.append(time.perf_counter() - start)
    run.losses.append(loss.item())


def compare(names: list[str], steps: int, rows: int) -> dict[str, Any]:
    from velora_cli.corpus import load_text_sets
    from velora_cli.eval.perplexity import perplexity
    from velora_cli.methods import recipe_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "model").mkdir()
        (work / "model" / "config.json").write_text(json.dumps(CONFIG))
        text = write_text(rows, work / "text.jsonl")
        recipes = {name: recipe_for(name, work, text, steps + 1) for name in names}
        first = recipes[names[0]]
        tokenizer = recipe_tokenizer(first)
        train, val, docs = load_text_sets(first.data, tokenizer, first.train.seed)
        runs = [build(name, recipes[name], tokenizer, steps + 1) for name in names]
    start = {k: v.clone() for k, v in runs[0].model.state_dict().items()}
    for run in runs[1:]:  # the same seed: the same initial weights (VeLoRA keeps the linears' parameters)
        assert all(torch.equal(start[k], v) for k, v in run.model.state_dict().items()), run.name
    del start
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    order = order * math.ceil((steps + 1) * BATCH / len(order))
    ids = torch.tensor(train["input_ids"])
    batches = [ids[order[i * BATCH : (i + 1) * BATCH]] for i in range(steps + 1)]
    params = sum(p.numel() for p in runs[0].model.parameters())
    print(f"{params / 1e6:.1f}M parameters, {docs} documents: {len(train)} train / {len(val)} held-out blocks of "
          f"{BLOCK} tokens; batch {BATCH}, {steps} timed steps", flush=True)  # fmt: skip
    for run in runs:  # the metered step is also the warm-up (VeLoRA's first-batch initialisation, allocator)
        step(run, batches[0], measure=True)
    load = os.getloadavg()[0]
    for i, batch in enumerate(batches[1:], 1):
        shift = i % len(runs)
        for run in runs[shift:] + runs[:shift]:  # round-robin, rotating: the configurations share the noise
            step(run, batch)
        if i % 10 == 0 or i == steps:
            print(f"  step {i}: " + ", ".join(f"{r.name} {r.times[-1]:.2f}s loss {r.losses[-1]:.3f}" for r in runs),
                  flush=True)  # fmt: skip
    tokens = BATCH * BLOCK
    out: dict[str, Any] = {"params": params, "steps": steps, "train_blocks": len(train), "heldout_blocks": len(val),
                           "load_average_at_start": load, "load_average_at_end": os.getloadavg()[0],
                           "runs": {}}  # fmt: skip
    for run in runs:
        ppl = perplexity(run.model, val, batch_size=BATCH)
        out["runs"][run.name] = {"perplexity": ppl["perplexity"], "heldout_loss": ppl["loss"],
                                 "heldout_tokens": ppl["tokens"], "train_loss": run.losses[-1],
                                 "activation_bytes_per_token": run.saved_bytes / tokens,
                                 "median_step_seconds": statistics.median(run.times),
                                 "step_seconds": run.times}  # fmt: skip
    return out


def print_comparison(result: dict[str, Any]) -> None:
    rows = result["runs"]
    base = rows.get("full") or next(iter(rows.values()))
    gc = rows.get("full_gc")
    print(f"\n{'config':<17} {'ppl':>9} {'vs full':>8} {'act KiB/tok':>12} {'vs full':>8} {'s/step':>7} "
          f"{'vs full':>8} {'tok/s vs GC':>12} {'train loss':>10}")  # fmt: skip
    for name, r in rows.items():
        act, secs = r["activation_bytes_per_token"], r["median_step_seconds"]
        speed = f"{gc['median_step_seconds'] / secs:.2f}x" if gc else "-"
        print(f"{name:<17} {r['perplexity']:>9.2f} {100 * (r['perplexity'] / base['perplexity'] - 1):>+7.2f}% "
              f"{act / 1024:>12.1f} {act / base['activation_bytes_per_token']:>7.3f}x {secs:>7.3f} "
              f"{secs / base['median_step_seconds']:>7.3f}x {speed:>12} {r['train_loss']:>10.4f}")  # fmt: skip
    print(f"load average {result['load_average_at_start']:.1f} at the start, {result['load_average_at_end']:.1f} "
          "at the end (step times: medians of interleaved steps; only their ratios mean anything on a busy machine)")


def estimates() -> list[dict[str, Any]]:
    """memory-estimate's figures at the paper's pre-training sizes, batch 1 x 256 tokens (Table 7's setting; the
    stock loss and ops, as the paper's runs)."""
    from velora_cli.memory.arch import arch_for
    from velora_cli.memory.estimate import Settings, estimate

    rows = []
    for preset in ("llama-60m", "llama-130m", "llama-7b"):
        arch = arch_for(preset=preset)
        base = Settings(batch=1, seq=256, quantization="none", compute="fp32" if preset != "llama-7b" else "bf16",
                        method="pretrain", targets=(), velora=(), num_groups=64)  # fmt: skip
        vd = ("v_proj", "down_proj")
        for label, s in (("full", base), ("full + VeLoRA (v,d)", dataclasses.replace(base, velora=vd)),
                         ("full + GC", dataclasses.replace(base, gradient_checkpointing=True)),
                         ("full + VeLoRA + optimizer in backward",
                          dataclasses.replace(base, velora=vd, optimizer_in_backward=True))):  # fmt: skip
            est = estimate(arch, s)
            states = sum(est.components[k] for k in ("weights", "gradients", "optimizer"))
            rows.append({"model": preset, "method": label, "total_GiB": est.total / 2**30,
                         "activations_MiB": est.components["activations"] / 2**20,
                         "states_GiB": states / 2**30})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per configuration (after 1 metered)")
    parser.add_argument("--rows", type=int, default=6000, help="instruction rows turned into text documents")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    report: dict[str, Any] = {"estimates": estimates()}
    for row in report["estimates"]:
        print(f"{row['model']:<11} {row['method']:<40} total {row['total_GiB']:.2f} GiB, activations "
              f"{row['activations_MiB']:.1f} MiB, weights+grads+optimizer {row['states_GiB']:.2f} GiB")  # fmt: skip
    if not SHARED.is_file():
        print(f"skipping the training comparison: {SHARED} is absent")
    else:
        report["training"] = compare(names, args.steps, args.rows)
        print_comparison(report["training"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
