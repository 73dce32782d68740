"""Attention for packed rows: causal SDPA on each example's own span, with no (S x S) mask.

A packed row holds several examples, its position_ids restarting at 0 for each (transformers'
DataCollatorWithFlattening). Stock `sdpa` then builds a block-diagonal boolean mask from the restarts
(masking_utils.find_packed_sequence_indices), and a masked SDPA call turns GQA's shared k/v off (k and v are
repeated to every head), keeps the mask in the compute dtype in every layer for backward (S x b bytes per token per
layer: 8 KiB per token and layer at 2k tokens in fp32) and still scores every masked block. Flash-attention's varlen
kernel avoids all three on CUDA, when `flash_attn` is installed; this module does the same everywhere else by
slicing the row at the restarts and calling transformers' own `sdpa_attention_forward` per example with
is_causal=True, so each example sees exactly its own tokens (as unpacked) and nothing of the mask is built or saved.

Registered with transformers' AttentionInterface under PACKED_SDPA, with a mask function that skips the mask
only in the case handled here (no padding mask, queries and keys of equal length: a training forward); padded
batches (the held-out rows), generation with a cache, and rows without restarts go to stock SDPA unchanged, so a
model switched to PACKED_SDPA computes exactly what `sdpa` computes on every input (tests/test_packing.py).
Models with a sliding window are left on `sdpa`: their window is part of the mask skipped here.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

PACKED_SDPA = "velora_packed_sdpa"

# Every layer of one forward gets the same position_ids tensor: its boundaries are read (a device-to-host copy) once
# and kept with a weak reference to it, so a new forward, or the tensor changed in place, reads them again.
_last_segments: tuple[weakref.ref, int, list[list[int]] | None] | None = None


def _segments(position_ids: torch.Tensor, rows: int) -> list[list[int]] | None:
    """Each row's example boundaries [0, s1, ..., S] (a restart is any step that is not +1, as masking_utils
    reads them), or None when no row restarts."""
    global _last_segments
    last = _last_segments
    if last is not None and last[0]() is position_ids and last[1] == position_ids._version:
        return last[2]
    positions = position_ids.expand(rows, -1)
    restarts = torch.ones_like(positions, dtype=torch.bool)
    restarts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    length = positions.shape[1]
    bounds = [[*row.nonzero().flatten().tolist(), length] for row in restarts] if restarts[:, 1:].any() else None
    _last_segments = (weakref.ref(position_ids), position_ids._version, bounds)
    return bounds


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q (B, heads, S, d), k/v (B, kv_heads, S, d); returns (B, S,
    heads, d). The per-example path runs only for an unmasked, cache-free forward over packed rows."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = None
    if attention_mask is None and position_ids is not None and query.shape[2] == key.shape[2] > 1:
        bounds = _segments(position_ids, query.shape[0])
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = []
    for b, edges in enumerate(bounds):
        parts = [
            sdpa_attention_forward(module, query[b : b + 1, :, s:e], key[b : b + 1, :, s:e],
                                   value[b : b + 1, :, s:e], None, **kwargs)[0]  # fmt: skip
            for s, e in zip(edges[:-1], edges[1:], strict=True)
        ]
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


def packed_sdpa_mask(**kwargs) -> torch.Tensor | None:
    """No mask for an unpadded forward with as many keys as queries (packed_sdpa_attention splits such a row at its
    restarts itself); stock SDPA's mask for everything else."""
    from transformers.masking_utils import sdpa_mask

    plain = kwargs.get("attention_mask") is None and kwargs.get("local_size") is None
    offset = kwargs.get("q_offset") or kwargs.get("kv_offset")
    if plain and not offset and kwargs["q_length"] == kwargs["kv_length"]:
        return None
    return sdpa_mask(**kwargs)


def register_packed_attention() -> str:
    """Make PACKED_SDPA known to transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)
    return PACKED_SDPA


def use_packed_attention(model: nn.Module) -> bool:
    """Switch a model on stock `sdpa` (bare or inside a PeftModel) to PACKED_SDPA, in place; True when switched.
    Other implementations (eager, flash-attention's varlen) and sliding-window models are left as they are."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or config._attn_implementation != "sdpa" or getattr(config, "sliding_window", None):
        return False
    base.set_attn_implementation(register_packed_attention())
    return True
