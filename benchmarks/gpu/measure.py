"""GPU truth (issue 16): every velora claim measured on one GPU, in one prepared run.

On random-initialised LLaMA-shaped models (weights do not change memory or speed) in bf16 with nf4 weights
(bitsandbytes Linear4bit, double quantisation) and PEFT LoRA r=32 on all seven projections (dropout 0.05,
AdamW), the configurations in CONFIGS at each workload in WORKLOADS:
- CUDA peak (`torch.cuda.max_memory_allocated`) of one whole training step, the activation share (peak of
  forward + backward minus what was allocated before the forward: weights, adapters, optimizer states),
  tokens/s (warm-up, then >= 10 timed steps), and `velora memory-estimate`'s prediction for the same
  configuration side by side (the CLI, called with --json; see estimates.py);
- builder check: the in-place quantisation used here (fast: 7B from random on the GPU in seconds) gives the
  same weights, memory and logits as loading a saved checkpoint with BitsAndBytesConfig, as `velora finetune`
  does;
- `pytest -m cuda` (the engine on real Linear4bit / Linear8bitLt CUDA kernels, paged optimizers);
- the cached MMLU scorer vs the per-question reference (benchmarks/mmlu_speed.py) on the 1B shape;
- `velora export` of an adapter saved from the measured 1B model, and the merged model checked against
  PEFT over the same base.

Everything depends only on stable interfaces: transformers / peft / bitsandbytes, the engine's public API
(`velora_cli.engine.VeloraConfig`, `apply_velora`), and the CLI and benchmark scripts as commands.
Each stage is guarded (an error is recorded in the JSON, the next stage runs) and the JSON is rewritten after
each one, so a run cut short keeps what it measured. `--tiny --device cpu` runs the same code on tiny shapes.

    python benchmarks/gpu/measure.py OUT_DIR [--device cuda|cpu] [--tiny] [--budget-s 390]

Usually run through benchmarks/gpu/run.sh, which installs the carried wheels first.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_R, LORA_ALPHA, LORA_DROPOUT, NUM_GROUPS, LR, SEED = 32, 16, 0.05, 32, 2e-4, 0
MMLU_DATA = REPO / "recipes" / "data" / "mmlu_mini"
MMLU_SUBJECTS = "astronomy,philosophy,high_school_geography,nutrition"

# Model shapes. The 1B shape is TinyLlama-1.1B's (GQA, 4 kv heads); the tiny ones keep each big shape's
# structure (MHA vs GQA) at a size a CPU runs in seconds. Depths divide NUM_GROUPS (VeLoRA needs it).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
    ),
    "llama-1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
    ),
    "tiny-7b": dict(
        hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=False,
    ),
    "tiny-1b": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=False,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Workload:
    key: str  # the same key with --tiny, so a dry run's JSON has the GPU run's layout
    shape: str
    batch: int
    seq: int


WORKLOADS = [Workload("7b_1x512", "llama-7b", 1, 512), Workload("7b_1x2048", "llama-7b", 1, 2048),
             Workload("1b_8x1024", "llama-1b", 8, 1024)]  # fmt: skip
TINY_WORKLOADS = [Workload("7b_1x512", "tiny-7b", 1, 32), Workload("7b_1x2048", "tiny-7b", 1, 128),
                  Workload("1b_8x1024", "tiny-1b", 2, 64)]  # fmt: skip
EXPORT_WORKLOAD, EXPORT_CONFIG = "1b_8x1024", "qlora_velora_vd"  # whose trained adapter `velora export` merges


@dataclass(frozen=True)
class Config:
    """One training configuration, and how to say it to `velora memory-estimate`.

    To add one (lean activations, a planner's choice, ...): give it a name, what it changes in the model
    (`velora`, `gradient_checkpointing`, or a `prepare` hook run on the PEFT model after LoRA and VeLoRA),
    and the recipe overrides that make memory-estimate model it (`estimate_set`; None: the CLI cannot express
    it, said so in the JSON).
    """

    name: str
    velora: tuple[str, ...] = ()
    gradient_checkpointing: bool = False
    prepare: Callable[[torch.nn.Module], None] | None = None
    estimate_set: tuple[str, ...] | None = ()


CONFIGS = [
    Config("qlora"),
    Config("qlora_velora_vd", velora=("v_proj", "down_proj")),
    Config("qlora_velora_all", velora=TARGETS),
    Config("qlora_gc", gradient_checkpointing=True),
]


# ------------------------------------------------------------------------------------------ bookkeeping


class Results:
    """results.json, rewritten atomically after every stage."""

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
    def __init__(self, budget_s: float) -> None:
        self.start, self.budget = time.perf_counter(), budget_s

    @property
    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)


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


# ------------------------------------------------------------------------------------------ the model


def llama_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape])


def random_model(shape: str, device: torch.device):
    """A random-initialised bf16 LLaMA, built directly on `device` (same seed, same device: same weights)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    with device:
        model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=torch.bfloat16)
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


