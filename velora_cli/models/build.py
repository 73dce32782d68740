"""The QLoRA/LoRA model builder: quantised (or plain) base + PEFT LoRA + VeLoRA + the lean memory techniques."""

from __future__ import annotations

import torch

from velora_cli.common.errors import RecipeError
from velora_cli.engine import VeloraConfigError, apply_velora
from velora_cli.models.load import (
    ModelSource,
    disable_cpu_4bit_repacking,
    first_line,
    load_recipe_base,
    resolve_model,
    restore_dtypes,
)


def build_training_model(recipe, device: torch.device, source: ModelSource | None = None):
    """The trainable model of a recipe: quantised base -> k-bit preparation -> PEFT LoRA -> VeLoRA.

    `source`: the base model's resolved reference (finetune.prepare resolves it once; resolved here when not given).
    Returns (model, names of the VeLoRA-compressed layers).
    """
    from peft import prepare_model_for_kbit_training

    source = source or resolve_model(recipe.model.name)
    model = load_recipe_base(recipe.model, device, source, sharded=recipe.distributed.shards())
    lean = lean_supported(model, recipe)
    # apply_lean owns the per-layer checkpointing switch on the models it patches (memory.checkpointing, which
    # train.gradient_checkpointing aliases); the stock switch serves the others.
    checkpointing = recipe.train.gradient_checkpointing and not lean
    if recipe.model.quantization != "none":
        loaded_dtypes = {name: p.dtype for name, p in model.named_parameters()}
        # Freezes the base and enables activation checkpointing for k-bit layers.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        # It also upcasts every frozen bf16/fp16 weight (embeddings, lm_head, norms) to fp32: +2 bytes per
        # parameter (0.5 GB on LLaMA-7B), and an fp32 residual stream that doubles every saved activation and
        # rules out flash attention. Undo that, as QLoRA's reference code does for embeddings/lm_head and
        # torchtune does for the whole base: RMSNorm computes in fp32 internally whatever its weight's dtype.
        restore_dtypes(model, loaded_dtypes)
        disable_cpu_4bit_repacking(model)
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if checkpointing:
        model.config.use_cache = False
    model, compressed = attach_adapters(model, recipe)
    real_vectors(model)
    if lean:
        apply_memory(model, recipe, device)
    attention_for_packing(model, recipe)
    return model, compressed


def real_vectors(model) -> None:
    """VeLoRA's v in CPU memory where its layer was built on meta (a sharded run's ranks other than 0, which do not
    read the weights: models.load.rank0_reads_weights). Sharding fills in the weights from rank 0 but keeps each
    rank's buffers as they are, so v must be a real tensor; finetune.sharding then gives every rank rank 0's v."""
    from velora_cli.engine import velora_layers

    for layer in velora_layers(model).values():
        if layer.velora_v.is_meta:
            layer.velora_v = torch.zeros(layer.velora_v.shape, dtype=layer.velora_v.dtype)


def attention_for_packing(model, recipe) -> None:
    """Packed example rows (data.packing) attend per example on stock SDPA, without the block-diagonal mask
    (engine/lean/packed_attention.py); eager and flash-attention keep their own handling of the restarts."""
    from velora_cli.engine.lean.packed_attention import use_packed_attention

    if recipe.data.packing and not recipe.text_data:
        use_packed_attention(model)


def lean_supported(model, recipe) -> bool:
    """Whether the recipe's memory techniques go through apply_lean for this model (a base model, or one wrapped
    by PEFT/DDP).

    A model apply_lean does not know keeps the stock path when the memory section is at its defaults (the exact
    savers are on by default), and is a recipe error when the section asks for anything explicitly."""
    from velora_cli.engine.lean import find_causal_lm

    try:
        find_causal_lm(model)
        return True
    except ValueError:
        pass
    mem = recipe.memory
    asked = mem.model_fields_set - {"budget"}
    if asked and (mem.loss == "chunked" or mem.lean_ops or mem.checkpointing not in ("none", "all") or mem.offload):
        raise RecipeError(
            f"memory: {type(model).__name__} is not supported by the lean techniques "
            "(LLaMA-family blocks only); set memory.loss: full, lean_ops: false, checkpointing: none|all"
        )
    return False


def lean_kernels(recipe, device: torch.device) -> str:
    """What the chunked loss and the lean ops run on here, for the plan's memory line: a fused CUDA kernel when
    installed (Liger Kernel, Cut Cross-Entropy), else the torch ops."""
    from velora_cli.engine.lean import select_backend, select_ops_backend

    m = recipe.memory
    parts = [f"loss: {select_backend(device)}"] if m.loss == "chunked" else []
    if m.lean_ops:
        parts.append(f"ops: {select_ops_backend({device.type})}")
    return ", ".join(parts)


def apply_memory(model, recipe, device: torch.device):
    """apply_lean as the recipe's memory section says (checkpointing already resolved from `auto`), on a model
    lean_supported accepts, to train on `device` (where its weights may not be yet: a sharded run's are in rank 0's
    CPU memory or on meta until FSDP places them)."""
    from velora_cli.engine.lean import apply_lean

    mem = recipe.memory
    if mem.checkpointing == "auto":
        raise RecipeError("memory.checkpointing=auto must be resolved by the planner before the model is built")
    try:
        report = apply_lean(
            model,
            loss=mem.loss,
            lean_ops=mem.lean_ops,
            checkpointing=mem.checkpointing,
            offload=mem.offload,
            chunk_size=mem.chunk_size,
            device=device,
        )
    except ValueError as exc:
        raise RecipeError(f"memory: {first_line(exc)}") from None
    if mem.checkpointing != "none":
        model.config.use_cache = False
    return report


def attach_adapters(model, recipe):
    """PEFT LoRA and then VeLoRA on a base model, as the recipe says; errors name the recipe field.

    Also run on a weightless meta-device model by `finetune --dry-run`, so shapes are checked by the very code
    that trains. Returns (PEFT model, names of the VeLoRA-compressed layers).
    """
    from peft import LoraConfig, get_peft_model

    if recipe.model.adapter:
        model = continue_adapter(model, recipe.model.adapter)
    else:
        lora = LoraConfig(
            r=recipe.lora.r,
            lora_alpha=recipe.lora.alpha,
            lora_dropout=recipe.lora.dropout,
            target_modules=recipe.lora.module_names,
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:
            raise RecipeError(f"lora.target_modules={recipe.lora.target_modules}: {first_line(exc)}") from None
    compressed: list[str] = []
    if recipe.velora.enabled:
        try:
            compressed = apply_velora(model, recipe.velora.to_config(), mode="lora")
        except VeloraConfigError as exc:
            raise RecipeError(f"velora.{exc}") from None
    return model, compressed


def continue_adapter(model, adapter: str):
    """`model.adapter`: a trained LoRA adapter (an SFT run's directory) as the trainable starting point, its own
    LoRA config in force. On a meta-device model (the dry run; a sharded run's ranks other than 0, which receive
    rank 0's weights) only its config is attached, trainable like the loaded one (a saved config says inference)."""
    from pathlib import Path

    from peft import LoraConfig, PeftModel, get_peft_model

    where = Path(adapter)
    if not (where / "adapter_config.json").is_file():
        raise RecipeError(f"model.adapter {adapter}: no adapter_config.json there (a finished LoRA run or adapter dir)")
    if next(model.parameters()).is_meta:
        config = LoraConfig.from_pretrained(str(where))
        config.inference_mode = False
        return get_peft_model(model, config)
    return PeftModel.from_pretrained(model, str(where), is_trainable=True)
