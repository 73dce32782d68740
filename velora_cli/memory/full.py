"""The memory of training without adapters (method full / pretrain): every weight, its gradient and its optimizer
states, and what the decoder layers save for backward when the base linears themselves train.

Pure arithmetic on an Arch and the estimate's Settings (duck-typed: c, seq, optimizer, velora, groups_for, ...):
- weights and gradients: every parameter in the compute dtype; with `train.optimizer_in_backward` the gradients
  of one parameter at a time (the largest one bounds it: each is freed by its hook before the next completes);
- optimizer: torch AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype; the bitsandbytes 8-bit variants
  two uint8 states + fp32 absmax per 256-block (fp32 below 4096 elements);
- activations per token and layer: each trainable linear saves its input in the compute dtype (inputs shared by
  several linears - q/k/v, gate/up - are one tensor, saved once unless every consumer is compressed); a VeLoRA
  layer keeps z_p (D/M numbers per token, compute dtype) instead; a norm with a trainable weight also keeps its
  normalised output h; attention and the MLP's element-wise ops as in the adapter estimate (SDPA's output is
  o_proj's input, already saved); the lean techniques (memory section) as there: lean ops drop silu(gate) and
  the norm's fp32 copy and h, checkpointing mlp keeps the norm + MLP region's input only;
- the trainable embedding and lm_head: token ids, lm_head's input or, under the chunked loss, its weight gradient
  computed in forward (full_head_activations).
"""

from __future__ import annotations

import math
from typing import Any

from velora_cli.memory.arch import Arch

BNB_OPT_BLOCK = 256  # 8-bit optimizer state blocksize
BNB_OPT_MIN_8BIT = 4096  # smaller tensors keep fp32 states (bitsandbytes' min_8bit_size)
INPUTS = {"attn_in": ("q_proj", "k_proj", "v_proj"), "o_in": ("o_proj",), "mlp_in": ("gate_proj", "up_proj"),
          "down_in": ("down_proj",)}  # fmt: skip


def param_sizes(arch: Arch) -> list[int]:
    """Element counts of every parameter tensor (decoder linears and biases, then the rest as one tensor each)."""
    per_layer = []
    for _, i, o, b in arch.linears:
        per_layer += [i * o] + ([o] if b else [])
    rest = [arch.vocab * arch.hidden] * (1 if arch.tied else 2)
    norms = max(0, arch.other_params - sum(rest))
    return per_layer * arch.layers + rest + ([norms] if norms else [])


def full_optimizer_bytes(sizes: list[int], optimizer: str, c: int) -> int:
    if optimizer in ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit"):
        per = c if optimizer != "paged_adamw_32bit" else 4
        return sum(2 * per * n for n in sizes)
    return adam8bit_bytes(sizes)


def adam8bit_bytes(sizes: list[int]) -> int:
    """bitsandbytes' 8-bit AdamW states: two uint8 states + one fp32 absmax per block each, fp32 below the minimum."""
    total = 2 * 256 * 4  # the two shared 8-bit quantisation maps
    for n in sizes:
        total += 8 * n if n < BNB_OPT_MIN_8BIT else 2 * n + 2 * 4 * math.ceil(n / BNB_OPT_BLOCK)
    return total


def trainable_norm_bytes(arch: Arch, s: Any) -> float:
    """Bytes per token an RMSNorm with a trainable weight saves: the stock norm its fp32 input copy, 1/rms and the
    normalised h (the other operand of `weight * h`); the lean one (RMSNormFunction) its input and 1/rms only."""
    d = arch.hidden
    return (s.c * d + 4) if s.lean_ops else (4 * d + 4 + s.c * d)


def full_layer_activations(arch: Arch, s: Any) -> dict[str, float]:
    """Bytes per token one decoder layer saves for backward when every weight trains.

    With checkpointing `mlp`, the post-attention norm + MLP region keeps only its input (the residual stream) and
    `mlp_region_recompute` is what backward re-creates in it, one layer at a time (as in the adapter estimate).
    """
    c, d = s.c, arch.hidden
    widths = {"attn_in": d, "o_in": arch.heads * arch.head_dim, "mlp_in": d, "down_in": arch.intermediate}
    ops = {"norms": 0.0, "linear_inputs": 0.0, "velora_zp": 0.0, "attention": 0.0, "mlp": 0.0}
    region = dict.fromkeys(ops, 0.0)  # what checkpointing=mlp recomputes: post-attention norm + MLP

    def add(key: str, value: float, in_region: bool = False) -> None:
        ops[key] += value
        if in_region:
            region[key] += value

    norm = trainable_norm_bytes(arch, s)
    add("norms", norm)
    add("norms", norm, in_region=True)
    for group, members in INPUTS.items():
        n, in_region = widths[group], group in ("mlp_in", "down_in")
        for m in members:
            if m in s.velora:
                add("velora_zp", s.groups_for(n, m) * c, in_region)
        plain = [m for m in members if m not in s.velora]
        if plain and not (group == "o_in" and s.attn == "sdpa"):
            add("linear_inputs", n * c, in_region)
    h, kv, hd = arch.heads, arch.kv_heads, arch.head_dim
    if s.attn == "eager":
        ops["attention"] = 3 * h * hd * c + h * s.seq * (4 + (c if c != 4 else 0))
    else:
        ops["attention"] = (2 * h * hd + 2 * kv * hd) * c + 4 * h
    # gate, silu(gate), up; the lean SwiGLU recomputes silu(gate) in backward
    add("mlp", (2 if s.lean_ops else 3) * arch.intermediate * c, in_region=True)
    if s.recompute.mode == "mlp":
        for key, value in region.items():
            ops[key] -= value
        ops["mlp_region_input"] = c * d
        ops["mlp_region_recompute"] = sum(region.values()) - c * d
    return ops


def full_head_activations(arch: Arch, s: Any) -> tuple[float, float]:
    """(bytes saved, bytes transient) by the trainable embedding and lm_head of one micro-batch, beyond the loss's
    per-token tensors: the embedding's int64 token ids; with the stock loss lm_head's input (its weight trains);
    with the chunked loss no input, but the lm_head weight gradient it computes in forward (fp32 while it
    accumulates over chunks, then the weight's dtype) is held until backward - V x H bytes whatever the batch, so
    on short micro-batches the chunked loss costs more than the logits it saves (fewer tokens than ~H)."""
    n = s.tokens
    saved = n * 8.0
    if s.loss == "chunked":
        head = arch.vocab * arch.hidden
        return saved + head * s.c, head * 4.0 if s.c != 4 else 0.0
    return saved + n * arch.hidden * s.c, 0.0


def full_components(arch: Arch, s: Any) -> dict[str, int]:
    """weights / adapters (none) / gradients / optimizer bytes of a full or pretrain run."""
    sizes = param_sizes(arch)
    total = sum(sizes)
    grads = max(sizes) * s.c if s.optimizer_in_backward else total * s.c
    return {
        "weights": total * s.c,
        "adapters": 0,
        "gradients": grads,
        "optimizer": full_optimizer_bytes(sizes, s.optimizer, s.c),
    }
