"""Lean activations: exact memory savers that compose with (Q)LoRA and VeLoRA.

Layers, following Liger Kernel's split: ops as autograd Functions (`ops`: RMSNorm, SwiGLU; `loss`: chunked linear
cross-entropy), thin module forwards (`modules`), selective recompute and CPU offload (`recompute`), and model
patching (`patch.apply_lean`); per-example attention for packed rows without a mask (`packed_attention`). Depends
on torch, transformers and (optionally) peft, bitsandbytes, liger_kernel, cut_cross_entropy; nothing from
velora_cli outside the engine package.
"""

from velora_cli.engine.lean.loss import (
    ChunkedLinearCrossEntropyFunction,
    causal_lm_loss,
    default_chunk_size,
    linear_cross_entropy,
    select_backend,
)
from velora_cli.engine.lean.ops import RMSNormFunction, SwiGLUFunction, rms_norm, swiglu
from velora_cli.engine.lean.packed_attention import PACKED_SDPA, use_packed_attention
from velora_cli.engine.lean.patch import (
    SUPPORTED_MODELS,
    LeanReport,
    apply_lean,
    find_causal_lm,
    remove_lean,
    select_ops_backend,
)
from velora_cli.engine.lean.recompute import ActivationOffload, Recompute, parse_checkpointing

__all__ = [
    "PACKED_SDPA",
    "SUPPORTED_MODELS",
    "ActivationOffload",
    "ChunkedLinearCrossEntropyFunction",
    "LeanReport",
    "RMSNormFunction",
    "Recompute",
    "SwiGLUFunction",
    "apply_lean",
    "causal_lm_loss",
    "default_chunk_size",
    "find_causal_lm",
    "linear_cross_entropy",
    "parse_checkpointing",
    "remove_lean",
    "rms_norm",
    "select_backend",
    "select_ops_backend",
    "swiglu",
    "use_packed_attention",
]
