"""apply_lean: put the chunked loss, lean ops, selective recompute and offload into a loaded causal LM, in place.

Model patching is kept apart from the ops (ops.py, loss.py) and the module forwards (modules.py), as Liger Kernel
keeps `monkey_patch.py` apart from its kernels. Everything is instance-level (the model's own modules get new
`forward`s; its classes, weights, parameter names and adapters do not change), so it composes with PEFT LoRA
(the projections stay whatever they are: LoRA layers, VeLoRA A's, bitsandbytes 4-bit bases) and can be undone
with `remove_lean` or re-applied with other settings (each call starts from the unpatched model).

Supported: transformers' LlamaForCausalLM and the classes built from the same blocks (Mistral, Qwen2, Qwen3:
`model.layers[i].mlp.{gate,up,down}_proj` with SiLU, RMSNorm computed like LlamaRMSNorm, a bias-free lm_head and
ForCausalLMLoss), bare or inside a PeftModel. Anything else raises a ValueError naming its class: a look-alike
with another norm (Gemma's 1 + w) or a fused gate_up_proj (Phi-3) would silently compute something else.

Saved-for-backward tensors each technique removes, for the memory model (b: bytes per activation element, 4 in
fp32 and 2 in bf16/fp16; H hidden, I intermediate, V vocabulary, L layers, T tokens; LoRA with a frozen base,
so norm weights and lm_head are frozen; checked byte for byte by tests/test_lean.py in fp32):

- loss="chunked", once per model (not per layer): per token, the fp32 log-softmax (4V) and NLL's int64 target (8)
  go (the fp32 copy of bf16 logits is never saved, and a frozen lm_head does not save its input); per token whose
  shifted label is not ignore_index, the hidden gradient (bH) and its int64 row index (8) come in. A trainable
  lm_head adds its V x H weight gradient per step (and the stock path would also have kept lm_head's input, bH).
  Transient: one chunk's logits, ~chunk_size x V x (b + 4 + b) bytes (default chunk: 128 MiB of fp32 logits).
- lean_ops, per MLP: silu(gate) (bI). Per RMSNorm whose input needs a gradient (2 per layer and the final norm;
  layer 0's input norm only when the embeddings' output needs one): in bf16/fp16 the fp32 copy of x (4H) is
  replaced by x itself (bH), saving (4 - b)H; in fp32 nothing (with a frozen weight the stock norm already keeps
  only x and 1/rms); with a trainable norm weight also the normalised h (bH).
- checkpointing every:K: ceil(L / K) layers (0, K, 2K, ...) keep their input (bH) instead of everything they
  saved; the rotary tables (cos, sin) stay saved while any layer is not checkpointed. all: every layer.
- checkpointing mlp: per layer, the post-attention norm + MLP region keeps its input (the residual stream, bH,
  which the norm saved anyway) instead of everything saved inside it: the norm's 1/rms (4) and output (bH, the
  MLP input kept by gate/up's LoRA A), and in the MLP, for fp32 LoRA without dropout, 4bI (gate, silu(gate), up,
  their product) plus the three LoRA A outputs (3 x 4r); with lean ops 3bI + 3 x 4r; plus whatever dropout
  masks, fp32 casts of the input for fp32 adapters and VeLoRA projections the MLP's LoRA layers saved.
- offload: every saved tensor of the decoder stack of at least 1 KiB (checkpointed inputs included) moves to
  pinned CPU memory until backward; the GPU keeps none of it (CUDA only).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from velora_cli.engine.lean import modules
from velora_cli.engine.lean.loss import Backend, select_backend
from velora_cli.engine.lean.policy import Recompute, parse_checkpointing
from velora_cli.engine.lean.recompute import (
    apply_recompute,
    check_offload_device,
    offloaded,
    restore_forward,
    set_forward,
)

SUPPORTED_MODELS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
_CHECKPOINTED = "_lean_checkpointed"  # set on decoder layers whose checkpointing apply_lean turned on


@dataclass
class LeanReport:
    """What apply_lean changed."""

    model_class: str
    loss: str
    loss_backend: str | None
    chunk_size: int | None
    lean_ops: bool
    ops_backend: str | None
    norms_patched: int
    mlps_patched: int
    checkpointing: str
    offload: bool
    changes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.model_class}: " + ("; ".join(self.changes) if self.changes else "unchanged")


def find_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside `model` (itself, or under PeftModel / DDP wrappers)."""
    current = model
    for _ in range(6):
        if type(current).__name__ in SUPPORTED_MODELS:
            return current
        if hasattr(current, "get_base_model"):  # peft.PeftModel
            current = current.get_base_model()
        elif isinstance(getattr(current, "module", None), nn.Module):  # DistributedDataParallel
            current = current.module
        else:
            break
    raise ValueError(
        f"apply_lean: {type(current).__name__} is not supported; lean memory techniques know "
        f"{', '.join(SUPPORTED_MODELS)} (LLaMA-family blocks)"
    )


def _check_structure(lm: nn.Module) -> None:
    config = lm.config
    name = type(lm).__name__
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"apply_lean: {name} uses hidden_act={config.hidden_act!r}; the SwiGLU op needs silu")
    for index, layer in enumerate(lm.model.layers):
        if not hasattr(layer, "post_attention_layernorm"):
            raise ValueError(f"apply_lean: {name} layer {index} has no post_attention_layernorm")
        for attr in ("gate_proj", "up_proj", "down_proj"):
            if not hasattr(layer.mlp, attr):
                raise ValueError(f"apply_lean: {name} layer {index} MLP has no {attr}")


