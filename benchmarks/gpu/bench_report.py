"""The environment record and results.md, the human-readable summary of results.json."""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

import torch
from bench_common import LORA_DROPOUT, LORA_R

GIB = 2**30


def env_stage(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for dist in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "pydantic", "safetensors",
                 "tokenizers", "typer", "rich", "pyyaml", "numpy", "triton", "liger-kernel",
                 "cut-cross-entropy"):  # fmt: skip
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    out: dict[str, Any] = {"python": platform.python_version(), "versions": versions, "device": str(args.torch_device)}
    if args.torch_device.type == "cuda":
        props = torch.cuda.get_device_properties(args.torch_device)
        out.update(gpu=props.name, gpu_total_bytes=props.total_memory, cuda=torch.version.cuda,
                   capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())  # fmt: skip
    import bitsandbytes  # noqa: F401 - fail here, loudly, if the carried wheel did not install

    return out


def training_table(title: str, workloads: dict[str, Any], baseline: str) -> list[str]:
    lines = [
        f"\n{title}\n",
        "| workload | config | peak GiB | activations GiB | estimate GiB | est. vs peak | tokens/s | vs "
        f"{baseline} | loss | kernels |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for wkey, rows in workloads.items():
        base_tps = (rows.get(baseline) or {}).get("tokens_per_s")
        for name, r in rows.items():
            label = name + (f" = {r['plan']['choice']}" if r.get("plan", {}).get("choice") else "")
            if r.get("error") or r.get("skipped"):
                why = (r.get("error") or f"skipped: {r['skipped']}").splitlines()[0][:90]
                lines.append(f"| {wkey} | {label} | {why} | | | | | | | |")
                continue
            est = r.get("estimate", {})
            est_s = f"{est['tensors'] / GIB:.3f}" if "tensors" in est else est.get("error", "-")[:40]
            vs = f"{100 * r['estimate_vs_peak']:+.1f}%" if "estimate_vs_peak" in r else "-"
            rel = f"{r['tokens_per_s'] / base_tps:.3f}x" if base_tps else "-"
            lean = r.get("lean") or {}
            kernels = "/".join(str(lean.get(k)) for k in ("loss_backend", "ops_backend") if lean.get(k)) or "stock"
            lines.append(
                f"| {wkey} | {label} | {r['peak_allocated'] / GIB:.3f} | {r['activation_bytes'] / GIB:.3f} | "
                f"{est_s} | {vs} | {r['tokens_per_s']} | {rel} | {r['loss_first']} -> {r['loss_last']} | {kernels} |"
            )
    return lines


def ops_table(st: dict[str, Any]) -> list[str]:
    lines = [f"\nops ({st.get('tokens')} tokens, forward + backward, bf16)\n",
             "| shape | op | implementation | ms | peak extra MiB | after forward MiB | out diff | grad diff |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for wkey, v in st.get("shapes", {}).items():
        for op, impls in v["ops"].items():
            for name, s in impls.items():
                if "median_ms" not in s:
                    why = s.get("skipped") or s.get("error") or ""
                    lines.append(f"| {wkey} | {op} | {name} | {why[:90]} | | | | |")
                    continue
                mib = {k: f"{s[k] / 2**20:.1f}" if k in s else "-" for k in ("peak_extra_bytes", "after_forward_bytes")}
                diffs = [f"{s[k]:.1e}" if k in s else "ref" for k in ("out_max_rel_diff", "grad_max_rel_diff")]
                lines.append(f"| {wkey} | {op} | {name} | {s['median_ms']} | {mib['peak_extra_bytes']} | "
                             f"{mib['after_forward_bytes']} | {diffs[0]} | {diffs[1]} |")  # fmt: skip
    return lines


BRIEF = ("error", "skipped", "counts", "identical_logits", "bytes_ratio", "wall_s", "exported_bytes", "seconds",
         "questions_done", "scoring_s", "questions_per_s", "extrapolated_all_questions_s", "complete",
         "prompts_with_fewer_shots", "speedup_per_example_vs_padded", "speedup_per_example_vs_mask",
         "logits_max_abs_diff_per_example_vs_mask", "real_tokens", "estimates", "process_rc")  # fmt: skip


def summary_markdown(data: dict[str, Any]) -> str:
    stages = data["stages"]
    lines = [
        f"device {data['device']}{' (tiny shapes)' if data['tiny'] else ''}; QLoRA: LoRA r={LORA_R} on all 7, dropout "
        f"{LORA_DROPOUT}, nf4 + double quant, bf16, AdamW; estimate = memory-estimate total minus its overhead line; "
        "kernels = loss/ops backend apply_lean picked",
    ]
    if "memory" in stages and "workloads" in stages["memory"]:
        lines += training_table("QLoRA configurations", stages["memory"]["workloads"], "qlora")
    if "pretrain" in stages and "workloads" in stages["pretrain"]:
        lines += training_table("full / pretrain (every weight trains)", stages["pretrain"]["workloads"], "full")
    if "ops" in stages and "shapes" in stages["ops"]:
        lines += ops_table(stages["ops"])
    for name, st in stages.items():
        if name in ("memory", "pretrain", "ops") and not (st.get("error") or st.get("skipped")):
            continue
        brief = {k: v for k, v in st.items() if k in BRIEF}
        if name == "mmlu" and "figures" in st:
            f = st["figures"]
            brief.update({k: f.get(k) for k in ("questions", "fast_questions_per_s", "reference_questions_per_s",
                                                "speedup", "identical_predictions")})  # fmt: skip
        if name == "packed" and "variants" in st:
            brief["variants"] = {k: {m: v.get(m) for m in ("real_tokens_per_s", "processed_tokens", "peak_extra_bytes")}
                                 for k, v in st["variants"].items()}  # fmt: skip
        if name == "export" and "check" in st:
            brief.update(st["check"])
        lines.append(f"\n{name}: " + json.dumps(brief, default=str)[:900])
    return "\n".join(lines) + "\n"
