"""The architecture a memory estimate is made for: what it needs to know about a LLaMA-family causal LM.

Owns the `Arch` description (per-layer linear shapes, the parameters outside the decoder layers), the built-in
presets (LLaMA-7B/13B, Llama-3.1-8B, SmolLM2-135M), and reading an Arch off a model config by building the model
on the meta device (no memory, no weights; nothing downloaded but config.json). A hub id resolves without the
network when it can: a config.json in the local Hugging Face cache, else the table of well-known models
(KNOWN_MODELS: the shipped recipes' models and their siblings), and only then the hub, so planning a run before
renting a GPU works offline.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from velora_cli.common.errors import UsageError, did_you_mean
from velora_cli.config.presets import KNOWN_MODELS, LLAMA_PROJECTIONS, PRESETS
from velora_cli.models.load import load_config, resolve_model


@dataclass(frozen=True)
class Arch:
    """What the memory model needs to know about a LLaMA-family causal LM."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    linears: tuple[tuple[str, int, int, bool], ...]  # per decoder layer: (name, in, out, has_bias)
    other_params: int  # embeddings, lm_head (if untied), norms: kept in the compute dtype

    def linear(self, name: str) -> tuple[int, int]:
        for n, i, o, _ in self.linears:
            if n == name:
                return i, o
        raise KeyError(name)

    @property
    def total_params(self) -> int:
        per_layer = sum(i * o + (o if b else 0) for _, i, o, b in self.linears)
        return self.layers * per_layer + self.other_params


def arch_of_config(config: Any, name: str) -> Arch:
    """Build the model on the meta device (no memory, no weights) and read its exact parameter layout."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return arch_of_model(model, name)


def arch_of_model(model: Any, name: str) -> Arch:
    """The Arch of a built model (normally on the meta device)."""
    config = model.config
    decoder = getattr(getattr(model, "model", None), "layers", None)
    if decoder is None or len(decoder) == 0:
        raise UsageError(f"{name}: memory-estimate supports decoder-only models with model.layers (LLaMA family)")
    layer = decoder[0]
    linears = []
    for mod_name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            linears.append(
                (mod_name.rsplit(".", 1)[-1], module.in_features, module.out_features, module.bias is not None)
            )
    missing = [p for p in LLAMA_PROJECTIONS if p not in {n for n, *_ in linears}]
    if missing:
        raise UsageError(f"{name}: not a LLaMA-family layout (no {', '.join(missing)} in a decoder layer)")
    in_layers = {id(p) for p in decoder.parameters()}
    linear_ids = {id(m.weight) for m in decoder.modules() if isinstance(m, torch.nn.Linear)}
    linear_ids |= {id(m.bias) for m in decoder.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}
    other = sum(p.numel() for p in model.parameters() if id(p) not in in_layers)  # parameters() de-duplicates ties
    other += sum(p.numel() for p in decoder.parameters() if id(p) not in linear_ids)  # per-layer norms
    heads = config.num_attention_heads
    return Arch(
        name=name,
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        linears=tuple(linears),
        other_params=other,
    )


def preset_config(preset: str):
    from transformers import LlamaConfig

    if preset not in PRESETS:
        hint = did_you_mean(preset, PRESETS, cutoff=0.5)
        raise UsageError(f"unknown preset {preset!r}{hint}; known: {', '.join(PRESETS)}")
    return LlamaConfig(**PRESETS[preset])


@functools.lru_cache(maxsize=8)
def arch_for(preset: str | None = None, model: str | None = None, trust_remote_code: bool = False) -> Arch:
    """The architecture of a preset or a model reference (config only, nothing downloaded but config.json)."""
    if preset is not None:
        return arch_of_config(preset_config(preset), preset)
    assert model is not None
    return arch_of_config(model_config(model, trust_remote_code), model)


def recipe_arch(recipe: Any) -> Arch:
    """The architecture a recipe trains: for `pretrain` its model.config (a paper size or a hub id / directory
    holding config.json), else its model.name."""
    m = recipe.model
    if recipe.method == "pretrain":
        return arch_for(preset=m.config) if m.config in PRESETS else arch_for(model=m.config)
    return arch_for(model=m.name, trust_remote_code=m.trust_remote_code)


def model_config(model: str, trust_remote_code: bool = False):
    """A model's config for planning: local files or the hub cache first, then KNOWN_MODELS, then the hub."""
    from velora_cli.common.hub import is_hub_id

    known = KNOWN_MODELS.get(model.lower())
    if known is not None and (model.startswith("embedded:") or is_hub_id(model)):
        from transformers import AutoConfig

        if model.startswith("embedded:"):  # its preset is exact; converting the GGUF file is not needed to plan
            return preset_config(known)
        try:
            return AutoConfig.from_pretrained(model, local_files_only=True, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):
            return preset_config(known)
    return load_config(resolve_model(model), trust_remote_code)
