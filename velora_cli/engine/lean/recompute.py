"""Selective recompute (gradient checkpointing of chosen blocks) and CPU activation offload.

Recompute, non-reentrant `torch.utils.checkpoint` throughout (it works with inputs that do not require grad,
keyword arguments and nested regions):

- `all`: every decoder layer; `every:K`: decoder layers 0, K, 2K, ... (ceil(L / K) of the L layers), using
  transformers' own per-layer switch (`GradientCheckpointingLayer.gradient_checkpointing`), so its handling of
  caches under checkpointing is kept. A checkpointed layer keeps only its input hidden state (tokens x hidden)
  and recomputes the rest in backward, one layer at a time.
- `mlp`: only the MLP sub-block of every layer: the post-attention RMSNorm and the MLP (gate/up/down projections,
  their LoRA/VeLoRA branches, SiLU and the product) as one region. It keeps only the region's input, the residual
  stream, which the norm saved anyway; the norm's output (the MLP input, saved by gate/up's LoRA A) and everything
  inside the MLP go, for the price of re-running the norm and the MLP (~2/3 of a LLaMA layer's matmul FLOPs).
  The decoder layer calls the norm and then the MLP with nothing in between (LLaMA, Mistral, Qwen2/3), so the
  norm's forward becomes the identity and the MLP's runs norm + MLP under one checkpoint.
- `none`: no recompute (and transformers' switch is turned off on every layer).

Like torchtune's selective activation checkpointing, the choice is per block, and the rest of the model runs
as usual. Offload (`ActivationOffload`) is a saved-tensors hook, torchtune-style: every tensor autograd saves
inside the decoder stack (checkpointed layers' inputs included) is copied to pinned CPU memory on a side CUDA
stream, overlapping the next kernels, and copied back when backward needs it. Parameters, buffers and small
tensors stay where they are. It needs CUDA; asked for on another device it raises a ValueError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial, wraps
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from velora_cli.engine.lean.policy import Recompute

_MARK = "_lean_patched_forward"  # in a module's __dict__ while its forward is patched


# --- instance-level forward patching (shared with patch.py) ----------------------------------------------------


def set_forward(module: nn.Module, forward: Callable[..., Any]) -> None:
    """Replace `module.forward` on this instance only (nn.Module.__call__ looks it up on the instance first).

    Instance-level, like Liger's `_bind_method_to_module`: other models of the same class are untouched, and
    restore_forward brings the class's forward back.
    """
    module.__dict__[_MARK] = True
    module.__dict__["forward"] = forward


def restore_forward(module: nn.Module) -> bool:
    """Undo set_forward; True when the module had been patched."""
    if not module.__dict__.pop(_MARK, False):
        return False
    module.__dict__.pop("forward", None)
    return True


def checkpointed(module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    """`forward` run under non-reentrant checkpoint while `module` trains with autograd on, as it is otherwise."""

    @wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


def _identity(hidden_states: torch.Tensor) -> torch.Tensor:
    return hidden_states


def _then(first: Callable[..., Any], second: Callable[..., Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    def block(hidden_states: torch.Tensor) -> torch.Tensor:
        return second(first(hidden_states))

    return block


def apply_recompute(layers: Iterable[nn.Module], recompute: Recompute) -> list[str]:
    """Set up `recompute` on decoder layers (each with `.post_attention_layernorm` and `.mlp`); returns a
    description per change. Call after the lean forwards are in place: the checkpointed region runs them."""
    layers = list(layers)
    whole = set(recompute.layers(len(layers)))
    changes: list[str] = []
    for index, layer in enumerate(layers):
        if not hasattr(layer, "_gradient_checkpointing_func") and not hasattr(type(layer), "gradient_checkpointing"):
            if index in whole:
                kind = type(layer).__name__
                raise ValueError(f"checkpointing={recompute}: {kind} is not a transformers GradientCheckpointingLayer")
            continue
        layer.gradient_checkpointing = index in whole
        if index in whole:
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
    if whole:
        changes.append(f"checkpointed decoder layers {sorted(whole)} (non-reentrant)")
    if recompute.mode == "mlp":
        for layer in layers:
            norm, mlp = layer.post_attention_layernorm, layer.mlp
            set_forward(mlp, checkpointed(mlp, _then(norm.forward, mlp.forward)))
            set_forward(norm, _identity)
        changes.append(f"checkpointed post-attention norm + MLP of {len(layers)} decoder layers (non-reentrant)")
    return changes


# --- offload ----------------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors on CUDA -> pinned CPU memory in forward, back to the device in backward.

    The device-to-host copy runs on a side stream after the producing kernels (so it overlaps the kernels that
    follow) and `record_stream` keeps the device memory from being reused until the copy is done; the
    host-to-device copy in backward runs on the current stream after waiting for that copy. Tensors of the
    `exclude` module's parameters/buffers and tensors under `min_bytes` are kept as they are.
    """

    def __init__(self, exclude: nn.Module | None = None, min_bytes: int = 1024) -> None:
        if not torch.cuda.is_available():
            raise ValueError("activation offload copies saved tensors from CUDA to CPU; CUDA is not available here")
        self.min_bytes = min_bytes
        held = list(exclude.parameters()) + list(exclude.buffers()) if exclude is not None else []
        self._excluded = {_storage_key(t) for t in held if t.is_cuda}
        self._stream = torch.cuda.Stream()
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> Any:
        if (
            not tensor.is_cuda
            or isinstance(tensor, nn.Parameter)
            or tensor.layout != torch.strided
            or tensor.numel() * tensor.element_size() < self.min_bytes
            or _storage_key(tensor) in self._excluded
        ):
            return tensor
        self._stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self._stream):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        tensor.record_stream(self._stream)
        return (tensor.device, host, done)

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, done = packed
        torch.cuda.current_stream(device).wait_event(done)
        return host.to(device, non_blocking=True)


def offloaded(module: nn.Module, forward: Callable[..., Any], exclude: nn.Module) -> Callable[..., Any]:
    """`forward` with its saved tensors offloaded to CPU while training with autograd on."""

    hooks: list[ActivationOffload] = []  # made at the first training forward, then re-entered every step

    @wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if module.training and torch.is_grad_enabled():
            if not hooks:
                hooks.append(ActivationOffload(exclude))
            with hooks[0]:
                return forward(*args, **kwargs)
        return forward(*args, **kwargs)

    return run


def check_offload_device(devices: set[str]) -> None:
    """ValueError unless the model trains on a CUDA device (`devices`: where its weights are or will be; offload
    has nothing to move elsewhere)."""
    if devices != {"cuda"} or not torch.cuda.is_available():
        where = ", ".join(sorted(devices)) or "no parameters"
        raise ValueError(
            f"offload=True copies activations from CUDA to CPU memory; this model is on {where}. "
            "Use offload only with a CUDA model (on CPU the activations are in CPU memory already)."
        )
