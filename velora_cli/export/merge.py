"""`velora export`: turn a run's LoRA adapter into weights that any transformers loader can serve.

The merged export is the base model reloaded WITHOUT quantisation in the chosen dtype, with the LoRA delta
(B @ A * alpha / r) added to every adapted weight by PEFT's `merge_and_unload`, then saved by
`save_pretrained` as (sharded) safetensors + config + generation config, with the run's tokenizer and a
model card (README.md). VeLoRA only changed how gradients were computed during training, so nothing of it
is left to merge: the exported model computes base + LoRA, exactly what PeftModel over the same base does.

With `--format gguf` the merge is done in fp32 and handed to export/gguf.py (one .gguf file for llama.cpp and an
Ollama Modelfile) instead of `save_pretrained`. The exported tokenizer carries the chat template the run trained with
(data/templates.py): an Alpaca run's export is prompted with the Alpaca prompt by any server that applies it.

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
killed export left behind is cleaned up by the next one (common.fs.recover_staged). The base model's own code
(`auto_map`) runs only with --trust-remote-code on the command line, never because a recipe.yaml in the run
directory says so: the run directory may come from someone else.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from velora_cli.common.device import dtype_name
from velora_cli.common.errors import UsageError, VeloraError
from velora_cli.common.fs import check_writable, staged_dir
from velora_cli.common.memstats import human_bytes
from velora_cli.config.recipe import Recipe
from velora_cli.data.templates import PromptStyle, served_chat_template, style_of_recipe
from velora_cli.export.card import model_card
from velora_cli.export.full import export_full, full_model_dir
from velora_cli.export.modelfile import modelfile
from velora_cli.export.options import CheckedOptions, ExportOptions, check_target, default_out, quiet_transformers
from velora_cli.models.load import ModelSource, first_line, load_config, load_unquantized_base, resolve_model
from velora_cli.rundir.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    RECIPE_FILE,
    adapter_dir,
    read_run_recipe,
)
from velora_cli.rundir.ownership import EXPORT_MARKER, claim
from velora_cli.rundir.verify import check_weights

TOKENIZER_MARKERS = ("tokenizer_config.json", "tokenizer.json")


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


def _run_tokenizer(dirs: list[Path], source: ModelSource | None, trust_remote_code: bool, style: PromptStyle):
    """The tokenizer the run saved (checkpoint first, then the run), else the base model's, carrying the chat
    template the run trained with (data/templates.py: an Alpaca run's export is prompted with the Alpaca prompt)."""
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


def export_run(run_dir: Path, out: Path | None = None, options: ExportOptions | None = None, *,
               recipe: Recipe | None = None, source: ModelSource | None = None, **kwargs: Any) -> Path:
    """Export a run's adapter (merged into its base, or as is with `adapter_only`) as safetensors, or the merged
    model as GGUF (`fmt="gguf"`, `quant` f16 | bf16 | q8_0 | f32, with an Ollama Modelfile); return the export dir.
    Options: an ExportOptions, or its fields as keywords. `recipe` / `source`: the run's recipe and resolved base
    model when the caller holds them (the pipeline's export stage), else read from RUN_DIR/recipe.yaml and resolved.

    Every input problem raises UsageError before anything is written.
    """
    from velora_cli.rundir.lock import run_lock

    options = options or ExportOptions(**kwargs)
    if out is not None:
        options = replace(options, out=out)
    # Options first and only a run gets a lock file: a typo'd directory or option must leave no .velora.lock behind.
    checked = options.checked()
    if (Path(run_dir) / RECIPE_FILE).is_file():
        with run_lock(Path(run_dir)):
            return _export_run(Path(run_dir), options, checked, recipe, source)
    return _export_run(Path(run_dir), options, checked, recipe, source)


def _export_run(run_dir: Path, options: ExportOptions, checked: CheckedOptions, recipe: Recipe | None,
                source: ModelSource | None) -> Path:
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: run directory not found")
    torch_dtype, gguf_quant, adapter_only = checked.dtype, checked.gguf_quant, options.adapter_only
    checkpoint, trust = options.checkpoint, options.trust_remote_code
    if not adapter_only and full_model_dir(run_dir, checkpoint) is not None:
        if gguf_quant is not None:
            raise UsageError(f"--format gguf: {run_dir} is a full-training run; export safetensors first, then "
                             "convert that directory with llama.cpp's convert_hf_to_gguf.py")  # fmt: skip
        return export_full(run_dir, options.out, torch_dtype, checkpoint, checked.shard_bytes, options.force, recipe)
    adapter_path = adapter_dir(run_dir, checkpoint)
    if not (adapter_path / ADAPTER_WEIGHTS).is_file():
        raise UsageError(f"{adapter_path}: {ADAPTER_WEIGHTS} missing beside {ADAPTER_CONFIG}")
    check_weights(adapter_path)
    recipe = recipe or read_run_recipe(run_dir)
    fmt = options.fmt
    target = Path(options.out) if options.out is not None else default_out(run_dir, checkpoint, adapter_only, fmt)
    check_target(target, run_dir, options.force)
    check_writable(target, "--out", directory=True)
    # Resolve the base and read its config and tokenizer now, so an unavailable base (or one the GGUF writer does
    # not know) fails before anything is written.
    source = source or resolve_model(recipe.model.name)
    base_config = load_config(source, trust_remote_code=trust)
    style = style_of_recipe(recipe)
    tokenizer = _run_tokenizer([adapter_path, run_dir], source, trust, style)
    if gguf_quant is not None:
        from velora_cli.export import gguf as gguf_export

        vocab = gguf_export.check(base_config, tokenizer, recipe.model.name)
        # The Modelfile's values (the system prompt above all) are checked before the merge, not after it.
        modelfile(gguf_export.GGUF_FILE, style, tokenizer, getattr(base_config, "max_position_embeddings", 4096))
        torch_dtype = torch.float32  # merged in fp32, so the weights are rounded once, to the GGUF type

    with staged_dir(target) as staging, quiet_transformers(), _steps(total=2 if adapter_only else 5) as steps:
        claim(staging, EXPORT_MARKER)
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
                steps.start(f"saving {options.dtype} safetensors")
                merged.save_pretrained(staging, max_shard_size=checked.shard_bytes)
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


def run_export(run_dir: Path, options: ExportOptions) -> None:
    """`velora export`: export, then say what was written."""
    target = export_run(run_dir, options=options)
    quant, fmt, merged = options.quant, options.fmt, f"merged {options.dtype} model"
    kind = "adapter" if options.adapter_only else f"{quant or 'f16'} GGUF" if fmt == "gguf" else merged
    typer.echo(f"exported {kind} to {target}/")
    for path in sorted(target.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            typer.echo(f"  {path.name:<40} {human_bytes(path.stat().st_size):>12}")
    if fmt == "gguf" and not options.adapter_only:
        from velora_cli.export.gguf import GGUF_FILE
        from velora_cli.export.modelfile import serve_commands

        recipe = read_run_recipe(run_dir)
        typer.echo("serve it with:")
        for command in serve_commands(target, recipe.name or run_dir.name, GGUF_FILE):
            typer.echo(f"  {command}")
