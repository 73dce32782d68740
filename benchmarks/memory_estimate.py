"""The memory-estimate tables of BENCHMARKS.md: LLaMA-7B/13B QLoRA vs + VeLoRA (GC off/on), the VeLoRA paper's
own accounting next to ours, and how many tokens that accounting needs to reproduce the paper's Table 3.

Run: python benchmarks/memory_estimate.py   (config-only: no weights, no GPU)
"""

from __future__ import annotations

import dataclasses

from velora_cli.memory.arch import arch_for
from velora_cli.memory.estimate import Settings, estimate, paper_accounting

PAPER = {"llama-7b": (32, 5.77, 4.88), "llama-13b": (64, 9.91, 8.48)}  # LoRA r of the official scripts, GB
VD = ("v_proj", "down_proj")


def main() -> None:
    header = ["model", "micro-batch x seq", "QLoRA", "+ VeLoRA", "QLoRA + GC", "+ VeLoRA + GC", "paper acct."]
    print("| " + " | ".join(header) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for preset, (r, _, _) in PAPER.items():
        arch = arch_for(preset=preset)
        for batch in (1, 16):
            s = Settings(batch=batch, seq=512, lora_r=r, lora_dropout=0.1, num_groups=32)
            cells = []
            for gc in (False, True):
                for vel in ((), VD):
                    est = estimate(arch, dataclasses.replace(s, velora=vel, gradient_checkpointing=gc))
                    cells.append(f"{est.total / 2**30:.2f} GiB")
            paper = [paper_accounting(arch, r, v, 32, batch * 512)["total"] / 1e9 for v in ((), VD)]
            cells.append(f"{paper[0]:.2f} / {paper[1]:.2f} GB")
            print(f"| {preset} r={r} | {batch} x 512 | " + " | ".join(cells) + " |")
    print()
    print("Paper accounting: tokens per step that best reproduce Table 3 (search over multiples of 64)")
    for preset, (r, q_paper, v_paper) in PAPER.items():
        arch = arch_for(preset=preset)
        best = min(
            range(64, 4097, 64),
            key=lambda t: (
                abs(paper_accounting(arch, r, (), 32, t)["total"] / 1e9 - q_paper)
                + abs(paper_accounting(arch, r, VD, 32, t)["total"] / 1e9 - v_paper)
            ),
        )
        q = paper_accounting(arch, r, (), 32, best)["total"] / 1e9
        v = paper_accounting(arch, r, VD, 32, best)["total"] / 1e9
        print(f"{preset} r={r}: {best} tokens -> QLoRA {q:.2f} GB, + VeLoRA {v:.2f} GB (paper {q_paper} / {v_paper})")


if __name__ == "__main__":
    main()