def peft_wrap(model: torch.nn.Module, cfg: Config):
    """What `velora finetune` does to a k-bit base (models.build_training_model), through the public APIs."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from velora_cli.engine import VeloraConfig, apply_velora

    loaded = {name: p.dtype for name, p in model.named_parameters()}
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    for name, p in model.named_parameters():  # velora undoes PEFT's fp32 upcast of embeddings, norms, lm_head
        if name in loaded and p.dtype != loaded[name]:
            p.data = p.data.to(loaded[name])
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    lora = LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=list(TARGETS),
        bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(model, lora)
    if cfg.velora:
        apply_velora(model, VeloraConfig(layers=list(cfg.velora), num_groups=NUM_GROUPS))
    if cfg.prepare is not None:
        cfg.prepare(model)
    return model


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


# ------------------------------------------------------------------------------------- memory & speed


def measure_config(w: Workload, cfg: Config, args: argparse.Namespace, save_adapter: Path | None) -> dict[str, Any]:
    device = args.torch_device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    row: dict[str, Any] = {"config": cfg.name, "shape": w.shape, "batch": w.batch, "seq": w.seq}
    row["tokens"] = tokens = w.batch * w.seq
    if cuda:
        torch.cuda.empty_cache()
        row["allocated_at_start"] = torch.cuda.memory_allocated()  # leak check: ~0 in every configuration
    began = time.perf_counter()
    model = random_model(w.shape, device)
    quantize_nf4_(model, device)
    model = peft_wrap(model, cfg)
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

    # warm-up: optimizer states, VeLoRA's first-batch init, allocator and kernel caches; the last warm-up step
    # counts what is saved for backward (skipped under checkpointing, where hooks cannot see inside).
    for i in range(args.warmup):
        counter = SavedCounter(model) if i == args.warmup - 1 and not cfg.gradient_checkpointing else None
        train_step(batches[i % 2], counter)
        if counter is not None:
            row["saved_for_backward"] = counter.total
            row["saved_for_backward_per_token"] = round(counter.total / tokens, 1)
    sync()
    # the measured step: peak of forward + backward, then of the optimizer step
    ids = batches[0]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = tensor_bytes(model, optimizer)
    counter = None if cuda or cfg.gradient_checkpointing else SavedCounter(model)
    if counter is not None:
        with counter:
            loss = model(input_ids=ids, labels=ids).loss
    else:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    sync()
    if cuda:
        peak_fwd_bwd = torch.cuda.max_memory_allocated()
    else:  # no allocator peak on CPU: what was there + what backward needs (saved tensors) + the gradients
        saved = counter.total if counter is not None else row.get("saved_for_backward", 0)
        peak_fwd_bwd = tensor_bytes(model, optimizer) + saved
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(loss.item())
    del loss
    sync()
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
    # timed steps
    times: list[float] = []
    for i in range(args.steps):
        sync()
        t0 = time.perf_counter()
        train_step(batches[i % 2])
        sync()
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
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def memory_stage(args: argparse.Namespace, results: Results, clock: Clock) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    results.data["stages"]["memory"] = {"workloads": table, "partial": True}
    for w in args.workloads:
        table[w.key] = {}
        for cfg in CONFIGS:
            if clock.left < args.config_need_s:
                table[w.key][cfg.name] = {"config": cfg.name, "error": "skipped: time budget"}
                continue
            adapter = args.work / "run-1b" if (w.key, cfg.name) == (EXPORT_WORKLOAD, EXPORT_CONFIG) else None
            log(f"  {w.key} ({w.shape} {w.batch}x{w.seq}) {cfg.name}")
            try:
                row = measure_config(w, cfg, args, adapter)
                row["error"] = None
                log(
                    f"    peak {row['peak_allocated'] / 2**30:.3f} GiB, activations "
                    f"{row['activation_bytes'] / 2**30:.3f} GiB, {row['tokens_per_s']} tokens/s, "
                    f"loss {row['loss_first']} -> {row['loss_last']}"
                )
            except Exception as exc:  # noqa: BLE001 - an OOM or a bug in one configuration keeps the others
                row = {"config": cfg.name, "error": error_text(exc)}
                log(f"    ERROR {type(exc).__name__}: {exc}")
                gc.collect()
                if args.torch_device.type == "cuda":
                    torch.cuda.empty_cache()
            table[w.key][cfg.name] = row
            results.save()
    results.data["stages"]["memory"].pop("partial")
    return results.data["stages"]["memory"]


# --------------------------------------------------------------------------------------------- estimates


def shape_dir(args: argparse.Namespace, shape: str) -> Path:
    """A directory holding only the shape's config.json: what `memory-estimate --model` reads."""
    path = args.work / "shapes" / shape
    if not (path / "config.json").is_file():
        llama_config(shape).save_pretrained(path)
    return path


