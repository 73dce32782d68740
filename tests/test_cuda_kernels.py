"""The VeLoRA engine on bitsandbytes' real CUDA kernels: nf4 Linear4bit and int8 Linear8bitLt bases with PEFT LoRA,
gradients against the closed form, and paged optimizers. Marked `cuda`; skipped where there is no CUDA device
(benchmarks/gpu/run.sh runs `pytest -m cuda` on a GPU).

VELORA_CUDA_TESTS_DEVICE=cpu runs the kernel-independent ones on CPU (to debug this file without a GPU).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from velora_cli.engine import VeloraConfig, VeloraLinear, apply_velora, project_subtokens, reconstruct_subtokens

DEVICE = torch.device(os.environ.get("VELORA_CUDA_TESTS_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA-only (paged memory)")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer LLaMA (hidden 128, GQA) saved in bf16: no tokenizer or download needed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("cuda-llama")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return out


def _load(llama_dir: Path, quantization: str):
    """The base as `velora finetune` loads it on a GPU: bnb-quantised, bf16 compute, on the device."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantization == "int8":
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    else:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8,
        )  # fmt: skip
    kwargs = {"device_map": {"": DEVICE.index or 0}} if DEVICE.type == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16, quantization_config=bnb, **kwargs)
    for module in model.modules():  # CPU debugging only: keep bnb's CPU Linear4bit on its autograd path
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _lora(llama_dir: Path, quantization: str, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    base = _load(llama_dir, quantization)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():  # B is zero at init: make it non-zero so A gets a gradient
        if "lora_B" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    return {"input_ids": ids, "labels": ids}


def _grads(model) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(**_batch()).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _closed_form(g: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """g^T proj_v(X), computed the long way (explicit reconstruction, float64)."""
    x_hat = reconstruct_subtokens(project_subtokens(x.double(), v.double()), v.double())
    return g.double().reshape(-1, g.shape[-1]).T @ x_hat.reshape(-1, x.shape[-1])


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_velora_on_quantized_cuda_layers(llama_dir: Path, quantization: str) -> None:
    import bitsandbytes as bnb

    if quantization == "int8" and DEVICE.type != "cuda":
        pytest.skip("int8 LoRA training needs bitsandbytes' CUDA kernels")
    base_cls = bnb.nn.Linear4bit if quantization == "nf4" else bnb.nn.Linear8bitLt
    plain, model = _lora(llama_dir, quantization), _lora(llama_dir, quantization)
    replaced = apply_velora(model, VeloraConfig(layers=TARGETS, num_groups=4))
    assert len(replaced) == 14
    lora_layer = model.get_submodule(replaced[-1])
    assert isinstance(lora_layer.base_layer, base_cls)
    layer = lora_layer.lora_A["default"]
    assert isinstance(layer, VeloraLinear) and layer.weight.device.type == DEVICE.type
    seen: dict[str, torch.Tensor] = {}

    def keep(module, args, out):
        seen["x"] = args[0].detach()
        out.retain_grad()
        seen["y"] = out

    layer.register_forward_hook(keep)
    g0, g1 = _grads(plain), _grads(model)
    assert g0.keys() == g1.keys() and len(g0) == 28
    for name in g0:
        assert torch.isfinite(g1[name]).all(), name
        if "lora_B" in name:  # exact: VeLoRA leaves forward values and input gradients untouched
            assert torch.equal(g0[name], g1[name]), name
    expected = _closed_form(seen["y"].grad, seen["x"], layer.velora_v)
    torch.testing.assert_close(layer.weight.grad.double(), expected, rtol=1e-4, atol=1e-6)
    assert (layer.weight.grad - g0[[n for n in g0 if replaced[-1] in n and "lora_A" in n][0]]).abs().max() > 0


def test_nf4_input_gradient_is_dequantized_weight(llama_dir: Path) -> None:
    """The frozen nf4 base's backward: dX = dY @ dequant(W), what lets gradients reach the adapters below."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    model = _load(llama_dir, "nf4")
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    x = torch.randn(3, 5, layer.in_features, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 5, layer.out_features, device=DEVICE, dtype=torch.bfloat16)
    y = layer(x)
    (gx,) = torch.autograd.grad(y, x, g)
    w = BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    torch.testing.assert_close(y.float(), x.float() @ w.T, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx.float(), g.float() @ w, rtol=2e-2, atol=2e-2)


def test_velora_model_trains_with_dropout_in_bf16(llama_dir: Path) -> None:
    """A few AdamW steps of nf4 + LoRA (dropout on) + VeLoRA v,d on one batch: finite, and the loss goes down."""
    model = _lora(llama_dir, "nf4", dropout=0.05)
    apply_velora(model, VeloraConfig(layers=["vd"], num_groups=4))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(**_batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@needs_cuda
@pytest.mark.parametrize("name", ["PagedAdamW32bit", "PagedAdamW8bit"])
def test_paged_optimizer_step(llama_dir: Path, name: str) -> None:
    """bitsandbytes' paged AdamW on a VeLoRA model (what train.optimizer=paged_adamw_* selects), checked against
    torch's AdamW from the same parameters and gradients; states of large tensors live in paged memory."""
    import bitsandbytes as bnb

    model = _lora(llama_dir, "nf4")
    apply_velora(model, VeloraConfig(layers=["vd"], num_groups=4))
    params = [p for p in model.parameters() if p.requires_grad]
    big = torch.nn.Parameter(torch.randn(512, 256, device=DEVICE) * 0.02)  # >= 1e5 elements: paged state
    _grads(model)
    big.grad = torch.randn_like(big) * 1e-3
    params.append(big)
    start = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    paged = getattr(bnb.optim, name)(params, lr=1e-3, weight_decay=0.0)
    paged.step()
    torch.cuda.synchronize()
    after = [p.detach().clone() for p in params]
    state = paged.state[big]
    assert getattr(state["state1"], "is_paged", False), "large optimizer state is not in paged memory"
    # the same step with torch's AdamW
    for p, s, g in zip(params, start, grads, strict=True):
        p.data.copy_(s)
        p.grad = g.clone()
    torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0).step()
    for p, s, a in zip(params, start, after, strict=True):
        assert torch.isfinite(a).all()
        d_paged, d_ref = (a - s).flatten().float(), (p.detach() - s).flatten().float()
        assert d_paged.abs().max() > 0
        if name == "PagedAdamW32bit":
            torch.testing.assert_close(d_paged, d_ref, rtol=1e-3, atol=1e-6)
        else:  # 8-bit states: the same direction, up to quantisation of the moments
            assert torch.nn.functional.cosine_similarity(d_paged, d_ref, dim=0) > 0.98
