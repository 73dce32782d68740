"""`velora memory-estimate`: where the memory of a QLoRA (+ VeLoRA) training run goes, and what fits.

The model is exact bookkeeping, not rules of thumb:
- weights: parameter counts from the model config (built on the meta device), with bitsandbytes' real storage
  layout for 4-bit (packed nibbles + blockwise absmax, double-quantised or not) and 8-bit (int8 + per-row scale);
  embeddings, lm_head and norms stay in the compute dtype (models.build_training_model undoes PEFT's fp32 upcast);
- adapters, gradients, optimizer: PEFT creates LoRA weights in fp32; AdamW keeps two fp32 moments, the
  bitsandbytes 8-bit variants two uint8 states + fp32 absmax per 256-block (fp32 below 4096 elements);
- activations: per decoder layer and per op, what autograd saves for backward in this stack
  (transformers LLaMA + PEFT LoRA + VeLoRA), which the ActivationMeter measures directly. The per-op terms
  were read off the meter (see `layer_activations`) and tests/test_memory_model.py checks them against it;
- logits: the fp32 log-softmax the loss keeps, the logits tensor, and its gradient during backward;
- overhead: CUDA context + allocator slack, a stated assumption (OVERHEAD_*).

It also reproduces the VeLoRA paper's own accounting (Table 3) so the two can be put side by side.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from velora_cli.errors import RecipeError, UsageError
from velora_cli.memstats import human_bytes, parse_bytes

# ------------------------------------------------------------------------------------------- presets

PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048,
    ),
    "llama-13b": dict(
        hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
        intermediate_size=13824, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048,
    ),
    "smollm2-135m": dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
    ),
}  # fmt: skip

# Assumptions for the overhead line (CUDA only; nothing is added on CPU).
OVERHEAD_CONTEXT = 512 * 2**20  # CUDA context + cuBLAS workspace, as torch reports after the first matmul
OVERHEAD_FRACTION = 0.10  # caching-allocator fragmentation, as a fraction of the tensors' bytes

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COMPONENTS = ("weights", "adapters", "gradients", "optimizer", "activations", "logits", "overhead")
BNB_4BIT_BLOCK = 64  # bitsandbytes quantize_4bit default blocksize
BNB_DQ_BLOCK = 256  # second-level blocksize of double quantisation (quantize_blockwise on the absmax)
BNB_OPT_BLOCK = 256  # 8-bit optimizer state blocksize
BNB_OPT_MIN_8BIT = 4096  # smaller tensors keep fp32 states (bitsandbytes' min_8bit_size)

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# --------------------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class Arch:
    """What the memory model needs to know about a LLaMA-family causal LM."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    linears: tuple[tuple[str, int, int, bool], ...]  # per decoder layer: (name, in, out, has_bias)
    other_params: int  # embeddings, lm_head (if untied), norms: kept in the compute dtype

    def linear(self, name: str) -> tuple[int, int]:
        for n, i, o, _ in self.linears:
            if n == name:
                return i, o
        raise KeyError(name)

    @property
    def total_params(self) -> int:
        per_layer = sum(i * o + (o if b else 0) for _, i, o, b in self.linears)
        return self.layers * per_layer + self.other_params


