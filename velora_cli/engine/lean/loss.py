"""Chunked linear cross-entropy: a causal LM's loss from its last hidden states, never holding all the logits.

The stock path, `lm_head(h)` then transformers' ForCausalLMLoss, keeps for backward the (tokens x vocab) log-softmax
in fp32 (after an fp32 copy of the logits when the model runs in bf16/fp16) plus lm_head's input: on a 49k
vocabulary that is ~200 KB per token, more than a whole decoder layer. Here the loss is computed chunk by chunk
of tokens, and, as in Liger Kernel's fused linear cross-entropy, each chunk's gradients are computed in forward,
while its logits exist: d loss / d hidden for the chunk's rows (and d loss / d lm_head.weight, accumulated in fp32,
when the head is trainable). Backward only scales what forward left by the incoming gradient. What stays alive
for backward is the hidden-state gradient of the rows that count (tokens x hidden, the hidden dtype) and their
int64 row indices; rows whose label is ignore_index (prompt tokens, padding, the last position of each sequence)
are dropped before any matmul, so they cost neither compute nor memory.

Exact against transformers' ForCausalLMLoss: labels are shifted the same way (pad with ignore_index, drop the
first), logits are computed in the hidden states' dtype (the lm_head matmul, autocast included) and upcast to
fp32 for log_softmax, and the reduction is the mean over non-ignored tokens, or the sum divided by
`num_items_in_batch` when the Trainer passes it under gradient accumulation. The gradient with respect to the
logits is formed with the same operations as log_softmax's backward applied to NLL's gradient (bit-identical
values), then cast to the logits dtype before the two matmuls, as autograd's backward of `.float()` does; what
remains is the matmuls' summation order over chunks of rows (on 30-layer SmolLM2 in fp32 the adapter gradients
stay within 6e-6 x max|grad| of the stock path's, less than re-running the stock path with another thread count
changes them).

On CUDA, when installed (optional, import-guarded, not installed in this project's CPU environment), Liger
Kernel's `liger_fused_linear_cross_entropy` or Apple's `cut_cross_entropy.linear_cross_entropy` is used instead
(`backend="auto"`); both are called with reduction="sum" and divided here, so the normalisation is the same.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import cache
from typing import Any, Literal

import torch
import torch.nn.functional as F

from velora_cli.engine.lean.policy import default_chunk_size

IGNORE_INDEX = -100
Backend = Literal["auto", "torch", "liger", "cce"]


def shift_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """HF's causal shift: position t is scored against labels[t + 1]; the last position against ignore_index."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _loss_denominator(
    targets: torch.Tensor, ignore_index: int, num_items_in_batch: torch.Tensor | int | float | None
) -> torch.Tensor:
    """What the summed loss is divided by: num_items_in_batch when given, else the non-ignored token count.

    Kept as a device tensor so neither case needs a host sync.
    """
    if num_items_in_batch is None:
        return (targets != ignore_index).sum().to(torch.float32)
    return torch.as_tensor(num_items_in_batch, device=targets.device).to(torch.float32)


def _chunk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor | None,
    want_grad_hidden: bool,
    grad_weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed loss of rows whose targets are all valid; with `scale`, also their gradients (scaled by it).

    Returns (loss sum in fp32, d loss / d hidden or None); the weight gradient is added into `grad_weight`.
    """
    logits = F.linear(hidden, weight)  # in the hidden dtype (or the autocast dtype), like lm_head
    # The same kernels, in the same order, as F.cross_entropy on the full logits: log_softmax, then NLL's picks.
    logp = torch.log_softmax(logits.float(), dim=-1)
    loss = -logp.gather(1, targets.unsqueeze(1)).sum()
    if scale is None:
        return loss, None
    # d loss / d logits = softmax * scale - onehot * scale, computed as log_softmax's backward computes it from
    # NLL's gradient (exp(logp) times the row's gradient sum, then the target's own term), so the values are
    # bit-identical to the stock path's; built in place in logp's buffer.
    grad = logp.exp_().mul_(scale)
    grad.scatter_add_(1, targets.unsqueeze(1), (-scale).expand(targets.shape[0], 1).to(grad.dtype))
    grad = grad.to(logits.dtype)  # autograd's backward of `.float()` casts to the logits dtype here
    del logits, logp
    w = weight.to(grad.dtype)
    grad_hidden = grad.mm(w).to(hidden.dtype) if want_grad_hidden else None
    if grad_weight is not None:
        grad_weight.add_(grad.t().mm(hidden.to(grad.dtype)).float())
    return loss, grad_hidden


def _chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    denominator: torch.Tensor,
    ignore_index: int,
    chunk_size: int | None,
    want_grad_hidden: bool,
    want_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(mean loss, grad of the valid rows or None, valid row indices, grad of weight or None)."""
    # Ignored rows contribute nothing to the loss or any gradient: keep only the others (one host sync, as
    # Liger's n_non_ignore .item()).
    rows = (targets != ignore_index).nonzero().squeeze(1)
    hidden_v = hidden.index_select(0, rows)
    targets_v = targets.index_select(0, rows)
    n = rows.numel()
    step = chunk_size or default_chunk_size(weight.shape[0])
    want_grad = want_grad_hidden or want_grad_weight
    scale = denominator.reciprocal() if want_grad else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad_weight else None
    grad_hidden = torch.empty_like(hidden_v) if want_grad_hidden else None
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        part, grad = _chunk(hidden_v[start:stop], weight, targets_v[start:stop], scale, want_grad_hidden, grad_weight)
        loss = loss + part
        if grad_hidden is not None and grad is not None:
            grad_hidden[start:stop] = grad
    # Divided once at the end like F.cross_entropy's sum / num_items (an all-ignored batch gives 0/0 = nan, as HF).
    loss = loss / denominator
    grad_w = grad_weight.to(weight.dtype) if grad_weight is not None else None
    return loss, grad_hidden, rows, grad_w


