"""ActivationMeter: what a forward pass keeps alive for backward, in bytes, per autograd op.

A `torch.autograd.graph.saved_tensors_hooks` pack hook sees every tensor autograd saves (built-in ops and
custom Functions' save_for_backward). Bytes are counted per storage, once, whatever number of ops or views
share it; the model's parameters and buffers are excluded (they live anyway). The pack hook is not told
which op is saving, so on exit the meter walks the autograd graph from the model's outputs (caught by a
forward hook) and charges each storage to the first node (grad_fn name) found holding it.

Not seen: tensors a custom Function keeps as plain ctx attributes instead of save_for_backward (bitsandbytes
keeps its quantised weight that way, which is a parameter anyway), and tensors inside non-reentrant
gradient-checkpointed regions (their own hooks take precedence; reentrant checkpointing is measured).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

UNATTRIBUTED = "(unattributed)"


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    local = getattr(t, "_local_tensor", t)  # an FSDP2 parameter is a DTensor: its storage is the local shard's
    return (str(local.device), local.untyped_storage().data_ptr())


def _has_storage(t: torch.Tensor) -> bool:
    """False for meta tensors and for FSDP2's gathered parameters once freed (storage resized to 0)."""
    local = getattr(t, "_local_tensor", t)
    return local.device.type != "meta" and local.untyped_storage().nbytes() > 0


def _tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors_in(value)
    elif hasattr(obj, "to_tuple"):  # transformers ModelOutput
        yield from _tensors_in(obj.to_tuple())


def _saved_by(node: Any) -> Iterator[torch.Tensor]:
    """Tensors a graph node holds for backward (`_saved_*` of built-in nodes, `saved_tensors` of custom ones)."""
    names = [n for n in dir(node) if n.startswith("_saved_")]
    if hasattr(node, "saved_tensors"):
        names.append("saved_tensors")
    for attr in names:
        try:
            value = getattr(node, attr)
        except RuntimeError:  # already freed by a backward pass
            continue
        yield from _tensors_in(value)


class ActivationMeter:
    """Context manager measuring the tensors saved for backward by the code run inside it."""

    def __init__(self, model: nn.Module | None = None, attribute: bool = True) -> None:
        self.model = model
        # Attribution reads every graph node's saved tensors; under non-reentrant checkpointing each such read
        # recomputes its whole region (SmolLM2 grew to ~20 GB), so a caller that needs totals only turns it off.
        self.attribute = attribute
        self._saved: dict[tuple[str, int], int] = {}  # storage -> bytes
        self._roots: list[torch.Tensor] = []
        self._excluded: set[tuple[str, int]] = set()
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._handle: Any = None
        self._by_op: dict[str, int] | None = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.layout == torch.strided and tensor.device.type != "meta":
            self._saved.setdefault(_storage_key(tensor), tensor.untyped_storage().nbytes())
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def _capture_output(self, module: nn.Module, args: Any, output: Any) -> None:
        self._roots.extend(t for t in _tensors_in(output) if t.grad_fn is not None)

    def __enter__(self) -> ActivationMeter:
        self._saved.clear()
        self._roots.clear()
        self._by_op = None
        if self.model is not None:
            self._handle = self.model.register_forward_hook(self._capture_output)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.model is not None:
            # Taken at exit, not entry: a buffer reassigned during the forward (VeLoRA's v) is still a buffer.
            held = list(self.model.parameters()) + list(self.model.buffers())
            self._excluded = {_storage_key(t) for t in held if _has_storage(t)}
        # Attribute now, while the graph still holds its saved tensors (a backward pass frees them), and let
        # go of the outputs so the meter does not keep the graph alive.
        self._by_op = self._attribute() if self._roots and self.attribute else None
        self._roots.clear()

    @property
    def storages(self) -> dict[tuple[str, int], int]:
        return {k: n for k, n in self._saved.items() if k not in self._excluded}

    @property
    def total_bytes(self) -> int:
        return sum(self.storages.values())

    def per_token(self, num_tokens: int) -> float:
        return self.total_bytes / num_tokens

    def by_op(self) -> dict[str, int]:
        """Bytes per saving op (grad_fn name), largest first; storages found on no node go to UNATTRIBUTED."""
        if self._by_op is None:
            if not self.attribute:
                raise RuntimeError("ActivationMeter(attribute=False) keeps totals only")
            self._by_op = self._attribute()
        return dict(self._by_op)

    def _attribute(self) -> dict[str, int]:
        remaining = dict(self.storages)
        totals: dict[str, int] = {}
        visited: dict[int, Any] = {}  # id -> node; holding the node keeps its id from being reused
        stack = [t.grad_fn for t in self._roots]
        while stack and remaining:
            node = stack.pop()
            if node is None or id(node) in visited:
                continue
            visited[id(node)] = node
            for tensor in _saved_by(node):
                nbytes = remaining.pop(_storage_key(tensor), None)
                if nbytes is not None:
                    totals[node.name()] = totals.get(node.name(), 0) + nbytes
            stack.extend(fn for fn, _ in node.next_functions)
        if remaining:
            totals[UNATTRIBUTED] = sum(remaining.values())
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
