"""The compressed-input linear layer as an autograd Function: y = dropout(x) W^T + b, keeping only z_p for backward.

Forward splits every token of dropout(x) into G sub-tokens of size M and stores their projections onto the
unit vector v (z_p, G numbers per token instead of D = G*M). Backward uses the rank-1 reconstruction
x_hat = z_p v^T for the weight gradient; because x_hat is an outer product, g^T x_hat never has to be
materialised: (g^T x_hat)[o, j*M + m] = (g^T z_p)[o, j] * v[m]. The input gradient g W (times the dropout mask)
is exact and needs no activation at all.

LoRA dropout is folded in so that neither the dropped-out input nor its mask is stored: the mask is drawn
from a fresh generator seeded with a number taken from the global RNG (so `torch.manual_seed` still makes
runs reproducible) and drawn again from the same seed in backward. PyTorch has no public API for "replay the
dropout mask of this call", which is why this is hand-written.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

_SEED_HIGH = 2**62


def draw_dropout_seed() -> int:
    """A seed for one dropout mask, from the global CPU RNG (advances it, like nn.Dropout would)."""
    return int(torch.randint(_SEED_HIGH, (), dtype=torch.int64))


def dropout_mask(
    shape: torch.Size | tuple[int, ...], p: float, seed: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The scaled keep-mask (values 0 or 1/(1-p)) for `seed`; the same seed always gives the same mask.

    Drawn as uniform 32-bit integers (two per int64 draw) compared with p * 2^32 rather than with `bernoulli_`:
    the mask is drawn twice per layer and step (forward and backward), and on CPU this is ~1.5x faster for the
    same distribution (keep probability exact to 2^-32).
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    count = math.prod(shape)
    bits = torch.empty((count + 1) // 2, dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)
    keep = bits.view(torch.int32)[:count].view(shape) >= _drop_below(p)
    return keep.to(dtype).mul_(1.0 / (1.0 - p))


def _drop_below(p: float) -> int:
    """Signed 32-bit threshold: a uniform int32 below it (probability p) drops its element."""
    return -(2**31) + round(p * 2**32)


def project_subtokens(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """z_p: (..., D) -> (..., D/M), each sub-token of size M = len(v) projected onto v."""
    m = v.shape[0]
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)
    return torch.matmul(grouped, v.to(grouped.dtype))


def reconstruct_subtokens(z_p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x_hat = z_p v^T un-grouped: (..., D/M) -> (..., D). Used by tests and diagnostics; backward avoids it."""
    return (z_p.unsqueeze(-1) * v.to(z_p.dtype)).flatten(-2)


class VeloraLinearFunction(torch.autograd.Function):
    """y = F.linear(dropout(x), weight, bias), saving z_p (B x N x D/M) instead of x (B x N x D)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        v: torch.Tensor,
        scale: float,
        dropout_p: float,
        seed: int | None,
    ) -> torch.Tensor:
        dropped = x
        if dropout_p > 0.0:
            assert seed is not None
            dropped = x * dropout_mask(x.shape, dropout_p, seed, x.device, x.dtype)
        out = F.linear(dropped, weight, bias)
        # Under autocast, matmul casts like F.linear did, so z_p is stored in the compute dtype.
        z_p = project_subtokens(dropped, v)
        del dropped
        ctx.save_for_backward(z_p, weight, v)
        ctx.scale = scale
        ctx.dropout_p = dropout_p
        ctx.seed = seed
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.x_device = x.device
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z_p, weight, v = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g2.mm(weight.to(g2.dtype)).view(*ctx.x_shape[:-1], weight.shape[1]).to(ctx.x_dtype)
            if ctx.dropout_p > 0.0:
                grad_x = grad_x * dropout_mask(ctx.x_shape, ctx.dropout_p, ctx.seed, ctx.x_device, ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            z2 = z_p.reshape(-1, z_p.shape[-1]).to(g2.dtype)
            gz = g2.t().mm(z2)  # (out, G) = g^T z_p
            grad_w = (gz.unsqueeze(-1) * v.to(gz.dtype)).flatten(1)
            if ctx.scale != 1.0:
                grad_w = grad_w * ctx.scale
            grad_w = grad_w.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None
