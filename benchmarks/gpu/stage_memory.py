"""The memory stage: CUDA peak, activation share and tokens/s of each training configuration at each workload,
beside `velora memory-estimate --json`'s prediction for the same configuration.

A configuration is what a recipe says: VeLoRA's layers and the `memory:` section (loss, lean_ops, checkpointing,
offload), applied as `velora finetune` applies them (models.build_training_model / apply_memory): PEFT's k-bit
preparation without its gradient checkpointing, PEFT LoRA, `apply_velora(mode="lora")`, then
`velora_cli.engine.lean.apply_lean(**memory)`, which owns checkpointing (non-reentrant, per layer) and picks the
fused kernels itself (Liger Kernel on CUDA when installed; each row records which ran). The same settings go to
memory-estimate as `--set` overrides, so the estimate models exactly what was measured. The planner's rows are
its choice (velora_cli.memory.plan) when the GPU-resident activations (the estimate's activations + logits lines)
may be 0.25x / 0.10x of stock QLoRA's, from VeLoRA off / v,d / all seven, both losses, lean ops on/off, every
recompute mode and, on CUDA, offload.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from bench_common import (
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_R,
    LR,
    NUM_GROUPS,
    REPO,
    SHAPES,
    TARGETS,
    VELORA_VD,
    Clock,
    Results,
    SavedCounter,
    Workload,
    error_text,
    free_memory,
    log,
    quantize_nf4_,
    random_model,
    shape_dir,
    sub_env,
    synchronize,
    tensor_bytes,
)

STOCK = {"loss": "full", "lean_ops": False, "checkpointing": "none", "offload": False}


def memory(**changes: Any) -> dict[str, Any]:
    """A `memory:` section: the stock path (no technique) with `changes`."""
    return {**STOCK, **changes}


@dataclass(frozen=True)
class Config:
    """One training configuration: VeLoRA's layers and the recipe's memory section (see the module docstring)."""

    name: str
    velora: tuple[str, ...] = ()
    memory: dict[str, Any] = field(default_factory=memory)
    plan: dict[str, Any] | None = None  # the planner's choice and why (planner rows)
    plan_error: str | None = None  # the planner found nothing that fits


CONFIGS = [  # in order of value: a run cut short by its budget keeps the first ones
    Config("qlora"),
    Config("qlora_velora_vd", velora=VELORA_VD),
    Config("qlora_velora_all", velora=TARGETS),
    Config("qlora_gc", memory=memory(checkpointing="all")),
    Config("qlora_velora_all_lean_chunked", velora=TARGETS, memory=memory(loss="chunked", lean_ops=True)),
    Config("qlora_gc_chunked", memory=memory(loss="chunked", checkpointing="all")),
    Config("qlora_gc_mlp_velora_all_lean_chunked", velora=TARGETS,
           memory=memory(loss="chunked", lean_ops=True, checkpointing="mlp")),
    Config("qlora_offload_lean_chunked", memory=memory(loss="chunked", lean_ops=True, offload=True)),
]  # fmt: skip
PLANNED = {"planner_0.25x": 0.25, "planner_0.10x": 0.10}  # name -> fraction of QLoRA's GPU activations


def estimate_sets(cfg: Config, method: str = "qlora") -> list[str]:
    """The recipe overrides that make memory-estimate model `cfg` (what the measurement builds)."""
    sets = ["model.compute_dtype=bf16", "train.optimizer=adamw_torch"]
    if method == "qlora":
        sets += ["model.quantization=nf4", "model.double_quant=true", f"lora.r={LORA_R}", f"lora.alpha={LORA_ALPHA}",
                 f"lora.dropout={LORA_DROPOUT}", "lora.target_modules=[q,k,v,o,g,u,d]"]  # fmt: skip
    else:
        sets += ["model.quantization=none"]
    if cfg.velora:
        sets += ["velora.enabled=true", f"velora.layers=[{','.join(cfg.velora)}]", f"velora.num_groups={NUM_GROUPS}"]
    else:
        sets += ["velora.enabled=false"]
    return sets + [f"memory.{k}={str(v).lower()}" for k, v in cfg.memory.items()]


def estimate_argv(args: argparse.Namespace, section: str, w: Workload, cfg: Config, method: str = "qlora") -> list:
    argv = ["memory-estimate", "--model", str(shape_dir(args, w.shape)), "--batch", str(w.batch), "--seq", str(w.seq)]
    if method != "qlora":
        argv += ["--method", method]
    argv += ["--json", str(args.work / "estimates" / f"{section}__{w.key}__{cfg.name}.json")]
    for s in estimate_sets(cfg, method):
        argv += ["--set", s]
    return argv


# ------------------------------------------------------------------------------------------- planner


def planned_configs(args: argparse.Namespace, w: Workload) -> list[Config]:
    """The planner's choices for this workload (budget on the GPU-resident activations; see the docstring)."""
    from velora_cli.memory.command import resolve_inputs
    from velora_cli.memory.estimate import estimate
    from velora_cli.memory.plan import candidates, plan
    from velora_cli.memory.settings import settings_from_recipe

    rec, arch = resolve_inputs(None, str(shape_dir(args, w.shape)), None, estimate_sets(CONFIGS[0]), w.batch, w.seq)
    s = settings_from_recipe(rec, device=args.torch_device.type)

    def on_gpu(e) -> int:
        return e.components["activations"] + e.components["logits"]

    qlora = on_gpu(estimate(arch, s))
    out = []
    for name, fraction in PLANNED.items():
        budget = int(fraction * qlora)
        result = plan(arch, candidates(s, velora=[(), VELORA_VD, TARGETS]), budget, size=on_gpu)
        info: dict[str, Any] = {"fraction": fraction, "budget": budget, "qlora_activations": qlora,
                                "reason": result.reason}  # fmt: skip
        if result.choice is None:
            out.append(Config(name, plan=info, plan_error=f"planner: {result.reason}"))
            continue
        c = result.choice.settings
        info.update(choice=result.choice.name, modelled_speed=round(result.choice.speed, 4))
        chosen = memory(loss=c.loss, lean_ops=c.lean_ops, checkpointing=str(c.recompute), offload=c.offload)
        out.append(Config(name, velora=tuple(c.velora), memory=chosen, plan=info))
        log(f"  {w.key} {name}: {result.reason}")
    return out


