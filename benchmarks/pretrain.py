"""Pre-training from scratch with VeLoRA in full mode (the paper's section 4.5), side by side in one process.

A LLaMA of 20.5M parameters (hidden 384, MLP 1024, 6 heads, 8 layers, tied embeddings, a 16,384-token byte-level
BPE) is built by `velora finetune`'s own code (models.full.build_full_model, method pretrain: the same seed gives every
configuration the same initial weights) and trained for --steps steps on the same batches of packed 128-token
blocks (corpus.load_text_sets, as the CLI packs text) of the instruction, input and output fields of
../shared/data/instruct/alpaca_libre.json joined as plain text (all 3,131 rows at the default --rows); 200
documents are held out.

The shape keeps the paper's balance between the decoder and the lm_head, which decides how much of a step gradient
checkpointing re-runs (the decoder's forward) and so what VeLoRA can win back. Multiply-adds per token:
  decoder = layers x (4 h^2 + 3 h m),  lm_head = vocabulary x h
  paper 60M  (h 512, m 1376,  8 layers, 32,000 t5-base tokens): 25.3M : 16.4M = 1.54
  paper 130M (h 768, m 2048, 12 layers, 32,000 tokens):         84.9M : 24.6M = 3.46
  this one   (h 384, m 1024,  8 layers, 16,384 tokens):         14.2M :  6.3M = 2.25 (between the two)
(SmolLM2's 49,152-token vocabulary at hidden 256 gave 6.3M : 12.6M = 0.50: the lm_head dominated and GC cost ~5%.)
No stock tokenizer has that vocabulary, so train_tokenizer learns one from the TRAINING documents only (the
held-out split exactly as load_text_sets makes it) and saves it as a tokenizer directory that the recipes name in
model.tokenizer. Blocks stay at 128 tokens (the paper's 256 would double each step, ~23 minutes at the default
steps, and repeat the ~170k training tokens 2.4 times instead of 1.2).
Configurations:
  full             every weight trains, nothing compressed (the baseline)
  full_velora_vd   + VeLoRA on v_proj and down_proj ({v: 48, d: 64}: sub-tokens of 8 and 16, as the 60M script)
  full_velora_all  + VeLoRA on all seven projections (48 groups on 384-wide inputs, 64 on down_proj)
  full_gc          the baseline with gradient checkpointing (non-reentrant, every layer)
The configurations take turns step by step (the order rotating every step), so the machine's noise hits them alike;
each step is AdamW (lr 3e-3, cosine to 10% after a 10% warm-up, gradient clipping at 1.0, the Trainer's defaults
otherwise). The first step of each is metered, not timed: activation bytes per token saved for backward
(ActivationMeter totals; under checkpointing only what the checkpointed layers keep, their inputs). Reported:
held-out perplexity (the CLI's eval.perplexity on the held-out blocks), activation bytes/token, median seconds per
step, and the ratios to full and to full_gc. Then memory-estimate's figures for LLaMA-60M/130M/7B at batch 1 (the
paper's Table 7 setting; 256 tokens). Skips the training without ../shared.

    python benchmarks/pretrain.py [--steps 200] [--json out.json]

At 200 steps: ~10-15 minutes on 2 idle cores (a round of the four steps took ~3 s there: full ~0.7 s, GC ~0.9 s),
under a minute of that training the tokenizer, tokenising, building and scoring. On a busy machine pass
--threads 1: two threads contending with other processes slowed steps up to ~15x here. `--steps 3 --rows 600`
checks it end to end (its 400 training documents give a BPE of ~8k tokens, so its shape is not the balanced one).
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
CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=384, intermediate_size=1024,
              num_attention_heads=6, num_key_value_heads=6, num_hidden_layers=8, max_position_embeddings=1024,
              rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=16384, use_cache=False)  # fmt: skip
EOS = "<|endoftext|>"
CONFIGS = {
    "full": {"velora": {"enabled": False}},
    "full_velora_vd": {"velora": {"layers": ["v", "d"], "num_groups": {"v": 48, "d": 64}, "scale": 1.5}},
    "full_velora_all": {"velora": {"layers": list("qkvogud"), "num_groups": {"q": 48, "k": 48, "v": 48, "o": 48,
                                                                              "g": 48, "u": 48, "d": 64}}},
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


def train_tokenizer(recipe: Any, out: Path) -> Path:
    """A byte-level BPE of CONFIG's vocabulary size learnt from the recipe's training documents only (the held-out
    split as load_text_sets makes it: the same documents, val_set_size and seed), saved as a tokenizer directory
    that AutoTokenizer (model.tokenizer) loads like any other. By hand because no tokenizer of this size exists:
    the vocabulary sets the decoder : lm_head balance (module docstring), so it cannot be a stock one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from velora_cli.data.corpus import iter_documents
    from velora_cli.data.load import split_validation

    d = recipe.data
    documents = list(iter_documents(d.path, split=d.split, text_field=d.text_field, subset=d.subset))
    train_docs = split_validation(documents, d.val_set_size, recipe.train.seed)[0]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=CONFIG["vocab_size"], special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator(train_docs, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)
    if len(tokenizer) != CONFIG["vocab_size"]:  # too little text for that many merges (a smoke run's --rows)
        print(f"note: the BPE learnt only {len(tokenizer)} of {CONFIG['vocab_size']} tokens from "
              f"{len(train_docs)} documents; the decoder : lm_head balance holds at the default --rows")  # fmt: skip
    tokenizer.save_pretrained(out)
    return out


