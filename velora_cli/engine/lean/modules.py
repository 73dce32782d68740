"""Thin forwards that route LLaMA-family modules through the lean ops and the chunked loss.

Bound onto existing module instances by patch.py (like Liger Kernel's instance-level monkey patching), so
weights, names, PEFT LoRA / VeLoRA layers and state dicts are untouched:

- `rms_norm_forward` for LlamaRMSNorm and its copies (Mistral, Qwen2, Qwen3);
- `swiglu_mlp_forward` for LlamaMLP: the projections are called as they are (they may be PEFT LoRA layers with
  VeLoRA A's, or bitsandbytes 4-bit layers); only `act_fn(gate) * up` becomes SwiGLUFunction;
- `causal_lm_forward` for LlamaForCausalLM and peers: with labels, the loss comes from the last hidden states
  through the chunked linear cross-entropy and `logits` is None; without labels, or with `skip_logits=False`,
  it is transformers' own forward (logits, stock loss).

With `use_liger` (decided by patch.py: CUDA weights and liger_kernel installed), the norm and the product call
Liger's Triton kernels, which save the same tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from velora_cli.engine.lean.loss import causal_lm_loss
from velora_cli.engine.lean.ops import rms_norm, swiglu

LOSS_SETTINGS = "_lean_loss_settings"  # attribute on the patched causal LM: {"chunk_size": .., "backend": ..}
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def liger_rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_rms_norm

    # in_place=False: the incoming gradient may be read again by the residual branch.
    return liger_rms_norm(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", False)


def swiglu_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def liger_swiglu_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_swiglu

    return self.down_proj(liger_swiglu(self.gate_proj(x), self.up_proj(x)))


def head_weight(head: nn.Module) -> torch.Tensor:
    """The dense (vocab x hidden) weight lm_head multiplies by: through PEFT's modules_to_save wrapper, and
    dequantised (a temporary, no grad) when the head is a bitsandbytes 4-bit layer."""
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):
        active = list(getattr(head, "active_adapters", []) or [])
        if getattr(head, "disable_adapters", False) or not active or active[0] not in head.modules_to_save:
            head = head.original_module
        else:
            head = head.modules_to_save[active[0]]
    weight = head.weight
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(weight.quant_state.dtype)
    return weight


def _keep_positions(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """transformers' slice_logits_to_keep: 0 keeps all, k > 0 the last k positions, a tensor the given indices."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:, :]
    return hidden[:, logits_to_keep, :]


def causal_lm_forward(
    self: nn.Module,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    *,
    labels: torch.LongTensor | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    skip_logits: bool | None = None,
    return_dict: bool | None = None,
    **kwargs: Any,
) -> Any:
    """LlamaForCausalLM.forward with the loss from hidden states when labels (or shift_labels) are given.

    `skip_logits` (Liger's name): None -> skip whenever there are labels, in training and evaluation alike;
    False -> transformers' own forward (logits and the stock loss). Other keyword arguments go to the decoder
    stack and to the loss, as in transformers (`num_items_in_batch`, `ignore_index`, `shift_labels`, caches).
    """
    has_labels = labels is not None or kwargs.get("shift_labels") is not None
    if skip_logits is None:
        skip_logits = has_labels
    if skip_logits and not has_labels:
        raise ValueError("skip_logits=True needs labels or shift_labels: there is nothing else to return")
    if return_dict is None:
        return_dict = getattr(self.config, "use_return_dict", getattr(self.config, "return_dict", True))
    if not skip_logits:
        # The class's forward, unpatched: logits and, with labels, the stock loss.
        return type(self).forward(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            logits_to_keep=logits_to_keep,
            return_dict=return_dict,
            **kwargs,
        )
    shift_labels = kwargs.pop("shift_labels", None)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    hidden = _keep_positions(outputs.last_hidden_state, logits_to_keep)
    settings = getattr(self, LOSS_SETTINGS, {})
    loss = causal_lm_loss(
        hidden,
        head_weight(self.lm_head),
        labels,
        shift_labels=shift_labels,
        chunk_size=settings.get("chunk_size"),
        backend=settings.get("backend", "auto"),
        **kwargs,
    )
    out = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
        **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD, None)},
    )
    return out if return_dict else out.to_tuple()
