"""Two kernel-level stages: the lean ops against the stock ones and Liger Kernel's, and packed batches with
per-example SDPA against padded batches.

ops: at each workload's shape (hidden, MLP width, vocabulary) and token count, forward + backward of the loss
(stock: lm_head then fp32 cross-entropy, as transformers' ForCausalLMLoss; velora's chunked linear cross-entropy
on the torch backend; Liger's fused linear cross-entropy and Cut Cross-Entropy when installed), RMSNorm (stock
LlamaRMSNorm; velora's lean forward; Liger's, as apply_lean binds them) and SwiGLU (stock silu(gate) * up; velora's
SwiGLUFunction; Liger's). Per implementation: median time, bytes alive after forward (output + what backward
keeps) and peak during forward + backward above what was allocated before, and the largest difference of output
and input gradient from the stock op (relative to the stock op's largest value). The frozen norm weight and
lm_head are as in (Q)LoRA training. Liger and CCE need CUDA and their package: otherwise skipped, with the reason.

packed: one QLoRA model (VeLoRA v,d, chunked loss, lean ops: the recipe defaults) trained forward + backward over
the same examples as right-padded batches, as packed rows on stock SDPA (transformers' block-diagonal mask from
the position_ids) and as packed rows on velora's per-example SDPA (`use_packed_attention`); real tokens/s, peak
memory, and the packed batch's logits under both attentions compared.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from bench_common import SHAPES, VELORA_VD, Workload, free_memory, log, synchronize
from stage_memory import Config, build_qlora, memory

# --------------------------------------------------------------------------------------------------- ops


def fused_available(module: str, device: torch.device) -> str | None:
    """None when `module`'s kernels can run here, else why not."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not importable (not installed)"
    if device.type != "cuda":
        return f"{module}'s Triton kernels need CUDA (device {device.type})"
    return None


def _stock_loss(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100)


