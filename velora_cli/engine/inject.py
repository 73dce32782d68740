"""Putting VeLoRA into a model: layer selection and replacement.

`apply_velora(model, config)` swaps LoRA's `lora_A[adapter]` for a VeloraLinear on every PEFT LoRA layer whose
name matches `config.layers` (plain Linear, bitsandbytes Linear4bit and Linear8bitLt alike: the A projection is
an ordinary nn.Linear in all three, and its input is the layer input). The adapter's dropout moves into the
VeloraLinear (the PEFT slot becomes nn.Identity) so that the dropped-out input and its mask are not stored.
On a model without LoRA layers (full fine-tuning, pre-training) it swaps the matching trainable nn.Linear layers.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from velora_cli.engine.config import VeloraConfig, VeloraConfigError, matches_layer
from velora_cli.engine.layer import VeloraLinear

Mode = Literal["auto", "lora", "full"]


def _set_child(model: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, child)


def _make_layer(linear: nn.Linear, config: VeloraConfig, name: str, dropout_p: float) -> VeloraLinear:
    return VeloraLinear(
        linear,
        subtoken_size=config.subtoken_size_for(linear.in_features, name),
        init=config.init,
        ema_decay=config.ema_decay,
        scale=config.scale,
        dropout_p=dropout_p,
    )


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # PEFT is optional for full training
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _apply_lora(lora_layers: list[tuple[str, nn.Module]], config: VeloraConfig) -> list[str]:
    replaced: list[str] = []
    for name, module in lora_layers:
        if not matches_layer(name, config.patterns):
            continue
        for adapter, lora_a in module.lora_A.items():
            if adapter in getattr(module, "lora_variant", {}):
                kind = type(module.lora_variant[adapter]).__name__
                raise VeloraConfigError("layers", f"{name} uses a LoRA variant ({kind}); VeLoRA needs plain LoRA")
            if isinstance(lora_a, VeloraLinear):
                continue
            if type(lora_a) is not nn.Linear:
                raise VeloraConfigError("layers", f"{name} has a {type(lora_a).__name__} LoRA A, not nn.Linear")
            dropout = module.lora_dropout[adapter]
            if not isinstance(dropout, (nn.Dropout, nn.Identity)):
                raise VeloraConfigError("layers", f"{name} has an unsupported LoRA dropout {type(dropout).__name__}")
            dropout_p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            module.lora_A[adapter] = _make_layer(lora_a, config, name, dropout_p)
            module.lora_dropout[adapter] = nn.Identity()
        replaced.append(name)
    return replaced


def _apply_full(model: nn.Module, config: VeloraConfig) -> list[str]:
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        # Exact type: bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear but their weights cannot train.
        if type(module) is nn.Linear and module.weight.requires_grad and matches_layer(name, config.patterns):
            _set_child(model, name, _make_layer(module, config, name, 0.0))
            replaced.append(name)
    return replaced


def apply_velora(model: nn.Module, config: VeloraConfig, mode: Mode = "auto") -> list[str]:
    """Compress the saved inputs of the matching layers; return the names of the layers wrapped.

    mode "auto" picks "lora" when the model has PEFT LoRA layers and "full" (trainable nn.Linear) otherwise.
    Raises VeloraConfigError (a ValueError) naming the config field when nothing matches or a shape does not fit.
    """
    if mode not in ("auto", "lora", "full"):
        raise ValueError(f"apply_velora: mode must be 'auto', 'lora' or 'full', got {mode!r}")
    lora_layers = _lora_layers(model) if mode != "full" else []
    if mode == "lora" or (mode == "auto" and lora_layers):
        replaced, where = _apply_lora(lora_layers, config), "PEFT LoRA layer"
    else:
        replaced, where = _apply_full(model, config), "trainable nn.Linear"
    if not replaced:
        raise VeloraConfigError("layers", f"no {where} matches (expanded: {config.patterns})", list(config.layers))
    return replaced


def velora_layers(model: nn.Module) -> dict[str, VeloraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, VeloraLinear)}


def velora_saving_per_token(model: nn.Module) -> float:
    """Activation bytes per token VeLoRA avoids storing in this model (see VeloraLinear.bytes_saved_per_token)."""
    return sum(layer.bytes_saved_per_token() for layer in velora_layers(model).values())
