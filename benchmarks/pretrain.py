"""Pre-training from scratch with VeLoRA in full mode (the paper's section 4.5), side by side in one run.

A LLaMA of ~20M parameters (GaLore's 60M shape scaled down: hidden 256, MLP 688, 4 heads, 8 layers, SmolLM2's
49k-token tokenizer, tied embeddings) is initialised with the same seed and trained for --steps steps on the same
packed 128-token blocks of plain text: the instruction, input and output fields of ../shared/data/instruct
(alpaca_libre.json) joined as text, through `velora finetune`'s own path (FinetuneSession, method: pretrain).
Configurations:
  full             every weight trains, nothing compressed (the baseline)
  full_velora_vd   + VeLoRA on v_proj and down_proj ({v: 32, d: 43}: sub-tokens of 8 and 16, as the 60M script)
  full_velora_all  + VeLoRA on all seven projections (32 groups on 256-wide inputs, 43 on down_proj)
  full_gc          the baseline with gradient checkpointing
Reported: held-out perplexity (the same held-out documents for all), activation bytes per token saved for backward
(measured on the first step; under GC the meter cannot see inside checkpointed regions, so GC's figure is the
estimate's), seconds per step and its ratio to full_gc. The CPU is shared with other work: step times are noisy
and only their ratios within one run mean anything. Then memory-estimate's figures for LLaMA-60M/130M/7B at
batch 1 (the paper's Table 7 setting; 256 tokens), full vs full+VeLoRA (v,d) vs full+GC. Skips without ../shared.

    python benchmarks/pretrain.py [--steps 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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


def write_text(rows: int, out: Path) -> Path:
    records = json.loads(SHARED.read_text())[:rows]
    with out.open("w") as f:
        for r in records:
            text = "\n".join(x for x in (r.get("instruction"), r.get("input"), r.get("output")) if x)
            f.write(json.dumps({"text": text}) + "\n")
    return out


def run_config(name: str, work: Path, text: Path, steps: int) -> dict:
    from velora_cli.eval.perplexity import perplexity
    from velora_cli.recipe import validate_recipe
    from velora_cli.train import FinetuneSession

    cfg = CONFIGS[name]
    data = {
        "name": name, "method": "pretrain",
        "model": {"config": str(work / "model"), "tokenizer": "embedded:smollm2-135m", "compute_dtype": "fp32"},
        "velora": {"init": "batch_average_once", **cfg["velora"]},
        "data": {"path": str(text), "format": "text", "cutoff_len": 128, "val_set_size": 200},
        "train": {"micro_batch_size": 8, "batch_size": 8, "max_steps": steps, "learning_rate": 3e-3,
                  "scheduler": "cosine", "min_lr_ratio": 0.1, "warmup_steps": max(1, steps // 10), "seed": 0,
                  "logging_steps": 5, "save_steps": 10**6, "gradient_checkpointing": cfg.get("gc", False)},
        "output": {"dir": str(work / name)},
    }  # fmt: skip
    session = FinetuneSession(validate_recipe(data), work / name)
    session.setup()
    load = os.getloadavg()[0]
    started = time.monotonic()
    result = session.train(display=False, resume=False)
    seconds = time.monotonic() - started
    ppl = perplexity(session.model, session.val_set, batch_size=8)
    out = {"config": name, "perplexity": ppl["perplexity"], "heldout_tokens": ppl["tokens"],
           "train_loss": result.train_loss, "activation_bytes_per_token": result.activation_bytes_per_token,
           "seconds_per_step": seconds / max(1, result.steps), "load_before": load,
           "params": sum(p.numel() for p in session.model.parameters())}  # fmt: skip
    del session
    gc.collect()
    return out


def estimates() -> list[dict]:
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
            rows.append({"model": preset, "method": label, "total_GiB": est.total / 2**30,
                         "activations_MiB": est.components["activations"] / 2**20,
                         "weights+grads+optimizer_GiB": sum(est.components[k] for k in ("weights", "gradients", "optimizer")) / 2**30})  # fmt: skip  # noqa: E501
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rows", type=int, default=6000, help="instruction rows turned into text")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report: dict = {"estimates": estimates()}
    for row in report["estimates"]:
        print(f"{row['model']:<11} {row['method']:<40} total {row['total_GiB']:.2f} GiB, activations "
              f"{row['activations_MiB']:.1f} MiB, weights+grads+optimizer {row['weights+grads+optimizer_GiB']:.2f} GiB")
    if not SHARED.is_file():
        print(f"skipping the training comparison: {SHARED} is absent")
    else:
        sys.path.insert(0, str(REPO))
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            (work / "model").mkdir()
            (work / "model" / "config.json").write_text(json.dumps(CONFIG))
            text = write_text(args.rows, work / "text.jsonl")
            runs = [run_config(name, work, text, args.steps) for name in args.configs.split(",")]
        gc_time = next((r["seconds_per_step"] for r in runs if r["config"] == "full_gc"), None)
        base = runs[0]
        print(f"\n{'config':<17} {'ppl':>8} {'vs full':>8} {'act KiB/tok':>12} {'s/step':>8} {'GC time/this':>13} load")
        for r in runs:
            act = r["activation_bytes_per_token"]
            rel = 100 * (r["perplexity"] / base["perplexity"] - 1)
            print(f"{r['config']:<17} {r['perplexity']:>8.2f} {rel:>+7.2f}% "
                  f"{(act or 0) / 1024:>12.1f} {r['seconds_per_step']:>8.2f} "
                  f"{(gc_time / r['seconds_per_step']) if gc_time else float('nan'):>12.2f}x {r['load_before']:.1f}")  # noqa: E501
        report["runs"] = runs
        report["steps"] = args.steps
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
