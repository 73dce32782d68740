"""The architecture a memory estimate is made for: what it needs to know about a LLaMA-family causal LM.

Owns the `Arch` description (per-layer linear shapes, the parameters outside the decoder layers) and reading it
for a preset or a model. A LLaMA or Mistral config.json (every preset, the shipped recipes' models) is read as
JSON and laid out by hand (`arch_of_layout`): no torch, no transformers, so `memory-estimate` answers in well under
a second; tests/test_memory_arch.py holds that layout equal to the built model's for every preset. Any other
architecture is built on the meta device (no memory, no weights) and read off the model. A hub id resolves
without the network when it can: a config.json in the local Hugging Face cache, else the table of well-known
models (KNOWN_MODELS: the shipped recipes' models and their siblings), and only then the hub, so planning a run
before renting a GPU works offline.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velora_cli.common.bounds import check_regular, clip
from velora_cli.common.errors import UsageError, did_you_mean
from velora_cli.common.hub import is_hub_id
from velora_cli.common.logs import quiet_transformers
from velora_cli.config.presets import EMBEDDED_PREFIX, GGUF_PREFIX, KNOWN_MODELS, LLAMA_PROJECTIONS, PRESETS

# Architectures whose decoder layer is exactly LLaMA's: q/k/v/o (bias: attention_bias), gate/up/down (bias:
# mlp_bias), two RMSNorms; embeddings, a final norm, and an lm_head unless tied.
LLAMA_LAYOUTS = ("llama", "mistral")
_LAYOUT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                  "tie_word_embeddings")  # fmt: skip
MAX_CONFIG_BYTES = 16 << 20


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


def arch_of_layout(config: Mapping[str, Any], name: str) -> Arch | None:
    """The Arch of a LLaMA-layout config.json, computed from its fields; None for any other architecture (or a
    config that leaves a field to transformers' defaults), which `arch_of_config` builds instead."""
    if config.get("model_type") not in LLAMA_LAYOUTS or any(config.get(f) is None for f in _LAYOUT_FIELDS):
        return None
    for key in (*_LAYOUT_FIELDS[:-1], "num_key_value_heads", "head_dim"):
        value = config.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise UsageError(f"model {name!r}: config.json's {key} must be a positive integer, not {clip(value)}")
    hidden, heads, inter = config["hidden_size"], config["num_attention_heads"], config["intermediate_size"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    attn_bias, mlp_bias = bool(config.get("attention_bias")), bool(config.get("mlp_bias"))
    q, kv = heads * head_dim, kv_heads * head_dim
    linears = (
        ("q_proj", hidden, q, attn_bias), ("k_proj", hidden, kv, attn_bias), ("v_proj", hidden, kv, attn_bias),
        ("o_proj", q, hidden, attn_bias), ("gate_proj", hidden, inter, mlp_bias), ("up_proj", hidden, inter, mlp_bias),
        ("down_proj", inter, hidden, mlp_bias),
    )  # fmt: skip
    tied = bool(config["tie_word_embeddings"])
    embeddings = config["vocab_size"] * hidden * (1 if tied else 2)
    norms = hidden * (2 * config["num_hidden_layers"] + 1)
    return Arch(
        name=name, hidden=hidden, layers=config["num_hidden_layers"], heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, intermediate=inter, vocab=config["vocab_size"], tied=tied, linears=linears,
        other_params=embeddings + norms,
    )  # fmt: skip


def arch_of_config(config: Any, name: str) -> Arch:
    """Build the model on the meta device (no memory, no weights) and read its exact parameter layout."""
    import torch

    quiet_transformers()
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return arch_of_model(model, name)


def arch_of_model(model: Any, name: str) -> Arch:
    """The Arch of a built model (normally on the meta device)."""
    import torch

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


def check_preset(preset: str) -> None:
    if preset not in PRESETS:
        hint = did_you_mean(preset, PRESETS, cutoff=0.5)
        raise UsageError(f"unknown preset {preset!r}{hint}; known: {', '.join(PRESETS)}")


def preset_layout(preset: str) -> dict[str, Any]:
    """A preset as the config.json of a LLaMA checkpoint would have it."""
    check_preset(preset)
    return {"model_type": "llama", **PRESETS[preset]}


@functools.lru_cache(maxsize=8)
def arch_for(preset: str | None = None, model: str | None = None, trust_remote_code: bool = False) -> Arch:
    """The architecture of a preset or a model reference (config only, nothing downloaded but config.json)."""
    if preset is not None:
        arch = arch_of_layout(preset_layout(preset), preset)
        assert arch is not None
        return arch
    assert model is not None
    layout = config_json(model)
    arch = arch_of_layout(layout, model) if layout is not None and "auto_map" not in layout else None
    if arch is not None:
        return arch
    return arch_of_config(model_config(model, trust_remote_code), model)


def recipe_arch(recipe: Any) -> Arch:
    """The architecture a recipe trains: for `pretrain` its model.config (a paper size or a hub id / directory
    holding config.json), else its model.name."""
    m = recipe.model
    if recipe.method == "pretrain":
        return arch_for(preset=m.config) if m.config in PRESETS else arch_for(model=m.config)
    return arch_for(model=m.name, trust_remote_code=m.trust_remote_code)


def config_json(model: str) -> dict[str, Any] | None:
    """A model's config.json as JSON, read without transformers where it is at hand: a local checkpoint
    directory's, a cached hub model's, else a well-known model's preset. None: ask transformers (GGUF files,
    hub models neither cached nor known, unreadable files)."""
    known = KNOWN_MODELS.get(model.lower())
    preset = preset_layout(known) if known is not None else None
    if model.startswith((EMBEDDED_PREFIX, GGUF_PREFIX)) or model.endswith(".gguf"):
        return preset  # an embedded model's preset is exact: no GGUF conversion to plan
    path = Path(model).expanduser()
    if path.is_dir():
        return _read_json(path / "config.json")
    if not is_hub_id(model):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model, "config.json")
    except ValueError:  # not a valid repo id: resolve_model names the problem
        return None
    return _read_json(Path(cached)) if isinstance(cached, str) else preset


def _read_json(path: Path) -> dict[str, Any] | None:
    check_regular(path, "model config")  # a FIFO named config.json would block the read forever
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise UsageError(f"{path}: {size} bytes is not a model config (config.json is kilobytes)")
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # transformers' loader says what is wrong with it
    return data if isinstance(data, dict) else None


def model_config(model: str, trust_remote_code: bool = False):
    """A model's transformers config, for an architecture `arch_of_layout` does not lay out."""
    quiet_transformers()
    from velora_cli.models.load import load_config, resolve_model

    return load_config(resolve_model(model), trust_remote_code)
