"""Activation memory of QLoRA vs QLoRA + VeLoRA, side by side: same model, data, seed and step order.

Configurations (LoRA r=8 on all seven projections, dropout 0.05 unless --dropout):
  qlora             PEFT LoRA on a bitsandbytes nf4 base (the baseline)
  qlora_velora_vd   + this project's VeLoRA on v_proj and down_proj (the paper's default)
  qlora_velora_all  + VeLoRA on all seven projections
  qlora_gc          the baseline with (reentrant) gradient checkpointing
  lora_peft_velora  un-quantised LoRA + PEFT's own VeLoRA variant on all seven (the anchor)
and the lean techniques of issue 19 (velora_cli.engine.lean.apply_lean on the QLoRA model; every configuration
that recomputes or offloads has `gc` in its name):
  qlora_chunked, qlora_lean, qlora_velora_all_lean_chunked, qlora_gc_chunked (all layers, non-reentrant),
  qlora_gc_every2, qlora_gc_every3, qlora_gc_mlp_velora_all_lean_chunked,
  planner_0.25x / planner_0.10x: the planner's (velora_cli.memory.plan) choice when the bytes saved for backward
  may be 0.25x / 0.10x of QLoRA's (modelled, at this shape); named *_gc when it recomputes.

For each: bytes saved for backward per token (ActivationMeter: storages counted once, parameters excluded)
with the top ops, the median training-step time (the configurations take turns step by step, so machine
noise hits them alike) and the loss after the last step. `--device cuda` adds a LLaMA-7B-shaped stack
(random weights, --big-layers layers) and reports real peak CUDA memory.

    python benchmarks/activation_memory.py [--device cpu|cuda] [--steps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from velora_cli.common.device import compute_dtype  # noqa: E402
from velora_cli.config.presets import DEFAULT_MODEL  # noqa: E402
from velora_cli.engine import VeloraConfig, apply_velora  # noqa: E402
from velora_cli.engine.meter import ActivationMeter  # noqa: E402
from velora_cli.models.load import ModelSource, load_base_model, load_tokenizer, resolve_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALPACA = REPO.parent / "shared" / "data" / "instruct" / "alpaca_libre.json"
CONFIGS = ["qlora", "qlora_velora_vd", "qlora_velora_all", "qlora_gc", "lora_peft_velora"]
LEAN: dict[str, dict] = {  # name -> (VeLoRA layers, apply_lean keyword arguments)
    "qlora_chunked": {"loss": "chunked", "lean_ops": False},
    "qlora_lean": {"loss": "full", "lean_ops": True},
    "qlora_velora_all_lean_chunked": {"velora": TARGETS, "loss": "chunked", "lean_ops": True},
    "qlora_gc_chunked": {"loss": "chunked", "lean_ops": False, "checkpointing": "all"},
    "qlora_gc_every2": {"loss": "full", "lean_ops": False, "checkpointing": "every:2"},
    "qlora_gc_every3": {"loss": "full", "lean_ops": False, "checkpointing": "every:3"},
    "qlora_gc_mlp_velora_all_lean_chunked": {
        "velora": TARGETS,
        "loss": "chunked",
        "lean_ops": True,
        "checkpointing": "mlp",
    },
}
PLANNED = {"planner_0.25x": 0.25, "planner_0.10x": 0.10}
ISSUE19 = ["qlora", "qlora_gc", "qlora_velora_all", "qlora_chunked", "qlora_lean", "qlora_velora_all_lean_chunked",
           "qlora_gc_chunked", "qlora_gc_every2", "qlora_gc_every3", "qlora_gc_mlp_velora_all_lean_chunked",
           *PLANNED]  # fmt: skip


def planned(fraction: float, args, device: torch.device) -> tuple[str, dict]:
    """The planner's choice when the bytes saved for backward may be `fraction` of QLoRA's (modelled)."""
    from velora_cli.memory.arch import arch_for
    from velora_cli.memory.estimate import Settings, estimate
    from velora_cli.memory.plan import candidates, plan

    arch = arch_for(model=str(resolve_model(args.model).path))
    compute = "fp32" if compute_dtype("auto", device) == torch.float32 else "bf16"
    s = Settings(batch=args.batch, seq=args.seq, compute=compute, device=device.type, lora_dropout=args.dropout,
                 velora=(), num_groups=args.num_groups)  # fmt: skip
    # The budget is on the bytes saved for backward, as the issue's 0.25x / 0.10x (of QLoRA's) are meant.
    budget = int(fraction * estimate(arch, s).act.meter_view)
    options = candidates(s, velora=[(), ("v_proj", "down_proj"), tuple(TARGETS)])
    result = plan(arch, options, budget, size=lambda e: e.act.meter_view)
    assert result.choice is not None, result.reason
    print(f"  planner at {fraction}x QLoRA's saved bytes ({budget / 2**20:.0f} MiB): {result.reason}", flush=True)
    c = result.choice.settings
    spec = {"velora": list(c.velora), "loss": c.loss, "lean_ops": c.lean_ops, "checkpointing": str(c.recompute)}
    return result.choice.name, spec


@dataclass
class Run:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    saved_bytes: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    peak_bytes: int | None = None


def training_text(limit: int = 400) -> tuple[str, str]:
    """Real instruction data when ../shared is present, else this project's own source text."""
    if ALPACA.is_file():
        rows = json.loads(ALPACA.read_text(encoding="utf-8"))[:limit]
        parts = [
            f"### Instruction:\n{r['instruction']}\n\n"
            + (f"### Input:\n{r['input']}\n\n" if r.get("input") else "")
            + f"### Response:\n{r['output']}"
            for r in rows
        ]
        return "\n\n".join(parts), str(ALPACA)
    files = sorted((REPO / "velora_cli").rglob("*.py"))
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files), "velora_cli/*.py (../shared absent)"


