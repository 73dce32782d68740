"""Model cards: the README.md written beside an exported model, saying how it was trained and what it scored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from velora_cli.config.description import RunDescription
from velora_cli.rundir.layout import (
    MMLU_FILE,
    SUMMARY_FILE,
)
from velora_cli.rundir.summary import RunSummary

_CARD_ROWS = 40  # model-card tables stop here; the full JSON stays in the run directory


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a damaged summary must not block an export; the card just leaves it out


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, dict):
        rows: list[tuple[str, Any]] = []
        for key, value in data.items():
            rows.extend(_flatten(value, f"{prefix}{key}."))
        return rows
    if isinstance(data, list):
        return [(prefix[:-1], f"[{len(data)} items]")] if data else []
    return [(prefix[:-1], data)]


def _table(data: Any, source: str) -> str:
    rows = _flatten(data)
    lines = ["| field | value |", "|---|---|"]
    for key, value in rows[:_CARD_ROWS]:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown.replace('|', '/')} |")
    if len(rows) > _CARD_ROWS:
        lines.append(f"\n({len(rows) - _CARD_ROWS} more fields in the run's {source})")
    return "\n".join(lines)


def model_card(
    *, recipe, recipe_text: str, run_dir: Path, adapter_path: Path, dtype: str | None, adapter_only: bool
) -> str:
    """README.md for the export: what it is, how to load it, how it was trained and how it scored."""
    base = recipe.model.name
    name = recipe.name or run_dir.name
    quantised = recipe.model.quantization != "none"
    hub_base = not (base.startswith(("embedded:", "gguf:", ".", "/", "~")) or Path(base).exists())
    front = ["---", "library_name: " + ("peft" if adapter_only else "transformers")]
    if hub_base:
        front.append(f"base_model: {base}")
    front += ["tags:", "- velora", "- lora", "- qlora" if quantised else "- peft", "---"]
    where = "the final adapter" if adapter_path == run_dir else f"`{adapter_path.name}`"
    description = RunDescription.of(recipe)
    velora = description.velora
    lines = [
        *front,
        "",
        f"# {name}",
        "",
        f"Base model: `{base}`. LoRA {description.lora.text()}; trained "
        + ("on the unquantised base" if not quantised else f"with the base quantised to {recipe.model.quantization}")
        + (
            f" and VeLoRA activation compression on {', '.join(velora.layers)} (init {velora.init}, {velora.grouping})."
            if velora.enabled
            else "."
        ),
        "",
    ]
    if adapter_only:
        lines += [
            f"This directory holds the PEFT adapter ({where} of run `{run_dir.name}`), as trained. Load it over the "
            "unquantised base model:",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base if hub_base else "BASE_MODEL"}")',
            'model = PeftModel.from_pretrained(base, "THIS_DIR")',
            'tokenizer = AutoTokenizer.from_pretrained("THIS_DIR")',
            "```",
        ]
        if not hub_base:
            lines += ["", f"BASE_MODEL: `{base}` as velora resolves it (`velora generate THIS_DIR --prompt ...` "
                      "loads both for you)."]  # fmt: skip
    else:
        lines += [
            f"This directory holds the base model with {where} of run `{run_dir.name}` merged in, saved in {dtype}. "
            "VeLoRA only changes how gradients are computed, so the merged weights are base + LoRA delta and "
            "load with any transformers-compatible tool:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("THIS_DIR")',
            'tokenizer = AutoTokenizer.from_pretrained("THIS_DIR")',
            "```",
        ]
        if quantised:
            lines += [
                "",
                "The adapter was trained against the quantised base and merged into the unquantised one (the usual "
                "QLoRA deployment), so outputs match the adapter applied to the full-precision base.",
            ]
    summary = RunSummary.load(run_dir)
    if summary is not None:
        lines += ["", "## Training summary", "", _table(summary.as_dict(), SUMMARY_FILE)]
    mmlu = _read_json(run_dir / MMLU_FILE)
    if mmlu is not None:
        lines += ["", "## Evaluation: MMLU", "", _table(mmlu, MMLU_FILE)]
    lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


def full_model_card(recipe, recipe_text: str, run_dir: Path, dtype_name: str) -> str:
    v = recipe.velora
    how = "pre-trained from a fresh initialisation" if recipe.method == "pretrain" else "fully fine-tuned"
    base = recipe.model.config if recipe.method == "pretrain" else recipe.model.name
    velora = f" with VeLoRA on {', '.join(v.module_names)} (num_groups {v.num_groups})" if v.enabled else ""
    return "\n".join([
        "---", "library_name: transformers", "tags:", "- velora", f"- {recipe.method}", "---", "",
        f"# {recipe.name or run_dir.name}", "",
        f"`{base}` {how}{velora}; every weight trained. Saved in {dtype_name}.", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        'model = AutoModelForCausalLM.from_pretrained("THIS_DIR")', "```", "",
        "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", "",
    ])  # fmt: skip


def make_adapter_portable(directory: Path, recipe, recipe_text: str, run_dir: Path) -> None:
    """What PEFT's save_pretrained leaves, made to travel: adapter_config.json names the base as the user wrote it
    (PEFT writes the path it was loaded from, a cache folder on this machine for a converted or local model), and
    README.md is this run's model card instead of PEFT's blank template."""
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = recipe.model.name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    card = model_card(recipe=recipe, recipe_text=recipe_text, run_dir=run_dir, adapter_path=run_dir, dtype=None,
                      adapter_only=True)  # fmt: skip
    (directory / "README.md").write_text(card, encoding="utf-8")
