"""memory-estimate: the estimate against real tensors (nf4 weights, LoRA, AdamW) and the ActivationMeter."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from velora_cli.cli import main
from velora_cli.config.presets import LLAMA_PROJECTIONS
from velora_cli.memory.activations import activations, layer_activations
from velora_cli.memory.arch import arch_for
from velora_cli.memory.command import parse_memory
from velora_cli.memory.estimate import (
    COMPONENTS,
    Settings,
    estimate,
    largest_fitting,
    optimizer_bytes,
    quantized_linear_bytes,
    weights_bytes,
)
from velora_cli.memory.measure import real_weight_bytes


def write_recipe(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(body, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize(
    ("preset", "hidden", "layers", "inter"),
    [("llama-7b", 4096, 32, 11008), ("llama-13b", 5120, 40, 13824)],
)
def test_weights_line_matches_nf4_footprint_of_llama(preset: str, hidden: int, layers: int, inter: int) -> None:
    # Hand arithmetic, independent of the module's code path:
    # - each decoder layer has q,k,v,o (hidden x hidden) and gate, up, down (hidden x inter) linears;
    # - nf4 with double quant stores 4 bits per weight, one uint8 absmax per 64 weights, and one fp32
    #   second-level absmax per 256 blocks (the 16-entry codebook and the offset are a few bytes per tensor);
    # - embed_tokens and the untied lm_head (32000 x hidden each) and the 2 * layers + 1 RMSNorm weights stay bf16.
    linear_params = layers * (4 * hidden * hidden + 3 * hidden * inter)
    nf4 = linear_params * (0.5 + 1 / 64 + 4 / (64 * 256))
    bf16 = (2 * 32000 * hidden + (2 * layers + 1) * hidden) * 2
    expected = nf4 + bf16
    arch = arch_for(preset=preset)
    got = weights_bytes(arch, Settings(batch=1, seq=1, compute="bf16"))
    assert abs(got - expected) / expected < 0.02
    # And the parameter count is LLaMA's: 6.74B and 13.02B.
    assert arch.total_params == linear_params + 2 * 32000 * hidden + (2 * layers + 1) * hidden
    assert round(arch.total_params / 1e9, 2) == {"llama-7b": 6.74, "llama-13b": 13.02}[preset]


@pytest.fixture(scope="module")
def smollm2_nf4(embedded_model_dir: Path):
    from velora_cli.models.load import ModelSource, load_base_model

    return load_base_model(ModelSource("embedded", str(embedded_model_dir)), quantization="nf4")


@pytest.fixture(scope="module")
def smollm2_base(embedded_model_dir: Path):
    """Unquantised frozen base: its linears save nothing for backward, exactly like bitsandbytes' 4-bit ones
    (test_nf4_base_saves_the_same checks it), and bitsandbytes' CPU 4-bit matmul costs ~30 s per forward here."""
    from velora_cli.models.load import ModelSource, load_base_model

    return load_base_model(ModelSource("embedded", str(embedded_model_dir)), quantization="none")


@pytest.mark.slow
def test_weights_match_real_nf4_load_of_smollm2(smollm2_nf4, embedded_model_dir: Path) -> None:
    real = real_weight_bytes(smollm2_nf4)
    arch = arch_for(model=str(embedded_model_dir))
    est = weights_bytes(arch, Settings(batch=1, seq=1, compute="fp32", device="cpu"))
    assert arch.total_params == 134_515_008
    assert abs(est - real) / real < 0.001, (est, real)


def test_quantized_linear_layout() -> None:
    n_in, n_out = 4096, 4096
    n = n_in * n_out
    # double quant: nibbles + uint8 absmax per 64 + fp32 absmax per 256 blocks + offset + 16-entry code + 256-entry map
    assert (
        quantized_linear_bytes(n_in, n_out, "nf4", True, 2) == n // 2 + n // 64 + (n // 64 // 256) * 4 + 4 + 64 + 1024
    )
    assert quantized_linear_bytes(n_in, n_out, "nf4", False, 2) == n // 2 + n // 64 * 4 + 64
    assert quantized_linear_bytes(n_in, n_out, "int8", True, 2) == n + n_out * 4
    assert quantized_linear_bytes(n_in, n_out, "none", True, 2) == 2 * n


def test_optimizer_states() -> None:
    sizes = [8 * 4096, 8 * 4096, 100]
    assert optimizer_bytes(sizes, "adamw_torch") == 8 * sum(sizes)
    # 8-bit: uint8 x2 + fp32 absmax x2 per 256 elements; the 100-element tensor stays fp32 (min_8bit_size).
    expect = 2 * 256 * 4 + 2 * (2 * 32768 + 8 * math.ceil(32768 / 256)) + 8 * 100
    assert optimizer_bytes(sizes, "paged_adamw_8bit") == expect


# ---------------------------------------------------------------------------------------- activations


