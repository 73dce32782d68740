"""How faithful `velora export --format gguf` is on the real SmolLM2-135M, read back by transformers' GGUF loader.

Builds a run directory with a LoRA r=8 adapter on all seven projections (B ~ N(0, 1e-3), so the merge changes
every weight), exports it merged in fp32 safetensors (the reference) and as GGUF of every type (f16, bf16, q8_0,
f32), and compares the next-token logits over the first 512 tokens of held-out text: the largest absolute
difference and how often the top-1 token agrees. As a yardstick, the same for the reference merely loaded in fp16
by transformers (what f16 rounding alone costs). Prints one JSON line; README.md quotes it. Takes a few minutes
on a 2-core CPU.

    python benchmarks/gguf_agreement.py [--text FILE] [--run RUN_DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct" / "alpaca_libre.json"
TOKENS = 512


def _make_run(run: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from velora_cli.config.load import dump_recipe, validate_recipe
    from velora_cli.config.presets import DEFAULT_MODEL
    from velora_cli.models.load import resolve_model

    base = resolve_model(DEFAULT_MODEL).path
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=8, target_modules=targets))
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            weight.data.normal_(0, 1e-3)
    model.save_pretrained(run)
    AutoTokenizer.from_pretrained(base).save_pretrained(run)
    data = {"path": "-", "template": "chat"}
    recipe = validate_recipe({"name": "gguf-agreement", "model": {"name": DEFAULT_MODEL}, "data": data})
    (run / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")


def _held_out_text(path: Path | None) -> str:
    if path is not None:
        return path.read_text(encoding="utf-8")
    rows = json.loads(SHARED.read_text(encoding="utf-8"))
    return "\n\n".join(row["output"] for row in rows[-40:])  # the file's last rows: no recipe trains on them here


def _compare(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    return {
        "max_abs_logit_diff": round((reference - other).abs().max().item(), 4),
        "top1_agreement": round((reference.argmax(-1) == other.argmax(-1)).float().mean().item(), 4),
    }


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, help="held-out text (default: the end of ../shared alpaca_libre.json)")
    parser.add_argument("--run", type=Path, help="a run directory to export (default: a fresh adapter run)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from velora_cli.export.gguf import QUANTS
    from velora_cli.export.merge import export_run

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or Path(tmp) / "run"
        if args.run is None:
            _make_run(run)
        merged = export_run(run, Path(tmp) / "merged", dtype="fp32")
        tokenizer = AutoTokenizer.from_pretrained(merged)
        text = _held_out_text(args.text)
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :TOKENS]
        reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(ids).logits[0]
        fp16 = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float16).float().eval()(ids).logits[0]
        result = {"tokens": ids.shape[1], "max_abs_logit": round(reference.abs().max().item(), 2),
                  "transformers_fp16": _compare(reference, fp16)}  # fmt: skip
        for quant in QUANTS:
            folder = export_run(run, Path(tmp) / quant, fmt="gguf", quant=quant)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32).eval()
            gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="model.gguf")
            same_tokens = gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
            result[quant] = {**_compare(reference, model(ids).logits[0]), "same_tokenization": same_tokens,
                             "file_bytes": (folder / "model.gguf").stat().st_size}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
