"""What every stage of the GPU truth run shares: shapes, bookkeeping (results.json, the time budget, logging,
subprocesses) and the random nf4 LLaMA the measurements train.

Stages live in stage_*.py beside this file; measure.py orders them and owns the command line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VELORA_VD = ("v_proj", "down_proj")
LORA_R, LORA_ALPHA, LORA_DROPOUT, NUM_GROUPS, LR, SEED = 32, 16, 0.05, 32, 2e-4, 0

# Model shapes. The 1B shape is TinyLlama-1.1B's (GQA, 4 kv heads), the 8B one Llama-3-8B's (8 kv heads, 128k
# vocabulary), 60m GaLore's LLaMA-60M (config/presets.py llama-60m, what `method: pretrain` builds). The tiny ones
# keep each big shape's structure (MHA vs GQA, vocabulary large against hidden) at a size a CPU runs in seconds.
# Depths divide NUM_GROUPS (VeLoRA needs it).
_COMMON = dict(tie_word_embeddings=False, hidden_act="silu")
SHAPES: dict[str, dict[str, Any]] = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048, **_COMMON),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                     **_COMMON),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, **_COMMON),
    "llama-60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=32000, max_position_embeddings=1024, **_COMMON),
    "tiny-7b": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=1024, max_position_embeddings=512, **_COMMON),
    # 10 layers: deep enough for the planner's 0.25x / 0.10x budgets to fit at a tiny size, as they do at 7B/8B
    "tiny-8b": dict(hidden_size=64, intermediate_size=224, num_hidden_layers=10, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, **_COMMON),
    "tiny-1b": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, **_COMMON),
    "tiny-60m": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=1024, max_position_embeddings=256, **_COMMON),
}  # fmt: skip


@dataclass(frozen=True)
class Workload:
    key: str  # the same key with --tiny, so a dry run's JSON has the GPU run's layout
    shape: str
    batch: int
    seq: int
    steps: int = 4  # timed steps after the warm-up and the measured step
    budget_s: float = 60  # of the run's time budget, at most this much for this workload's configurations


# ------------------------------------------------------------------------------------------ bookkeeping


class Results:
    """results.json, rewritten atomically after every configuration and stage."""

    def __init__(self, out: Path, data: dict[str, Any]) -> None:
        self.path = out / "results.json"
        self.data = data
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n", encoding="utf-8")
        tmp.replace(self.path)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def error_text(exc: BaseException) -> str:
    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:])
    return f"{type(exc).__name__}: {exc}"[:500] + "\n" + tail[-1500:]


class Clock:
    """Seconds left of a budget; `within(cap)` is a clock for one stage: its cap or what the run has left."""

    def __init__(self, budget_s: float, parent: Clock | None = None) -> None:
        self.start, self.budget, self.parent = time.perf_counter(), budget_s, parent

    @property
    def left(self) -> float:
        own = self.budget - (time.perf_counter() - self.start)
        return min(own, self.parent.left) if self.parent is not None else own

    def within(self, cap_s: float) -> Clock:
        return Clock(cap_s, parent=self)


def stage(results: Results, name: str, clock: Clock, need_s: float, fn: Callable[[], dict[str, Any]]) -> None:
    """Run one stage; its dict (or its error, or why it was skipped) goes under results[name]."""
    if clock.left < need_s:
        results.data["stages"][name] = {"skipped": f"time budget: {clock.left:.0f} s left, stage needs ~{need_s:.0f}"}
        results.save()
        log(f"stage {name}: skipped (budget)")
        return
    log(f"stage {name}: start ({clock.left:.0f} s of budget left)")
    began = time.perf_counter()
    try:
        out = fn()
        out.setdefault("error", None)
    except BaseException as exc:  # noqa: BLE001 - a failed stage must not lose the others
        if isinstance(exc, KeyboardInterrupt):
            raise
        out = {"error": error_text(exc)}
        log(f"stage {name}: ERROR {type(exc).__name__}: {exc}")
        free_memory()
    out["seconds"] = round(time.perf_counter() - began, 1)
    results.data["stages"][name] = out
    results.save()
    log(f"stage {name}: done in {out['seconds']} s")


def sub_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the subprocesses pick their device themselves
    return env


def run_cmd(cmd: list[str], args: argparse.Namespace, timeout: float, log_name: str | None = None) -> dict[str, Any]:
    """Run a command with the repo on PYTHONPATH; its output goes to our log (and to OUT/log_name)."""
    timeout = max(10.0, min(timeout, args.clock.left))  # never past the run's budget
    log("$ " + " ".join(cmd))
    began = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=sub_env(args), capture_output=True, text=True, timeout=timeout, check=False
        )
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    seconds = time.perf_counter() - began
    print(output, flush=True)
    if log_name:
        (args.out / log_name).write_text(output, encoding="utf-8")
    return {"cmd": cmd, "rc": rc, "wall_s": round(seconds, 2), "output_tail": output[-1500:]}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ the model


def llama_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape])


def shape_dir(args: argparse.Namespace, shape: str) -> Path:
    """A directory holding only the shape's config.json: what `memory-estimate --model` reads."""
    path = args.work / "shapes" / shape
    if not (path / "config.json").is_file():
        llama_config(shape).save_pretrained(path)
    return path


def random_model(shape: str, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """A random-initialised LLaMA, built directly on `device` (same seed, same device: same weights)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    with device:
        model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=dtype)
    return model


def quantize_nf4_(model: torch.nn.Module, device: torch.device) -> None:
    """Swap every decoder projection for a bitsandbytes nf4 Linear4bit in place, as BitsAndBytesConfig(nf4,
    double quant, bf16 compute, uint8 storage) loading does (transformers creates Params4bit from the loaded
    weight with the module's own attributes, then `.to(device)` quantises); embeddings, norms and lm_head stay
    bf16. The `builder_check` stage compares this with a real from_pretrained load."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for name, lin in list(layer.named_modules()):
            if not (isinstance(lin, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS):
                continue
            q = bnb.nn.Linear4bit(
                lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=torch.bfloat16,
                compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta",
            )  # fmt: skip
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, **q.weight.__dict__).to(device)
            if lin.bias is not None:
                q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, attr, q)
            del lin
    # what transformers' bnb quantizer marks, and PEFT reads (dispatch to its Linear4bit LoRA layer)
    model.is_loaded_in_4bit = True
    model.is_quantized = True
    model.quantization_method = "bitsandbytes"
    no_cpu_repacking_(model)


def no_cpu_repacking_(model: torch.nn.Module) -> None:
    """As velora's models.disable_cpu_4bit_repacking: on CPU, bnb would switch Linear4bit to an inference kernel
    without autograd after the first eval-mode forward (CUDA never does)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


class SavedCounter:
    """Bytes autograd saves for backward (distinct storages, parameters excluded): the CPU's activation figure."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.params:
                self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> SavedCounter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def tensor_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Distinct storages of parameters, buffers, bnb quant states and optimizer states (CPU 'allocated')."""
    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())

    for p in model.parameters():
        add(p)
        add(p.grad)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                add(t)
            if getattr(qs, "state2", None) is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
    for b in model.buffers():
        add(b)
    for state in optimizer.state.values() if optimizer is not None else ():
        for t in state.values():
            add(t)
    return sum(seen.values())