def recipe_for(name: str, work: Path, text: Path, steps: int) -> Any:
    from velora_cli.config.load import validate_recipe

    cfg = CONFIGS[name]
    return validate_recipe({
        "name": name, "method": "pretrain",
        "model": {"config": str(work / "model"), "tokenizer": str(work / "tokenizer"), "compute_dtype": "fp32"},
        "velora": {"init": "batch_average_once", **cfg["velora"]},
        "data": {"path": str(text), "format": "text", "cutoff_len": BLOCK, "val_set_size": HELD_OUT},
        "train": {"micro_batch_size": BATCH, "batch_size": BATCH, "max_steps": steps, "learning_rate": LR,
                  "min_lr_ratio": 0.1, "warmup_steps": max(1, steps // 10), "seed": 0, "weight_decay": 0.0,
                  "gradient_checkpointing": cfg.get("gc", False)},
        "output": {"dir": str(work / name)},
    })  # fmt: skip


def build(name: str, recipe: Any, tokenizer, steps: int) -> Run:
    from transformers import get_scheduler, set_seed

    from velora_cli.models.full import build_full_model, pretrain_config

    set_seed(recipe.train.seed)  # as FinetuneSession.setup: the fresh initialisation draws from the global RNG
    model = build_full_model(recipe, torch.device("cpu"), config=pretrain_config(recipe.model, tokenizer))[0]
    model.train()
    t = recipe.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=t.warmup_steps,
                              num_training_steps=steps,
                              scheduler_specific_kwargs={"min_lr_rate": t.min_lr_ratio})  # fmt: skip
    return Run(name, model, optimizer, scheduler)


def step(run: Run, ids: torch.Tensor, measure: bool = False) -> None:
    from velora_cli.engine.meter import ActivationMeter

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
    from velora_cli.data.corpus import load_text_sets
    from velora_cli.eval.perplexity import perplexity
    from velora_cli.models.load import recipe_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "model").mkdir()
        (work / "model" / "config.json").write_text(json.dumps(CONFIG))
        text = write_text(rows, work / "text.jsonl")
        recipes = {name: recipe_for(name, work, text, steps + 1) for name in names}
        first = recipes[names[0]]
        train_tokenizer(first, work / "tokenizer")
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
    print(f"{params / 1e6:.1f}M parameters ({len(tokenizer)}-token BPE), {docs} documents: {len(train)} train / "
          f"{len(val)} held-out blocks of {BLOCK} tokens; batch {BATCH}, {steps} timed steps", flush=True)  # fmt: skip
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
    out: dict[str, Any] = {"params": params, "vocabulary": len(tokenizer), "steps": steps, "train_blocks": len(train),
                           "heldout_blocks": len(val), "load_average_at_start": load,
                           "load_average_at_end": os.getloadavg()[0], "runs": {}}  # fmt: skip
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
    print(
        f"load average {result['load_average_at_start']:.1f} at the start, {result['load_average_at_end']:.1f} "
        "at the end (step times: medians of interleaved steps; only their ratios mean anything on a busy machine)"
    )


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
