"""`train.optimizer_in_backward`: each parameter's AdamW step runs inside the backward pass, as soon as its gradient
is complete (`Tensor.register_post_accumulate_grad_hook`, as GaLore's layer-wise mode), and its gradient is freed
at once, so a full set of gradients never exists: the gradient memory is one parameter's, not the model's.

`LayerwiseAdamW` is what the Trainer sees as its optimizer. It holds one torch AdamW per parameter (the same
hyper-parameters and the same weight-decay groups as the Trainer's own AdamW), and a single param group whose
`lr` the Trainer's scheduler sets; each hook reads that lr. Its `step()` and `zero_grad()` do nothing (the work
was done in backward), and its state dict carries every inner optimizer's state, so checkpoints resume exactly.

The step order equals ordinary training's: the scheduler advances after the Trainer's (empty) `step()`, so the
backward of step t uses lr_t. What it cannot do: gradient accumulation (a hook would step on every micro-batch:
the recipe requires batch_size == micro_batch_size) and gradient clipping by the global norm (no moment holds
every gradient; the Trainer is told max_grad_norm=0, and the plan says clipping is off). Under DDP the hooks would
run before the gradients are averaged, so it is single-process only. Its checkpoints cannot resume an ordinary
AdamW run nor the reverse (the state dicts differ in shape): `stepped_in_backward` tells which wrote one.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


class LayerwiseAdamW(torch.optim.Optimizer):
    """AdamW applied parameter by parameter inside backward; see the module docstring."""

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        *,
        lr: float,
        weight_decay: float,
        no_decay: set[str],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused: bool = False,
    ) -> None:
        named = [(n, p) for n, p in named_params if p.requires_grad]
        super().__init__([p for _, p in named], {"lr": lr})
        self.inner: list[torch.optim.AdamW] = []
        self._handles = []
        for name, param in named:
            decay = 0.0 if name in no_decay else weight_decay
            inner = torch.optim.AdamW([param], lr=lr, betas=betas, eps=eps, weight_decay=decay, fused=fused or None)
            self.inner.append(inner)
            self._handles.append(param.register_post_accumulate_grad_hook(self._hook(inner)))

    def _hook(self, inner: torch.optim.AdamW):
        def step_now(param: torch.Tensor) -> None:
            inner.param_groups[0]["lr"] = self.param_groups[0]["lr"]
            inner.step()
            param.grad = None  # freed here: the next parameter's gradient takes its place

        return step_now

    def step(self, closure=None):  # the steps ran in backward
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:  # every gradient was freed by its hook
        return None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["inner"] = [opt.state_dict() for opt in self.inner]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        inner = state_dict.pop("inner", None)
        super().load_state_dict(state_dict)
        if inner is not None:
            for opt, saved in zip(self.inner, inner, strict=True):
                opt.load_state_dict(saved)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def layerwise_for_trainer(trainer, fused: bool = False) -> LayerwiseAdamW:
    """A LayerwiseAdamW over the Trainer's model with the Trainer's own AdamW settings and decay groups."""
    args = trainer.args
    model = trainer.model
    decay = set(trainer.get_decay_parameter_names(model))
    named = list(model.named_parameters())
    return LayerwiseAdamW(
        named,
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        no_decay={n for n, _ in named if n not in decay},
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        fused=fused,
    )


def stepped_in_backward(checkpoint: Path) -> bool | None:
    """Whether a checkpoint's optimizer.pt is LayerwiseAdamW's state (True) or an ordinary optimizer's (False);
    None when it has none or it cannot be read (the Trainer reports that itself). Memory-mapped, so only the
    structure is read, not the moments."""
    path = Path(checkpoint) / "optimizer.pt"
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, ValueError, EOFError):
        return None
    return isinstance(state, dict) and "inner" in state
