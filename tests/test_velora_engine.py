"""The VeLoRA engine: exact where it must be exact, the closed form where it compresses, real PEFT/bnb layers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from velora_cli.engine import (
    ActivationMeter,
    VeloraConfig,
    VeloraConfigError,
    VeloraLinear,
    apply_velora,
    load_velora_state_dict,
    project_subtokens,
    reconstruct_subtokens,
    velora_state_dict,
)
from velora_cli.engine.function import draw_dropout_seed, dropout_mask

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _linear(d_in: int = 64, d_out: int = 8, bias: bool = False, dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(d_in, d_out, bias=bias).to(dtype)


def _grads(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    y = layer(x)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    return (y, *torch.autograd.grad(y, [x, *params], g))


def _closed_form(g: torch.Tensor, x: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """g^T proj_v(X): the weight gradient VeLoRA promises, computed the long way (explicit reconstruction)."""
    x_hat = reconstruct_subtokens(project_subtokens(x.double(), v.double()), v.double())
    return scale * g.double().reshape(-1, g.shape[-1]).T @ x_hat.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------------------------- the Function


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_input_grad_are_bit_identical(dtype: torch.dtype, bias: bool) -> None:
    plain = _linear(bias=bias, dtype=dtype)
    layer = VeloraLinear(copy.deepcopy(plain), subtoken_size=16)
    x = torch.randn(3, 7, 64, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 7, 8, dtype=dtype)
    y0, gx0, *_ = _grads(plain, x, g)
    y1, gx1, gw1, *rest = _grads(layer, x, g)
    assert torch.equal(y0, y1)
    assert torch.equal(gx0, gx1)
    assert gw1.dtype == dtype and gx1.dtype == dtype
    if bias:
        assert torch.equal(rest[0], g.reshape(-1, 8).sum(0))


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_weight_grad_is_closed_form_projection(scale: float) -> None:
    layer = VeloraLinear(_linear(), subtoken_size=16, scale=scale)
    x = torch.randn(2, 9, 64, requires_grad=True)
    g = torch.randn(2, 9, 8)
    _, _, gw = _grads(layer, x, g)
    expected = _closed_form(g, x.detach(), layer.velora_v, scale)
    torch.testing.assert_close(gw.double(), expected, rtol=1e-5, atol=1e-5)
    # ... and it is not the uncompressed gradient (the data is not rank-1 per sub-token)
    assert (gw - scale * g.reshape(-1, 8).T @ x.detach().reshape(-1, 64)).abs().max() > 1e-2


def test_weight_grad_is_exact_when_subtokens_lie_on_v() -> None:
    layer = VeloraLinear(_linear(), subtoken_size=16, init="random")
    v = layer.velora_v
    coeffs = torch.randn(4, 6, 4)  # 4 sub-tokens per 64-deep token, each a multiple of v
    x = (coeffs.unsqueeze(-1) * v).flatten(-2).requires_grad_(True)
    g = torch.randn(4, 6, 8)
    _, _, gw = _grads(layer, x, g)
    torch.testing.assert_close(gw, g.reshape(-1, 8).T @ x.detach().reshape(-1, 64), rtol=1e-5, atol=1e-5)


def test_autocast_stores_compute_dtype_and_returns_param_dtype_grads() -> None:
    layer = VeloraLinear(_linear(), subtoken_size=16)
    x = torch.randn(2, 5, 64, requires_grad=True)
    with ActivationMeter(layer) as meter, torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert meter.total_bytes == 2 * 5 * 4 * 2  # z_p: 4 sub-tokens per token, bf16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- dropout folding


def test_dropout_folding_matches_explicit_dropout_with_the_same_mask() -> None:
    p = 0.3
    layer = VeloraLinear(_linear(), subtoken_size=16, dropout_p=p)
    layer.observe(torch.randn(8, 64))  # freeze v first, so it is the same in the reference
    x = torch.randn(2, 9, 64, requires_grad=True)
    g = torch.randn(2, 9, 8)
    torch.manual_seed(123)
    y, gx, gw = _grads(layer, x, g)
    torch.manual_seed(123)
    mask = dropout_mask(x.shape, p, draw_dropout_seed(), x.device, x.dtype)
    assert mask.unique().tolist() == pytest.approx([0.0, 1 / (1 - p)])
    dropped = x * mask
    y_ref = F.linear(dropped, layer.weight)
    gx_ref, gw_plain = torch.autograd.grad(y_ref, (x, layer.weight), g)
    assert torch.equal(y, y_ref)
    assert torch.equal(gx, gx_ref)  # exact, mask included
    torch.testing.assert_close(gw.double(), _closed_form(g, dropped.detach(), layer.velora_v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_dropout_mask_drops_p_of_the_elements_and_keeps_the_mean(p: float) -> None:
    mask = dropout_mask((1001, 999), p, 11, torch.device("cpu"), torch.float32)  # odd count: the last int64 half unused
    sigma = (p * (1 - p) / mask.numel()) ** 0.5
    assert abs((mask == 0).double().mean().item() - p) < 5 * sigma
    assert mask.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    assert abs(mask.double().mean().item() - 1.0) < 5 * sigma / (1 - p)
    # neighbouring elements come from the two halves of one 64-bit draw: they must not be correlated
    pairs = (mask.flatten()[:-1:2] == 0).double(), (mask.flatten()[1::2] == 0).double()
    assert abs((pairs[0] * pairs[1]).mean().item() - p * p) < 10 * sigma


def test_dropout_mask_is_reproducible_and_not_stored() -> None:
    a = dropout_mask((4, 64), 0.5, 7, torch.device("cpu"), torch.float32)
    assert torch.equal(a, dropout_mask((4, 64), 0.5, 7, torch.device("cpu"), torch.float32))
    assert not torch.equal(a, dropout_mask((4, 64), 0.5, 8, torch.device("cpu"), torch.float32))
    layer = VeloraLinear(_linear(), subtoken_size=16, dropout_p=0.05)
    x = torch.randn(2, 5, 64, requires_grad=True)
    with ActivationMeter(layer) as meter:
        layer(x)
    assert meter.total_bytes == 2 * 5 * 4 * 4  # only z_p; no mask, no dropped-out input


# ---------------------------------------------------------------------------------------------- the projection vector


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm()


def test_batch_average_once_freezes_after_the_first_batch() -> None:
    layer = VeloraLinear(_linear(), subtoken_size=16)
    b1, b2 = torch.randn(3, 64) + 1.0, torch.randn(3, 64) - 2.0
    layer(b1).sum().backward()
    v1 = layer.velora_v.clone()
    torch.testing.assert_close(v1, _unit(b1.reshape(-1, 16).mean(0)))
    layer(b2).sum().backward()
    assert torch.equal(layer.velora_v, v1)


def test_batch_average_and_ema_follow_every_batch() -> None:
    b1, b2 = torch.randn(3, 64) + 1.0, torch.randn(3, 64) - 2.0
    avg = VeloraLinear(_linear(), subtoken_size=16, init="batch_average")
    ema = VeloraLinear(_linear(), subtoken_size=16, init="ema", ema_decay=0.9)
    for layer in (avg, ema):
        layer(b1).sum().backward()
        layer(b2).sum().backward()
    m1, m2 = _unit(b1.reshape(-1, 16).mean(0)), _unit(b2.reshape(-1, 16).mean(0))
    torch.testing.assert_close(avg.velora_v, m2)
    torch.testing.assert_close(ema.velora_v, _unit(0.9 * m1 + 0.1 * m2))


def test_svd_and_random_init() -> None:
    x = torch.randn(5, 64) + torch.linspace(-1, 1, 16).repeat(4)
    svd = VeloraLinear(_linear(), subtoken_size=16, init="svd")
    svd(x).sum().backward()
    top = torch.linalg.svd(x.reshape(-1, 16)).Vh[0]
    torch.testing.assert_close(svd.velora_v.abs(), top.abs(), rtol=1e-4, atol=1e-5)
    rnd = VeloraLinear(_linear(), subtoken_size=16, init="random")
    before = rnd.velora_v.clone()
    assert rnd.initialized and before.norm().item() == pytest.approx(1.0)
    rnd(x).sum().backward()
    assert torch.equal(rnd.velora_v, before)


def test_eval_and_no_grad_take_the_plain_path() -> None:
    plain = _linear()
    layer = VeloraLinear(copy.deepcopy(plain), subtoken_size=16, dropout_p=0.5)
    x = torch.randn(2, 5, 64)
    layer.eval()
    assert torch.equal(layer(x), plain(x))
    layer.train()
    with torch.no_grad():
        layer(x)
    assert not layer.initialized and torch.count_nonzero(layer.velora_v) == 0


# ---------------------------------------------------------------------------------------------- PEFT models


@pytest.fixture(scope="module")
def tiny_lora(tiny_llama_dir: Path):
    """(fresh-model factory) tiny LLaMA + PEFT LoRA on all seven projections, dropout 0, identical init."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def make(dropout: float = 0.0, **lora_kwargs):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=LORA_TARGETS, **lora_kwargs)
        model = get_peft_model(base, config)
        for name, param in model.named_parameters():  # B is zero at init: make it non-zero so A gets a gradient
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
        return model

    return make


