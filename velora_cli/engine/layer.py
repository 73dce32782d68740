"""VeloraLinear: an nn.Linear that trains through VeloraLinearFunction and owns its projection vector v.

It takes over the parameters of the layer it replaces (LoRA's `lora_A[adapter]`, or a plain trainable
nn.Linear in full fine-tuning), so parameter names, optimizers, PEFT merge and adapter files are unchanged.
v and its "initialised" flag are non-persistent: every tensor under a PEFT LoRA layer (except its base
layer) goes into adapter_model.safetensors, and a persistent buffer would add keys that plain-LoRA loaders
do not expect. They are saved and restored by `velora.state` (and, under a Trainer, by `VeloraCallback`).

Gradient checkpointing runs a layer's forward twice: once to produce the output, once more inside the backward
pass to rebuild what backward needs (non-reentrant: both with grad enabled; reentrant: the first under no_grad).
v is updated on the first grad-enabled run only (under reentrant checkpointing that is the recompute, and the
first run does not use v), so `batch_average`/`ema` move once per micro-batch and a non-reentrant recompute
compresses with the v the output was computed with; the dropout mask always comes
from a seed drawn from the global RNG, which checkpointing restores before the recompute, so both runs (and the
backward) drop out the same elements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from velora_cli.engine.config import InitType
from velora_cli.engine.function import VeloraLinearFunction, draw_dropout_seed, dropout_mask


def _unit(vec: torch.Tensor) -> torch.Tensor:
    """vec / |vec|; the uniform direction for a zero (or non-finite) vec. No host sync, so CUDA steps don't stall."""
    norm = torch.linalg.vector_norm(vec)
    ok = torch.isfinite(norm) & (norm > 0)
    return torch.where(ok, vec / torch.where(ok, norm, 1.0), torch.full_like(vec, vec.numel() ** -0.5))


