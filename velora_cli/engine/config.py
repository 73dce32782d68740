"""VeloraConfig: which layers VeLoRA compresses, how tokens are split into sub-tokens, how v is chosen.

The grouping follows the paper: a token of depth D is cut into `num_groups` sub-tokens of size M = D / num_groups
(or, with `subtoken_size`, into D / M sub-tokens of size M). `num_groups` may also be one count per layer type,
as the official pre-training scripts do (`--num_groups 64,86`: 64 on v_proj, 86 on down_proj). Depth must divide
exactly: the reshape that makes sub-tokens is what keeps the compressed value one number per sub-token, and
padding (as PEFT's variant does) would make the reconstruction of the last sub-token depend on zeros that are not
in the data.

The config validates itself and raises VeloraConfigError (a ValueError) carrying the offending field's name, so a
caller with its own schema (the CLI's recipe) can point at its own path for that field.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

InitType = Literal["batch_average_once", "batch_average", "ema", "random", "svd"]
INIT_TYPES: tuple[str, ...] = get_args(InitType)
VECTORS_FILE = "velora_projections.safetensors"  # the run directory's VeLoRA projections (engine.state writes it)
DEFAULT_NUM_GROUPS = 32  # the paper's LLaMA-7B setting (D=4096, M=128)

# LLaMA-family projection names by the letters the VeLoRA paper uses (q,k,v,o,g,u,d).
LAYER_LETTERS = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "g": "gate_proj",
    "u": "up_proj",
    "d": "down_proj",
}


class VeloraConfigError(ValueError):
    """A VeloraConfig field is invalid, or does not fit the model it is applied to."""

    def __init__(self, field_name: str, reason: str, value: object = ...) -> None:
        super().__init__(f"{field_name}{'' if value is ... else f'={value!r}'}: {reason}")
        self.field = field_name


class VeloraConfigTypeError(VeloraConfigError, TypeError):
    """A VeloraConfig field has the wrong type."""


def expand_layer_names(names: Sequence[str]) -> list[str]:
    """Letters (q,k,v,o,g,u,d, or a run such as "vd") become module names; anything else is kept as given."""
    out: list[str] = []
    for name in names:
        if name in LAYER_LETTERS:
            out.append(LAYER_LETTERS[name])
        elif name and all(ch in LAYER_LETTERS for ch in name) and len(set(name)) == len(name):
            out.extend(LAYER_LETTERS[ch] for ch in name)
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def matches_layer(name: str, patterns: Sequence[str]) -> bool:
    """The one rule for "does module `name` match a layer pattern": exact, dotted suffix, glob or full regex."""
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern):
            return True
        try:
            if re.fullmatch(pattern, name):
                return True
        except re.error:
            pass
    return False


def _positive_int(field_name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise VeloraConfigTypeError(field_name, "must be an integer", value)
    if value <= 0:
        raise VeloraConfigError(field_name, "must be a positive integer", value)
    return value


@dataclass
class VeloraConfig:
    layers: list[str] = field(default_factory=lambda: ["v_proj", "down_proj"])
    num_groups: int | dict[str, int] | None = None  # None with subtoken_size None: DEFAULT_NUM_GROUPS
    subtoken_size: int | None = None
    init: InitType = "batch_average_once"
    ema_decay: float = 0.99
    scale: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            self.layers = [self.layers]
        if not isinstance(self.layers, Sequence) or not all(isinstance(x, str) and x for x in self.layers):
            raise VeloraConfigTypeError("layers", "must be a list of layer names", self.layers)
        self.layers = list(self.layers)
        if not self.layers:
            raise VeloraConfigError("layers", "empty; name at least one layer (e.g. ['v', 'd'])")
        if self.num_groups is not None and self.subtoken_size is not None:
            raise VeloraConfigError("num_groups", "set either num_groups or subtoken_size, not both")
        if self.num_groups is None and self.subtoken_size is None:
            self.num_groups = DEFAULT_NUM_GROUPS
        if isinstance(self.num_groups, Mapping):
            self.num_groups = self._per_layer_groups(self.num_groups)
        elif self.num_groups is not None:
            _positive_int("num_groups", self.num_groups)
        if self.subtoken_size is not None:
            _positive_int("subtoken_size", self.subtoken_size)
        if self.init not in INIT_TYPES:
            raise VeloraConfigError("init", f"must be one of {', '.join(INIT_TYPES)}", self.init)
        for name, low, high in (("ema_decay", 0.0, 1.0), ("scale", 0.0, None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise VeloraConfigTypeError(name, "must be a number", value)
            if not (low < value and (value < high if high is not None else math.isfinite(value))):
                bounds = f"in ({low:g}, {high:g})" if high is not None else f"finite and > {low:g}"
                raise VeloraConfigError(name, f"must be {bounds}", value)

    def _per_layer_groups(self, groups: Mapping[str, int]) -> dict[str, int]:
        """{v: 64, d: 86} -> {"v_proj": 64, "down_proj": 86}; every compressed layer type needs a count."""
        out: dict[str, int] = {}
        for key, value in groups.items():
            names = expand_layer_names([str(key)])
            for name in names:
                out[name] = _positive_int(f"num_groups.{key}", value)
        missing = [p for p in self.patterns if p not in out]
        if missing:
            raise VeloraConfigError("num_groups", f"no count for layer {missing[0]!r} (have {sorted(out)})")
        unused = [k for k in out if k not in self.patterns]
        if unused:
            raise VeloraConfigError("num_groups", f"{unused[0]!r} is not one of the layers {self.patterns}")
        return out

    @property
    def patterns(self) -> list[str]:
        """Layer names with the paper's letters (q,k,v,o,g,u,d; runs such as "vd") expanded."""
        return expand_layer_names(self.layers)

    def groups_for(self, layer: str) -> int | None:
        """The sub-token count for a module named `layer` (None when subtoken_size fixes M instead)."""
        if isinstance(self.num_groups, dict):
            for pattern, count in self.num_groups.items():
                if matches_layer(layer, [pattern]):
                    return count
            raise VeloraConfigError("num_groups", f"no count matches layer {layer}")
        return self.num_groups

    def subtoken_size_for(self, depth: int, layer: str) -> int:
        """M for a layer whose input depth is `depth`; VeloraConfigError naming the field when it does not divide."""
        if self.subtoken_size is not None:
            if depth % self.subtoken_size:
                raise VeloraConfigError(
                    "subtoken_size",
                    f"layer {layer} has input depth {depth}, which is not a multiple of {self.subtoken_size}",
                    self.subtoken_size,
                )
            return self.subtoken_size
        groups = self.groups_for(layer)
        assert groups is not None
        if depth % groups:
            raise VeloraConfigError(
                "num_groups",
                f"layer {layer} has input depth {depth}, which does not split into {groups} equal sub-tokens",
                groups,
            )
        return depth // groups
