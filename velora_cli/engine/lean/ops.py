"""Memory-lean exact ops for LLaMA-family blocks: RMSNorm and SwiGLU as autograd Functions.

Stock HF code builds both from small tensor ops, and autograd keeps every intermediate any of them needs:

- LlamaRMSNorm(x) = w * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype) saves the fp32 copy of x (x
  itself in fp32), the per-row rsqrt and, when w trains, the normalised h (the other operand of `w * h`).
  RMSNormFunction saves x in its own dtype and 1/rms (fp32, one number per row) and recomputes h in backward:
  in bf16/fp16 the saved x takes 2 bytes per element instead of the fp32 copy's 4, and a trainable w no longer
  adds h. (In fp32 with a frozen w, as under LoRA, the stock norm saves the same two tensors already.)
- silu(gate) * up saves gate (for SiLU), silu(gate) and up (for the product). SwiGLUFunction saves gate and up
  only and recomputes silu(gate) in backward: one (tokens x intermediate) tensor less per MLP.

Backward repeats the stock graph's arithmetic in the same order and dtypes (silu_backward is the same ATen kernel,
the dtype casts sit where HF's `.to` calls are), so gradients equal the stock modules' up to fp32 round-off.
Liger Kernel's Triton kernels (`liger_rms_norm`, `liger_swiglu`) save the same tensors; on CUDA, when
`liger_kernel` is installed (and the weights are on CUDA), the module forwards in modules.py call them instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class RMSNormFunction(torch.autograd.Function):
    """y = weight * (x.float() * rstd).to(x.dtype), rstd = rsqrt(mean(x.float()^2, -1) + eps); saves x and rstd."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        h = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        # `weight * h` promotes like the stock module (an fp32 weight over a bf16 h gives an fp32 output).
        return weight * h

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, rstd = ctx.saved_tensors
        xf = x.float()
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            h = (xf * rstd).to(x.dtype)  # bit-identical to forward's: same ops on the same saved values
            grad_w = (grad_out * h).reshape(-1, h.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # d/dx of (x * rstd) with rstd = (mean(x^2) + eps)^-1/2: g * rstd - x * rstd^3 * mean(g * x).
            grad_h = (grad_out * weight).to(x.dtype).float()  # the backward of `.to(x.dtype)` returns to fp32
            dot = (grad_h * xf).sum(-1, keepdim=True)
            grad_xf = grad_h * rstd - xf * (rstd.pow(3) * dot / x.shape[-1])
            grad_x = grad_xf.to(x.dtype)
        return grad_x, grad_w, None


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only (silu(gate) is recomputed in backward)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = grad_out * F.silu(gate)
        if ctx.needs_input_grad[0]:
            # The same ATen kernel the stock SiLU backward runs: grad * sig(g) * (1 + g * (1 - sig(g))).
            grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate)
        return grad_gate, grad_up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's output; saves only x and 1/rms when autograd records it."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return RMSNormFunction.apply(x, weight, eps)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; saves only gate and up when autograd records it."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLUFunction.apply(gate, up)
    return F.silu(gate) * up
