"""Activation memory: what each decoder layer and the head keep for backward under QLoRA, VeLoRA and the lean
techniques."""

from __future__ import annotations

from dataclasses import dataclass

from velora_cli.engine.lean.policy import default_chunk_size
from velora_cli.memory.arch import Arch
from velora_cli.memory.full import full_head_activations, full_layer_activations, trainable_norm_bytes
from velora_cli.memory.settings import OFFLOAD_IN_FLIGHT, Settings

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
    rotary = 2 * s.seq * arch.head_dim * s.c * (s.sequences if s.packing else 1)
    frozen_norm = (s.c * arch.hidden + 4) if s.lean_ops else (4 * arch.hidden + 4)
    final_norm = n * (trainable_norm_bytes(arch, s) if s.full else frozen_norm)
    if s.pairs:
        logits_saved, logits_peak = preference_head(arch, s)
    elif s.loss == "chunked":
        # the hidden-state gradient and int64 row index of every scored token (labels shifted: seq - 1 per row)
        logits_saved = s.sequences * (s.seq - 1) * (arch.hidden * s.c + 8)
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


# TRL's fused log-prob head (trl.kernels.chunked_logprob): tokens and vocabulary columns per projection tile
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768


def preference_head(arch: Arch, s: Settings) -> tuple[float, float]:
    """(saved, peak) bytes of DPO's head and reference forward: TRL's chunked log-prob function keeps the scored
    hidden states (a copy: the shifted slice is reshaped), their int64 targets, fp32 log-normaliser and entropy, and
    the bool label mask; no logits. Every position is counted (CUDA scores completion tokens only: fewer). At peak,
    one (tokens x vocabulary) tile with its fp32 accumulator, or the reference forward (no grad, adapters off) that
    runs while the policy's saved tensors are held: one layer's hidden states and MLP intermediates at a time."""
    scored = s.sequences * (s.seq - 1)
    saved = scored * (arch.hidden * s.c + 8 + 4 + 4 + 1)
    tile = min(scored, TRL_TOKEN_TILE) * min(arch.vocab, TRL_VOCAB_TILE) * (s.c + 4)
    reference = s.tokens * (2 * arch.hidden + 3 * arch.intermediate) * s.c
    return saved, saved + max(tile, reference)