def op_cases(shape: dict[str, Any], tokens: int, device: torch.device) -> dict[str, dict[str, Any]]:
    """op -> {"inputs": (tensors, the first needs grad), "impls": {name: fn or why it cannot run}}."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from velora_cli.engine.lean import linear_cross_entropy, swiglu
    from velora_cli.engine.lean.modules import liger_rms_norm_forward, rms_norm_forward

    g = torch.Generator(device=device).manual_seed(0)
    dtype, hidden, inter, vocab = torch.bfloat16, shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    liger = fused_available("liger_kernel", device)
    cce = fused_available("cut_cross_entropy", device)
    norm = LlamaRMSNorm(hidden, eps=1e-5).to(device=device, dtype=dtype).requires_grad_(False)
    norm.weight.data.uniform_(0.5, 1.5, generator=g)

    def liger_swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        from liger_kernel.transformers.functional import liger_swiglu as fn

        return fn(a, b)

    def loss_with(backend: str) -> Callable[..., torch.Tensor]:
        return lambda h, w, t: linear_cross_entropy(h, w, t, backend=backend)  # type: ignore[arg-type]

    targets = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    return {
        "loss": {
            "inputs": (randn(tokens, hidden), randn(vocab, hidden, scale=hidden**-0.5), targets),
            "impls": {"stock": _stock_loss, "velora_chunked_torch": loss_with("torch"),
                      "liger_fused": liger or loss_with("liger"), "cce": cce or loss_with("cce")},
        },
        "rms_norm": {
            "inputs": (randn(tokens, hidden),),
            "impls": {"stock": norm, "velora_lean": lambda x: rms_norm_forward(norm, x),
                      "liger": liger or (lambda x: liger_rms_norm_forward(norm, x))},
        },
        "swiglu": {
            "inputs": (randn(tokens, inter), randn(tokens, inter)),
            "impls": {"stock": lambda a, b: F.silu(a) * b, "velora_lean": swiglu, "liger": liger or liger_swiglu},
        },
    }  # fmt: skip


def time_op(fn: Callable[..., torch.Tensor], inputs: tuple, reps: int, device: torch.device) -> dict[str, Any]:
    """Forward + backward of fn(*inputs): median time; on CUDA the bytes after forward and the peak above before."""
    cuda = device.type == "cuda"
    grad_inputs = inputs[:1] if len(inputs) == 3 else inputs  # the loss: d/dh only (lm_head is frozen)

    def leaves() -> list[torch.Tensor]:
        return [x.detach().requires_grad_(any(x is y for y in grad_inputs)) for x in inputs]

    def once() -> tuple[torch.Tensor, list[torch.Tensor]]:
        xs = leaves()
        out = fn(*xs)
        out.backward(torch.ones_like(out) if out.dim() else None)
        return out.detach(), [x.grad for x in xs if x.requires_grad]

    out, grads = once()  # warm-up: kernels compiled, autotuned, cached
    synchronize(device)
    stats: dict[str, Any] = {}
    if cuda:
        free_memory()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        xs = leaves()
        o = fn(*xs)
        synchronize(device)
        stats["after_forward_bytes"] = torch.cuda.memory_allocated() - before
        o.backward(torch.ones_like(o) if o.dim() else None)
        synchronize(device)
        stats["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before
        del o, xs
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        once()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    stats["median_ms"] = round(1000 * sorted(times)[len(times) // 2], 4)
    stats["_out"], stats["_grads"] = out, grads
    return stats


def ops_stage(args: argparse.Namespace) -> dict[str, Any]:
    device = args.torch_device
    out: dict[str, Any] = {"tokens": args.ops_tokens, "shapes": {}}
    for w in args.workloads:
        shape = SHAPES[w.shape]
        per_op: dict[str, Any] = {}
        for op, case in op_cases(shape, args.ops_tokens, device).items():
            rows: dict[str, Any] = {}
            ref: dict[str, Any] | None = None
            for name, impl in case["impls"].items():
                if isinstance(impl, str):
                    rows[name] = {"skipped": impl}
                    continue
                try:
                    stats = time_op(impl, case["inputs"], args.ops_reps, device)
                except Exception as exc:  # noqa: BLE001 - one kernel failing keeps the others
                    rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                    log(f"    {w.key} {op} {name}: ERROR {rows[name]['error']}")
                    continue
                o, grads = stats.pop("_out"), stats.pop("_grads")
                if ref is None:
                    ref = {"out": o, "grads": grads}
                else:
                    stats["out_max_rel_diff"] = rel_diff(o, ref["out"])
                    stats["grad_max_rel_diff"] = max(rel_diff(a, b) for a, b in zip(grads, ref["grads"], strict=True))
                rows[name] = stats
                log(f"    {w.key} {op} {name}: {stats}")
            per_op[op] = rows
            free_memory()
        out["shapes"][w.key] = {"shape": w.shape, "ops": per_op}
    out["errors"] = [f"{k}/{op}/{n}" for k, v in out["shapes"].items() for op, r in v["ops"].items()
                     for n, s in r.items() if s.get("error")]  # fmt: skip
    if out["errors"]:
        out["error"] = f"{len(out['errors'])} op implementation(s) failed: {out['errors']}"
    return out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.float().abs().max().item() or 1.0
    return (a.float() - b.float()).abs().max().item() / scale


# ------------------------------------------------------------------------------------------------ packed


def example_lengths(n: int, cutoff: int, median: int) -> list[int]:
    """Instruction-data-like lengths: log-normal around `median`, clipped to [16, cutoff] (fixed seed)."""
    g = torch.Generator().manual_seed(4)
    raw = torch.exp(torch.randn(n, generator=g) * 0.8) * median
    return [int(x) for x in raw.clamp(16, cutoff)]


def packed_stage(args: argparse.Namespace, w: Workload) -> dict[str, Any]:
    from velora_cli.data.packing import PackedCollator, pack_rows
    from velora_cli.engine.lean import use_packed_attention

    device = args.torch_device
    cuda = device.type == "cuda"
    vocab = SHAPES[w.shape]["vocab_size"]
    lengths = example_lengths(args.packed_examples, w.seq, args.packed_median)
    g = torch.Generator().manual_seed(5)
    rows = []
    for n in lengths:
        ids = torch.randint(2, vocab, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    cfg = Config("qlora_recipe_defaults", velora=VELORA_VD, memory=memory(loss="chunked", lean_ops=True))
    model, lean = build_qlora(w.shape, cfg, device)
    model.train()

    def padded(members: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in members)
        ids = torch.zeros(len(members), longest, dtype=torch.long)
        labels = torch.full((len(members), longest), -100, dtype=torch.long)
        mask = torch.zeros(len(members), longest, dtype=torch.long)
        for i, r in enumerate(members):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "use_cache": False}

    packed_rows = pack_rows(rows, w.seq)
    collate = PackedCollator(padded, pad_token_id=0)
    batches = {
        "padded": [padded(rows[i : i + w.batch]) for i in range(0, len(rows), w.batch)],
        "packed": [collate(packed_rows[i : i + args.packed_rows]) for i in range(0, len(packed_rows),
                                                                               args.packed_rows)],
    }  # fmt: skip
    real = sum(lengths)
    out: dict[str, Any] = {"workload": w.key, "shape": w.shape, "examples": len(rows), "real_tokens": real,
                           "cutoff": w.seq, "lean": lean, "variants": {}}  # fmt: skip

    def epoch(kind: str) -> dict[str, Any]:
        data = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches[kind]]
        step(data[0])  # warm-up
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        synchronize(device)
        t0 = time.perf_counter()
        for b in data:
            step(b)
        synchronize(device)
        seconds = time.perf_counter() - t0
        processed = sum(b["input_ids"].numel() for b in data)
        row = {"batches": len(data), "processed_tokens": processed, "seconds": round(seconds, 4),
               "real_tokens_per_s": round(real / seconds, 1)}  # fmt: skip
        if cuda:
            row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before
        return row

    def step(b: dict[str, Any]) -> None:
        model(**b).loss.backward()
        model.zero_grad(set_to_none=True)

    out["variants"]["padded"] = epoch("padded")
    out["variants"]["packed_block_diagonal_mask"] = epoch("packed")
    first = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batches["packed"][0].items()}
    masked = logits(model, first)
    out["per_example_attention"] = use_packed_attention(model)
    out["variants"]["packed_per_example_sdpa"] = epoch("packed")
    per_example = logits(model, first)
    out["logits_max_abs_diff_per_example_vs_mask"] = (per_example - masked).abs().max().item()
    out["logit_scale"] = masked.abs().max().item()
    v = out["variants"]
    out["speedup_per_example_vs_padded"] = round(v["padded"]["seconds"] / v["packed_per_example_sdpa"]["seconds"], 3)
    out["speedup_per_example_vs_mask"] = round(
        v["packed_block_diagonal_mask"]["seconds"] / v["packed_per_example_sdpa"]["seconds"], 3
    )
    model = None
    free_memory()
    return out


def logits(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The batch's logits (no labels: the full-logits path of the patched causal LM), in eval mode."""
    model.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs).logits.float().cpu()
    model.train()
    return out