VELORA = {"off": (), "vd": ("v_proj", "down_proj"), "all": LLAMA_PROJECTIONS}


def _meter_bytes(base, velora: tuple[str, ...], dropout: float, batch: int, seq: int) -> tuple[int, object]:
    from peft import LoraConfig, get_peft_model

    from velora_cli.engine import VeloraConfig, apply_velora
    from velora_cli.engine.meter import ActivationMeter

    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=list(LLAMA_PROJECTIONS))
    model = get_peft_model(base, cfg)
    try:
        if velora:
            apply_velora(model, VeloraConfig(layers=list(velora), num_groups=32))
        model.train()
        ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
        with ActivationMeter(model) as meter:
            out = model(input_ids=ids, labels=ids)
        del out
        return meter.total_bytes, meter
    finally:
        model.unload()


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 64), (2, 128)])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("velora", ["off", "vd", "all"])
def test_activation_estimate_matches_meter(smollm2_base, velora: str, dropout: float, shape: tuple[int, int]) -> None:
    batch, seq = shape
    measured, _ = _meter_bytes(smollm2_base, VELORA[velora], dropout, batch, seq)
    arch = arch_for(preset="smollm2-135m")
    s = Settings(
        batch=batch, seq=seq, compute="fp32", device="cpu", lora_dropout=dropout, velora=VELORA[velora], num_groups=32
    )
    est = activations(arch, s).meter_view
    assert abs(est - measured) / measured < 0.05, (est, measured)


@pytest.mark.slow
def test_nf4_base_saves_the_same(smollm2_nf4) -> None:
    measured, _ = _meter_bytes(smollm2_nf4, VELORA["vd"], 0.05, 1, 32)
    arch = arch_for(preset="smollm2-135m")
    s = Settings(batch=1, seq=32, compute="fp32", device="cpu", lora_dropout=0.05, velora=VELORA["vd"])
    assert activations(arch, s).meter_view == pytest.approx(measured, rel=1e-6)


@pytest.mark.slow
def test_per_layer_terms_explain_the_meter(smollm2_base) -> None:
    """One middle decoder layer's bytes = the difference between two and three layers, per token, per setting."""
    layers = smollm2_base.model.layers
    arch = arch_for(preset="smollm2-135m")
    try:
        for velora in ("off", "vd"):
            for dropout in (0.0, 0.05):
                totals = []
                for n in (2, 3):
                    smollm2_base.model.layers = layers[:n]
                    totals.append(_meter_bytes(smollm2_base, VELORA[velora], dropout, 2, 32)[0])
                per_token = (totals[1] - totals[0]) / 64
                s = Settings(batch=2, seq=32, compute="fp32", device="cpu", lora_dropout=dropout, velora=VELORA[velora])
                assert sum(layer_activations(arch, s).values()) == pytest.approx(per_token, rel=1e-6)
    finally:
        smollm2_base.model.layers = layers


def test_velora_and_checkpointing_shrink_activations() -> None:
    arch = arch_for(preset="llama-7b")
    base = Settings(batch=4, seq=512, velora=())
    plain = estimate(arch, base)
    vel = estimate(arch, Settings(batch=4, seq=512))
    gc = estimate(arch, Settings(batch=4, seq=512, velora=(), gradient_checkpointing=True))
    assert vel.components["activations"] < plain.components["activations"]
    assert gc.components["activations"] < vel.components["activations"]
    # weights do not depend on the batch; activations scale linearly with it
    double = estimate(arch, Settings(batch=8, seq=512, velora=()))
    assert double.components["weights"] == plain.components["weights"]
    assert double.components["activations"] == pytest.approx(2 * plain.components["activations"], rel=1e-3)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_gpu_mem_json_and_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "est.json"
    code, out, err = run_cli(
        ["memory-estimate", "--preset", "llama-7b", "--batch", "4", "--seq", "512", "--gpu-mem", "24GiB",
         "--json", str(out_json)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert set(data["components"]) == set(COMPONENTS)
    assert data["total"] == sum(data["components"].values())
    assert data["settings"]["batch"] == 4 and data["settings"]["seq"] == 512
    arch = arch_for(preset="llama-7b")
    s = Settings(batch=4, seq=512, loss="chunked", lean_ops=True)  # the recipe's memory defaults
    best = largest_fitting(arch, s, 24 * 2**30, "batch")
    assert estimate(arch, dataclasses.replace(s, batch=best)).total <= 24 * 2**30
    assert estimate(arch, dataclasses.replace(s, batch=best + 1)).total > 24 * 2**30
    assert f"largest micro-batch at seq 512: {best}" in " ".join(out.split())
    assert "QLoRA + VeLoRA" in out and "GC" in out


def test_cli_recipe_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(
        tmp_path, "data: {path: x.json, cutoff_len: 256}\ntrain: {micro_batch_size: 2, batch_size: 8}\n"
    )
    out_json = tmp_path / "e.json"
    code, _, err = run_cli(
        ["memory-estimate", str(recipe), "--preset", "llama-13b", "--set", "lora.r=64", "--json", str(out_json)], capsys
    )
    assert code == 0, err
    settings = json.loads(out_json.read_text())["settings"]
    assert (settings["batch"], settings["seq"], settings["lora_r"], settings["model"]) == (2, 256, 64, "llama-13b")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "llama-7"], "unknown preset 'llama-7' (did you mean 'llama-7b'?)"),
        (["--preset", "llama-7b", "--gpu-mem", "24 bananas"], "--gpu-mem '24 bananas': expected a size"),
        (["--preset", "llama-7b", "--set", "lora.rank=8"], "unknown field 'lora.rank'"),
        (["missing.yaml"], "recipe not found: missing.yaml"),
    ],
)
def test_cli_bad_input(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["memory-estimate", *argv], capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_cli_bad_recipe_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path, "data: {path: x.json}\nlora: {r: 0}\n")
    code, _, err = run_cli(["memory-estimate", str(recipe), "--preset", "llama-7b"], capsys)
    assert code == 2 and "lora.r" in err and str(recipe) in err


