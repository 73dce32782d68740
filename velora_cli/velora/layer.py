"""VeloraLinear: an nn.Linear that trains through VeloraLinearFunction and owns its projection vector v.

It takes over the parameters of the layer it replaces (LoRA's `lora_A[adapter]`, or a plain trainable
nn.Linear in full fine-tuning), so parameter names, optimizers, PEFT merge and adapter files are unchanged.
v and its "initialised" flag are non-persistent: every tensor under a PEFT LoRA layer (except its base
layer) goes into adapter_model.safetensors, and a persistent buffer would add keys that plain-LoRA loaders
do not expect. They are saved and restored with `velora_state_dict` / `load_velora_state_dict` instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from velora_cli.velora.config import InitType
from velora_cli.velora.function import VeloraLinearFunction, draw_dropout_seed


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
        if not (self.training and torch.is_grad_enabled() and self.weight.requires_grad):
            if self.dropout_p and self.training:
                x = F.dropout(x, self.dropout_p, True)
            return F.linear(x, self.weight, self.bias)
        self.observe(x)
        seed = draw_dropout_seed() if self.dropout_p > 0 else None
        return VeloraLinearFunction.apply(x, self.weight, self.bias, self.velora_v, self.scale, self.dropout_p, seed)