def _batch(vocab: int = 400) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (2, 16), generator=gen)
    return {"input_ids": ids, "labels": ids}


def _lora_grads(model) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(**_batch()).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_apply_velora_on_peft_lora_layers(tiny_lora) -> None:
    plain, model = tiny_lora(), tiny_lora()
    replaced = apply_velora(model, VeloraConfig(layers=["vd"], num_groups=4))
    assert len(replaced) == 4 and all(n.endswith(("v_proj", "down_proj")) for n in replaced)
    layer = model.get_submodule(replaced[0]).lora_A["default"]
    assert isinstance(layer, VeloraLinear) and layer.subtoken_size == 16
    g0, g1 = _lora_grads(plain), _lora_grads(model)
    assert g0.keys() == g1.keys()
    for name in g0:
        if "lora_A" in name and name.split(".lora_A")[0].endswith(("v_proj", "down_proj")):
            assert not torch.allclose(g0[name], g1[name])  # compressed
        else:
            # every other gradient only depends on exact forward values and exact input gradients
            assert torch.equal(g0[name], g1[name]), name


def test_weight_grad_on_peft_layer_is_closed_form(tiny_lora) -> None:
    model = tiny_lora()
    (name,) = [n for n in apply_velora(model, VeloraConfig(layers=[r".*layers\.1\.mlp\.down_proj"], num_groups=8))]
    layer = model.get_submodule(name).lora_A["default"]
    seen: dict[str, torch.Tensor] = {}

    def keep(module, args, out):
        seen["x"] = args[0].detach()
        out.retain_grad()
        seen["y"] = out

    layer.register_forward_hook(keep)
    _lora_grads(model)
    expected = _closed_form(seen["y"].grad, seen["x"], layer.velora_v)
    torch.testing.assert_close(layer.weight.grad.double(), expected, rtol=1e-5, atol=1e-6)