@pytest.mark.parametrize(("text", "value"), [("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("40960 MiB", 40960 * 2**20)])
def test_parse_memory(text: str, value: int) -> None:
    assert parse_memory(text) == value


@pytest.mark.slow
def test_cli_measure_on_cpu(tmp_path: Path, embedded_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(
        tmp_path,
        f"model: {{name: {embedded_model_dir}}}\ndata: {{path: x.json, cutoff_len: 64}}\n"
        "train: {micro_batch_size: 1, batch_size: 1}\n",
    )
    out_json = tmp_path / "m.json"
    code, out, err = run_cli(["memory-estimate", str(recipe), "--measure", "--json", str(out_json)], capsys)
    assert code == 0, err
    measured = json.loads(out_json.read_text())["measured"]
    assert (
        abs(measured["estimated_saved_for_backward"] - measured["saved_for_backward"])
        < 0.05 * measured["saved_for_backward"]
    )
    assert measured["adapters"] == measured["gradients"] > 0
    assert measured["optimizer"] == 2 * measured["adapters"]
    assert "estimated vs measured" in out


@pytest.mark.parametrize("compute", ["bf16", "fp32"])
def test_quantized_stack_is_what_the_estimate_counts(tmp_path: Path, tiny_llama_dir: Path, compute: str) -> None:
    """The real nf4 + LoRA + VeLoRA stack in a GPU's compute dtype (bf16 runs on CPU too, slowly): the frozen
    embeddings and norms stay in that dtype (prepare_model_for_kbit_training's fp32 upcast is undone), so the
    residual stream - and every activation saved for backward - is bf16, and the meter equals the estimate."""
    from velora_cli.config.load import validate_recipe
    from velora_cli.engine.meter import ActivationMeter
    from velora_cli.models.build import build_training_model

    recipe = validate_recipe({
        "model": {"name": str(tiny_llama_dir), "quantization": "nf4", "compute_dtype": compute},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05},
        "velora": {"layers": ["v", "d"], "num_groups": 8},
        "data": {"path": str(tmp_path / "unused.json")},
        "output": {"dir": str(tmp_path / "run")},
    })  # fmt: skip
    model, _ = build_training_model(recipe, torch.device("cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[compute]
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad and p.is_floating_point()}
    assert frozen and set(frozen.values()) == {dtype}, frozen  # embeddings + norms; 4-bit weights are uint8
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # PEFT's fp32 adapters

    model.train()
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    with ActivationMeter(model) as meter:
        out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    assert {h.dtype for h in out.hidden_states} == {dtype}
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)

    arch = arch_for(model=str(tiny_llama_dir))
    s = Settings(
        batch=2, seq=32, compute=compute, device="cpu", lora_r=4, lora_dropout=0.05, velora=VELORA["vd"], num_groups=8,
        loss="chunked", lean_ops=True,  # the recipe's memory defaults
    )  # fmt: skip
    assert activations(arch, s).meter_view == pytest.approx(meter.total_bytes, rel=1e-3)


def test_cli_checkpointing_override_without_a_recipe(tmp_path: Path) -> None:
    """The recipe defaults behind --preset/--model are defaults, not choices: train.gradient_checkpointing=true
    (memory.checkpointing's alias) must not collide with a default memory.checkpointing."""
    out = tmp_path / "gc.json"
    main(["memory-estimate", "--preset", "llama-7b", "--set", "train.gradient_checkpointing=true", "--json", str(out)])
    plain = tmp_path / "plain.json"
    main(["memory-estimate", "--preset", "llama-7b", "--json", str(plain)])
    with_gc, without = json.loads(out.read_text()), json.loads(plain.read_text())
    assert with_gc["settings"]["checkpointing"] == "all"
    assert with_gc["components"]["activations"] < without["components"]["activations"] / 5
