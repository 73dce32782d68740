"""The description of a training run's method that every table, panel and card shows.

Owns `method_name`, the one label of a training configuration ('QLoRA + VeLoRA (v_proj,down_proj) + lean + chunked +
GC every:2'), used by `velora runs`, the live training panel, memory-estimate's columns and the planner's frontier,
and `RunDescription`, what was trained and how, from the recipe as the run resolved and applied it (stored flat at
the top level of summary.json; runs.RunSummary reads and writes it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from velora_cli.config.preference import PREFERENCE_METHODS
from velora_cli.config.presets import LLAMA_PROJECTIONS


def _known(cls: type, data: Any) -> dict[str, Any]:
    """The keys of a JSON object that are fields of dataclass `cls` (others are left out)."""
    data = data if isinstance(data, dict) else {}
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class MemoryPart:
    """What the memory techniques of a run were, as applied: the recipe's memory section once resolved (the
    planner's choice for `checkpointing: auto`; the stock equivalent for a model the lean techniques do not know)
    and, for full/pretrain, whether the optimizer stepped in backward."""

    loss: str = "full"  # full | chunked
    lean_ops: bool = False
    checkpointing: str = "none"  # none | all | mlp | every:K
    offload: bool = False
    optimizer_in_backward: bool = False

    def parts(self) -> list[str]:
        """The label's pieces, in the planner's words: lean, chunked, GC / GC every:K / GC mlp, offload."""
        out = ["lean"] if self.lean_ops else []
        out += ["chunked"] if self.loss == "chunked" else []
        if self.checkpointing != "none":
            out.append("GC" if self.checkpointing == "all" else f"GC {self.checkpointing}")
        out += ["offload"] if self.offload else []
        out += ["optimizer in backward"] if self.optimizer_in_backward else []
        return out


def method_name(
    method: str,
    quantization: str | None = None,
    velora_layers: Sequence[str] = (),
    memory: MemoryPart | None = None,
    *,
    layers: Literal["names", "short", "none"] = "names",
    gradient_checkpointing: bool = False,
) -> str:
    """The one label of a training configuration, e.g. 'QLoRA + VeLoRA (v_proj,down_proj) + lean + chunked + GC
    every:2': `velora runs`, the live panel, memory-estimate's columns and the planner's frontier all use it.

    layers: "names" lists VeLoRA's modules, "short" says `all` or their letters (the planner's tables), "none"
    only that VeLoRA is on. `gradient_checkpointing`: summaries written before the memory section (no `memory`)."""
    name = method if method in ("full", "pretrain") else "QLoRA" if quantization not in (None, "none") else "LoRA"
    name += f" {method.upper()}" if method in PREFERENCE_METHODS else ""  # e.g. QLoRA DPO
    if velora_layers:
        if layers == "names":
            name += f" + VeLoRA ({','.join(velora_layers)})"
        elif layers == "short":
            every = set(velora_layers) >= set(LLAMA_PROJECTIONS)
            name += " + VeLoRA " + ("all" if every else ",".join(m[0] for m in velora_layers))
        else:
            name += " + VeLoRA"
    parts = memory.parts() if memory is not None else (["GC"] if gradient_checkpointing else [])
    return " + ".join([name, *parts])


@dataclass
class LoraPart:
    r: int
    alpha: float
    dropout: float
    target_modules: list[str]

    def text(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g} on {', '.join(self.target_modules)}"


@dataclass
class VeloraPart:
    enabled: bool = False
    layers: list[str] = field(default_factory=list)
    num_groups: int | None = None
    subtoken_size: int | None = None
    init: str | None = None
    scale: float | None = None

    @property
    def grouping(self) -> str:
        return f"{self.num_groups} groups" if self.num_groups else f"M={self.subtoken_size} groups"

    def text(self) -> str:
        if not self.enabled:
            return "off"
        return f"{', '.join(self.layers)} / {self.grouping}, init {self.init}, scale {self.scale}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) if self.enabled else {"enabled": False}


@dataclass
class RunDescription:
    """What was trained and how: the resolved recipe's facts every summary, table, panel and model card describes a
    run by. `memory` is None only in summaries written before the memory section existed (they kept a
    `gradient_checkpointing` flag instead)."""

    recipe: str | None
    base_model: str
    quantization: str
    velora: VeloraPart
    lora: LoraPart
    kind: str = "qlora"  # the recipe's method: qlora | lora | full | pretrain ("method" in summary.json)
    memory: MemoryPart | None = None
    gradient_checkpointing: bool = False  # older summaries only

    @classmethod
    def of(cls, recipe: Any) -> RunDescription:
        """The one translation of a (resolved) Recipe into its description. A pretrain run's base is the
        architecture it initialised (model.config), not model.name, which it never loads."""
        v, m = recipe.velora, recipe.memory
        velora = VeloraPart(True, v.module_names, v.num_groups, v.subtoken_size, v.init, v.scale) if v.enabled else (
            VeloraPart())  # fmt: skip
        lora = LoraPart(recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout, recipe.lora.module_names)
        memory = MemoryPart(m.loss, m.lean_ops, m.checkpointing, m.offload, recipe.train.optimizer_in_backward)
        base = recipe.model.config if recipe.method == "pretrain" else recipe.model.name
        return cls(recipe.name, base, recipe.model.quantization, velora, lora, recipe.method, memory)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunDescription | None:
        if "base_model" not in data:
            return None
        lora = data.get("lora") or {}
        quantization = data.get("quantization", "none")
        memory = data.get("memory")
        return cls(
            recipe=data.get("recipe"),
            base_model=data["base_model"],
            quantization=quantization,
            velora=VeloraPart(**_known(VeloraPart, data.get("velora"))),
            lora=LoraPart(
                lora.get("r", 0), lora.get("alpha", 0), lora.get("dropout", 0), lora.get("target_modules", [])
            ),
            # summaries of qlora runs carry no `method` (the layout before full/pretrain)
            kind=str(data.get("method") or ("qlora" if quantization != "none" else "lora")),
            memory=MemoryPart(**_known(MemoryPart, memory)) if isinstance(memory, dict) else None,
            gradient_checkpointing=bool(data.get("gradient_checkpointing", False)),
        )

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "recipe": self.recipe,
            "base_model": self.base_model,
            "quantization": self.quantization,
            "velora": self.velora.as_dict(),
            "lora": asdict(self.lora),
        }
        if self.kind != "qlora":
            out["method"] = self.kind
        if self.memory is not None:
            out["memory"] = asdict(self.memory)
        else:
            out["gradient_checkpointing"] = self.gradient_checkpointing
        return out

    @property
    def how(self) -> str:
        """How the base was trained: 'from scratch' (pretrain), 'full' (every weight), else its quantisation."""
        return {"pretrain": "from scratch", "full": "full"}.get(self.kind, self.quantization)

    @property
    def base_text(self) -> str:
        """The base column of `velora runs`: a pretrain run names the architecture it started from."""
        return f"{self.base_model} (from scratch)" if self.kind == "pretrain" else self.base_model

    @property
    def model_text(self) -> str:
        return f"{self.base_model} ({self.how})"

    @property
    def method(self) -> str:
        """The run's label (method_name)."""
        layers = self.velora.layers if self.velora.enabled else ()
        return method_name(self.kind, self.quantization, layers, self.memory,
                           gradient_checkpointing=self.gradient_checkpointing)  # fmt: skip