def _check_head(lm: nn.Module) -> None:
    head = lm.lm_head
    if hasattr(head, "base_layer") and hasattr(head, "lora_A"):
        raise ValueError("apply_lean: loss='chunked' does not support LoRA on lm_head; use loss='full'")
    inner = getattr(head, "original_module", head)
    if getattr(inner, "bias", None) is not None:
        raise ValueError("apply_lean: loss='chunked' needs a bias-free lm_head")
    if type(inner).__name__ == "Linear8bitLt":
        raise ValueError("apply_lean: loss='chunked' does not support an 8-bit lm_head; use loss='full'")
    loss_fn = getattr(lm, "loss_function", None)
    if loss_fn is not None and getattr(loss_fn, "__name__", "") != "ForCausalLMLoss":
        raise ValueError(f"apply_lean: {type(lm).__name__} uses the loss {loss_fn!r}, not ForCausalLMLoss")
    if getattr(lm.config, "final_logit_softcapping", None):
        raise ValueError("apply_lean: loss='chunked' does not implement final_logit_softcapping")


def select_ops_backend(devices: set[str]) -> str:
    """The lean ops' implementation for a model whose weights are on `devices`: Liger Kernel's Triton RMSNorm and
    SwiGLU ("liger") when every weight is on CUDA and liger_kernel is installed, else the torch Functions."""
    from velora_cli.engine.lean import loss

    return "liger" if devices == {"cuda"} and loss._installed("liger_kernel") else "torch"


def remove_lean(model: nn.Module) -> int:
    """Undo apply_lean (forwards and the per-layer checkpointing it set); returns the number of modules restored."""
    lm = find_causal_lm(model)
    restored = 0
    for module in lm.modules():
        restored += restore_forward(module)
        if module.__dict__.pop(_CHECKPOINTED, False):
            module.gradient_checkpointing = False
    if hasattr(lm, modules.LOSS_SETTINGS):
        delattr(lm, modules.LOSS_SETTINGS)
    return restored


def apply_lean(
    model: nn.Module,
    *,
    loss: Literal["chunked", "full"] = "chunked",
    lean_ops: bool = True,
    checkpointing: str | bool | None = "none",
    offload: bool = False,
    chunk_size: int | None = None,
    loss_backend: Backend = "auto",
    device: torch.device | None = None,
) -> LeanReport:
    """Patch `model` (a supported causal LM, or a PeftModel around one) in place; see the module docstring.

    device: where the model will train, which picks the kernels and allows offload; by default where its weights
    are. A model built in CPU memory or on meta to be sharded onto GPUs (FSDP's low-RAM loading) gives its GPU.

    checkpointing: none | all | mlp | every:K. apply_lean owns the per-layer checkpointing switch: it turns
    transformers' gradient checkpointing off on the layers it does not checkpoint, so call it after
    `prepare_model_for_kbit_training` / `gradient_checkpointing_enable`, and do not set the Trainer's
    `gradient_checkpointing` (it would turn every layer back on).
    """
    lm = find_causal_lm(model)
    name = type(lm).__name__
    # Validate everything before changing anything.
    if loss not in ("chunked", "full"):
        raise ValueError(f"apply_lean: loss={loss!r}: expected 'chunked' or 'full'")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"apply_lean: chunk_size={chunk_size!r}: expected a positive integer or None")
    recompute: Recompute = parse_checkpointing(checkpointing)
    _check_structure(lm)
    if loss == "chunked":
        _check_head(lm)
    devices = {device.type} if device is not None else {p.device.type for p in lm.parameters()}
    device = device or next(lm.parameters()).device
    backend = select_backend(device, loss_backend) if loss == "chunked" else None
    if offload:
        check_offload_device(devices)

    remove_lean(lm)
    changes: list[str] = []
    norms = mlps = 0
    ops_backend = None
    if lean_ops:
        ops_backend = select_ops_backend(devices)
        use_liger = ops_backend == "liger"
        norm_forward = modules.liger_rms_norm_forward if use_liger else modules.rms_norm_forward
        mlp_forward = modules.liger_swiglu_mlp_forward if use_liger else modules.swiglu_mlp_forward
        for module in lm.modules():
            if type(module).__name__ in SUPPORTED_NORMS:
                set_forward(module, types.MethodType(norm_forward, module))
                norms += 1
        for layer in lm.model.layers:
            set_forward(layer.mlp, types.MethodType(mlp_forward, layer.mlp))
            mlps += 1
        changes.append(f"lean RMSNorm on {norms} norms and SwiGLU on {mlps} MLPs ({ops_backend})")

    changes += apply_recompute(lm.model.layers, recompute)
    for index in recompute.layers(len(lm.model.layers)):
        lm.model.layers[index].__dict__[_CHECKPOINTED] = True

    if offload:
        set_forward(lm.model, offloaded(lm.model, lm.model.forward, exclude=lm))
        changes.append("saved activations of the decoder stack offloaded to pinned CPU memory")

    if loss == "chunked":
        setattr(lm, modules.LOSS_SETTINGS, {"chunk_size": chunk_size, "backend": loss_backend})
        set_forward(lm, types.MethodType(modules.causal_lm_forward, lm))
        size = chunk_size if chunk_size is not None else "auto"
        changes.append(f"chunked linear cross-entropy ({backend}, chunk {size} tokens); logits None with labels")

    return LeanReport(
        model_class=name,
        loss=loss,
        loss_backend=backend,
        chunk_size=chunk_size,
        lean_ops=lean_ops,
        ops_backend=ops_backend,
        norms_patched=norms,
        mlps_patched=mlps,
        checkpointing=str(recompute),
        offload=offload,
        changes=changes,
    )
