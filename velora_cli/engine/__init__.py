"""VeLoRA (Miles et al., NeurIPS 2024): rank-1 sub-token projections of the inputs a linear layer saves for backward.

The library layer of velora: it imports torch (and PEFT / bitsandbytes / transformers only to recognise their
layer types or plug into their Trainer) and nothing else of velora_cli, so any training loop can use it:

    model = get_peft_model(prepare_model_for_kbit_training(base), LoraConfig(...))
    apply_velora(model, VeloraConfig(layers=["v", "d"], num_groups=32))
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[VeloraCallback()]).train()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Every name loads on first use (PEP 562): `velora runs` and the recipe checks import engine.config, which needs no
# torch, through this package, and torch alone takes seconds to import.
_HOME = {
    "DEFAULT_NUM_GROUPS": "config", "VeloraConfig": "config", "VeloraConfigError": "config",
    "expand_layer_names": "config", "VeloraLinearFunction": "function", "project_subtokens": "function",
    "reconstruct_subtokens": "function", "apply_velora": "inject", "velora_layers": "inject",
    "velora_saving_per_token": "inject", "VeloraLinear": "layer", "ActivationMeter": "meter",
    "VECTORS_FILE": "state", "load_velora_state_dict": "state", "load_velora_vectors": "state",
    "save_velora_vectors": "state", "velora_state_dict": "state", "VeloraCallback": "callback",
}  # fmt: skip

if TYPE_CHECKING:
    from velora_cli.engine.callback import VeloraCallback
    from velora_cli.engine.config import DEFAULT_NUM_GROUPS, VeloraConfig, VeloraConfigError, expand_layer_names
    from velora_cli.engine.function import VeloraLinearFunction, project_subtokens, reconstruct_subtokens
    from velora_cli.engine.inject import apply_velora, velora_layers, velora_saving_per_token
    from velora_cli.engine.layer import VeloraLinear
    from velora_cli.engine.meter import ActivationMeter
    from velora_cli.engine.state import (
        VECTORS_FILE,
        load_velora_state_dict,
        load_velora_vectors,
        save_velora_vectors,
        velora_state_dict,
    )


def lazy_attribute(package: str, homes: dict[str, str], name: str) -> Any:
    """`name` of `package`, imported on first use from the submodule `homes` names (PEP 562 __getattr__)."""
    home = homes.get(name)
    if home is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{package}.{home}"), name)


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _HOME, name)


__all__ = [
    "DEFAULT_NUM_GROUPS",
    "VECTORS_FILE",
    "ActivationMeter",
    "VeloraCallback",
    "VeloraConfig",
    "VeloraConfigError",
    "VeloraLinear",
    "VeloraLinearFunction",
    "apply_velora",
    "expand_layer_names",
    "load_velora_state_dict",
    "load_velora_vectors",
    "project_subtokens",
    "reconstruct_subtokens",
    "save_velora_vectors",
    "velora_layers",
    "velora_saving_per_token",
    "velora_state_dict",
]