def _share_rank0(direction: torch.Tensor) -> None:
    """Under DDP, overwrite `direction` with rank 0's, so every rank compresses with the v that checkpoints record.

    DDP's buffer broadcast syncs v only before the *next* forward; without this, each rank's first micro-batch
    would be compressed with a v taken from its own batch. Later per-step updates (batch_average, ema) stay local.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(direction, src=0)


class VeloraLinear(nn.Linear):
    """A linear layer whose weight gradient comes from rank-1 sub-token projections of its (dropped-out) input."""

    velora_v: torch.Tensor

    def __init__(
        self,
        linear: nn.Linear,
        *,
        subtoken_size: int,
        init: InitType = "batch_average_once",
        ema_decay: float = 0.99,
        scale: float = 1.0,
        dropout_p: float = 0.0,
    ) -> None:
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a weight; this one reuses `linear`'s
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.train(linear.training)
        if self.in_features % subtoken_size:
            raise ValueError(f"input depth {self.in_features} is not a multiple of subtoken_size {subtoken_size}")
        self.subtoken_size = subtoken_size
        self.init = init
        self.ema_decay = ema_decay
        self.scale = scale
        self.dropout_p = float(dropout_p)
        self.initialized = init == "random"
        # (dtype of the input a plain layer would keep, dtype of z_p) in the last training forward
        self.saved_dtypes: tuple[torch.dtype, torch.dtype] | None = None
        self.input_needs_grad = True
        self._observed_this_batch = False
        device = linear.weight.device
        if init == "random":
            v = _unit(torch.randn(subtoken_size, dtype=torch.float32)).to(device)
        else:
            v = torch.zeros(subtoken_size, dtype=torch.float32, device=device)
        self.register_buffer("velora_v", v, persistent=False)

    @property
    def num_groups(self) -> int:
        return self.in_features // self.subtoken_size

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_groups={self.num_groups}, subtoken_size={self.subtoken_size}, "
            f"init={self.init}, scale={self.scale}, dropout={self.dropout_p}"
        )

    def set_projection(self, v: torch.Tensor, initialized: bool = True) -> None:
        if v.shape != (self.subtoken_size,):
            raise ValueError(f"projection has shape {tuple(v.shape)}, expected ({self.subtoken_size},)")
        # Assigned, never written in place: a step's saved v must stay valid while the next batch updates it.
        self.velora_v = v.detach().to(device=self.velora_v.device, dtype=torch.float32).clone()
        self.initialized = initialized

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Update v from a training batch according to `init` (no-op once frozen)."""
        if self.init == "random" or (self.initialized and self.init in ("batch_average_once", "svd")):
            return
        # E[dropout(x)] = x, so the pre-dropout batch gives the same average without drawing a mask here.
        sub = x.detach().reshape(-1, self.subtoken_size).float()
        mean = sub.mean(0)
        if self.init == "svd":
            # Top right-singular vector of the sub-token matrix = top eigenvector of its Gram matrix (M x M).
            _, vecs = torch.linalg.eigh(sub.T @ sub)
            direction = vecs[:, -1]
            direction = torch.where(torch.dot(direction, mean) >= 0, direction, -direction)  # a fixed sign
        elif self.init == "ema" and self.initialized:
            direction = self.ema_decay * self.velora_v + (1.0 - self.ema_decay) * _unit(mean)
        else:
            direction = mean
        direction = _unit(direction)
        if self.init in ("batch_average_once", "svd"):  # reached only before the first update
            _share_rank0(direction)
        self.set_projection(direction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, self.weight, self.bias)
        trains = torch.is_grad_enabled() and self.weight.requires_grad
        if trains:
            if not _in_backward():  # an ordinary forward, or the first run of a non-reentrant checkpoint
                self.observe(x)
                self._observed_this_batch = True
            elif self._observed_this_batch:  # a non-reentrant recompute: v already is this micro-batch's
                self._observed_this_batch = False
            else:  # a reentrant recompute: its first run had grad disabled and did not observe
                self.observe(x)
        seed = draw_dropout_seed() if self.dropout_p > 0 else None
        if not trains:
            if seed is not None:  # the same mask the checkpointed recompute will draw from the same seed
                x = x * dropout_mask(x.shape, self.dropout_p, seed, x.device, x.dtype)
            return F.linear(x, self.weight, self.bias)
        self.saved_dtypes = (_linear_input_dtype(x), _projection_dtype(x))
        self.input_needs_grad = x.requires_grad
        return VeloraLinearFunction.apply(x, self.weight, self.bias, self.velora_v, self.scale, self.dropout_p, seed)

    def bytes_saved_per_token(self) -> float:
        """Activation bytes per token this layer avoids keeping, compared with the plain layer it replaces.

        The plain layer keeps its (dropped-out) input, D values, plus with dropout the mask (bool on CUDA, the
        input's dtype on CPU) when the input needs a gradient; this one keeps D/M projections. Dtypes are those
        of the last training forward: PEFT casts a LoRA input to the adapter's dtype (fp32 adapters on a bf16
        base keep fp32 inputs), autocast to its own. Before any forward, the weight's dtype (what PEFT casts to)
        stands in. Not seen from here: without dropout and without a cast, plain LoRA layers that share one
        input (q/k/v) share its saved storage, so compressing only some of them frees less.
        """
        input_dtype, projection_dtype = self.saved_dtypes or (self.weight.dtype, self.weight.dtype)
        elem = _itemsize(input_dtype)
        depth = self.in_features
        keeps_mask = self.dropout_p > 0 and self.input_needs_grad
        mask = depth * (1 if self.weight.is_cuda else elem) if keeps_mask else 0
        return depth * elem + mask - self.num_groups * _itemsize(projection_dtype)


def _in_backward() -> bool:
    """True while autograd runs a backward pass, i.e. when checkpointing recomputes a forward.

    PyTorch has no public API for this; torch.utils.checkpoint itself uses the graph task id the same way.
    """
    return torch._C._current_graph_task_id() != -1


def _linear_input_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would keep x in: autocast's when autocast covers x's device, else x's own."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return torch.get_autocast_dtype(device)
    return x.dtype


def _projection_dtype(x: torch.Tensor) -> torch.dtype:
    # z_p is a matmul of x with v: autocast casts it like F.linear, otherwise it keeps x's dtype.
    return _linear_input_dtype(x)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
