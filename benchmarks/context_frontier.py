"""Longest batch-1 context per configuration, from memory-estimate's model (bf16, CUDA, nf4 + double quant).

    python benchmarks/context_frontier.py PRESET LORA_R GIB [GIB ...]     (DROPOUT=0 for LoRA dropout 0)

For each budget: the longest sequence at micro-batch 1 and the modelled speed of the issue-19 configurations,
the planner's choice at seq 2048, its longest context (with and without offload, and without VeLoRA), and the
fastest configuration reaching Unsloth's published figures.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from velora_cli.config.presets import LLAMA_PROJECTIONS as P  # noqa: E402
from velora_cli.memory.arch import arch_for  # noqa: E402
from velora_cli.memory.estimate import Settings, largest_fitting  # noqa: E402
from velora_cli.memory.plan import candidates, plan, relative_speed  # noqa: E402

G = 2**30
CONF = {
    "QLoRA": {},
    "+GC": {"checkpointing": "all"},
    "+VeLoRA all": {"velora": P},
    "+chunked loss": {"loss": "chunked"},
    "+lean ops": {"lean_ops": True},
    "VeLoRA all+lean+chunked": {"velora": P, "lean_ops": True, "loss": "chunked"},
    "GC+chunked": {"checkpointing": "all", "loss": "chunked"},
    "GC every:2": {"checkpointing": "every:2"},
    "GC every:3": {"checkpointing": "every:3"},
    "GC mlp+VeLoRA all+lean+chunked": {"checkpointing": "mlp", "velora": P, "lean_ops": True, "loss": "chunked"},
    "GC+offload+lean+chunked": {"checkpointing": "all", "offload": True, "lean_ops": True, "loss": "chunked"},
}


def table(preset: str, r: int, budgets: list[int]) -> None:
    a = arch_for(preset=preset)
    dropout = float(os.environ.get("DROPOUT", "0.05"))
    s = Settings(batch=1, seq=2048, lora_r=r, velora=(), lora_dropout=dropout)
    for budget in budgets:
        print(f"\n{preset} nf4 r={r}, dropout {dropout}, bf16, sdpa, adamw_torch, {budget} GiB, batch 1")
        for name, kw in CONF.items():
            c = dataclasses.replace(s, **kw)
            longest = largest_fitting(a, c, budget * G, "seq", 1 << 21)
            print(f"  {name:34s} {longest:>9,d}  speed {relative_speed(a, c):.2f}x")
        res = plan(a, candidates(s), budget * G)
        options = res.options
        best = max(options, key=lambda o: o.max_seq)
        print(f"  planner choice at seq 2048: {res.reason}")
        print(f"  longest context over all configurations: {best.name}: {best.max_seq:,} ({best.speed:.2f}x)")
        no_offload = max((o for o in options if not o.settings.offload), key=lambda o: o.max_seq)
        print(f"  longest without offload: {no_offload.name}: {no_offload.max_seq:,} ({no_offload.speed:.2f}x)")
        exact = max((o for o in options if not o.settings.velora), key=lambda o: o.max_seq)
        print(f"  longest exact (no VeLoRA): {exact.name}: {exact.max_seq:,} ({exact.speed:.2f}x)")
        for target in (56_000, 342_000, 28_000):
            ok = [o for o in options if o.max_seq >= target]
            if ok:
                f = max(ok, key=lambda o: (o.speed, -len(o.settings.velora)))
                print(f"  fastest reaching {target:,}: {f.name} ({f.speed:.2f}x, max {f.max_seq:,})")


if __name__ == "__main__":
    table(sys.argv[1], int(sys.argv[2]), [int(b) for b in sys.argv[3:]])
