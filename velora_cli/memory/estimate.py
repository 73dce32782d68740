"""The memory estimate: where the memory of a QLoRA (+ VeLoRA) training run goes, and what fits.

Owns the Settings an estimate depends on (resolved from a recipe), the byte counts per component, the largest
micro-batch or sequence that fits a budget, and the VeLoRA paper's own accounting. Pure arithmetic on an Arch.

The model is exact bookkeeping, not rules of thumb:
- weights: parameter counts from the model config (built on the meta device), with bitsandbytes' real storage
  layout for 4-bit (packed nibbles + blockwise absmax, double-quantised or not) and 8-bit (int8 + per-row scale);
  embeddings, lm_head and norms stay in the compute dtype (models.build_training_model undoes PEFT's fp32 upcast);
- adapters, gradients, optimizer: PEFT creates LoRA weights in fp32; AdamW keeps two fp32 moments, the
  bitsandbytes 8-bit variants two uint8 states + fp32 absmax per 256-block (fp32 below 4096 elements);
- activations: per decoder layer and per op, what autograd saves for backward in this stack
  (transformers LLaMA + PEFT LoRA + VeLoRA), which the ActivationMeter measures directly. The per-op terms
  were read off the meter (see `layer_activations`) and tests/test_memory_model.py checks them against it;
- logits: the fp32 log-softmax the loss keeps, the logits tensor, and its gradient during backward; with the
  chunked loss (velora_cli.velora.lean) the hidden-state gradient of the scored tokens and one chunk's logits;
- lean techniques (memory.loss / lean_ops / checkpointing / offload): the tensors each removes, as stated in
  velora_cli/velora/lean/patch.py and counted byte for byte there in fp32; recompute adds the one layer (or
  region) re-run at a time in backward, offload keeps the decoder stack's saved tensors in host memory and
  OFFLOAD_IN_FLIGHT layers' worth of them on the GPU (copies in flight, the layer backward is working on);
- overhead: CUDA context + allocator slack, a stated assumption (OVERHEAD_*);
- packing (data.packing): a micro-batch is micro_batch_size rows of cutoff_len real tokens (the worst case an
  unpacked batch is counted at too), plus the rotary tables per row; the attention saves what unpacked SDPA saves,
  because packed rows attend per example without a mask (velora/lean/packed_attention.py; tests/test_packing.py
  checks it against the meter).

It also reproduces the VeLoRA paper's own accounting (Table 3) so the two can be put side by side.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from velora_cli.description import MemoryPart, method_name
from velora_cli.device import DTYPES, compute_dtype, dtype_name
from velora_cli.errors import RecipeError
from velora_cli.memory.arch import LLAMA_PROJECTIONS, Arch
from velora_cli.memory.full import full_components, full_head_activations, full_layer_activations, trainable_norm_bytes
from velora_cli.velora.config import DEFAULT_NUM_GROUPS
from velora_cli.velora.lean import Recompute, default_chunk_size, parse_checkpointing

# Assumptions for the overhead line (CUDA only; nothing is added on CPU).
OVERHEAD_CONTEXT = 512 * 2**20  # CUDA context + cuBLAS workspace, as torch reports after the first matmul
OVERHEAD_FRACTION = 0.10  # caching-allocator fragmentation, as a fraction of the tensors' bytes

COMPONENTS = ("weights", "adapters", "gradients", "optimizer", "activations", "logits", "overhead")
BNB_4BIT_BLOCK = 64  # bitsandbytes quantize_4bit default blocksize
BNB_DQ_BLOCK = 256  # second-level blocksize of double quantisation (quantize_blockwise on the absmax)
BNB_OPT_BLOCK = 256  # 8-bit optimizer state blocksize
BNB_OPT_MIN_8BIT = 4096  # smaller tensors keep fp32 states (bitsandbytes' min_8bit_size)

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OFFLOAD_IN_FLIGHT = 2  # layers of saved tensors on the GPU under offload: one being copied, one in use (assumption)


# ------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Everything the estimate depends on, resolved from a recipe (and the command-line shortcuts)."""

    batch: int
    seq: int
    quantization: str = "nf4"
    double_quant: bool = True
    compute: str = "bf16"  # fp32 | bf16 | fp16
    device: str = "cuda"  # cuda | cpu: dropout masks are bool on CUDA, float on CPU; overhead only on CUDA
    attn: str = "sdpa"  # sdpa | eager
    lora_r: int = 8
    lora_dropout: float = 0.05
    targets: tuple[str, ...] = LLAMA_PROJECTIONS
    velora: tuple[str, ...] = ("v_proj", "down_proj")  # empty: VeLoRA off
    # one count, or per layer ((module name, count), ...: hashable, as the planner keeps Settings in a set)
    num_groups: int | tuple[tuple[str, int], ...] | None = DEFAULT_NUM_GROUPS
    subtoken_size: int | None = None
    gradient_checkpointing: bool = False  # the stock switch (input grads on); `checkpointing` is apply_lean's
    optimizer: str = "adamw_torch"
    loss: str = "full"  # full | chunked
    lean_ops: bool = False
    checkpointing: str = "none"  # none | all | mlp | every:K (apply_lean; "auto" is resolved by memory.plan)
    offload: bool = False
    chunk_size: int | None = None
    method: str = "qlora"  # full / pretrain: every weight trains (memory/full.py)
    optimizer_in_backward: bool = False
    packing: bool = False  # data.packing: rows of several examples, position_ids per row (see `activations`)

    @property
    def recompute(self) -> Recompute:
        return parse_checkpointing("all" if self.gradient_checkpointing else self.checkpointing)

    @property
    def full(self) -> bool:
        return self.method in ("full", "pretrain")

    @property
    def c(self) -> int:
        return DTYPE_BYTES[self.compute]

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def groups_for(self, depth: int, layer: str) -> int:
        """Sub-tokens per token (D/M) VeLoRA keeps for the projection `layer` of input depth `depth`."""
        if self.subtoken_size is not None:
            return max(1, depth // self.subtoken_size)
        if isinstance(self.num_groups, tuple):
            return dict(self.num_groups).get(layer, DEFAULT_NUM_GROUPS)
        return self.num_groups or DEFAULT_NUM_GROUPS

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"], d["velora"] = list(self.targets), list(self.velora)
        return d


def _num_groups(velora: Any) -> int | tuple[tuple[str, int], ...] | None:
    """The recipe's VeLoRA grouping as Settings holds it: per-layer counts by module name ({v: 64} -> v_proj)."""
    if velora.subtoken_size is not None:
        return None
    groups = velora.to_config().num_groups
    return tuple(sorted(groups.items())) if isinstance(groups, dict) else groups


def settings_from_recipe(recipe: Any, device: str = "cuda") -> Settings:
    compute = recipe.model.compute_dtype
    if compute == "auto":  # what device.compute_dtype picks: bf16 on a current GPU, fp32 on CPU
        compute = "bf16" if device == "cuda" else dtype_name(compute_dtype("auto", torch.device("cpu")))
    assert compute in DTYPES
    targets = tuple(recipe.lora.module_names) if not getattr(recipe, "full", False) else ()
    unknown = [t for t in targets if t not in LLAMA_PROJECTIONS]
    if unknown:
        raise RecipeError(
            f"lora.target_modules: {unknown[0]!r} is not a LLaMA projection; memory-estimate models "
            f"{', '.join(LLAMA_PROJECTIONS)}"
        )
    velora = tuple(recipe.velora.module_names) if recipe.velora.enabled else ()
    return Settings(
        batch=recipe.train.micro_batch_size,
        seq=recipe.data.cutoff_len,
        quantization=recipe.model.quantization,
        double_quant=recipe.model.double_quant,
        compute=compute,
        device=device,
        # flash-attention keeps what SDPA's fused kernels keep (q, k, v, output, log-sum-exp), no probabilities
        attn="eager" if recipe.model.attn_implementation == "eager" else "sdpa",
        lora_r=recipe.lora.r,
        lora_dropout=recipe.lora.dropout,
        targets=targets,
        velora=velora,
        num_groups=_num_groups(recipe.velora),
        subtoken_size=recipe.velora.subtoken_size,
        optimizer=recipe.train.optimizer,
        # train.gradient_checkpointing is folded into memory.checkpointing by the recipe; auto stays for the planner
        loss=recipe.memory.loss,
        lean_ops=recipe.memory.lean_ops,
        checkpointing=recipe.memory.checkpointing,
        offload=recipe.memory.offload,
        chunk_size=recipe.memory.chunk_size,
        method=recipe.method,
        optimizer_in_backward=recipe.train.optimizer_in_backward,
        packing=recipe.data.packing and not recipe.text_data,
    )


# -------------------------------------------------------------------------------- parameters & states


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
    total = 2 * 256 * 4  # the two shared 8-bit quantisation maps
    for n in sizes:
        if n < BNB_OPT_MIN_8BIT:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_OPT_BLOCK)
    return total


