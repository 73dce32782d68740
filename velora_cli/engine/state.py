"""The projection vectors' state: v and its "initialised" flag per VeLoRA layer, as tensors and as a file.

v is not part of a PEFT adapter (see layer.py), so a resumed run must get it back from here, or it would
re-initialise v from another batch and train on a different compression than the one it started with.
The file is safetensors (no pickle), float32 on CPU, one `<module>.velora_v` and `<module>.velora_initialized`
per layer.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from velora_cli.engine.config import VECTORS_FILE
from velora_cli.engine.inject import velora_layers

V_KEY = "velora_v"
INIT_KEY = "velora_initialized"


def velora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each VeloraLinear's v (float32, CPU) and initialised flag: `<module>.velora_v`, `<module>.velora_initialized`."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in velora_layers(model).items():
        state[f"{name}.{V_KEY}"] = layer.velora_v.detach().float().cpu().contiguous()
        state[f"{name}.{INIT_KEY}"] = torch.tensor(layer.initialized)
    return state


def load_velora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore the vectors saved by velora_state_dict and mark them initialised (a resumed run keeps its v)."""
    layers = velora_layers(model)
    if not layers:
        raise ValueError("load_velora_state_dict: the model has no VeLoRA layers (call apply_velora first)")
    missing = [f"{name}.{V_KEY}" for name in layers if f"{name}.{V_KEY}" not in state]
    if missing:
        raise ValueError(f"VeLoRA projections: missing {missing[0]} ({len(missing)} of {len(layers)} layers missing)")
    unexpected = [k for k in state if k.endswith(f".{V_KEY}") and k[: -len(V_KEY) - 1] not in layers]
    if unexpected:
        raise ValueError(f"VeLoRA projections: {unexpected[0]} matches no VeLoRA layer in this model")
    for name, layer in layers.items():
        v = state[f"{name}.{V_KEY}"]
        if tuple(v.shape) != (layer.subtoken_size,):
            raise ValueError(
                f"VeLoRA projections: {name}.{V_KEY} has shape {tuple(v.shape)}, "
                f"expected ({layer.subtoken_size},) (was the run started with another num_groups?)"
            )
        layer.set_projection(v, initialized=True)


def save_velora_vectors(model: nn.Module, directory: str | os.PathLike[str]) -> Path | None:
    """Write VECTORS_FILE into `directory` (written beside, then renamed); None when the model has no VeLoRA."""
    from safetensors.torch import save_file

    state = velora_state_dict(model)
    if not state:
        return None
    target = Path(directory) / VECTORS_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{VECTORS_FILE}-", dir=directory)
    os.close(fd)
    try:
        save_file(state, tmp)
        mask = os.umask(0o022)  # mkstemp made it 0600: give it open()'s mode, so other users can read the run
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_velora_vectors(model: nn.Module, directory: str | os.PathLike[str]) -> bool:
    """Restore v from `directory`/VECTORS_FILE; False when the file is absent or the model has no VeLoRA."""
    from safetensors.torch import load_file

    path = Path(directory) / VECTORS_FILE
    if not path.is_file() or not velora_layers(model):
        return False
    load_velora_state_dict(model, load_file(str(path)))
    return True