def estimate_requests(args: argparse.Namespace) -> dict[str, Any]:
    requests: dict[str, Any] = {}
    for w in args.workloads:
        for cfg in CONFIGS:
            key = f"{w.key}/{cfg.name}"
            if cfg.estimate_set is None:
                requests[key] = None
                continue
            sets = [
                "model.quantization=nf4", "model.double_quant=true", "model.compute_dtype=bf16",
                f"lora.r={LORA_R}", f"lora.alpha={LORA_ALPHA}", f"lora.dropout={LORA_DROPOUT}",
                "lora.target_modules=[q,k,v,o,g,u,d]", "train.optimizer=adamw_torch",
                f"train.gradient_checkpointing={'true' if cfg.gradient_checkpointing else 'false'}",
            ]  # fmt: skip
            if cfg.velora:
                layers = ",".join(cfg.velora)
                sets += ["velora.enabled=true", f"velora.layers=[{layers}]", f"velora.num_groups={NUM_GROUPS}"]
            else:
                sets += ["velora.enabled=false"]
            sets += list(cfg.estimate_set)
            argv = ["memory-estimate", "--model", str(shape_dir(args, w.shape)), "--batch", str(w.batch)]
            argv += ["--seq", str(w.seq), "--json", str(args.work / "estimates" / f"{w.key}__{cfg.name}.json")]
            for s in sets:
                argv += ["--set", s]
            requests[key] = argv
    return requests


def start_estimates(args: argparse.Namespace) -> subprocess.Popen | None:
    """memory-estimate for every configuration, in one background process while the GPU measures."""
    requests = estimate_requests(args)
    (args.work / "estimates").mkdir(parents=True, exist_ok=True)
    req_path = args.work / "estimate_requests.json"
    req_path.write_text(json.dumps(requests, indent=2), encoding="utf-8")
    script = REPO / "benchmarks" / "gpu" / "estimates.py"
    cmd = [sys.executable, str(script), str(req_path), str(args.out / "estimates.json")]
    log("$ " + " ".join(cmd) + " (background)")
    pipe = subprocess.PIPE
    return subprocess.Popen(cmd, cwd=REPO, env=sub_env(args), stdout=pipe, stderr=subprocess.STDOUT, text=True)


def collect_estimates(proc: subprocess.Popen | None, args: argparse.Namespace, results: Results) -> dict[str, Any]:
    assert proc is not None
    out, _ = proc.communicate(timeout=max(30.0, args.clock.left))
    print(out[-3000:], flush=True)
    data = json.loads((args.out / "estimates.json").read_text(encoding="utf-8"))
    memory = results.data["stages"].get("memory", {}).get("workloads", {})
    n_ok = 0
    for key, est in data.items():
        wkey, cname = key.split("/", 1)
        row = memory.get(wkey, {}).get(cname)
        if row is None:
            continue
        if est is None:
            row["estimate"] = {"error": "memory-estimate cannot express this configuration"}
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
        n_ok += 1
    return {"estimates": n_ok, "requests": len(data), "process_rc": proc.returncode}


# ------------------------------------------------------------------------------ checkpoint & tokenizer