def _arch_from_config(config: Any, name: str) -> Arch:
    """Build the model on the meta device (no memory, no weights) and read its exact parameter layout."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    decoder = getattr(getattr(model, "model", None), "layers", None)
    if decoder is None or len(decoder) == 0:
        raise UsageError(f"{name}: memory-estimate supports decoder-only models with model.layers (LLaMA family)")
    layer = decoder[0]
    linears = []
    for mod_name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            linears.append(
                (mod_name.rsplit(".", 1)[-1], module.in_features, module.out_features, module.bias is not None)
            )
    missing = [p for p in LLAMA_PROJECTIONS if p not in {n for n, *_ in linears}]
    if missing:
        raise UsageError(f"{name}: not a LLaMA-family layout (no {', '.join(missing)} in a decoder layer)")
    in_layers = {id(p) for p in decoder.parameters()}
    linear_ids = {id(m.weight) for m in decoder.modules() if isinstance(m, torch.nn.Linear)}
    linear_ids |= {id(m.bias) for m in decoder.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}
    other = sum(p.numel() for p in model.parameters() if id(p) not in in_layers)  # parameters() de-duplicates ties
    other += sum(p.numel() for p in decoder.parameters() if id(p) not in linear_ids)  # per-layer norms
    heads = config.num_attention_heads
    return Arch(
        name=name,
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        linears=tuple(linears),
        other_params=other,
    )


def preset_config(preset: str):
    from transformers import LlamaConfig

    if preset not in PRESETS:
        close = difflib.get_close_matches(preset, list(PRESETS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown preset {preset!r}{hint}; known: {', '.join(PRESETS)}")
    return LlamaConfig(**PRESETS[preset])


@functools.lru_cache(maxsize=8)
def arch_for(preset: str | None = None, model: str | None = None, trust_remote_code: bool = False) -> Arch:
    """The architecture of a preset or a model reference (config only, nothing downloaded but config.json)."""
    if preset is not None:
        return _arch_from_config(preset_config(preset), preset)
    from velora_cli.models import load_config, resolve_model

    assert model is not None
    return _arch_from_config(load_config(resolve_model(model), trust_remote_code), model)


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
    num_groups: int | None = 32
    subtoken_size: int | None = None
    gradient_checkpointing: bool = False
    optimizer: str = "adamw_torch"

    @property
    def c(self) -> int:
        return DTYPE_BYTES[self.compute]

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def groups_for(self, depth: int) -> int:
        """Sub-tokens per token (D/M) VeLoRA keeps for a layer of input depth `depth`."""
        if self.subtoken_size is not None:
            return max(1, depth // self.subtoken_size)
        return self.num_groups or 32

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"], d["velora"] = list(self.targets), list(self.velora)
        return d


def settings_from_recipe(recipe: Any, device: str = "cuda") -> Settings:
    from velora_cli.device import DTYPES, compute_dtype, dtype_name

    compute = recipe.model.compute_dtype
    if compute == "auto":  # what device.compute_dtype picks: bf16 on a current GPU, fp32 on CPU
        compute = "bf16" if device == "cuda" else dtype_name(compute_dtype("auto", torch.device("cpu")))
    assert compute in DTYPES
    targets = tuple(recipe.lora.module_names)
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
        attn=recipe.model.attn_implementation or "sdpa",
        lora_r=recipe.lora.r,
        lora_dropout=recipe.lora.dropout,
        targets=targets,
        velora=velora,
        num_groups=recipe.velora.num_groups if recipe.velora.subtoken_size is None else None,
        subtoken_size=recipe.velora.subtoken_size,
        gradient_checkpointing=recipe.train.gradient_checkpointing,
        optimizer=recipe.train.optimizer,
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
    ops["norms"] = (0 if no_grad_input else 4 * d + 4) + 4 * d + 4
    for group, n in widths.items():
        members = [m for m in s.targets if INPUT_GROUPS[m] == group]
        plain = [m for m in members if m not in s.velora]
        for m in members:
            ops["lora_B_inputs"] += s.lora_r * la
            if m in s.velora:
                ops["velora_zp"] += s.groups_for(n) * la
        if not plain:
            continue
        if s.lora_dropout > 0:
            ops["lora_inputs"] += len(plain) * n * la
            if not (no_grad_input and group == "attn_in"):
                ops["dropout_masks"] += len(plain) * n * mask_b
        elif c != la:
            ops["lora_inputs"] += len(plain) * n * la
        elif not (group == "o_in" and s.attn == "sdpa"):
            # SDPA returns its output in (B, S, H, hd) memory order, so o_proj's input is a view of the
            # attention output that SDPA already saves; eager's transpose makes a copy.
            ops["lora_inputs"] += n * c
    h, kv, hd = arch.heads, arch.kv_heads, arch.head_dim
    if s.attn == "eager":
        probs = h * s.seq * (4 + (c if c != 4 else 0))
        ops["attention"] = 3 * h * hd * c + probs
    else:
        ops["attention"] = (2 * h * hd + 2 * kv * hd) * c + 4 * h
    ops["mlp"] = 3 * arch.intermediate * c
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

    @property
    def total(self) -> float:
        return self.layers + self.other


def activations(arch: Arch, s: Settings) -> Activations:
    n = s.tokens
    mid = layer_activations(arch, s)
    first = layer_activations(arch, s, first=True)
    per_mid, per_first = sum(mid.values()), sum(first.values())
    rotary = 2 * s.seq * arch.head_dim * s.c  # cos and sin, (1, S, head_dim), shared by all layers
    final_norm = n * (4 * arch.hidden + 4)
    logits_saved = n * (arch.vocab * 4 + 8) + 4
    logits_peak = logits_saved + n * arch.vocab * (s.c + 4)
    if s.gradient_checkpointing:
        # Non-reentrant checkpointing keeps each layer's input; backward recomputes one layer at a time.
        kept = arch.layers * n * arch.hidden * s.c
        layers = kept + n * per_mid
        meter = final_norm + logits_saved  # the meter cannot see inside non-reentrant checkpointed regions
        return Activations(mid, layers, final_norm + rotary, logits_saved, logits_peak, meter)
    layers = n * (per_first + (arch.layers - 1) * per_mid)
    return Activations(
        mid, layers, final_norm + rotary, logits_saved, logits_peak, layers + final_norm + rotary + logits_saved
    )


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
        "activations": int(act.total),
        "logits": int(act.logits_peak),
    }
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


# ------------------------------------------------------------------------------------------ sizes & input

def parse_memory(text: str, what: str = "--gpu-mem") -> int:
    """'24GiB' -> bytes. GiB/MiB (and bare G/M) are binary, GB/MB decimal."""
    return parse_bytes(text or "", what, "24GiB, 80GB or 40960MiB")


def _default_recipe(model: str | None):
    from velora_cli.recipe import Recipe

    data: dict[str, Any] = {"data": {"path": "unused.json"}}
    if model:
        data["model"] = {"name": model}
    return Recipe.model_validate(data)


def resolve_inputs(
    recipe: Path | None, model: str | None, preset: str | None, overrides: list[str], batch: int | None, seq: int | None
):
    """(recipe, arch): from a recipe file, or the recipe defaults with --model/--preset; CLI shortcuts applied."""
    from velora_cli.recipe import apply_overrides, load_recipe, validate_recipe

    if model and preset:
        raise UsageError("give either --model or --preset, not both")
    if preset is not None:
        preset_config(preset)  # fails early with a did-you-mean
    extra = list(overrides)
    if batch is not None:
        extra.append(f"train.micro_batch_size={batch}")
        extra.append(f"train.batch_size={batch}")  # keep batch_size a multiple; accumulation does not change memory
    if seq is not None:
        extra.append(f"data.cutoff_len={seq}")
    if recipe is not None:
        rec = load_recipe(recipe, extra)
    else:
        rec = _default_recipe(model)
        data = apply_overrides(rec.model_dump(mode="json"), extra)
        rec = validate_recipe(data, source="--set")
    if preset is not None:
        return rec, arch_for(preset=preset)
    return rec, arch_for(model=model or rec.model.name, trust_remote_code=rec.model.trust_remote_code)


# --------------------------------------------------------------------------------------------- measuring


def real_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the frozen model as loaded: parameters, buffers and bitsandbytes quant-state tensors, per storage."""
    seen: dict[tuple[str, int], int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen.setdefault((str(t.device), t.untyped_storage().data_ptr()), t.untyped_storage().nbytes())

    for name, p in model.named_parameters():
        if ".lora_" in name:  # the adapters are counted on their own line
            continue
        add(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, qs.offset):
                add(t)
            if qs.state2 is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
        add(getattr(p, "SCB", None))
    for b in model.buffers():
        add(b)
    return sum(seen.values())


def measure_training(recipe: Any, s: Settings, steps: int = 2) -> dict[str, int]:
    """Run `steps` real training steps on the available device; return measured bytes per component."""
    from velora_cli.device import default_device
    from velora_cli.models import build_training_model
    from velora_cli.velora.meter import ActivationMeter

    if recipe.train.gradient_checkpointing:
        # saved-tensor hooks cannot see inside non-reentrant checkpointed regions and made memory grow without bound
        raise UsageError("--measure does not support train.gradient_checkpointing=true yet; measure with it off")
    device = default_device()
    model, _, _ = build_training_model(recipe, device)  # exactly what `velora finetune` trains
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(trainable, recipe)
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (s.batch, s.seq), generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    act_bytes, by_op = 0, {}
    start = time.perf_counter()
    for _ in range(steps):
        with ActivationMeter(model) as meter:
            loss = model(input_ids=ids, labels=ids).loss
        act_bytes, by_op = meter.total_bytes, meter.by_op()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
    out = {
        "weights": real_weight_bytes(model),
        "adapters": sum(p.numel() * p.element_size() for p in trainable),
        "gradients": sum(p.numel() * p.element_size() for p in trainable),  # grads mirror their fp32 params
        "optimizer": sum(
            t.untyped_storage().nbytes()
            for st in optimizer.state.values()
            for k, t in st.items()
            if isinstance(t, torch.Tensor) and k != "step" and not k.startswith("qmap")
        ),
        "saved_for_backward": act_bytes,
        "seconds_per_step": int(1000 * (time.perf_counter() - start) / steps),  # milliseconds
    }
    if device.type == "cuda":
        out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(device)
    out["by_op"] = by_op  # type: ignore[assignment]
    return out


def _optimizer(params: list[torch.nn.Parameter], recipe: Any):
    lr, wd = recipe.train.learning_rate, recipe.train.weight_decay
    name = recipe.train.optimizer
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[name]
    return cls(params, lr=lr, weight_decay=wd)


# ------------------------------------------------------------------------------------------------ output


def _variants(s: Settings, velora_layers: tuple[str, ...]) -> list[tuple[str, Settings]]:
    on = velora_layers or ("v_proj", "down_proj")
    out = []
    for gc in (False, True):
        for vel in ((), on):
            label = ("QLoRA" if s.quantization in ("nf4", "fp4") else "LoRA") + (" + VeLoRA" if vel else "")
            label += " + GC" if gc else ""
            out.append((label, dataclasses.replace(s, velora=vel, gradient_checkpointing=gc)))
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def render(est: Estimate, arch: Arch, s: Settings, velora_layers: tuple[str, ...], budget: int | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    variants = [(label, estimate(arch, vs)) for label, vs in _variants(s, velora_layers)]
    title = (
        f"{arch.name}: {arch.total_params / 1e9:.2f}B params, {s.quantization}"
        f"{' + double quant' if s.quantization in ('nf4', 'fp4') and s.double_quant else ''}, {s.compute} compute, "
        f"micro-batch {s.batch} x seq {s.seq}, LoRA r={s.lora_r} on {','.join(t[0] for t in s.targets)}, "
        f"dropout {s.lora_dropout}, {s.attn}, {s.optimizer}, {s.device}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("GiB")
    for label, v in variants:
        mine = v.settings.velora == s.velora and v.settings.gradient_checkpointing == s.gradient_checkpointing
        table.add_column(label + (" *" if mine else ""), justify="right")
    for comp in COMPONENTS:
        table.add_row(comp, *(_gib(v.components[comp]) for _, v in variants))
    table.add_row("total", *(f"[bold]{_gib(v.total)}[/bold]" for _, v in variants))
    if budget is not None:
        table.add_row("fits", *("yes" if v.total <= budget else "[red]no[/red]" for _, v in variants))
    console.print(table)
    console.print(
        f"* = this recipe. overhead = {OVERHEAD_CONTEXT // 2**20} MiB CUDA context + "
        f"{OVERHEAD_FRACTION:.0%} allocator slack (an assumption, not measured here). "
        "activations assume unpadded sequences (padding adds a mask and, for GQA, repeated k/v)."
    )
    per_layer = ", ".join(f"{k} {v:,.0f}" for k, v in est.act.per_layer.items() if v)
    console.print(f"per decoder layer, bytes/token: {per_layer} (total {sum(est.act.per_layer.values()):,.0f})")
    if budget is not None:
        mb = largest_fitting(arch, s, budget, "batch")
        ms = largest_fitting(arch, s, budget, "seq", limit=1 << 18)
        verdict = "fits" if est.total <= budget else "does NOT fit"
        console.print(
            f"{human_bytes(budget)}: this recipe {verdict} ({human_bytes(est.total)}); "
            f"largest micro-batch at seq {s.seq}: {mb or 'none'}; largest seq at micro-batch {s.batch}: {ms or 'none'}"
        )
    if s.quantization in ("nf4", "fp4") and arch.heads == arch.kv_heads:
        tokens = s.tokens
        paper = {
            label: paper_accounting(arch, s.lora_r, vel, s.num_groups or 32, tokens)
            for label, vel in (("QLoRA", ()), ("+ VeLoRA", velora_layers or ("v_proj", "down_proj")))
        }
        console.print(
            "paper accounting (4-bit weights + fp16 adapters + fp16 inputs of trainable layers): "
            + ", ".join(f"{k} {v['total'] / 1e9:.2f} GB" for k, v in paper.items())
        )


def to_json(est: Estimate) -> dict[str, Any]:
    return {
        "components": dict(est.components),
        "total": est.total,
        "settings": {**est.settings.as_dict(), "model": est.arch.name, "params": est.arch.total_params},
        "activations_per_layer_per_token": est.act.per_layer,
        "measured": est.measured,
    }


def render_measured(est: Estimate, cpu_est: Estimate, measured: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"estimated vs measured ({cpu_est.settings.device}, {cpu_est.settings.compute})")
    for col in ("component", "estimated", "measured", "diff"):
        table.add_column(col, justify="left" if col == "component" else "right")
    rows = [(k, cpu_est.components[k], measured[k]) for k in ("weights", "adapters", "gradients", "optimizer")]
    rows.append(("saved for backward", int(cpu_est.act.meter_view), measured["saved_for_backward"]))
    for name, e, m in rows:
        table.add_row(name, human_bytes(e), human_bytes(m), f"{(e - m) / m:+.1%}" if m else "-")
    Console().print(table)
    if "cuda_peak_allocated" in measured:
        Console().print(f"CUDA peak allocated {human_bytes(measured['cuda_peak_allocated'])}")


def run_memory_estimate(
    *,
    recipe: Path | None,
    model: str | None,
    preset: str | None,
    overrides: list[str],
    batch: int | None,
    seq: int | None,
    gpu_mem: str | None,
    measure: bool,
    json_path: Path | None,
) -> Estimate:
    budget = parse_memory(gpu_mem) if gpu_mem is not None else None
    rec, arch = resolve_inputs(recipe, model, preset, overrides, batch, seq)
    s = settings_from_recipe(rec, device="cuda")
    velora_layers = tuple(rec.velora.module_names)
    est = estimate(arch, s)
    render(est, arch, s, velora_layers, budget)
    if measure:
        if preset is not None:
            raise UsageError("--measure needs real weights: use a recipe or --model, not --preset")
        from velora_cli.device import default_device

        dev = default_device().type
        run_s = settings_from_recipe(rec, device=dev)
        measured = measure_training(rec, run_s)
        run_est = estimate(arch, run_s)
        render_measured(est, run_est, measured)
        est.measured = {k: v for k, v in measured.items() if k != "by_op"}
        est.measured["estimated_saved_for_backward"] = int(run_est.act.meter_view)
    if json_path is not None:
        from velora_cli.rundir import write_json_atomic

        write_json_atomic(json_path, to_json(est))
    return est