# -------------------------------------------------------------------------------------------- activations

# Which tensor feeds each LoRA-able projection: modules in one group see the same input tensor.
INPUT_GROUPS = {
    "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in",
    "o_proj": "o_in",
    "gate_proj": "mlp_in", "up_proj": "mlp_in",
    "down_proj": "down_in",
}  # fmt: skip
LORA_BYTES = 4  # PEFT creates (autocasts) adapter weights in fp32 and casts their input to it


def layer_activations(arch: Arch, s: Settings, first: bool = False) -> dict[str, float]:
    """Bytes per token one decoder layer saves for backward, by op.

    Read off the ActivationMeter on this stack (transformers LLaMA, PEFT LoRA over bitsandbytes Linear4bit):
    - RMSNorm saves its fp32 input copy and the fp32 rsqrt (whatever the compute dtype);
    - the frozen 4-bit base matmul saves nothing (its weight is a parameter);
    - LoRA: PEFT casts the input to fp32 (a copy per module unless compute is fp32), dropout saves its mask
      (bool on CUDA's fused kernel, a float tensor on CPU) only when its input needs grad, lora_A saves the
      dropped-out input, lora_B saves the r-wide A output; without dropout and cast, modules sharing an
      input share one saved tensor;
    - VeLoRA replaces the dropped-out input and mask by z_p (D/M fp32 numbers per token);
    - SDPA saves q, k, v (k/v with the kv heads: transformers uses SDPA's GQA when there is no padding mask),
      the output and an fp32 logsumexp per head; eager saves q, repeated k/v, fp32 softmax probs (S per head)
      and their compute-dtype copy when compute is not fp32;
    - the SiLU-gated MLP saves the gate output, the SiLU output and the up output.
    `first`: layer 0, whose input (the frozen embedding) needs no grad unless input grads are enabled.
    """
    c, la, d = s.c, LORA_BYTES, arch.hidden
    widths = {"attn_in": d, "o_in": arch.heads * arch.head_dim, "mlp_in": d, "down_in": arch.intermediate}
    mask_b = 1 if s.device == "cuda" else la
    no_grad_input = first and not s.gradient_checkpointing  # GC enables input grads (enable_input_require_grads)
    ops: dict[str, float] = {"norms": 0.0, "attention": 0.0, "mlp": 0.0, "lora_inputs": 0.0, "dropout_masks": 0.0}
    ops["lora_B_inputs"] = 0.0
    ops["velora_zp"] = 0.0
    region = dict.fromkeys(ops, 0.0)  # what checkpointing=mlp recomputes: post-attention norm + MLP

    def add(key: str, value: float, group: str = "") -> None:
        ops[key] += value
        if group in ("mlp_in", "down_in", "post_norm"):
            region[key] += value

    # RMSNorm keeps an fp32 copy of its input and the fp32 rsqrt; the lean one its input as it is and the rsqrt.
    norm = (c * d + 4) if s.lean_ops else (4 * d + 4)
    add("norms", 0 if no_grad_input else norm)
    add("norms", norm, "post_norm")
    for group, n in widths.items():
        members = [m for m in s.targets if INPUT_GROUPS[m] == group]
        plain = [m for m in members if m not in s.velora]
        for m in members:
            add("lora_B_inputs", s.lora_r * la, group)
            if m in s.velora:
                add("velora_zp", s.groups_for(n, m) * la, group)
        if not plain:
            continue
        if s.lora_dropout > 0:
            add("lora_inputs", len(plain) * n * la, group)
            if not (no_grad_input and group == "attn_in"):
                add("dropout_masks", len(plain) * n * mask_b, group)
        elif c != la:
            add("lora_inputs", len(plain) * n * la, group)
        elif not (group == "o_in" and s.attn == "sdpa"):
            # SDPA returns its output in (B, S, H, hd) memory order, so o_proj's input is a view of the
            # attention output that SDPA already saves; eager's transpose makes a copy.
            add("lora_inputs", n * c, group)
    h, kv, hd = arch.heads, arch.kv_heads, arch.head_dim
    if s.attn == "eager":
        probs = h * s.seq * (4 + (c if c != 4 else 0))
        ops["attention"] = 3 * h * hd * c + probs
    else:
        ops["attention"] = (2 * h * hd + 2 * kv * hd) * c + 4 * h
    # gate, silu(gate), up; the lean SwiGLU recomputes silu(gate) in backward
    add("mlp", (2 if s.lean_ops else 3) * arch.intermediate * c, "mlp_in")
    if s.recompute.mode == "mlp":
        for key, value in region.items():
            ops[key] -= value
        ops["mlp_region_input"] = c * d  # the residual stream, which the region keeps
        ops["mlp_region_recompute"] = sum(region.values()) - c * d  # not saved: re-run one layer at a time
    return ops


