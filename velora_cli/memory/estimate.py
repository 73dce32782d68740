"""The memory estimate: where the memory of a QLoRA (+ VeLoRA) training run goes, and what fits.

Owns the Settings an estimate depends on (resolved from a recipe), the byte counts per component, the largest
micro-batch or sequence that fits a budget, and the VeLoRA paper's own accounting. Pure arithmetic on an Arch.

The model is exact bookkeeping, not rules of thumb:
- weights: parameter counts from the model config (built on the meta device), with bitsandbytes' real storage
  layout for 4-bit (packed nibbles + blockwise absmax, double-quantised or not) and 8-bit (int8 + per-row scale);
  embeddings, lm_head and norms stay in the compute dtype (models.build.build_training_model undoes PEFT's fp32 upcast);
- adapters, gradients, optimizer: PEFT creates LoRA weights in fp32; AdamW keeps two fp32 moments, the
  bitsandbytes 8-bit variants two uint8 states + fp32 absmax per 256-block (fp32 below 4096 elements);
- activations: per decoder layer and per op, what autograd saves for backward in this stack
  (transformers LLaMA + PEFT LoRA + VeLoRA), which the ActivationMeter measures directly. The per-op terms
  were read off the meter (see `layer_activations`) and tests/test_memory_model.py checks them against it;
- logits: the fp32 log-softmax the loss keeps, the logits tensor, and its gradient during backward; with the
  chunked loss (velora_cli.engine.lean) the hidden-state gradient of the scored tokens and one chunk's logits;
- lean techniques (memory.loss / lean_ops / checkpointing / offload): the tensors each removes, as stated in
  velora_cli/engine/lean/patch.py and counted byte for byte there in fp32; recompute adds the one layer (or
  region) re-run at a time in backward, offload keeps the decoder stack's saved tensors in host memory and
  OFFLOAD_IN_FLIGHT layers' worth of them on the GPU (copies in flight, the layer backward is working on);
- overhead: CUDA context + allocator slack, a stated assumption (OVERHEAD_*);
- packing (data.packing): a micro-batch is micro_batch_size rows of cutoff_len real tokens (the worst case an
  unpacked batch is counted at too), plus the rotary tables per row; the attention saves what unpacked SDPA saves,
  because packed rows attend per example without a mask (engine/lean/packed_attention.py; tests/test_packing.py
  checks it against the meter).

It also reproduces the VeLoRA paper's own accounting (Table 3) so the two can be put side by side.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from velora_cli.config.description import MemoryPart, method_name
from velora_cli.config.presets import LLAMA_PROJECTIONS
from velora_cli.engine.config import DEFAULT_NUM_GROUPS
from velora_cli.memory.activations import LORA_BYTES, Activations, activations
from velora_cli.memory.arch import Arch
from velora_cli.memory.full import adam8bit_bytes, full_components
from velora_cli.memory.settings import DTYPE_BYTES, OFFLOAD_IN_FLIGHT, Settings, settings_from_recipe  # noqa: F401

# Assumptions for the overhead line (CUDA only; nothing is added on CPU).
OVERHEAD_CONTEXT = 512 * 2**20  # CUDA context + cuBLAS workspace, as torch reports after the first matmul

OVERHEAD_FRACTION = 0.10  # caching-allocator fragmentation, as a fraction of the tensors' bytes

COMPONENTS = ("weights", "adapters", "gradients", "optimizer", "activations", "logits", "overhead")

BNB_4BIT_BLOCK = 64  # bitsandbytes quantize_4bit default blocksize

BNB_DQ_BLOCK = 256  # second-level blocksize of double quantisation (quantize_blockwise on the absmax)


def quantized_linear_bytes(n_in: int, n_out: int, quantization: str, double_quant: bool, c: int) -> int:
    """Bytes of one frozen linear weight as bitsandbytes stores it (see bitsandbytes.functional.quantize_4bit)."""
    n = n_in * n_out
    if quantization in ("nf4", "fp4"):
        blocks = math.ceil(n / BNB_4BIT_BLOCK)
        packed = math.ceil(n / 2)  # two 4-bit codes per uint8
        code = 16 * 4  # the 16-entry fp32 codebook each QuantState carries
        if double_quant:
            # uint8 absmax per block, re-quantised in blocks of 256 with fp32 absmax, the fp32 mean offset and
            # the 256-entry fp32 dynamic map of the second level (a copy per tensor in a real load)
            return packed + blocks + math.ceil(blocks / BNB_DQ_BLOCK) * 4 + 4 + code + 256 * 4
        return packed + blocks * 4 + code
    if quantization == "int8":
        return n + n_out * 4  # int8 weight + fp32 scale per output row (Int8Params CB / SCB)
    return n * c


def weights_bytes(arch: Arch, s: Settings) -> int:
    per_layer = sum(
        quantized_linear_bytes(i, o, s.quantization, s.double_quant, s.c) + (o * s.c if b else 0)
        for _, i, o, b in arch.linears
    )
    return arch.layers * per_layer + arch.other_params * s.c


def lora_tensors(arch: Arch, s: Settings) -> list[int]:
    """Element counts of every LoRA tensor (A: r x in, B: out x r), one entry per tensor."""
    out: list[int] = []
    for name in s.targets:
        i, o = arch.linear(name)
        out += [s.lora_r * i, o * s.lora_r]
    return out * arch.layers


def optimizer_bytes(sizes: list[int], optimizer: str) -> int:
    if optimizer in ("adamw_torch", "paged_adamw_32bit"):
        return sum(8 * n for n in sizes)  # exp_avg + exp_avg_sq, fp32 like the fp32 LoRA weights
    return adam8bit_bytes(sizes)


@dataclass
class Estimate:
    arch: Arch
    settings: Settings
    components: dict[str, int]
    act: Activations
    measured: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.components.values())


def estimate(arch: Arch, s: Settings) -> Estimate:
    lora = lora_tensors(arch, s)
    act = activations(arch, s)
    comps = {
        "weights": weights_bytes(arch, s),
        "adapters": sum(lora) * LORA_BYTES,
        "gradients": sum(lora) * LORA_BYTES,
        "optimizer": optimizer_bytes(lora, s.optimizer),
    }
    if s.full:
        comps = full_components(arch, s)
    comps |= {"activations": int(act.total), "logits": int(act.logits_peak)}
    comps["overhead"] = cuda_overhead(sum(comps.values()), s.device)
    return Estimate(arch, s, comps, act)


def cuda_overhead(tensors: int, device: str) -> int:
    """The CUDA context and the allocator's slack on top of `tensors` bytes (none counted on CPU)."""
    return int(OVERHEAD_CONTEXT + OVERHEAD_FRACTION * tensors) if device == "cuda" else 0


