"""The real measuring run behind `velora memory-estimate --measure`.

Owns building exactly what `velora finetune` trains, running a few real optimizer steps on the available device,
and reading what each component really holds: frozen weights as stored (bitsandbytes quant states included),
adapters, gradients, optimizer states, and the tensors saved for backward (the ActivationMeter).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from velora_cli.common.device import default_device
from velora_cli.common.errors import UsageError
from velora_cli.engine.meter import ActivationMeter
from velora_cli.memory.estimate import Settings
from velora_cli.models.build import build_training_model

# --------------------------------------------------------------------------------------------- measuring


def real_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the frozen model as loaded: parameters, buffers and bitsandbytes quant-state tensors, per storage."""
    seen: dict[tuple[str, int], int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen.setdefault((str(t.device), t.untyped_storage().data_ptr()), t.untyped_storage().nbytes())

    for name, p in model.named_parameters():
        if ".lora_" in name:  # the adapters are counted on their own line
            continue
        add(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, qs.offset):
                add(t)
            if qs.state2 is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
        add(getattr(p, "SCB", None))
    for b in model.buffers():
        add(b)
    return sum(seen.values())


def measure_training(recipe: Any, s: Settings, steps: int = 2) -> dict[str, int]:
    """Run `steps` real training steps on the available device; return measured bytes per component."""
    if recipe.train.gradient_checkpointing:
        # saved-tensor hooks cannot see inside non-reentrant checkpointed regions and made memory grow without bound
        raise UsageError("--measure does not support train.gradient_checkpointing=true yet; measure with it off")
    device = default_device()
    model, _ = build_training_model(recipe, device)  # exactly what `velora finetune` trains
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(trainable, recipe)
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (s.batch, s.seq), generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    act_bytes, by_op = 0, {}
    start = time.perf_counter()
    for _ in range(steps):
        with ActivationMeter(model) as meter:
            loss = model(input_ids=ids, labels=ids).loss
        act_bytes, by_op = meter.total_bytes, meter.by_op()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
    out = {
        "weights": real_weight_bytes(model),
        "adapters": sum(p.numel() * p.element_size() for p in trainable),
        "gradients": sum(p.numel() * p.element_size() for p in trainable),  # grads mirror their fp32 params
        "optimizer": sum(
            t.untyped_storage().nbytes()
            for st in optimizer.state.values()
            for k, t in st.items()
            if isinstance(t, torch.Tensor) and k != "step" and not k.startswith("qmap")
        ),
        "saved_for_backward": act_bytes,
        "seconds_per_step": int(1000 * (time.perf_counter() - start) / steps),  # milliseconds
    }
    if device.type == "cuda":
        out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(device)
    out["by_op"] = by_op  # type: ignore[assignment]
    return out


def _optimizer(params: list[torch.nn.Parameter], recipe: Any):
    lr, wd = recipe.train.learning_rate, recipe.train.weight_decay
    name = recipe.train.optimizer
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[name]
    return cls(params, lr=lr, weight_decay=wd)
