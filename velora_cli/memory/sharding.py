"""Memory per GPU when a run is spread over several GPUs (and nodes): DDP replicas or FSDP2 shards, and the choice
between them that `distributed.strategy: auto` makes.

From the one-GPU estimate (memory.estimate), per GPU:
- DDP: every GPU holds everything the one-GPU run holds, plus DDP's gradient buckets (a flat copy of the trainable
  gradients, the Trainer does not make them views);
- FSDP (fully_shard per decoder layer, as finetune/sharding.py): weights, adapters, gradients and optimizer state
  divided by the number of GPUs (every unit is split evenly over all ranks: embeddings and lm_head too; 4-bit quant
  states are not sharded, each rank holds them whole), plus the all-gather buffers: the largest unit gathered
  whole, twice (the unit computing and the next one prefetched);
- activations and logits: per micro-batch on each GPU, the same under both (the global batch is split, not a
  micro-batch); the CUDA overhead is recounted on the per-GPU tensors.
Before FSDP shards the model, loading has costs of its own. A base (unquantised, or quantised to nf4/fp4 here) is
read into CPU memory by rank 0 alone (models.load.rank0_reads_weights): `host_load`, rank 0's host bytes; the GPUs
then only ever hold shards. A pretrain model is initialised whole on each GPU: `load_peak`, one GPU's bytes then.
The verdict is on the larger of training and `load_peak`. (int8 does not shard: auto picks DDP for it.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from velora_cli.common.memstats import human_bytes
from velora_cli.memory.arch import Arch
from velora_cli.memory.estimate import Estimate, cuda_overhead, quantized_linear_bytes
from velora_cli.memory.settings import Settings

SHARDED = ("weights", "adapters", "gradients", "optimizer")

PREFETCH_UNITS = 2  # FSDP2 gathers the next unit while one computes (forward and backward prefetch)


def largest_unit_bytes(arch: Arch, s: Settings) -> int:
    """Bytes of the largest FSDP unit gathered whole: one decoder layer (frozen weights as stored, plus trainable
    LoRA in fp32), the input embedding, or lm_head (its own unit when untied)."""
    layer = sum(quantized_linear_bytes(i, o, s.quantization, s.double_quant, s.c) for _, i, o, _ in arch.linears)
    if not s.full:
        layer += sum(s.lora_r * (i + o) * 4 for name, i, o, _ in arch.linears if name in s.targets)
    embedding = arch.vocab * arch.hidden * s.c
    return max(layer, embedding)


@dataclass
class Sharding:
    gpus: int  # per node
    nodes: int
    strategy: str  # ddp | fsdp
    reason: str
    per_gpu: dict[str, int] = field(default_factory=dict)
    one_gpu: int = 0  # the same run on a single GPU
    budget: int | None = None
    load_peak: int | None = None  # FSDP: bytes on one GPU while the model loads, before it is sharded (see above)
    host_load: int | None = None  # FSDP: rank 0's CPU-memory bytes for the base it alone reads (see above)

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    @property
    def total(self) -> int:
        return sum(self.per_gpu.values())

    @property
    def peak(self) -> int:
        return max(self.total, self.load_peak or 0)

    @property
    def margin(self) -> int | None:
        return None if self.budget is None else self.budget - self.peak

    def as_dict(self) -> dict[str, Any]:
        return {"gpus_per_node": self.gpus, "nodes": self.nodes, "world_size": self.world, "strategy": self.strategy,
                "reason": self.reason, "per_gpu": dict(self.per_gpu), "per_gpu_total": self.total,
                "one_gpu_total": self.one_gpu, "load_peak": self.load_peak, "host_load": self.host_load,
                "peak": self.peak, "budget": self.budget, "margin": self.margin}  # fmt: skip


def per_gpu(est: Estimate, strategy: str, world: int) -> dict[str, int]:
    c = dict(est.components)
    c.pop("overhead", None)
    if strategy == "fsdp" and world > 1:
        whole = quant_state_bytes(est)
        c["weights"] -= whole
        for key in SHARDED:
            c[key] = -(-c[key] // world)  # ceil: a rank holds at most this
        c["weights"] += whole
        c["all_gather"] = PREFETCH_UNITS * largest_unit_bytes(est.arch, est.settings)
    elif world > 1:
        c["ddp_buckets"] = c["gradients"]
    c["overhead"] = cuda_overhead(sum(c.values()), est.settings.device)
    return c


def quant_state_bytes(est: Estimate) -> int:
    """The bytes of every 4-bit layer's quant state (absmax, code tables), which FSDP leaves whole on each rank."""
    s = est.settings
    if s.quantization not in ("nf4", "fp4"):
        return 0
    per_layer = sum(quantized_linear_bytes(i, o, s.quantization, s.double_quant, s.c) - -(-i * o // 2)
                    for _, i, o, _ in est.arch.linears)  # fmt: skip
    return est.arch.layers * per_layer


def loads_whole(est: Estimate) -> bool:
    """Whether every rank of an FSDP run holds the whole model before sharding: a pretrain initialisation does;
    else rank 0 alone reads the base."""
    return est.settings.method == "pretrain"


def load_peak(est: Estimate, world: int) -> int | None:
    """One GPU's bytes while an FSDP run loads, where every rank holds the whole model then (loads_whole)."""
    if world <= 1 or not loads_whole(est):
        return None
    weights = est.components["weights"]
    return weights + cuda_overhead(weights, est.settings.device)


def host_load(est: Estimate, world: int) -> int | None:
    """Rank 0's CPU-memory bytes for the base it alone reads (and quantises: plus the largest weight unquantised)."""
    if world <= 1 or loads_whole(est):
        return None
    s = est.settings
    staged = max(i * o for _, i, o, _ in est.arch.linears) * s.c if s.quantization != "none" else 0
    return est.components["weights"] + staged


def choose(est: Estimate, requested: str, gpus: int, nodes: int = 1, budget: int | None = None) -> Sharding:
    """The per-GPU figures for `requested` (auto: DDP when one GPU holds the whole DDP replica, FSDP otherwise)."""
    world = gpus * nodes
    ddp = per_gpu(est, "ddp", world)
    if requested == "auto":
        if world == 1:
            strategy, reason = "ddp", "one process: nothing to shard"
        elif est.settings.quantization == "int8":
            strategy, reason = "ddp", "int8 weights do not shard under FSDP"
        elif budget is None:
            strategy, reason = "ddp", "no GPU budget given: DDP, the faster when the run fits one GPU"
        elif sum(ddp.values()) <= budget:
            strategy, reason = "ddp", f"a whole replica ({human_bytes(sum(ddp.values()))}) fits {human_bytes(budget)}"
        else:
            strategy = "fsdp"
            reason = f"a whole replica ({human_bytes(sum(ddp.values()))}) exceeds {human_bytes(budget)}: shard it"
    else:
        strategy, reason = requested, f"distributed.strategy: {requested}"
    if strategy == "ddp":
        return Sharding(gpus, nodes, strategy, reason, ddp, est.total, budget)
    fsdp = per_gpu(est, "fsdp", world)
    return Sharding(gpus, nodes, strategy, reason, fsdp, est.total, budget, load_peak(est, world),
                    host_load(est, world))


def print_sharding(sh: Sharding, out: Any) -> None:
    """The per-GPU table of `memory-estimate --gpus N`."""
    from rich.table import Table

    table = Table(title=f"per GPU: {sh.nodes} node(s) x {sh.gpus} GPU(s), {sh.strategy.upper()}")
    table.add_column("component")
    table.add_column("per GPU", justify="right")
    for key, value in sh.per_gpu.items():
        table.add_row(key.replace("_", " "), human_bytes(value))
    table.add_row("total", human_bytes(sh.total), style="bold")
    table.add_row("one GPU, unsharded", human_bytes(sh.one_gpu), style="dim")
    if sh.load_peak is not None:
        table.add_row("while loading, before sharding", human_bytes(sh.load_peak), style="dim")
    if sh.host_load is not None:
        table.add_row("rank 0's CPU memory while loading", human_bytes(sh.host_load), style="dim")
    out.print(table)
    line = f"strategy: {sh.strategy} ({sh.reason})"
    if sh.margin is not None:
        verdict = "fits" if sh.margin >= 0 else "does NOT fit"
        budget = human_bytes(sh.budget or 0)
        line += f"; {human_bytes(sh.peak)} per GPU {verdict} {budget}, margin {human_bytes(sh.margin)}"
        if sh.load_peak is not None and sh.load_peak > sh.total:
            line += (" - the peak is loading: every rank initialises the whole model on its GPU before it is "
                     "sharded (pretrain; a base to fine-tune is read by rank 0 into CPU memory)")
    out.print(line)