def test_matches_peft_velora_variant(tiny_lora) -> None:
    from peft.tuners.lora.config import VeloraConfig as PeftVeloraConfig

    peft_cfg = PeftVeloraConfig(num_groups=4, scale=0.5, init_type="batch_average_once")
    theirs = tiny_lora(velora_config=peft_cfg)
    ours = tiny_lora()
    apply_velora(ours, VeloraConfig(layers=LORA_TARGETS, num_groups=4, scale=0.5))
    _lora_grads(ours)  # first batch initialises v (same batch, same inputs: same mean as PEFT's)
    for name, layer in velora_state_dict(ours).items():
        if name.endswith(".velora_v"):
            module = theirs.get_submodule(name.removesuffix(".lora_A.default.velora_v"))
            module.lora_velora_embed["default"] = layer.clone()
            module.lora_velora_initialized["default"] = True
    g_ours, g_theirs = _lora_grads(ours), _lora_grads(theirs)
    assert g_ours.keys() == g_theirs.keys()
    for name in g_ours:
        torch.testing.assert_close(g_ours[name], g_theirs[name], rtol=1e-4, atol=1e-7)


def test_dropout_moves_into_the_layer(tiny_lora) -> None:
    model = tiny_lora(dropout=0.1)
    apply_velora(model, VeloraConfig(layers=["q"], num_groups=4))
    lora_layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert isinstance(lora_layer.lora_dropout["default"], nn.Identity)
    assert lora_layer.lora_A["default"].dropout_p == pytest.approx(0.1)
    k_layer = model.get_submodule("base_model.model.model.layers.0.self_attn.k_proj")
    assert isinstance(k_layer.lora_dropout["default"], nn.Dropout)