def make_batches(tokenizer, batch: int, seq: int, steps: int) -> list[torch.Tensor]:
    text, _ = training_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    need = batch * seq * steps
    if ids.numel() < need:
        ids = ids.repeat(need // ids.numel() + 1)
    return [ids[i * batch * seq : (i + 1) * batch * seq].view(batch, seq) for i in range(steps)]


def build(name: str, source: ModelSource, device: torch.device, dtype: torch.dtype, args) -> Run:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import VeloraConfig as PeftVeloraConfig

    torch.manual_seed(args.seed)
    quantized = name.startswith(("qlora", "planner"))
    base = load_base_model(source, quantization="nf4" if quantized else "none", compute=dtype, device=device)
    if name == "qlora_gc":
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        base.enable_input_require_grads()
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": args.dropout, "target_modules": TARGETS}
    if name == "lora_peft_velora":
        lora["velora_config"] = PeftVeloraConfig(num_groups=args.num_groups, init_type="batch_average_once")
    torch.manual_seed(args.seed)  # identical LoRA initialisation in every configuration
    model = get_peft_model(base, LoraConfig(**lora))
    if name == "qlora_velora_vd":
        apply_velora(model, VeloraConfig(layers=["vd"], num_groups=args.num_groups))
    elif name == "qlora_velora_all":
        apply_velora(model, VeloraConfig(layers=TARGETS, num_groups=args.num_groups))
    lean = dict(LEAN.get(name) or args.planned.get(name) or {})
    if lean:
        from velora_cli.engine.lean import apply_lean

        if lean.get("velora"):
            apply_velora(model, VeloraConfig(layers=lean["velora"], num_groups=args.num_groups))
        lean.pop("velora", None)
        print(f"  {name}: {apply_lean(model, **lean)}", flush=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return Run(name, model, torch.optim.AdamW(params, lr=args.lr))


def step(run: Run, ids: torch.Tensor, device: torch.device, measure: bool = False) -> None:
    ids = ids.to(device)
    sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    start = time.perf_counter()
    if measure:
        # totals only under non-reentrant checkpointing (attribution would re-run checkpointed regions)
        with ActivationMeter(run.model, attribute=not (run.name in LEAN or run.name.startswith("planner"))) as meter:
            loss = run.model(input_ids=ids, labels=ids).loss
        run.saved_bytes, run.by_op = meter.total_bytes, (meter.by_op() if meter.attribute else {})
    else:
        loss = run.model(input_ids=ids, labels=ids).loss
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    sync()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        run.peak_bytes = max(run.peak_bytes or 0, torch.cuda.max_memory_allocated(device))
    if not measure:
        run.times.append(elapsed)
    run.losses.append(loss.item())


def compare(title: str, source: ModelSource, tokenizer, device: torch.device, args, names: list[str]) -> dict:
    dtype = compute_dtype("auto", device)
    tokens = args.batch * args.seq
    batches = make_batches(tokenizer, args.batch, args.seq, args.steps + 1)
    runs = [build(name, source, device, dtype, args) for name in names]
    # The metered step is also the warm-up (first-batch VeLoRA initialisation, allocator warm-up).
    for run in runs:
        step(run, batches[0], device, measure=True)
        print(
            f"  {run.name}: saved {run.saved_bytes / tokens / 1024:.1f} KB/token, loss {run.losses[-1]:.4f}", flush=True
        )
    for i, ids in enumerate(batches[1:], 1):
        for run in runs:  # round-robin: the configurations share the machine's noise
            step(run, ids, device)
        print(f"  step {i}: " + ", ".join(f"{r.name} {r.times[-1]:.1f}s" for r in runs), flush=True)
    base = next((r for r in runs if r.name == "qlora"), runs[0])
    base_time = statistics.median(base.times)
    print(
        f"\n== {title}: {args.batch}x{args.seq} tokens, {dtype}, {device}, dropout {args.dropout}, "
        f"num_groups {args.num_groups}, {args.steps} timed steps"
    )
    print(
        f"{'config':18s} {'saved KB/tok':>12s} {'vs qlora':>8s} {'step s':>8s} {'vs qlora':>8s} "
        f"{'loss':>7s}" + (f" {'peak GiB':>9s}" if device.type == "cuda" else "")
    )
    out = {}
    for run in runs:
        per_token = run.saved_bytes / tokens
        step_s = statistics.median(run.times)
        row = (
            f"{run.name:18s} {per_token / 1024:12.1f} {run.saved_bytes / base.saved_bytes:8.3f} "
            f"{step_s:8.2f} {step_s / base_time:8.3f} {run.losses[-1]:7.4f}"
        )
        if run.peak_bytes is not None:
            row += f" {run.peak_bytes / 2**30:9.2f}"
        print(row)
        out[run.name] = {
            "saved_bytes_per_token": per_token,
            "saved_ratio_vs_qlora": run.saved_bytes / base.saved_bytes,
            "step_seconds": step_s,
            "step_ratio_vs_qlora": step_s / base_time,
            "loss": run.losses[-1],
            "losses": run.losses,
            "top_ops_bytes_per_token": {k: v / tokens for k, v in list(run.by_op.items())[:6]},
        }
        if run.peak_bytes is not None:
            out[run.name]["peak_bytes"] = run.peak_bytes
    print("top saved ops, KB/token:")
    for run in runs:
        top = ", ".join(f"{k} {v / tokens / 1024:.1f}" for k, v in list(run.by_op.items())[:5])
        print(f"  {run.name:18s} {top}")
    del runs
    return out


def llama7b_shaped(tmp: Path, layers: int, dtype: torch.dtype, vocab: int) -> ModelSource:
    """A LLaMA-7B-shaped checkpoint with random weights and fewer layers, for real CUDA peak memory.

    The vocabulary is the tokenizer's (SmolLM2: 49152, not LLaMA's 32000) so the same real text feeds it.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(dtype).save_pretrained(tmp)
    return ModelSource(f"llama-7b-shaped-{layers}-layers", str(tmp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the metered warm-up step")
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--num-groups", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names, or issue19")
    parser.add_argument("--big-layers", type=int, default=4, help="layers of the LLaMA-7B-shaped CUDA stack")
    parser.add_argument("--json", type=Path, help="write {'configs': {...}} here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.configs == "issue19":
        args.configs = ",".join(ISSUE19)
    names = [n for n in args.configs.split(",") if n]
    unknown = sorted(set(names) - set(CONFIGS) - set(LEAN) - set(PLANNED))
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {CONFIGS}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")

    args.planned = {}
    for i, name in enumerate(names):
        if name in PLANNED:
            choice, spec = planned(PLANNED[name], args, device)
            renamed = name + ("_gc" if spec["checkpointing"] != "none" else "")
            print(f"  {renamed} = {choice}", flush=True)
            args.planned[renamed] = spec
            names[i] = renamed
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    print(f"data: {training_text()[1]}")
    result = {"command": " ".join(sys.argv), "configs": compare(args.model, source, tokenizer, device, args, names)}
    if device.type == "cuda":
        with tempfile.TemporaryDirectory() as tmp:
            big = llama7b_shaped(Path(tmp), args.big_layers, compute_dtype("auto", device), len(tokenizer))
            big_names = [n for n in names if n != "lora_peft_velora" and not n.startswith("planner")]
            big_args = argparse.Namespace(**{**vars(args), "num_groups": 32})
            result["llama7b_shaped"] = compare(big.reference, big, tokenizer, device, big_args, big_names)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp_path.write_text(json.dumps(result, indent=2), encoding="utf-8")
        tmp_path.replace(args.json)


if __name__ == "__main__":
    main()