@dataclass
class Activations:
    """Activation bytes of one micro-batch: per layer by op, the rest of the model, and the total."""

    per_layer: dict[str, float]  # bytes per token, a middle layer
    layers: float  # all decoder layers
    other: float  # final norm + rotary tables (+ checkpointed layer inputs)
    logits_saved: float  # what the loss saves: fp32 log-softmax + int64 targets
    logits_peak: float  # + the logits tensor and the log-softmax gradient alive at the start of backward
    meter_view: float  # what ActivationMeter measures (saved tensors at the end of forward)
    host: float = 0.0  # offloaded to pinned CPU memory

    @property
    def total(self) -> float:
        return self.layers + self.other


def activations(arch: Arch, s: Settings) -> Activations:
    n = s.tokens
    mid = full_layer_activations(arch, s) if s.full else layer_activations(arch, s)
    first = mid if s.full else layer_activations(arch, s, first=True)
    transient = mid.pop("mlp_region_recompute", 0.0)
    first.pop("mlp_region_recompute", None)
    per_mid, per_first = sum(mid.values()), sum(first.values())
    # cos and sin, (1, S, head_dim), shared by all layers; packed rows have position_ids of their own: (batch, S, hd)
    rotary = 2 * s.seq * arch.head_dim * s.c * (s.batch if s.packing else 1)
    frozen_norm = (s.c * arch.hidden + 4) if s.lean_ops else (4 * arch.hidden + 4)
    final_norm = n * (trainable_norm_bytes(arch, s) if s.full else frozen_norm)
    if s.loss == "chunked":
        # the hidden-state gradient and int64 row index of every scored token (labels shifted: seq - 1 per row)
        logits_saved = s.batch * (s.seq - 1) * (arch.hidden * s.c + 8)
        chunk = min(n, s.chunk_size or default_chunk_size(arch.vocab))
        logits_peak = logits_saved + chunk * arch.vocab * (2 * s.c + 4)  # one chunk's logits, fp32 copy, gradient
    else:
        logits_saved = n * (arch.vocab * 4 + 8) + 4
        logits_peak = logits_saved + n * arch.vocab * (s.c + 4)
    if s.full:  # the embedding and lm_head train: what they keep (full.py)
        head_saved, head_transient = full_head_activations(arch, s)
        logits_saved += head_saved
        logits_peak += head_saved + head_transient
    whole = len(s.recompute.layers(arch.layers))
    plain = n * (per_first + (arch.layers - 1 - whole) * per_mid) if whole == 0 else n * (arch.layers - whole) * per_mid
    kept = whole * n * arch.hidden * s.c  # a checkpointed layer keeps its input hidden state
    if whole:
        transient = max(transient, per_mid + arch.hidden * s.c)  # backward re-runs one layer at a time
    rope = rotary if whole < arch.layers else 0  # the tables stay saved while any layer is not checkpointed
    saved = plain + kept + final_norm + rope
    meter = saved + logits_saved
    if s.offload:
        # The decoder stack's saved tensors (final norm included) wait in pinned host memory.
        in_flight = OFFLOAD_IN_FLIGHT * n * (per_mid if whole < arch.layers else arch.hidden * s.c)
        return Activations(mid, in_flight + n * transient, 0.0, logits_saved, logits_peak, meter, host=saved)
    return Activations(mid, plain + kept + n * transient, final_norm + rope, logits_saved, logits_peak, meter)


# ----------------------------------------------------------------------------------------------- estimate


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
    tensors = sum(comps.values())
    comps["overhead"] = int(OVERHEAD_CONTEXT + OVERHEAD_FRACTION * tensors) if s.device == "cuda" else 0
    return Estimate(arch, s, comps, act)


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


# --------------------------------------------------------------------------------- paper's accounting


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


# ------------------------------------------------------------------------------------------------ output


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