def train_tokenizer(path: Path, vocab: int):
    """A byte-level BPE trained on the repo's MMLU CSVs and docs (nothing downloaded): MMLU and export need one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [p.read_text(encoding="utf-8") for p in sorted(MMLU_DATA.rglob("*.csv"))]
    texts += [(REPO / name).read_text(encoding="utf-8") for name in ("README.md", "BENCHMARKS.md")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab, 8000), special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.pad_token = fast.eos_token
    fast.save_pretrained(path)
    return fast


def checkpoint_stage(args: argparse.Namespace) -> dict[str, Any]:
    """The 1B shape as a bf16 checkpoint + tokenizer on local disk (same seed: the measured model's weights)."""
    shape = args.export_shape
    ckpt = args.work / "ckpt-1b"
    began = time.perf_counter()
    model = random_model(shape, args.torch_device)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 0, 1, 1
    model.save_pretrained(ckpt)
    del model
    gc.collect()
    if args.torch_device.type == "cuda":
        torch.cuda.empty_cache()
    saved_s = time.perf_counter() - began
    tok = train_tokenizer(ckpt, SHAPES[shape]["vocab_size"])
    args.ckpt = ckpt
    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    return {"path": str(ckpt), "shape": shape, "weights_bytes": size, "save_s": round(saved_s, 1),
            "tokenizer_vocab": len(tok)}  # fmt: skip


def builder_check_stage(args: argparse.Namespace) -> dict[str, Any]:
    """In-place nf4 (used for every measurement) vs from_pretrained + BitsAndBytesConfig (what finetune does)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = args.torch_device
    cuda = device.type == "cuda"
    ids = torch.randint(0, SHAPES[args.export_shape]["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(2))
    ids = ids.to(device)

    def weights_bytes(model) -> int:
        return torch.cuda.memory_allocated() if cuda else tensor_bytes(model)

    def logits(model) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return model(input_ids=ids).logits.float().cpu()

    if cuda:
        torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated() if cuda else 0
    began = time.perf_counter()
    inplace = random_model(args.export_shape, device)
    quantize_nf4_(inplace, device)
    if cuda:
        torch.cuda.empty_cache()
    inplace_s = time.perf_counter() - began
    inplace_bytes = weights_bytes(inplace) - base
    a = logits(inplace)
    del inplace
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8,
    )  # fmt: skip
    began = time.perf_counter()
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "quantization_config": bnb_config}
    if cuda:
        kwargs["device_map"] = {"": device.index or 0}
    loaded = AutoModelForCausalLM.from_pretrained(args.ckpt, **kwargs)
    no_cpu_repacking_(loaded)
    loaded_s = time.perf_counter() - began
    loaded_bytes = weights_bytes(loaded) - base
    b = logits(loaded)
    del loaded
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    diff = (a - b).abs().max().item()
    return {
        "inplace_bytes": inplace_bytes,
        "from_pretrained_bytes": loaded_bytes,
        "bytes_ratio": round(inplace_bytes / loaded_bytes, 6) if loaded_bytes else None,
        "max_abs_logit_diff": diff,
        "identical_logits": diff == 0.0,
        "inplace_s": round(inplace_s, 2),
        "from_pretrained_s": round(loaded_s, 2),
    }


# ---------------------------------------------------------------------------------- tests, MMLU, export


def cuda_tests_stage(args: argparse.Namespace) -> dict[str, Any]:
    xml = args.work / "pytest_cuda.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra"]
    cmd += ["--continue-on-collection-errors", f"--junitxml={xml}", "tests"]
    res = run_cmd(cmd, args, timeout=args.pytest_timeout, log_name="pytest_cuda.log")
    counts: dict[str, int] = {}
    failed: list[str] = []
    if xml.is_file():
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        if suite is not None:
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
    res.update(counts=counts, failed=failed)
    if res["rc"] not in (0, 5):  # 5: nothing selected
        res["error"] = f"pytest -m cuda exited {res['rc']}: {len(failed)} failed/errored"
    return res


def mmlu_data(args: argparse.Namespace) -> Path:
    """The repo's mini-MMLU, its test questions repeated `--mmlu-repeat` times (more timed questions; the
    5-shot dev prefixes stay the real ones)."""
    out = args.work / "mmlu"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(MMLU_DATA, out)
    for csv in (out / "test").glob("*.csv"):
        text = csv.read_text(encoding="utf-8")
        csv.write_text((text if text.endswith("\n") else text + "\n") * args.mmlu_repeat, encoding="utf-8")
    return out


def mmlu_stage(args: argparse.Namespace) -> dict[str, Any]:
    data = mmlu_data(args)
    figures = args.work / "mmlu_speed.json"
    cmd = [sys.executable, "benchmarks/mmlu_speed.py", "--model", str(args.ckpt), "--data-dir", str(data)]
    cmd += ["--subjects", MMLU_SUBJECTS, "--limit", str(args.mmlu_limit), "--json", str(figures)]
    res = run_cmd(cmd, args, timeout=args.sub_timeout)
    if figures.is_file():
        res["figures"] = json.loads(figures.read_text(encoding="utf-8"))
    if res["rc"] != 0:
        res["error"] = f"mmlu_speed.py exited {res['rc']}"
    return res


def export_stage(args: argparse.Namespace) -> dict[str, Any]:
    run_dir = args.work / "run-1b"
    if not (run_dir / "adapter_config.json").is_file():
        raise RuntimeError(f"no adapter: the {EXPORT_WORKLOAD}/{EXPORT_CONFIG} measurement did not save one")
    for f in args.ckpt.iterdir():  # the run's tokenizer, as a finetune run directory holds it
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, run_dir / f.name)
    recipe = (
        "name: gpu-truth-1b\n"
        f"model: {{name: {json.dumps(str(args.ckpt))}, quantization: nf4, compute_dtype: bf16}}\n"
        f"lora: {{r: {LORA_R}, alpha: {LORA_ALPHA}, dropout: {LORA_DROPOUT}}}\n"
        f"velora: {{enabled: true, layers: [v, d], num_groups: {NUM_GROUPS}}}\n"
        "data: {path: unused.json}\n"
    )
    (run_dir / "recipe.yaml").write_text(recipe, encoding="utf-8")
    merged = args.work / "merged-1b"
    cmd = [sys.executable, "-m", "velora_cli", "export", str(run_dir), "--out", str(merged), "--dtype", "bf16"]
    cmd.append("--force")
    res = run_cmd(cmd, args, timeout=args.sub_timeout)
    if res["rc"] != 0:
        res["error"] = f"velora export exited {res['rc']}"
        return res
    res["exported_bytes"] = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
    res["files"] = sorted(p.name for p in merged.iterdir())
    res["check"] = merged_check(args, run_dir, merged)
    return res


def merged_check(args: argparse.Namespace, run_dir: Path, merged: Path) -> dict[str, Any]:
    """The merged export vs PEFT's adapter over the same unquantised bf16 base: same logits up to bf16 rounding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = args.torch_device
    ids = torch.randint(0, SHAPES[args.export_shape]["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(3))
    ids = ids.to(device)
    out = {}
    with torch.no_grad():
        m = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16).to(device).eval()
        a = m(input_ids=ids).logits.float()
        del m
        base = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.bfloat16).to(device)
        p = PeftModel.from_pretrained(base, str(run_dir)).eval()
        b = p(input_ids=ids).logits.float()
        c = p.get_base_model()
        with p.disable_adapter():
            base_logits = c(input_ids=ids).logits.float()
        del p, base, c
    out["max_abs_logit_diff_vs_peft"] = (a - b).abs().max().item()
    out["max_abs_logit_diff_vs_base"] = (b - base_logits).abs().max().item()  # the adapter does something
    out["logit_scale"] = b.abs().max().item()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------------- report


