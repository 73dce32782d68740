"""What a finetune resolves before any weights load, done once: the model reference, its config and tokenizer, the
VeLoRA layers on a weightless meta-device model, the training data (read, format detected, tokenised), and the
recipe as it will train.

The recipe a run trains with is made here and nowhere else: the loaded recipe (CLI flags and relative paths already
applied by config.load) plus the detected data format, the planner's memory choice (memory.checkpointing: auto) and,
for a model outside the LLaMA family, the stock path's memory section. Recipes are frozen: the pre-flight checks what
`prepare` returns, and the session, the summary and recipe.yaml all use the same Prepared.recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from velora_cli.common.device import world_size
from velora_cli.config.preference import PREFERENCE_METHODS
from velora_cli.config.recipe import Recipe
from velora_cli.data.training import TrainingData, load_training_data
from velora_cli.models.load import ModelSource, load_config, load_tokenizer, resolve_model, tokenizer_reference


@dataclass(frozen=True)
class Prepared:
    recipe: Recipe  # as it trains
    source: ModelSource | None  # the base model (None for pretrain: nothing to load)
    config: Any  # the base model's config (pretrain: the architecture it initialises)
    tokenizer: Any
    data: TrainingData
    compressed: list[str]  # the VeLoRA layers, as attached to the meta-device model
    lean: bool  # the memory techniques go through apply_lean (LLaMA-family blocks)
    memory_choice: str | None  # the planner's reason, when memory.checkpointing was auto


def _with(recipe: Recipe, section: str, **values: Any) -> Recipe:
    """A copy of the frozen `recipe` with fields of one section replaced."""
    part = getattr(recipe, section)
    return recipe.model_copy(update={section: part.model_copy(update=values)})


def _meta_model(recipe: Recipe, config: Any):
    """The architecture on the meta device with the recipe's adapters / VeLoRA attached by the code that trains, so a
    13B recipe's LoRA targets and VeLoRA grouping are checked without its weights. Returns (model, compressed)."""
    from transformers import AutoModelForCausalLM

    from velora_cli.models.build import attach_adapters
    from velora_cli.models.full import attach_full_velora

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
        if recipe.full:
            return model, attach_full_velora(model, recipe)
        return attach_adapters(model, recipe)


def _memory_budget(recipe: Recipe, device: torch.device) -> int | None:
    budget = recipe.memory.budget_bytes
    if budget is None and device.type == "cuda" and torch.cuda.is_available():  # a dry run plans for a GPU anywhere
        budget = torch.cuda.get_device_properties(device).total_memory
    return budget


def prepare(recipe: Recipe, device: torch.device) -> Prepared:
    """Resolve the model once, read the data once, and settle the recipe the run trains with (module docstring)."""
    from velora_cli.models.build import lean_supported
    from velora_cli.models.full import pretrain_config

    m = recipe.model
    source = None if recipe.method == "pretrain" else resolve_model(m.name)
    config = None if source is None else load_config(source, m.trust_remote_code)  # a wrong name fails here, first
    reference = tokenizer_reference(m)
    tokenizer_source = source if source is not None and reference == m.name else resolve_model(reference)
    tokenizer = load_tokenizer(tokenizer_source, m.trust_remote_code)
    config = pretrain_config(m, tokenizer) if config is None else config
    model, compressed = _meta_model(recipe, config)
    lean = lean_supported(model, recipe)
    del model
    if recipe.method in PREFERENCE_METHODS:
        from velora_cli.data.preference import load_preference_data

        data = load_preference_data(recipe, tokenizer)
    else:
        data = load_training_data(recipe, tokenizer)
    if data.format != "text":  # recipe.yaml records what was detected: generate/chat prompt the run with it
        recipe = _with(recipe, "data", format=data.format)
    choice = None
    auto_strategy = world_size() > 1 and recipe.distributed.strategy == "auto"
    if auto_strategy and (recipe.method in PREFERENCE_METHODS or recipe.model.quantization == "int8"):
        recipe = _with(recipe, "distributed", strategy="ddp")  # neither has an FSDP path (config.recipe)
        auto_strategy = False
    if recipe.memory.checkpointing == "auto" or auto_strategy:  # the planner's choices: one meta-model layout
        from velora_cli.memory.arch import arch_of_config
        from velora_cli.memory.estimate import estimate, settings_from_recipe

        arch = arch_of_config(config, m.name if source is not None else str(m.config))
        if recipe.memory.checkpointing == "auto":
            from velora_cli.memory.plan import resolve_auto

            settings = settings_from_recipe(recipe, device=device.type)
            recipe, result = resolve_auto(recipe, arch, settings, _memory_budget(recipe, device))
            choice = result.reason
        if auto_strategy:  # DDP when a replica fits one GPU, else FSDP
            from velora_cli.memory.sharding import choose

            est = estimate(arch, settings_from_recipe(recipe, device=device.type))
            sharding = choose(est, "auto", world_size(), 1, _memory_budget(recipe, device))
            recipe = _with(recipe, "distributed", strategy=sharding.strategy)
    if not lean:  # the stock path: what summaries, recipe.yaml and the panel then describe
        recipe = _with(recipe, "memory", loss="full", lean_ops=False, offload=False)
    return Prepared(recipe, source, config, tokenizer, data, compressed, lean, choice)
