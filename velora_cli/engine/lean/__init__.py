"""Lean activations: exact memory savers that compose with (Q)LoRA and VeLoRA.

Layers, following Liger Kernel's split: ops as autograd Functions (`ops`: RMSNorm, SwiGLU; `loss`: chunked linear
cross-entropy), thin module forwards (`modules`), selective recompute and CPU offload (`recompute`), and model
patching (`patch.apply_lean`); per-example attention for packed rows without a mask (`packed_attention`); the
torch-free settings (`policy`: the checkpointing choice, the default chunk size). Depends on torch, transformers
and (optionally) peft, bitsandbytes, liger_kernel, cut_cross_entropy; nothing from velora_cli outside the engine
package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from velora_cli.engine import lazy_attribute

# Every name loads on first use (PEP 562), as in the engine package: the memory model reads `policy`, which needs
# no torch, through this package.
_HOME = {
    "ChunkedLinearCrossEntropyFunction": "loss", "causal_lm_loss": "loss", "linear_cross_entropy": "loss",
    "select_backend": "loss", "default_chunk_size": "policy", "Recompute": "policy",
    "parse_checkpointing": "policy", "RMSNormFunction": "ops", "SwiGLUFunction": "ops", "rms_norm": "ops",
    "swiglu": "ops", "PACKED_SDPA": "packed_attention", "use_packed_attention": "packed_attention",
    "SUPPORTED_MODELS": "patch", "LeanReport": "patch", "apply_lean": "patch", "find_causal_lm": "patch",
    "remove_lean": "patch", "select_ops_backend": "patch", "ActivationOffload": "recompute",
}  # fmt: skip

if TYPE_CHECKING:
    from velora_cli.engine.lean.loss import (
        ChunkedLinearCrossEntropyFunction,
        causal_lm_loss,
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
    from velora_cli.engine.lean.policy import Recompute, default_chunk_size, parse_checkpointing
    from velora_cli.engine.lean.recompute import ActivationOffload


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _HOME, name)


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
