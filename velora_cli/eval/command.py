"""`velora eval --mmlu`, and the model loading every evaluation shares.

Owns what the command line asks for (checked before any model loads), loading the model to evaluate - a hub id,
a checkpoint or merged directory, a GGUF file, or a finetune run directory, which is evaluated as trained: the
base model from RUN_DIR/recipe.yaml with its quantization, plus the LoRA adapter (VeLoRA only changes what the
backward pass stores, so inference needs the adapter alone) - and writing the results JSON and the per-question
predictions, only once the whole evaluation has succeeded (their locations are checked before the model loads).
A model's own code (`auto_map`) runs only with --trust-remote-code, never because a file in the evaluated
directory asks for it. The tables are eval.report's.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from velora_cli.common.device import compute_dtype, default_device
from velora_cli.common.errors import UsageError, VeloraError
from velora_cli.common.fs import check_writable, write_json_atomic, write_text_atomic
from velora_cli.eval.mmlu_data import load_mmlu
from velora_cli.eval.report import print_mmlu_results
from velora_cli.eval.summary import accuracy, evaluate_loaded
from velora_cli.models.load import (
    ModelSource,
    first_line,
    load_base_model,
    load_recipe_base,
    load_tokenizer,
    resolve_model,
)
from velora_cli.rundir.layout import ADAPTER_CONFIG, MMLU_FILE, is_run_dir, latest_run, read_run_recipe
from velora_cli.rundir.lock import run_lock
from velora_cli.rundir.verify import check_weights

QUANTIZATIONS = ("nf4", "fp4", "int8", "none")



def load_eval_model(
    reference: str | Path, quantization: str | None = None, trust_remote_code: bool = False, *, recipe: Any = None,
    source: ModelSource | None = None,
) -> tuple[Any, Any, str]:
    """(model, tokenizer, description) for a hub id, checkpoint / merged dir, GGUF, or finetune run dir.

    The one rule (`velora eval --help` says it): a run dir (or its checkpoint-N) loads as trained, the recipe's
    base model and quantization plus the LoRA adapter, and a --quantization other than that is refused; any other
    model loads as `quantization` says, unquantised by default. `recipe` / `source`: the run's recipe and resolved
    base when the caller holds them (the pipeline's eval stage), else read from recipe.yaml and resolved here.
    """
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise UsageError(f"--quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    device = default_device()
    path = Path(reference).expanduser()
    run_dir = None
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        run_dir = path if is_run_dir(path) else path.parent if is_run_dir(path.parent) else None
        if run_dir is None:
            raise UsageError(f"{path}: a LoRA adapter without recipe.yaml beside it; is this a velora run directory?")
    if run_dir is None:
        quantization = quantization or "none"
        source = resolve_model(str(reference))
        model = load_base_model(source, quantization=quantization, compute=compute_dtype("auto", device), device=device,
                                trust_remote_code=trust_remote_code)  # fmt: skip
        description = str(reference) + ("" if quantization == "none" else f" ({quantization})")
        return model.eval(), load_tokenizer(source, trust_remote_code), description

    # The run's recipe.yaml may come from anyone: its trust_remote_code is not ours to follow.
    recipe = (recipe or read_run_recipe(run_dir)).model.model_copy(update={"trust_remote_code": trust_remote_code})
    if quantization not in (None, recipe.quantization):
        raise UsageError(
            f"--quantization {quantization}: {run_dir} was trained on a {recipe.quantization} base and is evaluated "
            "on it; --quantization applies to hub ids and model directories"
        )
    check_weights(Path(path))  # a damaged adapter is one line naming the file, before the base loads
    from peft import PeftModel  # peft pulls in half of transformers; only a run's adapter needs it

    source = source or resolve_model(recipe.name)
    base = load_recipe_base(recipe, device, source)
    try:
        model = PeftModel.from_pretrained(base, str(path))
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # weights of another shape or base
        raise VeloraError(f"{path}: adapter does not fit the base model: {first_line(exc)}") from None
    has_tokenizer = (path / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(ModelSource(str(path), str(path)) if has_tokenizer else source, trust_remote_code)
    description = f"{path} (LoRA adapter on {recipe.name}, {recipe.quantization})"
    return model.eval(), tokenizer, description


def run_eval_command(
    *,
    mmlu: bool,
    model: str | None,
    data_dir: Path | None,
    subjects: str | None,
    limit: int | None,
    shots: int,
    batch_size: int,
    split: str,
    quantization: str | None,
    json_path: Path | None,
    save_predictions: Path | None,
    trust_remote_code: bool = False,
) -> None:
    """`velora eval --mmlu`: load the data (fail fast), then the model, score, print, write files."""
    if not mmlu:
        raise UsageError("velora eval: choose a benchmark; --mmlu (5-shot MMLU) is the one eval supports")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise UsageError(f"--quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    wanted = [s.strip() for s in subjects.split(",") if s.strip()] if subjects else None
    data = load_mmlu(data_dir, split=split, subjects=wanted, limit=limit, shots=shots)
    reference = model if model is not None else str(latest_run())
    run_dir = Path(reference)
    if json_path is None and is_run_dir(run_dir) and not wanted and not limit and split == "test":
        json_path = run_dir / MMLU_FILE  # a complete evaluation of a run is kept with it
    for path, what in ((json_path, "--json"), (save_predictions, "--save-predictions")):
        if path is not None:
            check_writable(path, what, directory=False)
    if is_run_dir(run_dir):
        with run_lock(run_dir):
            _evaluate(reference, quantization, trust_remote_code, data, data_dir, limit, shots, batch_size, split,
                      json_path, save_predictions)  # fmt: skip
    else:
        _evaluate(reference, quantization, trust_remote_code, data, data_dir, limit, shots, batch_size, split,
                  json_path, save_predictions)  # fmt: skip


def _evaluate(reference, quantization, trust, data, data_dir, limit, shots, batch_size, split, json_path,
              save_predictions) -> None:  # fmt: skip
    console = Console(stderr=True)
    with console.status(f"loading {reference}"):
        loaded, tokenizer, description = load_eval_model(reference, quantization, trust)
    columns = (TextColumn("MMLU"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("mmlu", total=sum(len(d.questions) for d in data.values()))
        result, predictions = evaluate_loaded(
            loaded,
            tokenizer,
            data,
            data_dir=data_dir,
            limit=limit,
            shots=shots,
            batch_size=batch_size,
            split=split,
            model_name=description,
            progress=lambda done, _total: bar.update(task, completed=done),
            on_subject=lambda subject, preds: bar.console.print(
                f"{subject}: {100 * accuracy(preds)['acc']:.1f}% of {len(preds)}", highlight=False
            ),
        )
    print_mmlu_results(result, Console())
    if json_path is not None:
        write_json_atomic(json_path, result)
        console.print(f"results: {json_path}")
    if save_predictions is not None:
        write_text_atomic(save_predictions, "".join(json.dumps(asdict(p)) + "\n" for p in predictions))
        console.print(f"predictions: {save_predictions}")