def test_adapter_file_keys_and_merge_are_plain_lora(tiny_lora, tmp_path: Path) -> None:
    plain, model = tiny_lora(), tiny_lora()
    apply_velora(model, VeloraConfig(layers=LORA_TARGETS, num_groups=4))
    _lora_grads(model)
    plain.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "velora")
    keys = {}
    for which in ("plain", "velora"):
        with safe_open(tmp_path / which / "adapter_model.safetensors", "pt") as f:
            keys[which] = set(f.keys())
    assert keys["plain"] == keys["velora"]
    assert not any("velora" in k for k in keys["velora"])
    assert json.loads((tmp_path / "velora" / "adapter_config.json").read_text())["lora_dropout"] == 0.0
    batch = _batch()
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, before, rtol=1e-4, atol=1e-5)


def test_state_dict_round_trip(tiny_lora) -> None:
    cfg = VeloraConfig(layers=["vd"], num_groups=4)
    trained, resumed = tiny_lora(), tiny_lora()
    apply_velora(trained, cfg)
    apply_velora(resumed, cfg)
    _lora_grads(trained)
    state = velora_state_dict(trained)
    assert len(state) == 8 and all(state[k].item() for k in state if k.endswith("velora_initialized"))
    load_velora_state_dict(resumed, state)
    for name, layer in resumed.named_modules():
        if isinstance(layer, VeloraLinear):
            assert layer.initialized and torch.equal(layer.velora_v, state[f"{name}.velora_v"])
    with torch.no_grad():  # the next training batch must not re-initialise the restored vectors
        resumed.train()
    _lora_grads(resumed)
    after = velora_state_dict(resumed)
    assert all(torch.equal(after[k], state[k]) for k in state)
    bad = dict(state)
    key = next(k for k in bad if k.endswith("velora_v"))
    bad[key] = torch.ones(3)
    with pytest.raises(ValueError, match=r"velora_v has shape \(3,\), expected \(16,\)"):
        load_velora_state_dict(resumed, bad)
    del bad[key]
    with pytest.raises(ValueError, match="missing"):
        load_velora_state_dict(resumed, bad)


def test_full_fine_tuning_mode(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)
    weight = model.model.layers[1].mlp.down_proj.weight
    replaced = apply_velora(model, VeloraConfig(layers=["d"], num_groups=8), mode="full")
    assert replaced == ["model.layers.1.mlp.down_proj"]  # the frozen one is left alone
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, VeloraLinear) and layer.weight is weight
    model.train()
    model(**_batch()).loss.backward()
    assert layer.initialized and torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_errors_name_the_field_layer_and_depth(tiny_lora) -> None:
    model = tiny_lora()
    message = r"^num_groups=5: layer .*layers\.0\.self_attn\.v_proj has input depth 64"
    with pytest.raises(VeloraConfigError, match=message) as info:
        apply_velora(model, VeloraConfig(layers=["v"], num_groups=5))
    assert info.value.field == "num_groups"
    with pytest.raises(VeloraConfigError, match=r"^subtoken_size=48: layer .*down_proj has input depth 128"):
        apply_velora(model, VeloraConfig(layers=["d"], subtoken_size=48))
    with pytest.raises(VeloraConfigError, match=r"^layers=\['w_proj'\]: no PEFT LoRA layer matches"):
        apply_velora(model, VeloraConfig(layers=["w_proj"]))
    with pytest.raises(ValueError, match="^init='pca': must be one of"):
        VeloraConfig(init="pca")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="^num_groups='8': must be an integer"):
        VeloraConfig(num_groups="8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^scale=nan: must be finite and > 0"):
        VeloraConfig(scale=float("nan"))


def test_per_layer_type_group_counts(tiny_lora) -> None:
    """The official pre-training scripts give one count per layer type (`--num_groups 64,86`)."""
    model = tiny_lora()
    config = VeloraConfig(layers=["v", "d"], num_groups={"v": 16, "d": 8})
    apply_velora(model, config)
    layers = {n.split(".")[-3]: m for n, m in model.named_modules() if isinstance(m, VeloraLinear)}
    assert layers["v_proj"].num_groups == 16 and layers["down_proj"].num_groups == 8
    with pytest.raises(VeloraConfigError, match="^num_groups: no count for layer 'down_proj'"):
        VeloraConfig(layers=["v", "d"], num_groups={"v": 16})


