"""Shared fixtures: the embedded pretrained model, a tiny random LLaMA, and ../shared when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Converted checkpoints go to a cache inside the checkout, so tests never write to the user's home
# and a second run reuses the conversion.
os.environ.setdefault("VELORA_CACHE", str(REPO / ".cache" / "velora"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once from its GGUF file to safetensors."""
    from velora_cli.config.presets import DEFAULT_MODEL
    from velora_cli.models.load import resolve_model

    return Path(resolve_model(DEFAULT_MODEL).path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Path:
    """A randomly initialised 2-layer LLaMA (hidden 64) with the real SmolLM2 tokenizer, saved to disk."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared (real MMLU and instruction data); tests using it skip in a fresh user clone."""
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared is not present beside the checkout")
    return SHARED


def _mount_tmpfs(target: Path, size_mib: int, readonly: bool = False) -> bool:
    import subprocess

    target.mkdir(parents=True, exist_ok=True)
    options = f"size={size_mib}m" + (",ro" if readonly else "")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    return result.returncode == 0


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A factory of small tmpfs file systems (MiB), unmounted afterwards; skips where mounting is not allowed."""
    import subprocess

    mounted: list[Path] = []

    def make(size_mib: int, readonly: bool = False) -> Path:
        target = tmp_path / f"disk{len(mounted)}"
        if not _mount_tmpfs(target, size_mib, readonly):
            pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
        mounted.append(target)
        return target

    yield make
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_run_recipe(run_dir: Path, base: str, **data) -> None:
    """recipe.yaml as `velora finetune` leaves it: a QLoRA run of `base` with `data` fields (alpaca by default)."""
    from velora_cli.config.load import dump_recipe, validate_recipe

    recipe = validate_recipe(
        {"name": run_dir.name, "model": {"name": base, "quantization": "nf4"}, "data": {"path": "x.json", **data}}
    )
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_lora_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """A finished QLoRA run on the tiny LLaMA, trained on the Alpaca prompt: a LoRA adapter on every projection
    with random, non-zero A and B (peft's init_lora_weights=False), so it changes what the model says."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR, init_lora_weights=False, task_type="CAUSAL_LM")
    run = tmp_path_factory.mktemp("runs") / "tiny-alpaca"
    get_peft_model(base, lora).save_pretrained(run)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(run)
    write_run_recipe(run, str(tiny_llama_dir))
    return run


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `velora ARGV` run in-process."""
    from velora_cli.cli import main

    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def c4_like(root: Path) -> Path:
    """A local copy laid out like allenai/c4: a dataset card naming subset `en` and its splits, gzipped JSON lines."""
    import gzip
    import json

    (root / "en").mkdir(parents=True)
    (root / "README.md").write_text("---\nconfigs:\n- config_name: en\n  data_files:\n  - split: train\n    path: "
                                    "en/c4-train.*.json.gz\n  - split: validation\n    path: en/c4-validation.*.json.gz"
                                    "\n---\n")  # fmt: skip
    for split, n in (("train", 30), ("validation", 8)):
        with gzip.open(root / "en" / f"c4-{split}.00000-of-00001.json.gz", "wt") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"{split} page {i}: the mill by the river {i % 5} " * 3}) + "\n")
    return root
