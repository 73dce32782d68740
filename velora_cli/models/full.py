"""The training methods without adapters: `full` (every weight of a pretrained model trains) and `pretrain` (every
weight of a freshly initialised model trains), both with VeLoRA on the chosen linear layers in full mode.

`qlora` and `lora` are models.build.build_training_model's. Here:
- the paper's pre-training sizes (GaLore's LLaMA configs, configs/llama_*.json of jiaweizzhao/GaLore, which the
  VeLoRA scripts use) and the config of a `pretrain` recipe: one of those sizes, or a hub id / directory whose
  config.json is read (weights are never loaded), its vocabulary sized to the recipe's tokenizer;
- the trainable model: unquantised weights in the compute dtype (fp32 on CPU, bf16 on a current GPU), every
  parameter trainable, VeLoRA's VeloraLinear swapped in for the matching nn.Linear (`apply_velora(...,
  mode="full")`: same parameters, same state-dict keys, so save_pretrained and the Trainer's checkpoints hold an
  ordinary transformers model), then the recipe's memory section through models.apply_memory, as for
  qlora/lora (chunked loss, lean ops, selective checkpointing, offload; the stock gradient checkpointing for
  models outside the LLaMA family);
- exporting such a run: the run dir already holds the whole model (save_pretrained), so `velora export` loads
  it in the asked dtype and saves it again (staged, then renamed), with the tokenizer; nothing is merged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from velora_cli.common.device import compute_dtype
from velora_cli.common.errors import RecipeError, UsageError
from velora_cli.config.presets import PRETRAIN_SIZES, size_config
from velora_cli.engine import VeloraConfigError, apply_velora
from velora_cli.models.build import apply_memory, attention_for_packing, lean_supported, real_vectors
from velora_cli.models.load import ModelSource, load_config, load_recipe_base, recipe_tokenizer, resolve_model


def pretrain_config(model_section, tokenizer):
    """The architecture a `pretrain` recipe initialises, its vocabulary and special tokens set by the tokenizer."""
    special = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if model_section.config in PRETRAIN_SIZES:
        return size_config(model_section.config, **special)
    config = load_config(resolve_model(model_section.config), model_section.trust_remote_code)
    for key, value in special.items():
        setattr(config, key, value)
    return config


def build_full_model(recipe, device: torch.device, source: ModelSource | None = None, config=None):
    """The trainable model of a `full` or `pretrain` recipe: (model, names of the VeLoRA layers).

    `source` (full) / `config` (pretrain): as finetune.prepare resolved them once; resolved here when not given.
    A fresh initialisation draws from the global RNG: the caller seeds it (train.seed) first.
    """
    from transformers import AutoModelForCausalLM

    m = recipe.model
    dtype = compute_dtype(m.compute_dtype, device)
    if recipe.method == "pretrain":
        config = config if config is not None else pretrain_config(m, recipe_tokenizer(recipe))
        kwargs = {"attn_implementation": m.attn_implementation} if m.attn_implementation else {}
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=m.trust_remote_code, **kwargs)
        model.to(device)
    else:
        # Sharded: rank 0 alone reads the weights (models.load.rank0_reads_weights), the others start on meta.
        model = load_recipe_base(m, device, source, sharded=recipe.distributed.shards())
    model.requires_grad_(True)
    lean = lean_supported(model, recipe)
    if recipe.train.gradient_checkpointing and not lean:  # apply_lean owns the per-layer switch on the others
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    compressed = attach_full_velora(model, recipe)
    real_vectors(model)
    if lean:  # after VeLoRA, as for the adapters: the lean forwards call whatever the projections have become
        apply_memory(model, recipe, device)
    attention_for_packing(model, recipe)
    return model, compressed


def attach_full_velora(model, recipe) -> list[str]:
    """VeLoRA on the recipe's layers of a fully trainable model (also run on a meta-device model by --dry-run)."""
    if not recipe.velora.enabled:
        return []
    try:
        return apply_velora(model, recipe.velora.to_config(), mode="full")
    except VeloraConfigError as exc:
        raise RecipeError(f"velora.{exc}") from None


def load_full_checkpoint(model, checkpoint: Path) -> None:
    """The weights of a full/pretrain checkpoint-N (model.safetensors or its shards) into the built model: a run
    killed after its last checkpoint finishes from it. Tied weights are saved once; any other gap is an error."""
    from safetensors.torch import load_file

    index = checkpoint / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]  # fmt: skip
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(checkpoint / name)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in state if k in own}
    untied = [k for k in missing if own[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise UsageError(f"{checkpoint}: its weights do not fit the model (missing {untied[:3]}, "
                         f"unexpected {unexpected[:3]})")  # fmt: skip