# ---------------------------------------------------------------------------------------------- bitsandbytes


def _quantized_lora(tiny_llama_dir: Path, quantization: str):
    from peft import LoraConfig, get_peft_model

    from velora_cli.models.load import ModelSource, load_base_model

    torch.manual_seed(0)
    base = load_base_model(ModelSource(str(tiny_llama_dir), str(tiny_llama_dir)), quantization=quantization)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def _check_quantized(model, base_cls: type) -> None:
    plain = copy.deepcopy(model)
    replaced = apply_velora(model, VeloraConfig(layers=list("qkvogud"), num_groups=4))
    assert len(replaced) == 14
    lora_layer = model.get_submodule(replaced[0])
    assert isinstance(lora_layer.base_layer, base_cls) and isinstance(lora_layer.lora_A["default"], VeloraLinear)
    seen: dict[str, torch.Tensor] = {}
    layer = model.get_submodule(replaced[-1]).lora_A["default"]

    def keep(module, args, out):
        seen["x"] = args[0].detach()
        out.retain_grad()
        seen["y"] = out

    layer.register_forward_hook(keep)
    g0, g1 = _lora_grads(plain), _lora_grads(model)
    for name in g0:
        if "lora_B" in name:  # exact: forward values and input gradients are untouched by VeLoRA
            assert torch.equal(g0[name], g1[name]), name
    torch.testing.assert_close(
        layer.weight.grad.double(), _closed_form(seen["y"].grad, seen["x"], layer.velora_v), rtol=1e-5, atol=1e-6
    )


@pytest.mark.slow
def test_qlora_nf4_layer(tiny_llama_dir: Path) -> None:
    import bitsandbytes as bnb

    _check_quantized(_quantized_lora(tiny_llama_dir, "nf4"), bnb.nn.Linear4bit)


def test_int8_layer(tiny_llama_dir: Path) -> None:
    import bitsandbytes as bnb

    try:
        model = _quantized_lora(tiny_llama_dir, "int8")
        _lora_grads(copy.deepcopy(model))
    except Exception as exc:  # noqa: BLE001 - whatever bnb raises when 8-bit training is unsupported here
        pytest.skip(f"bitsandbytes 8-bit LoRA training does not run on this machine: {exc}")
    _check_quantized(model, bnb.nn.Linear8bitLt)


# ---------------------------------------------------------------------------------------------- memory