def env_stage(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for dist in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "pydantic", "safetensors",
                 "tokenizers", "typer", "rich", "pyyaml", "numpy", "triton"):  # fmt: skip
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


def summary_markdown(data: dict[str, Any]) -> str:
    mem = data["stages"].get("memory", {}).get("workloads", {})
    gib = 2**30
    lines = [
        f"device {data['device']}{' (tiny shapes)' if data['tiny'] else ''}; LoRA r={LORA_R} on all 7, dropout "
        f"{LORA_DROPOUT}, nf4 + double quant, bf16, AdamW; estimate = memory-estimate total minus its overhead line",
        "",
        "| workload | config | peak GiB | activations GiB | estimate GiB | est. vs peak | tokens/s | vs qlora | loss |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for wkey, rows in mem.items():
        base_tps = (rows.get("qlora") or {}).get("tokens_per_s")
        for name, r in rows.items():
            if r.get("error"):
                lines.append(f"| {wkey} | {name} | error: {r['error'].splitlines()[0][:80]} | | | | | | |")
                continue
            est = r.get("estimate", {})
            est_s = f"{est['tensors'] / gib:.3f}" if "tensors" in est else est.get("error", "-")
            vs = f"{100 * r['estimate_vs_peak']:+.1f}%" if "estimate_vs_peak" in r else "-"
            rel = f"{r['tokens_per_s'] / base_tps:.3f}x" if base_tps else "-"
            lines.append(
                f"| {wkey} | {name} | {r['peak_allocated'] / gib:.3f} | {r['activation_bytes'] / gib:.3f} | {est_s} | "
                f"{vs} | {r['tokens_per_s']} | {rel} | {r['loss_first']} -> {r['loss_last']} |"
            )
    for name in ("builder_check", "cuda_tests", "mmlu", "export"):
        st = data["stages"].get(name)
        if st is None:
            continue
        brief = {k: v for k, v in st.items() if k in ("error", "skipped", "counts", "identical_logits", "bytes_ratio",
                                                      "wall_s", "exported_bytes", "seconds")}  # fmt: skip
        if name == "mmlu" and "figures" in st:
            f = st["figures"]
            brief.update({k: f.get(k) for k in ("questions", "fast_questions_per_s", "reference_questions_per_s",
                                                "speedup", "identical_predictions")})  # fmt: skip
        if name == "export" and "check" in st:
            brief.update(st["check"])
        lines.append(f"\n{name}: " + json.dumps(brief, default=str)[:600])
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and few steps (the CPU dry run)")
    parser.add_argument("--budget-s", type=float, default=None, help="skip stages that would overrun this")
    parser.add_argument("--stages", default="memory,builder_check,cuda_tests,mmlu,export")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary checkpoint/run directories")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible (use --device cpu --tiny for the dry run)")
    args.out.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()
    args.torch_device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    tiny = args.tiny
    args.workloads = TINY_WORKLOADS if tiny else WORKLOADS
    args.export_shape = "tiny-1b" if tiny else "llama-1b"
    args.warmup, args.steps = (1, 2) if tiny else (2, 10)
    args.mmlu_repeat, args.mmlu_limit = (1, 2) if tiny else (8, 1000)
    args.pytest_timeout, args.sub_timeout = (240, 240) if tiny else (150, 150)
    args.config_need_s = 1 if tiny else 12
    budget = args.budget_s if args.budget_s is not None else (600 if tiny else 390)
    clock = args.clock = Clock(budget)
    args.work = Path(tempfile.mkdtemp(prefix="velora-gpu-"))
    args.ckpt = None
    wanted = [s for s in args.stages.split(",") if s]

    results = Results(args.out, {
        "issue": 16, "command": " ".join(sys.argv), "device": args.device, "tiny": tiny,
        "settings": {"lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": LORA_DROPOUT, "targets": TARGETS,
                     "num_groups": NUM_GROUPS, "optimizer": "AdamW (torch)", "lr": LR, "dtype": "bf16",
                     "quantization": "nf4 + double quant", "warmup_steps": args.warmup, "timed_steps": args.steps},
        "workloads": {w.key: {"shape": w.shape, "batch": w.batch, "seq": w.seq, **SHAPES[w.shape]}
                      for w in args.workloads},
        "configs": [c.name for c in CONFIGS],
        "stages": {},
    })  # fmt: skip
    began = time.perf_counter()
    try:
        stage(results, "env", clock, 0, lambda: env_stage(args))
        estimates = None
        if "memory" in wanted:
            try:
                estimates = start_estimates(args)
            except Exception as exc:  # noqa: BLE001
                results.data["stages"]["estimates"] = {"error": error_text(exc)}
            stage(results, "memory", clock, 30, lambda: memory_stage(args, results, clock))
            if estimates is not None:
                stage(results, "estimates", clock, 0, lambda: collect_estimates(estimates, args, results))
        if wanted != ["memory"]:
            stage(results, "checkpoint", clock, 5 if tiny else 25, lambda: checkpoint_stage(args))
        if "builder_check" in wanted and args.ckpt:
            stage(results, "builder_check", clock, 5 if tiny else 25, lambda: builder_check_stage(args))
        if "cuda_tests" in wanted:
            stage(results, "cuda_tests", clock, 10 if tiny else 40, lambda: cuda_tests_stage(args))
        if "mmlu" in wanted and args.ckpt:
            stage(results, "mmlu", clock, 10 if tiny else 40, lambda: mmlu_stage(args))
        if "export" in wanted and args.ckpt:
            stage(results, "export", clock, 10 if tiny else 45, lambda: export_stage(args))
    finally:
        results.data["wall_s"] = round(time.perf_counter() - began, 1)
        results.save()
        (args.out / "results.md").write_text(summary_markdown(results.data), encoding="utf-8")
        if not args.keep_work:
            shutil.rmtree(args.work, ignore_errors=True)
    print(summary_markdown(results.data), flush=True)
    errors = [k for k, v in results.data["stages"].items() if isinstance(v, dict) and v.get("error")]
    log(f"done in {results.data['wall_s']} s; stage errors: {errors or 'none'}; results in {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
