"""`velora export`: turn a run's LoRA adapter into weights that any transformers loader can serve.

The merged export is the base model reloaded WITHOUT quantisation in the chosen dtype, with the LoRA delta
(B @ A * alpha / r) added to every adapted weight by PEFT's `merge_and_unload`, then saved by
`save_pretrained` as (sharded) safetensors + config + generation config, with the run's tokenizer and a
model card (README.md). VeLoRA only changed how gradients were computed during training, so nothing of it
is left to merge: the exported model computes base + LoRA, exactly what PeftModel over the same base does.

With `--format gguf` the merge is done in fp32 and handed to gguf_export.py (one .gguf file for llama.cpp and an
Ollama Modelfile) instead of `save_pretrained`. The exported tokenizer carries the chat template the run trained with
(templates.py): an Alpaca run's export is prompted with the Alpaca prompt by any server that applies it.

What the export reproduces: the adapter applied to the *unquantised* base. A QLoRA run trained the adapter
against the NF4-dequantised base, so the export differs from the training-time forward pass by the base's
quantisation error; this is the standard QLoRA deployment (serve a full-precision merged model).

Peak host memory, and why there is no custom layer-by-layer merger: the base is loaded directly in the export
dtype (from_pretrained converts while reading the memory-mapped safetensors), the adapter is loaded in fp32
(~1% of the model), and PEFT merges in place, one weight at a time (`W += B @ A * scale`; the only temporary is
one layer's fp32 delta). So the peak is one copy of the model in the export dtype plus the adapter plus one
layer, plus the page cache of the checkpoint being read, which is file-backed and reclaimable but counted in
RSS while mapped. `python benchmarks/export_memory.py --dtype bf16` (SmolLM2-135M, fp32 checkpoint, RssAnon
sampled every 20 ms) measured the anonymous peak at 1.03x the exported weights above the baseline (0.79x for
fp32, where unmodified weights stay backed by the mapped file), and file-backed RSS at ~0.6 GiB. A streaming
merger could only save the one in-memory copy, at the price of re-implementing the loading, weight tying and
sharding that transformers already does.

Nothing is half-written: everything goes to a hidden staging directory beside the target, which is renamed
into place at the end; with --force the old export is only moved away once the new one is complete, and what a
killed export left behind is cleaned up by the next one (runs.recover_staged). The base model's own code
(`auto_map`) runs only with --trust-remote-code on the command line, never because a recipe.yaml in the run
directory says so: the run directory may come from someone else.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from velora_cli.description import RunDescription
from velora_cli.device import DTYPES, dtype_name
from velora_cli.errors import UsageError, VeloraError
from velora_cli.memstats import human_bytes, parse_bytes
from velora_cli.models import ModelSource, first_line, load_config, load_unquantized_base, resolve_model
from velora_cli.recipe import read_run_recipe
from velora_cli.runs import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MMLU_FILE,
    MODEL_CONFIG,
    RECIPE_FILE,
    SUMMARY_FILE,
    RunSummary,
    adapter_dir,
    staged_dir,
)
from velora_cli.templates import PromptStyle, served_chat_template, style_of_recipe
from velora_cli.validate import OutputError, check_writable

DEFAULT_DIR = "merged"
FORMATS = ("safetensors", "gguf")
TOKENIZER_MARKERS = ("tokenizer_config.json", "tokenizer.json")
_CARD_ROWS = 40  # model-card tables stop here; the full JSON stays in the run directory


def parse_size(text: str | int) -> int:
    """`5GB`, `500MB`, `2GiB` or a byte count -> bytes (checked before anything is loaded)."""
    return parse_bytes(text, "--max-shard-size", "5GB, 500MB or 2GiB")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ------------------------------------------------------------------------------------------------ progress


class _Steps:
    """One rich progress task whose description says which stage the export is in."""

    def __init__(self, progress: Any, total: int) -> None:
        self.progress = progress
        self.task = progress.add_task("export", total=total)
        self.started = False

    def start(self, description: str) -> None:
        if self.started:
            self.progress.advance(self.task)
        self.started = True
        self.progress.update(self.task, description=description)

    def finish(self) -> None:
        self.progress.update(self.task, completed=self.progress.tasks[self.task].total)


@contextmanager
def _steps(total: int) -> Iterator[_Steps]:
    """A progress display on stderr (on a terminal only) whose task says which step the export is in."""
    console = Console(stderr=True)
    own = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        # In a log file or a pipe a live display is noise (and leaves blank lines before an error line).
        disable=not console.is_terminal,
    )
    with own:
        yield _Steps(own, total)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own tqdm bars would interleave with ours; silence them for the export only."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------ target handling


def default_out(run_dir: Path, checkpoint: int | None, adapter_only: bool, fmt: str = "safetensors") -> Path:
    name = "adapter" if adapter_only else "gguf" if fmt == "gguf" else DEFAULT_DIR
    return run_dir / (name if checkpoint is None else f"{name}-checkpoint-{checkpoint}")


def _check_target(target: Path, run_dir: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise OutputError(f"--out {target}: exists and is a file")
    resolved, run = target.resolve(), run_dir.resolve()
    if resolved == run or resolved in run.parents:
        raise UsageError(f"--out {target}: would replace the run directory {run_dir} itself; choose another path")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise UsageError(f"--out {target}: directory exists and is not empty; pass --force to replace it")


# ------------------------------------------------------------------------------------------------- merging


def _load_adapter(model, adapter_path: Path):
    from peft import PeftModel

    # Not low_cpu_mem_usage=True: with it, peft 0.21 materialises the adapter in the base dtype and upcasts
    # afterwards, so a bf16 export would merge an adapter rounded to bf16 (tests/test_export.py checks the merged
    # weights against the fp32 merge). The adapter is ~1% of the model; loading it in fp32 costs nothing that matters.
    try:
        return PeftModel.from_pretrained(model, adapter_path, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise VeloraError(f"{adapter_path}: adapter does not fit the base model: {first_line(exc)}") from exc


def _merge(peft_model, adapter_path: Path):
    # A diverged run can save NaN/inf adapter weights; say so instead of exporting a broken model. Checking the
    # adapter (~1% of the model) replaces PEFT's safe_merge, which clones and scans every merged weight: measured
    # on SmolLM2-135M bf16, safe_merge raised the merge's anonymous-memory peak from 1.26x to 1.95x the model
    # and took 3x as long.
    for name, param in peft_model.named_parameters():
        if "lora_" in name and not torch.isfinite(param).all():
            raise VeloraError(f"{adapter_path}: adapter weight {name} is not finite (NaN/inf); the run diverged")
    return peft_model.merge_and_unload()


def _check_format(fmt: str, quant: str | None, adapter_only: bool) -> str | None:
    """The GGUF quantisation asked for (None for safetensors); UsageError for options that do not go together."""
    from velora_cli.gguf_export import QUANTS

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "safetensors":
        if quant is not None:
            raise UsageError("--quant applies to --format gguf; safetensors exports take --dtype")
        return None
    if adapter_only:
        raise UsageError("--adapter-only copies the PEFT adapter; it cannot be combined with --format gguf")
    if (quant or "f16") not in QUANTS:
        raise UsageError(f"--quant {quant!r}: expected one of {', '.join(QUANTS)}")
    return quant or "f16"


def _run_tokenizer(dirs: list[Path], source: ModelSource | None, trust_remote_code: bool, style: PromptStyle):
    """The tokenizer the run saved (checkpoint first, then the run), else the base model's, carrying the chat
    template the run trained with (templates.py: an Alpaca run's export is prompted with the Alpaca prompt)."""
    from transformers import AutoTokenizer

    where = next((d for d in dirs if any((d / m).is_file() for m in TOKENIZER_MARKERS)), None)
    path = str(where) if where is not None else source.path if source is not None else None
    if path is None:
        raise UsageError(f"{dirs[-1]}: no tokenizer files in the run directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise UsageError(f"cannot load tokenizer from {path}: {first_line(exc)}") from exc
    tokenizer.chat_template = served_chat_template(style, tokenizer)
    return tokenizer


def _save_tokenizer(tokenizer, staging: Path) -> None:
    tokenizer.save_pretrained(staging)


# ---------------------------------------------------------------------------------------------- model card


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
            'base = AutoModelForCausalLM.from_pretrained("BASE_MODEL")',
            'model = PeftModel.from_pretrained(base, "THIS_DIR")',
            'tokenizer = AutoTokenizer.from_pretrained("THIS_DIR")',
            "```",
        ]
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


# ------------------------------------------------------------------------------------------------------ API


def export_run(
    run_dir: Path,
    out: Path | None = None,
    *,
    dtype: str = "bf16",
    checkpoint: int | None = None,
    max_shard_size: str | int = "5GB",
    adapter_only: bool = False,
    force: bool = False,
    trust_remote_code: bool = False,
    fmt: str = "safetensors",
    quant: str | None = None,
) -> Path:
    """Export a run's adapter (merged into its base, or as is with `adapter_only`) as safetensors, or the merged
    model as GGUF (`fmt="gguf"`, `quant` f16 | bf16 | q8_0 | f32, with an Ollama Modelfile); return the export dir.

    Every input problem raises UsageError before anything is written.
    """
    from velora_cli.lock import run_lock

    args = (run_dir, out, dtype, checkpoint, max_shard_size, adapter_only, force, trust_remote_code, fmt, quant)
    # Options first and only a run gets a lock file: a typo'd directory or option must leave no .velora.lock behind.
    parse_dtype(dtype), parse_size(max_shard_size), _check_format(fmt, quant, adapter_only)
    if (Path(run_dir) / RECIPE_FILE).is_file():
        with run_lock(Path(run_dir)):
            return _export_run(*args)
    return _export_run(*args)


def _export_run(run_dir, out, dtype, checkpoint, max_shard_size, adapter_only, force, trust, fmt, quant) -> Path:  # noqa: PLR0913
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: run directory not found")
    torch_dtype = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    gguf_quant = _check_format(fmt, quant, adapter_only)
    if not adapter_only and _full_model_dir(run_dir, checkpoint) is not None:
        if gguf_quant is not None:
            raise UsageError(f"--format gguf: {run_dir} is a full-training run; export safetensors first, then "
                             "convert that directory with llama.cpp's convert_hf_to_gguf.py")  # fmt: skip
        return _export_full(run_dir, out, torch_dtype, checkpoint, shard_bytes, force)
    adapter_path = adapter_dir(run_dir, checkpoint)
    if not (adapter_path / ADAPTER_WEIGHTS).is_file():
        raise UsageError(f"{adapter_path}: {ADAPTER_WEIGHTS} missing beside {ADAPTER_CONFIG}")
    recipe = read_run_recipe(run_dir)
    target = Path(out) if out is not None else default_out(run_dir, checkpoint, adapter_only, fmt)
    _check_target(target, run_dir, force)
    check_writable(target, "--out", directory=True)
    # Resolve the base and read its config and tokenizer now, so an unavailable base (or one the GGUF writer does
    # not know) fails before anything is written.
    source = resolve_model(recipe.model.name)
    base_config = load_config(source, trust_remote_code=trust)
    style = style_of_recipe(recipe)
    tokenizer = _run_tokenizer([adapter_path, run_dir], source, trust, style)
    if gguf_quant is not None:
        from velora_cli import gguf_export

        vocab = gguf_export.check(base_config, tokenizer, recipe.model.name)
        torch_dtype = torch.float32  # merged in fp32, so the weights are rounded once, to the GGUF type

    with staged_dir(target) as staging, _quiet_transformers(), _steps(total=2 if adapter_only else 5) as steps:
        if adapter_only:
            steps.start(f"copying adapter from {adapter_path}")
            for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.copy2(adapter_path / name, staging / name)
        else:
            steps.start(f"loading {recipe.model.name} ({dtype_name(torch_dtype)})")
            model = load_unquantized_base(source, base_config, torch_dtype, trust)
            steps.start(f"loading adapter from {adapter_path}")
            peft_model = _load_adapter(model, adapter_path)
            steps.start("merging LoRA into the base weights")
            merged = _merge(peft_model, adapter_path)
            merged.config.use_cache = True
            if gguf_quant is not None:
                steps.start(f"writing {gguf_quant} GGUF and Modelfile")
                name = recipe.name or run_dir.name
                gguf_export.write_export(merged, vocab, staging, gguf_quant, name, style, tokenizer)
            else:
                steps.start(f"saving {dtype} safetensors")
                merged.save_pretrained(staging, max_shard_size=shard_bytes)
            del merged, peft_model, model
        if gguf_quant is None:  # a GGUF file carries its tokenizer; the card's loading code is for transformers
            steps.start("saving tokenizer and model card")
            _save_tokenizer(tokenizer, staging)
            card = model_card(
                recipe=recipe,
                recipe_text=(run_dir / RECIPE_FILE).read_text(encoding="utf-8"),
                run_dir=run_dir,
                adapter_path=adapter_path,
                dtype=None if adapter_only else dtype_name(torch_dtype),
                adapter_only=adapter_only,
            )
            (staging / "README.md").write_text(card, encoding="utf-8")
        steps.finish()
    return target


def _full_model_dir(run_dir: Path, checkpoint: int | None) -> Path | None:
    """A method full/pretrain run holds a whole model (config.json, no adapter): where, or None."""
    path = run_dir / f"checkpoint-{checkpoint}" if checkpoint is not None else run_dir
    has_model = (path / MODEL_CONFIG).is_file() and not (path / ADAPTER_CONFIG).is_file()
    return path if has_model and (run_dir / RECIPE_FILE).is_file() else None


def _export_full(run_dir: Path, out: Path | None, dtype: torch.dtype, checkpoint: int | None, shard: int, force: bool):
    """A full/pretrain run: nothing to merge; the model is loaded in `dtype` and saved again (methods.py)."""
    from velora_cli.methods import export_full_model, full_model_card

    recipe = read_run_recipe(run_dir)
    target = Path(out) if out is not None else default_out(run_dir, checkpoint, False)
    _check_target(target, run_dir, force)
    recipe_text = (run_dir / RECIPE_FILE).read_text(encoding="utf-8")
    card = full_model_card(recipe, recipe_text, run_dir, dtype_name(dtype))
    with _quiet_transformers():
        return export_full_model(_full_model_dir(run_dir, checkpoint), target, dtype, shard, card)


def run_export(
    run_dir: Path,
    *,
    out: Path | None = None,
    dtype: str = "bf16",
    checkpoint: int | None = None,
    max_shard_size: str = "5GB",
    adapter_only: bool = False,
    force: bool = False,
    trust_remote_code: bool = False,
    fmt: str = "safetensors",
    quant: str | None = None,
) -> None:
    """`velora export`: export, then say what was written."""
    target = export_run(
        run_dir,
        out,
        dtype=dtype,
        checkpoint=checkpoint,
        max_shard_size=max_shard_size,
        adapter_only=adapter_only,
        force=force,
        trust_remote_code=trust_remote_code,
        fmt=fmt,
        quant=quant,
    )
    kind = "adapter" if adapter_only else f"{quant or 'f16'} GGUF" if fmt == "gguf" else f"merged {dtype} model"
    typer.echo(f"exported {kind} to {target}/")
    for path in sorted(target.iterdir()):
        if path.is_file():
            typer.echo(f"  {path.name:<40} {human_bytes(path.stat().st_size):>12}")