def test_meter_sees_d_over_m_values_per_token() -> None:
    d, m = 64, 16
    plain = _linear(d)
    layer = VeloraLinear(copy.deepcopy(plain), subtoken_size=m)
    x = torch.randn(2, 10, d)  # LoRA's A input: the layer input, which need not require grad
    with ActivationMeter(plain) as before:
        plain(x)
    with ActivationMeter(layer) as after:
        layer(x)
    assert before.per_token(20) == d * 4
    assert after.per_token(20) == d // m * 4
    assert after.by_op() == {"VeloraLinearFunctionBackward": 20 * (d // m) * 4}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocast_and_dropout_replay() -> None:
    device = torch.device("cuda")
    plain = _linear().to(device)
    layer = VeloraLinear(copy.deepcopy(plain), subtoken_size=16, dropout_p=0.2)
    x = torch.randn(2, 9, 64, device=device, requires_grad=True)
    g = torch.randn(2, 9, 8, device=device, dtype=torch.bfloat16)
    torch.manual_seed(5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, gx, gw = _grads(layer, x, g)
    torch.manual_seed(5)
    mask = dropout_mask(x.shape, 0.2, draw_dropout_seed(), device, x.dtype)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_ref = plain(x * mask)
    gx_ref = torch.autograd.grad(y_ref, x, g)[0]
    assert y.dtype == torch.bfloat16 and gw.dtype == torch.float32 and layer.velora_v.device.type == "cuda"
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)


# ---------------------------------------------------------------------------------------- checkpointing


class _Block(nn.Module):
    def __init__(self, init: str) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.velora = VeloraLinear(nn.Linear(64, 32), subtoken_size=16, init=init, dropout_p=0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.velora(x))


def _train_block(init: str, checkpointing: str | None, batches: int = 3):
    """Micro-batches through one VeLoRA layer, optionally gradient-checkpointed; returns what a test compares."""
    from torch.utils.checkpoint import checkpoint

    block = _Block(init)
    updates, grads = [], []
    original = block.velora.set_projection

    def counting(v: torch.Tensor, initialized: bool = True) -> None:
        updates.append(v.clone())
        original(v, initialized)

    block.velora.set_projection = counting  # type: ignore[method-assign]
    torch.manual_seed(11)
    for i in range(batches):
        x = (torch.randn(2, 5, 64) + i).requires_grad_(True)
        out = block(x) if checkpointing is None else checkpoint(block, x, use_reentrant=checkpointing == "reentrant")
        block.velora.weight.grad = None
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append((block.velora.weight.grad.clone(), x.grad.clone()))
    return block, updates, grads


@pytest.mark.parametrize("init", ["batch_average", "ema"])
@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant"])
def test_gradient_checkpointing_updates_v_once_and_replays_the_same_mask(init: str, checkpointing: str) -> None:
    plain_block, plain_updates, plain_grads = _train_block(init, None)
    block, updates, grads = _train_block(init, checkpointing)
    assert len(updates) == len(plain_updates) == 3  # once per micro-batch, not once per forward run
    for ours, theirs in zip(updates, plain_updates, strict=True):
        assert torch.equal(ours, theirs)
    # Same v and the same dropout mask in the recompute as in the first run: the gradients are the uncheckpointed
    # ones, which test_weight_grad_is_closed_form_projection ties to g^T proj_v(dropout(x)).
    for (gw, gx), (pw, px) in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(gw, pw, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gx, px, rtol=1e-6, atol=1e-7)


def test_checkpointed_weight_grad_is_the_closed_form() -> None:
    """Under non-reentrant checkpointing: grad_W == g^T (z_p v^T) for the dropped-out input of the first run."""
    from torch.utils.checkpoint import checkpoint

    from velora_cli.engine import function

    layer = VeloraLinear(nn.Linear(64, 32, bias=False), subtoken_size=16, init="batch_average_once", dropout_p=0.25)
    layer.train()
    seeds: list[int] = []
    draw = function.draw_dropout_seed

    def recording() -> int:
        seeds.append(draw())
        return seeds[-1]

    x = torch.randn(3, 7, 64, requires_grad=True)
    g = torch.randn(3, 7, 32)
    import velora_cli.engine.layer as layer_module

    original, layer_module.draw_dropout_seed = layer_module.draw_dropout_seed, recording
    try:
        checkpoint(layer, x, use_reentrant=False).backward(g)
    finally:
        layer_module.draw_dropout_seed = original
    assert len(seeds) == 2 and seeds[0] == seeds[1]  # the recompute drew the first run's seed again
    dropped = x.detach() * dropout_mask(x.shape, 0.25, seeds[0], x.device, x.dtype)
    x_hat = reconstruct_subtokens(project_subtokens(dropped, layer.velora_v), layer.velora_v)
    expected = g.reshape(-1, 32).t() @ x_hat.reshape(-1, 64)
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- saving figure


def test_saving_figure_counts_fp32_adapter_inputs_on_a_bf16_model(tiny_llama_dir: Path) -> None:
    """PEFT casts a LoRA layer's input to the adapter's dtype (fp32) on a bf16 base: the figure the panel and
    summary.json show must be what the meter sees VeLoRA remove, not a bf16-sized guess."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from velora_cli.engine import velora_saving_per_token

    def model_with(velora: bool):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=LORA_TARGETS))
        if velora:
            apply_velora(model, VeloraConfig(layers=["vd"], num_groups=8))
        return model.train()

    ids = torch.randint(5, 400, (2, 16), generator=torch.Generator().manual_seed(1))
    measured = {}
    for velora in (False, True):
        model = model_with(velora)
        assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
        with ActivationMeter(model) as meter:
            model(input_ids=ids, labels=ids)
        measured[velora] = meter.per_token(ids.numel())
    figure = velora_saving_per_token(model)
    assert figure == pytest.approx(measured[False] - measured[True], rel=1e-6)
    # 2 layers x (v: D=64, d: D=128) x (input + dropout mask, fp32) - 8 projections each; layer 0's v_proj
    # input is the frozen embedding's output, which needs no gradient, so its dropout keeps no mask.
    assert figure == 2 * ((64 + 64 - 8) * 4 + (128 + 128 - 8) * 4) - 64 * 4