def largest_fitting(arch: Arch, s: Settings, budget: int, what: str, limit: int = 1 << 20) -> int:
    """Largest micro-batch (what="batch") or sequence length ("seq") whose estimate fits `budget` (0: none)."""

    def fits(v: int) -> bool:
        return estimate(arch, dataclasses.replace(s, **{what: v})).total <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def paper_accounting(arch: Arch, r: int, velora: tuple[str, ...], num_groups: int, tokens: int) -> dict[str, float]:
    """The VeLoRA paper's estimate (Table 3): 4-bit weights + fp16 adapters + the fp16 inputs of trainable layers.

    Every parameter at half a byte; LoRA A and B on all seven projections in fp16; each LoRA layer's input
    counted once per layer that consumes it (no sharing), VeLoRA layers at `num_groups` numbers per token.
    """
    weights = arch.total_params * 0.5
    adapters = sum(lora_tensors(arch, Settings(batch=1, seq=1, lora_r=r))) * 2
    per_token = 0
    for name in LLAMA_PROJECTIONS:
        i, _ = arch.linear(name)
        per_token += num_groups if name in velora else i
    acts = arch.layers * tokens * per_token * 2
    return {"weights": weights, "adapters": adapters, "activations": acts, "total": weights + adapters + acts}


def to_json(est: Estimate) -> dict[str, Any]:
    return {
        "components": dict(est.components),
        "total": est.total,
        "settings": {**est.settings.as_dict(), "model": est.arch.name, "params": est.arch.total_params},
        "activations_per_layer_per_token": est.act.per_layer,
        "measured": est.measured,
    }


def variants(arch: Arch, s: Settings, velora_layers: tuple[str, ...]) -> list[tuple[str, Estimate]]:
    """The estimate with VeLoRA off / on and gradient checkpointing off / on: the columns of the table (the
    recipe's loss, lean ops and offload kept)."""
    on = velora_layers or ("v_proj", "down_proj")
    out = []
    for rec in ("none", "all"):
        for vel in ((), on):
            v = dataclasses.replace(s, velora=vel, gradient_checkpointing=False, checkpointing=rec)
            out.append((settings_label(v, layers="none"), estimate(arch, v)))
    return out


def settings_label(s: Settings, layers: str = "short") -> str:
    """description.method_name for a configuration of the estimate (the planner's frontier, the table's columns)."""
    memory = MemoryPart(s.loss, s.lean_ops, str(s.recompute), s.offload, s.optimizer_in_backward)
    return method_name(s.method, s.quantization, s.velora, memory, layers=layers)  # type: ignore[arg-type]


def paper_totals(arch: Arch, s: Settings, velora_layers: tuple[str, ...]) -> dict[str, dict[str, float]] | None:
    """The paper's accounting without and with VeLoRA, where it applies (4-bit weights, no grouped-query attention)."""
    if s.quantization not in ("nf4", "fp4") or arch.heads != arch.kv_heads:
        return None
    groups = s.num_groups if isinstance(s.num_groups, int) else DEFAULT_NUM_GROUPS
    return {
        label: paper_accounting(arch, s.lora_r, vel, groups, s.tokens)
        for label, vel in (("QLoRA", ()), ("+ VeLoRA", velora_layers or ("v_proj", "down_proj")))
    }
