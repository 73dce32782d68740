"""`velora export`: the merged export computes what the adapter model computes, and bad input writes nothing.

Run directories are built here the way `velora finetune` leaves them: a PEFT LoRA adapter trained a few real
optimizer steps (against an NF4-quantised tiny LLaMA, as QLoRA does), its tokenizer and the resolved recipe.
The reference for every comparison is PeftModel over the same base loaded unquantised in fp32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from velora_cli.common.fs import write_json_atomic
from velora_cli.config.load import dump_recipe, validate_recipe
from velora_cli.config.presets import DEFAULT_MODEL
from velora_cli.export.merge import export_run
from velora_cli.export.options import parse_size
from velora_cli.rundir.layout import read_run_recipe

PROMPTS = [
    "The capital of France is",
    "Below is an instruction that describes a task.",
    "def fibonacci(n):",
]
TRAIN_TEXTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Below is an instruction that describes a task. Write a response that completes the request.",
]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# fp32 export vs unmerged adapter: both compute in fp32, only the summation order of W x + B(A x) differs.
FP32_TOL = 1e-4


def _train_run(
    base_dir: Path,
    run_dir: Path,
    *,
    quantization: str,
    steps: int,
    checkpoint_at: int | None = None,
    lr: float = 1e-2,
    model_name: str | None = None,
) -> Path:
    """Train a LoRA adapter for a few real AdamW steps and save it as a finetune run directory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from velora_cli.models.load import ModelSource, load_base_model

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = load_base_model(ModelSource(str(base_dir), str(base_dir)), quantization=quantization)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=ALL_LINEAR, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = tokenizer(TRAIN_TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for step in range(1, steps + 1):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == checkpoint_at:
            model.save_pretrained(run_dir / f"checkpoint-{step}")
    model.save_pretrained(run_dir)
    tokenizer.save_pretrained(run_dir)
    recipe = validate_recipe(
        {
            "name": run_dir.name,
            "model": {"name": model_name or str(base_dir), "quantization": quantization},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": list("qkvogud")},
            "data": {"path": "data/alpaca.json"},
            "train": {"max_steps": steps},
        }
    )
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    return run_dir


def _logits(model, tokenizer) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt")).logits[0].float() for p in PROMPTS]


def _greedy(model, tokenizer, new_tokens: int = 12) -> list[list[int]]:
    model.eval()
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")
            gen = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            out.append(gen[0, ids["input_ids"].shape[1] :].tolist())
    return out


def _adapter_model(base_dir: Path, adapter_path: Path):
    """The reference: the adapter, unmerged, over the unquantised fp32 base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_path)


def _load(path: Path, dtype: torch.dtype | str = "auto"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """QLoRA (nf4) adapter on the tiny LLaMA, 6 steps, with checkpoint-3, a summary and MMLU results."""
    run = _train_run(
        tiny_llama_dir, tmp_path_factory.mktemp("runs") / "tiny-qlora", quantization="nf4", steps=6, checkpoint_at=3
    )
    write_json_atomic(run / "summary.json", {"method": "qlora+velora", "steps": 6, "train_loss": 9.87654})
    write_json_atomic(run / "eval" / "mmlu.json", {"overall": {"accuracy": 0.2461, "n": 128}})
    return run


@pytest.fixture(scope="module")
def reference(tiny_run: Path, tiny_llama_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_run)
    model = _adapter_model(tiny_llama_dir, tiny_run)
    return model, tokenizer, _logits(model, tokenizer)


@pytest.fixture(scope="module")
def fp32_export(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_run(tiny_run, tmp_path_factory.mktemp("exports") / "fp32", dtype="fp32")


# ------------------------------------------------------------------------------------------ merged export


def test_fp32_export_reproduces_adapter_logits(fp32_export: Path, reference, tiny_llama_dir: Path) -> None:
    _, tokenizer, expected = reference
    model, export_tokenizer = _load(fp32_export)
    assert model.dtype == torch.float32
    got = _logits(model, export_tokenizer)
    assert _max_diff(got, expected) < FP32_TOL
    # The merge really happened: the base alone is far outside that tolerance.
    base, _ = _load(tiny_llama_dir, torch.float32)
    assert _max_diff(_logits(base, tokenizer), expected) > 1000 * FP32_TOL
    # The exported tokenizer is the run's.
    assert export_tokenizer(PROMPTS[0])["input_ids"] == tokenizer(PROMPTS[0])["input_ids"]


@pytest.mark.slow
def test_fp32_export_greedy_generation_matches(fp32_export: Path, reference) -> None:
    adapter_model, tokenizer, _ = reference
    model, export_tokenizer = _load(fp32_export)
    assert _greedy(model, export_tokenizer) == _greedy(adapter_model, tokenizer)


def test_export_files_config_and_model_card(fp32_export: Path, tiny_llama_dir: Path) -> None:
    names = {p.name for p in fp32_export.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= names
    assert not any(n.startswith("adapter_") for n in names)
    config = json.loads((fp32_export / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"
    assert config["architectures"] == ["LlamaForCausalLM"]
    card = (fp32_export / "README.md").read_text()
    assert f"Base model: `{tiny_llama_dir}`" in card
    assert "saved in fp32" in card
    assert "| train_loss | 9.877 |" in card  # summary.json
    assert "| overall.accuracy | 0.2461 |" in card  # eval/mmlu.json
    assert "quantization: nf4" in card  # the recipe, verbatim
    # No staging or backup directories are left beside the export.
    assert [p.name for p in fp32_export.parent.iterdir()] == ["fp32"]


def _bf16_rounding_error(base_dir: Path, tokenizer) -> float:
    """How far the base model's own logits move when it is loaded in bf16: the yardstick for a bf16 export."""
    fp32, _ = _load(base_dir, torch.float32)
    bf16, _ = _load(base_dir, torch.bfloat16)
    return _max_diff(_logits(bf16, tokenizer), _logits(fp32, tokenizer))


def _top1_agreement(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return torch.cat([(g.argmax(-1) == e.argmax(-1)).float() for g, e in zip(got, expected, strict=True)]).mean().item()


@pytest.mark.slow
def test_bf16_export_close_to_fp32_adapter(
    tiny_run: Path, fp32_export: Path, reference, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from safetensors import safe_open

    _, tokenizer, expected = reference
    out = export_run(tiny_run, tmp_path / "bf16", dtype="bf16")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config

    # Weights: the merge adds nothing beyond rounding to bf16 (unit roundoff u = 2^-8). PEFT adds the delta to the
    # base already rounded at load (error <= u|w|), itself rounded to bf16 (<= u|d|, |d| <= |w| + |r|), and
    # rounds the sum (<= u|r|); rounding the fp32 export once costs <= u|r|. So each weight is within
    # 2u (|w| + |r|) of the fp32 export rounded to bf16 (the |w| term matters where the delta cancels the base).
    with (
        safe_open(out / "model.safetensors", framework="pt") as f16,
        safe_open(fp32_export / "model.safetensors", framework="pt") as f32,
        safe_open(tiny_llama_dir / "model.safetensors", framework="pt") as f_base,
    ):
        assert set(f16.keys()) == set(f32.keys())
        for key in f16.keys():  # noqa: SIM118 (safe_open is not iterable)
            got, rounded = f16.get_tensor(key), f32.get_tensor(key).to(torch.bfloat16).float()
            assert got.dtype == torch.bfloat16
            bound = 2**-7 * (f_base.get_tensor(key).abs() + rounded.abs()) + 1e-12
            assert ((got.float() - rounded).abs() <= bound).all(), key

    # Logits: bf16 weights and bf16 compute move them by about as much as they move the base model itself when
    # it is loaded in bf16 (measured 0.0057 vs 0.0060 here, logits O(1)); 2x that still fails if the delta is
    # lost, since the adapter moves these logits by ~1.
    model, _ = _load(out)
    assert model.dtype == torch.bfloat16
    got = _logits(model, tokenizer)
    assert _max_diff(got, expected) < 2 * _bf16_rounding_error(tiny_llama_dir, tokenizer)
    assert _top1_agreement(got, expected) == 1.0


@pytest.mark.slow
def test_checkpoint_export_uses_that_adapter(tiny_run: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = export_run(tiny_run, tmp_path / "ckpt", dtype="fp32", checkpoint=3)
    model, tokenizer = _load(out)
    got = _logits(model, tokenizer)
    checkpoint_ref = _logits(_adapter_model(tiny_llama_dir, tiny_run / "checkpoint-3"), tokenizer)
    final_ref = _logits(_adapter_model(tiny_llama_dir, tiny_run), tokenizer)
    assert _max_diff(got, checkpoint_ref) < FP32_TOL
    assert _max_diff(got, final_ref) > 100 * FP32_TOL
    assert "`checkpoint-3`" in (out / "README.md").read_text()


def test_sharded_export_has_index_and_reloads(tiny_run: Path, fp32_export: Path, tmp_path: Path) -> None:
    out = export_run(tiny_run, tmp_path / "sharded", dtype="fp32", max_shard_size="4MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and set(index["weight_map"].values()) == set(shards)
    assert not (out / "model.safetensors").exists()
    # The embedding alone (49152 x 64 fp32 = 12.6 MB) exceeds 4 MB and gets a shard of its own; the rest obey it.
    assert sum(p.stat().st_size > 4_000_000 for p in out.glob("model-*.safetensors")) == 1
    sharded, tokenizer = _load(out)
    whole, _ = _load(fp32_export)
    assert _max_diff(_logits(sharded, tokenizer), _logits(whole, tokenizer)) == 0.0


def test_adapter_only_export_loads_with_peft(tiny_run: Path, reference, tiny_llama_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, expected = reference
    out = export_run(tiny_run, tmp_path / "adapter", adapter_only=True)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= names
    assert not any(n.startswith("model") for n in names)
    assert "library_name: peft" in (out / "README.md").read_text()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    assert _max_diff(_logits(model, AutoTokenizer.from_pretrained(out)), expected) == 0.0


def test_cli_export_prints_what_it_wrote(tiny_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    code, stdout, _ = run_cli(["export", str(tiny_run), "--out", str(out), "--dtype", "fp16"], capsys)
    assert code == 0
    assert f"exported merged fp16 model to {out}/" in stdout
    assert "model.safetensors" in stdout and "README.md" in stdout
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def test_force_replaces_only_after_success(tiny_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("old export")
    code, _, err = run_cli(["export", str(tiny_run), "--out", str(out)], capsys)
    assert code == 2
    assert err.strip() == f"error: --out {out}: directory exists and is not empty; pass --force to replace it"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    # A failure while saving leaves the old export untouched and no staging directory behind.
    from transformers import PreTrainedModel

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedModel, "save_pretrained", broken_save)
        with pytest.raises(OSError, match="disk full"):
            export_run(tiny_run, out, dtype="fp32", force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]

    assert export_run(tiny_run, out, dtype="fp32", force=True) == out
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]


def test_default_out_is_inside_the_run(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert export_run(run, dtype="fp32") == run / "merged"
    assert export_run(run, adapter_only=True, checkpoint=3) == run / "adapter-checkpoint-3"
    assert (run / "merged" / "model.safetensors").is_file()


@pytest.mark.slow
def test_pre_quantised_base_is_dequantised(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A base saved in bnb 4-bit (like *-bnb-4bit hub models) is exported without quantization_config."""
    from velora_cli.models.load import ModelSource, load_base_model

    quantised = tmp_path / "base-nf4"
    load_base_model(ModelSource("tiny", str(tiny_llama_dir)), quantization="nf4").save_pretrained(quantised)
    shutil.copy(tiny_llama_dir / "tokenizer.json", quantised)
    shutil.copy(tiny_llama_dir / "tokenizer_config.json", quantised)
    assert "quantization_config" in json.loads((quantised / "config.json").read_text())
    run = _train_run(quantised, tmp_path / "run", quantization="nf4", steps=2)
    out = export_run(run, tmp_path / "out", dtype="fp32")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    model, tokenizer = _load(out)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    # Reference: the adapter over the same base, dequantised by transformers.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(quantised, dtype=torch.float32).dequantize(dtype=torch.float32)
    expected = _logits(PeftModel.from_pretrained(base, run), tokenizer)
    assert _max_diff(_logits(model, tokenizer), expected) < FP32_TOL


# ------------------------------------------------------------------------------------------------ errors


def _bad_base_run(tiny_run: Path, tmp_path: Path, name: str) -> Path:
    run = tmp_path / "run-bad-base"
    shutil.copytree(tiny_run, run)
    recipe = read_run_recipe(run)
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"name": name})})
    (run / "recipe.yaml").write_text(dump_recipe(recipe))
    return run


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no-adapter", "{run}: no adapter found (adapter_config.json missing); is this a finished finetune run?"),
        ("missing-run", "{run}: run directory not found"),
        ("bad-dtype", "--dtype 'int4': expected one of bf16, fp16, fp32"),
        ("bad-shard", "--max-shard-size 'lots': expected a size such as 5GB, 500MB or 2GiB"),
        ("no-checkpoint", "{run}: no adapter in checkpoint-9 (checkpoints: checkpoint-3)"),
        ("missing-base", "model directory not found: {base}"),
        ("hub-base-offline", "model 'velora-test/no-such-model': not in the local Hugging Face cache"),
        ("into-run", "--out {run}: would replace the run directory {run} itself; choose another path"),
    ],
)
def test_errors_exit_2_with_one_line_and_write_nothing(
    case: str, expected: str, tiny_run: Path, tmp_path: Path, capsys
) -> None:
    run, out, extra = tiny_run, tmp_path / "out", []
    base = tmp_path / "gone"
    if case == "no-adapter":
        run = tmp_path / "empty-run"
        run.mkdir()
    elif case == "missing-run":
        run = tmp_path / "nope"
    elif case == "bad-dtype":
        extra = ["--dtype", "int4"]
    elif case == "bad-shard":
        extra = ["--max-shard-size", "lots"]
    elif case == "no-checkpoint":
        extra = ["--checkpoint", "9"]
    elif case == "missing-base":
        run = _bad_base_run(tiny_run, tmp_path, str(base))
    elif case == "hub-base-offline":
        run = _bad_base_run(tiny_run, tmp_path, "velora-test/no-such-model")
    elif case == "into-run":
        out, extra = tiny_run, ["--force"]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = run_cli(["export", str(run), "--out", str(out), *extra], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + expected.format(run=run, base=base)), err
    assert stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, not even a staging dir
    assert not (tmp_path / "out").exists()
    assert (tiny_run / "adapter_model.safetensors").is_file()


def test_non_finite_adapter_is_refused(tiny_run: Path, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    run = tmp_path / "diverged"
    shutil.copytree(tiny_run, run)
    weights = load_file(run / "adapter_model.safetensors")
    key = next(k for k in weights if "layers.1.mlp.down_proj.lora_B" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, run / "adapter_model.safetensors")
    code, _, err = run_cli(["export", str(run), "--out", str(tmp_path / "out")], capsys)
    assert code == 1
    assert err.startswith(f"error: {run}: adapter weight ") and "layers.1.mlp.down_proj.lora_B" in err
    assert "not finite (NaN/inf); the run diverged" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diverged"]


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500 mb") == 500 * 10**6
    assert parse_size(1234) == 1234


# ------------------------------------------------------------------------------------- embedded real model


@pytest.mark.slow
def test_embedded_model_export_matches_adapter(embedded_model_dir: Path, tmp_path: Path) -> None:
    """A LoRA adapter on the real SmolLM2-135M (base converted from GGUF): fp32 and bf16 exports."""
    from transformers import AutoTokenizer

    run = _train_run(
        embedded_model_dir, tmp_path / "smol-lora", quantization="none", steps=2, lr=1e-3, model_name=DEFAULT_MODEL
    )

    reference = _adapter_model(embedded_model_dir, run)
    tokenizer = AutoTokenizer.from_pretrained(run)
    expected = _logits(reference, tokenizer)

    fp32 = export_run(run, tmp_path / "fp32", dtype="fp32")
    assert "Base model: `embedded:smollm2-135m`" in (fp32 / "README.md").read_text()
    merged, _ = _load(fp32)
    got = _logits(merged, tokenizer)
    # Real 135M model: logits up to ~36 through 30 layers of fp32 reassociation; measured 7e-5.
    assert _max_diff(got, expected) < 5 * FP32_TOL
    base, _ = _load(embedded_model_dir, torch.float32)
    assert _max_diff(_logits(base, tokenizer), expected) > 1.0  # the adapter's effect (measured 8.6)
    assert _greedy(merged, tokenizer) == _greedy(reference, tokenizer)
    del merged, base

    bf16 = export_run(run, tmp_path / "bf16", dtype="bf16")
    model, _ = _load(bf16)
    got = _logits(model, tokenizer)
    # 30 layers of bf16 weights and compute move these O(30) logits by ~2 (the base alone moves by ~1.7 when loaded
    # in bf16; measured 2.4 for the export), while the adapter moved them by ~8.6. Top-1 agreement is what a user
    # sees; measured 20/20.
    assert _max_diff(got, expected) < 2 * _bf16_rounding_error(embedded_model_dir, tokenizer)
    assert _top1_agreement(got, expected) >= 0.9