# ------------------------------------------------------------------------------------ building models


def build_qlora(shape: str, cfg: Config, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """What `velora finetune` builds for a qlora recipe (models.build_training_model), through public APIs."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from velora_cli.engine import VeloraConfig, apply_velora

    model = random_model(shape, device)
    quantize_nf4_(model, device)
    loaded = {name: p.dtype for name, p in model.named_parameters()}
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for name, p in model.named_parameters():  # velora undoes PEFT's fp32 upcast of embeddings, norms, lm_head
        if name in loaded and p.dtype != loaded[name]:
            p.data = p.data.to(loaded[name])
    lora = LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=list(TARGETS),
        bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(model, lora)
    if cfg.velora:
        apply_velora(model, VeloraConfig(layers=list(cfg.velora), num_groups=NUM_GROUPS), mode="lora")
    return model, apply_memory(model, cfg)


def apply_memory(model: torch.nn.Module, cfg: Config) -> dict[str, Any]:
    """The recipe's memory section as models.apply_memory applies it; returns what apply_lean reported."""
    from velora_cli.engine.lean import apply_lean

    report = apply_lean(model, **cfg.memory)
    if cfg.memory["checkpointing"] != "none":
        model.config.use_cache = False
    return {"loss_backend": report.loss_backend, "ops_backend": report.ops_backend, "changes": report.changes}


# ------------------------------------------------------------------------------------- memory & speed


def measure_training(
    w: Workload,
    build: Callable[[], tuple[torch.nn.Module, dict[str, Any]]],
    args: argparse.Namespace,
    save_adapter: Path | None = None,
) -> dict[str, Any]:
    """Peak memory, activation share and tokens/s of training steps of the model `build` returns."""
    device = args.torch_device
    cuda = device.type == "cuda"
    row: dict[str, Any] = {"shape": w.shape, "batch": w.batch, "seq": w.seq}
    row["tokens"] = tokens = w.batch * w.seq
    if cuda:
        torch.cuda.empty_cache()
        row["allocated_at_start"] = torch.cuda.memory_allocated()  # leak check: ~0 in every configuration
    began = time.perf_counter()
    model, row["lean"] = build()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR)
    if cuda:
        torch.cuda.empty_cache()  # drop the blocks of the bf16 weights that were quantised
        row["allocated_after_build"] = torch.cuda.memory_allocated()
    row["build_s"] = round(time.perf_counter() - began, 2)
    row["trainable_params"] = sum(p.numel() for p in trainable)
    vocab = SHAPES[w.shape]["vocab_size"]
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (w.batch, w.seq), generator=gen).to(device) for _ in range(2)]
    losses: list[float] = []

    def train_step(ids: torch.Tensor, counter: SavedCounter | None = None) -> None:
        if counter is not None:
            with counter:
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    # warm-up: optimizer states, VeLoRA's first-batch init, allocator, kernel and pinned-memory caches; on CPU
    # the last warm-up step counts what is saved for backward.
    for i in range(args.warmup):
        counter = SavedCounter(model) if i == args.warmup - 1 else None
        train_step(batches[i % 2], counter)
        if counter is not None:
            row["saved_for_backward"] = counter.total
            row["saved_for_backward_per_token"] = round(counter.total / tokens, 1)
    synchronize(device)
    # the measured step: peak of forward + backward, then of the optimizer step
    ids = batches[0]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = tensor_bytes(model, optimizer)
    counter = None if cuda else SavedCounter(model)
    if counter is not None:
        with counter:
            loss = model(input_ids=ids, labels=ids).loss
    else:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    synchronize(device)
    # no allocator peak on CPU: what was there + what backward needs (saved tensors) + the gradients
    peak_fwd_bwd = torch.cuda.max_memory_allocated() if cuda else tensor_bytes(model, optimizer) + counter.total
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(loss.item())
    del loss
    synchronize(device)
    row["allocated_before_step"] = before
    row["peak_fwd_bwd"] = peak_fwd_bwd
    row["activation_bytes"] = peak_fwd_bwd - before
    row["activation_bytes_per_token"] = round((peak_fwd_bwd - before) / tokens, 1)
    if cuda:
        row["peak_allocated"] = torch.cuda.max_memory_allocated()
        row["peak_reserved"] = torch.cuda.max_memory_reserved()
        free, total = torch.cuda.mem_get_info()
        row["device_used_after"] = total - free  # + CUDA context, cached blocks: what nvidia-smi shows
        row["peak_source"] = "torch.cuda.max_memory_allocated"
    else:
        row["peak_allocated"] = peak_fwd_bwd
        row["peak_source"] = "cpu accounting: tensor bytes before + saved for backward + gradients"
    times: list[float] = []
    for i in range(w.steps):
        synchronize(device)
        t0 = time.perf_counter()
        train_step(batches[i % 2])
        synchronize(device)
        times.append(time.perf_counter() - t0)
    row["step_s"] = [round(t, 4) for t in times]
    row["median_step_s"] = sorted(times)[len(times) // 2]
    row["tokens_per_s"] = round(tokens * len(times) / sum(times), 1)
    row["loss_first"], row["loss_last"] = round(losses[0], 4), round(losses[-1], 4)
    row["finite"] = all(math.isfinite(x) for x in losses)
    if save_adapter is not None:
        model.save_pretrained(save_adapter)
        row["adapter_saved_to"] = str(save_adapter)
    model = optimizer = trainable = batches = None  # free before the next configuration is built
    free_memory()
    return row


def measure_rows(
    args: argparse.Namespace,
    results: Results,
    section: str,
    workloads: list[tuple[Workload, list[Config]]],
    build: Callable[[Workload, Config], Callable[[], tuple[torch.nn.Module, dict[str, Any]]]],
) -> dict[str, Any]:
    """Every configuration of every workload into results[section]["workloads"], saved after each one."""
    table: dict[str, dict[str, Any]] = {}
    results.data["stages"][section] = {"workloads": table, "partial": True}
    for w, configs in workloads:
        table[w.key] = {}
        clock: Clock = args.clock.within(w.budget_s)
        for cfg in configs:
            row: dict[str, Any] = {"config": cfg.name, "velora": list(cfg.velora), "memory": cfg.memory}
            if cfg.plan is not None:
                row["plan"] = cfg.plan
            table[w.key][cfg.name] = row
            if cfg.plan_error:  # nothing fits the budget: the planner's answer, not a failure of the run
                row.update(skipped=cfg.plan_error, error=None)
                continue
            same = next((n for n, r in table[w.key].items() if n != cfg.name and r.get("velora") == row["velora"]
                         and r.get("memory") == cfg.memory and r.get("error") is None and "tokens_per_s" in r), None)
            if same is not None:  # e.g. the planner chose one configuration for both budgets: measured once
                row.update({k: v for k, v in table[w.key][same].items() if k not in row}, same_as=same)
                continue
            if clock.left < args.config_need_s:
                row.update(skipped=f"time budget: {clock.left:.0f} s left of this workload's", error=None)
                continue
            log(f"  {w.key} ({w.shape} {w.batch}x{w.seq}) {cfg.name}")
            try:
                row.update(measure_training(w, build(w, cfg), args))
                row["error"] = None
                log(f"    peak {row['peak_allocated'] / 2**30:.3f} GiB, activations "
                    f"{row['activation_bytes'] / 2**30:.3f} GiB, {row['tokens_per_s']} tokens/s, "
                    f"loss {row['loss_first']} -> {row['loss_last']}")  # fmt: skip
            except ValueError as exc:
                if not (cfg.memory["offload"] and args.torch_device.type != "cuda"):
                    record_error(row, exc)
                else:  # apply_lean refuses offload off CUDA: recorded, as the configuration it is
                    row.update(skipped=f"offload needs CUDA: {exc}", error=None)
                    log(f"    skipped: {row['skipped']}")
            except Exception as exc:  # noqa: BLE001 - an OOM or a bug in one configuration keeps the others
                record_error(row, exc)
            free_memory()
            results.save()
    results.data["stages"][section].pop("partial")
    return results.data["stages"][section]


def record_error(row: dict[str, Any], exc: BaseException) -> None:
    row["error"] = error_text(exc)
    log(f"    ERROR {type(exc).__name__}: {exc}")


def memory_stage(args: argparse.Namespace, results: Results, planned: dict[str, list[Config]]) -> dict[str, Any]:
    workloads = [(w, CONFIGS + planned[w.key]) for w in args.workloads]
    device = args.torch_device
    return measure_rows(args, results, "memory", workloads, lambda w, cfg: lambda: build_qlora(w.shape, cfg, device))


# --------------------------------------------------------------------------------------------- estimates


def start_estimates(args: argparse.Namespace, requests: dict[str, list[str]]) -> subprocess.Popen:
    """memory-estimate for every configuration, in one background process while the GPU measures."""
    (args.work / "estimates").mkdir(parents=True, exist_ok=True)
    req_path = args.work / "estimate_requests.json"
    req_path.write_text(json.dumps(requests, indent=2), encoding="utf-8")
    script = REPO / "benchmarks" / "gpu" / "estimates.py"
    cmd = [sys.executable, str(script), str(req_path), str(args.out / "estimates.json")]
    log("$ " + " ".join(cmd) + " (background)")
    return subprocess.Popen(
        cmd, cwd=REPO, env=sub_env(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def attach_estimates(args: argparse.Namespace, results: Results) -> dict[str, Any]:
    """Each estimate beside its measured row ("section/workload/config" keys); waits for the process once."""
    if args.estimates is None:
        out, _ = args.estimates_proc.communicate(timeout=max(30.0, args.clock.left))
        print(out[-3000:], flush=True)
        args.estimates = json.loads((args.out / "estimates.json").read_text(encoding="utf-8"))
    attached = 0
    for key, est in args.estimates.items():
        section, wkey, cname = key.split("/", 2)
        row = results.data["stages"].get(section, {}).get("workloads", {}).get(wkey, {}).get(cname)
        if row is None:
            continue
        if est.get("error"):
            row["estimate"] = {"error": est["error"]}
            continue
        comps = est["json"]["components"]
        tensors = est["json"]["total"] - comps.get("overhead", 0)
        row["estimate"] = {
            "total": est["json"]["total"],
            "tensors": tensors,  # without the CUDA-context / allocator-slack assumption: vs max_memory_allocated
            "activations_and_logits": comps["activations"] + comps["logits"],
            "components": comps,
        }
        if row.get("peak_allocated"):
            row["estimate_vs_peak"] = round((tensors - row["peak_allocated"]) / row["peak_allocated"], 4)
            act = row.get("activation_bytes")
            if act:
                row["estimate_vs_activation"] = round((comps["activations"] + comps["logits"] - act) / act, 4)
        attached += 1
    results.save()
    return {"estimates": attached, "requests": len(args.estimates), "process_rc": args.estimates_proc.returncode}