class ChunkedLinearCrossEntropyFunction(torch.autograd.Function):
    """Mean cross-entropy of softmax(hidden @ weight^T) against targets, gradients computed in forward.

    Inputs: hidden (N x H), weight (V x H), targets (N,) int64 with ignore_index rows, denominator (fp32 scalar
    tensor), ignore_index, chunk_size. Saves the valid rows' hidden gradient and their indices (and the weight
    gradient when the weight is trainable), never the logits.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        denominator: torch.Tensor,
        ignore_index: int,
        chunk_size: int | None,
    ) -> torch.Tensor:
        loss, grad_rows, rows, grad_weight = _chunked_forward(
            hidden,
            weight,
            targets,
            denominator,
            ignore_index,
            chunk_size,
            want_grad_hidden=ctx.needs_input_grad[0],
            want_grad_weight=ctx.needs_input_grad[1],
        )
        ctx.save_for_backward(grad_rows, rows, grad_weight)
        ctx.hidden_shape = hidden.shape
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_rows, rows, grad_weight = ctx.saved_tensors
        grad_hidden = grad_w = None
        if grad_rows is not None:
            # Out of place: the saved gradient stays valid for a retain_graph second backward.
            grad_hidden = grad_rows.new_zeros(ctx.hidden_shape)
            grad_hidden.index_copy_(0, rows, grad_rows * grad_out.to(grad_rows.dtype))
        if grad_weight is not None:
            grad_w = grad_weight * grad_out.to(grad_weight.dtype)
        return grad_hidden, grad_w, None, None, None, None


# --- optional fused kernels (CUDA only) ------------------------------------------------------------------------


def _liger_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, reduction="sum")


def _cce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, reduction="sum")


# backend -> (module that must be importable, summed-loss function); tests substitute fakes here.
FUSED_BACKENDS: dict[str, tuple[str, Callable[..., torch.Tensor]]] = {
    "liger": ("liger_kernel", _liger_sum),
    "cce": ("cut_cross_entropy", _cce_sum),
}


@cache
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def select_backend(device: torch.device, backend: Backend = "auto") -> str:
    """The implementation used on `device`: a fused CUDA kernel when installed (liger first), else "torch"."""
    if backend not in ("auto", "torch", "liger", "cce"):
        raise ValueError(f"loss backend {backend!r}: expected auto, torch, liger or cce")
    if backend == "torch" or device.type != "cuda":
        if backend in FUSED_BACKENDS and device.type != "cuda":
            raise ValueError(f"loss backend {backend!r} needs CUDA; the hidden states are on {device}")
        return "torch"
    names = list(FUSED_BACKENDS) if backend == "auto" else [backend]
    for name in names:
        if _installed(FUSED_BACKENDS[name][0]):
            return name
    if backend != "auto":
        raise ValueError(f"loss backend {backend!r}: {FUSED_BACKENDS[backend][0]} is not installed")
    return "torch"


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: torch.Tensor | int | float | None = None,
    chunk_size: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """fixed_cross_entropy(hidden @ weight^T, targets) without materialising the logits.

    hidden (..., H) and targets (...) are flattened; targets are already shifted. Returns the fp32 scalar loss:
    mean over non-ignored targets, or their sum / num_items_in_batch when that is given.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden rows but {targets.shape[0]} targets")
    denominator = _loss_denominator(targets, ignore_index, num_items_in_batch)
    name = select_backend(hidden.device, backend)
    if name != "torch":
        return FUSED_BACKENDS[name][1](hidden, weight, targets, ignore_index).float() / denominator
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return ChunkedLinearCrossEntropyFunction.apply(hidden, weight, targets, denominator, ignore_index, chunk_size)
    # No graph (evaluation): the same chunk loop, no gradients, nothing saved.
    loss, *_ = _chunked_forward(hidden, weight, targets, denominator, ignore_index, chunk_size, False, False)
    return loss


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: torch.Tensor | int | float | None = None,
    chunk_size: int | None = None,
    backend: Backend = "auto",
    **_: Any,
) -> torch.Tensor:
    """transformers' ForCausalLMLoss(lm_head(hidden), labels, ...) computed from the hidden states.

    Takes the same keyword arguments (`shift_labels`, `ignore_index`, `num_items_in_batch`; others are ignored, as
    HF's loss ignores the attention kwargs it is handed).
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs labels or shift_labels")
        shift_labels = shift_targets(labels, ignore_index)
    return linear_cross_entropy(
        hidden,
        weight,
        shift_labels,
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size,
        backend=backend,
    )
