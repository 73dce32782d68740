"""The command-line interface. It only parses arguments and calls the module that owns each command.

Every VeloraError becomes one line on stderr and its exit code (2 for usage and recipe errors); so does a
file-system error no check could foresee (a disk filling up mid-run: exit 1). Library warnings and progress bars
go to the log file unless --verbose (logs.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import typer

from velora_cli import __version__
from velora_cli.common.device import leave_process_group
from velora_cli.common.errors import VeloraError
from velora_cli.export.options import DEFAULTS as EXPORT

try:  # typer >= 0.20 vendors click; older versions use the click package
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

app = typer.Typer(
    name="velora",
    help="Fine-tune LLMs on less GPU memory: 4-bit QLoRA + VeLoRA activation compression.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"velora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """velora: YAML recipe in, QLoRA + VeLoRA adapter out."""


SetOption = typer.Option(None, "--set", help="Override a recipe field, e.g. --set train.learning_rate=2e-4.")
VerboseOption = typer.Option(False, "--verbose", "-v", help="Also show library warnings and progress bars.")
TrustOption = typer.Option(
    False, "--trust-remote-code", help="Run the model's own code (auto_map) if it has some; never read from files."
)


def _quiet(verbose: bool, transformers_now: bool = True) -> None:
    from velora_cli.common import logs

    logs.configure(verbose, transformers_now)


@app.command()
def finetune(
    recipe: Path = typer.Argument(..., help="The YAML recipe, e.g. recipes/llama7b_alpaca.yaml."),
    overrides: list[str] | None = SetOption,
    output_dir: Path | None = typer.Option(None, "--output-dir", help="Run directory (default: output.dir)."),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="Stop after this many steps."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the newest checkpoint."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate, build, print the plan; train nothing."),
    stages: str | None = typer.Option(
        None, "--stages", help="Comma-separated subset of train,export,eval (default: all the recipe enables)."
    ),
    json_out: bool = typer.Option(False, "--json", help="--dry-run: also print the plan as JSON on stdout."),
    nproc_per_node: int | None = typer.Option(
        None, "--nproc-per-node", min=1, help="Run under torchrun with this many processes per node."
    ),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="Machines (1 process each unless --nproc-per-node)."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="With --nnodes: this machine's index."),
    rdzv_endpoint: str | None = typer.Option(None, "--rdzv-endpoint", help="With --nnodes: HOST:PORT of node 0."),
    verbose: bool = VerboseOption,
    force: bool = typer.Option(False, "--force", help="Write into an existing folder velora did not create."),
) -> None:
    """Train a LoRA adapter from a recipe; then export and evaluate when the recipe asks."""
    from velora_cli.finetune.pipeline import run_pipeline

    _quiet(verbose)
    launching = nproc_per_node is not None or nnodes > 1 or node_rank > 0 or rdzv_endpoint is not None
    if launching and "LOCAL_RANK" not in os.environ:
        from velora_cli.finetune.launch import Launch, child_arguments, launch_finetune

        launch = Launch(nproc_per_node or 1, nnodes, node_rank, rdzv_endpoint)
        launch.check()
        if not dry_run:
            child = child_arguments(recipe, overrides or [], output_dir, max_steps, resume, stages, verbose, force)
            launch_finetune(launch, recipe, overrides or [], output_dir, child, verbose, force)
            return
    result = run_pipeline(
        recipe,
        overrides=overrides or [],
        output_dir=output_dir,
        max_steps=max_steps,
        resume=resume,
        dry_run=dry_run,
        stages=stages,
        force=force,
    )
    if json_out:
        typer.echo(json.dumps(result, indent=2))


@app.command("eval")
def evaluate(
    mmlu: bool = typer.Option(False, "--mmlu", help="Score 5-shot MMLU (the only benchmark for now)."),
    model: str | None = typer.Option(
        None, "--model", help="Hub id, checkpoint dir, run dir or merged export (default: the newest run)."
    ),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", envvar="VELORA_MMLU_DIR", help="MMLU in the original CSV layout (default: cais/mmlu)."
    ),
    subjects: str | None = typer.Option(None, "--subjects", help="Comma-separated subjects (default: all)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most this many questions per subject."),
    shots: int = typer.Option(5, "--shots", min=0, help="Few-shot examples from the dev split."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Questions per forward pass."),
    split: str = typer.Option("test", "--split", help="test | validation | dev."),
    quantization: str | None = typer.Option(
        None, "--quantization", help="A hub id or model dir's base: nf4 | fp4 | int8 | none (default: none). A run "
        "dir is evaluated as it was trained, on its recipe's quantization (nf4 for QLoRA); another value is refused.",
    ),  # fmt: skip
    json_path: Path | None = typer.Option(None, "--json", help="Write the results as JSON here."),
    save_predictions: Path | None = typer.Option(
        None, "--save-predictions", help="Write per-question predictions (JSONL) here."
    ),
    perplexity: bool = typer.Option(False, "--perplexity", help="Perplexity of held-out text (--data FILE)."),
    data: Path | None = typer.Option(None, "--data", help="--perplexity: text file, .jsonl/parquet with `text`."),
    block: int = typer.Option(256, "--block", min=2, help="--perplexity: tokens per packed block."),
    trust_remote_code: bool = TrustOption,
    verbose: bool = VerboseOption,
) -> None:
    """Evaluate a model: 5-shot MMLU accuracy per subject, category and overall, or held-out perplexity."""
    _quiet(verbose)
    if perplexity:
        from velora_cli.eval.perplexity import run_perplexity_command

        run_perplexity_command(model, data, block, limit, batch_size, json_path, trust_remote_code)
        return
    from velora_cli.eval.command import run_eval_command

    run_eval_command(
        mmlu=mmlu,
        model=model,
        data_dir=data_dir,
        subjects=subjects,
        limit=limit,
        shots=shots,
        batch_size=batch_size,
        split=split,
        quantization=quantization,
        json_path=json_path,
        save_predictions=save_predictions,
        trust_remote_code=trust_remote_code,
    )


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A finetune run directory (holds the adapter)."),
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: RUN_DIR/merged)."),
    fmt: str = typer.Option(EXPORT.fmt, "--format", help="safetensors | gguf (llama.cpp / Ollama, LLaMA models)."),
    quant: str | None = typer.Option(EXPORT.quant, "--quant", help="GGUF weights: f16 (default) | bf16 | q8_0 | f32."),
    dtype: str = typer.Option(EXPORT.dtype, "--dtype", help="safetensors weights: bf16 | fp16 | fp32."),
    checkpoint: int | None = typer.Option(None, "--checkpoint", help="Export checkpoint-N, not the final adapter."),
    max_shard_size: str = typer.Option(EXPORT.max_shard_size, "--max-shard-size", help="Largest safetensors shard."),
    adapter_only: bool = typer.Option(False, "--adapter-only", help="Copy the PEFT adapter only, no merge."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output directory."),
    trust_remote_code: bool = TrustOption,
    verbose: bool = VerboseOption,
) -> None:
    """Merge the adapter into full-precision weights that any transformers loader can serve (or into GGUF)."""
    from velora_cli.export.merge import run_export
    from velora_cli.export.options import ExportOptions

    _quiet(verbose)
    options = ExportOptions(out=out, fmt=fmt, quant=quant, dtype=dtype, checkpoint=checkpoint,
                            max_shard_size=max_shard_size, adapter_only=adapter_only, force=force,
                            trust_remote_code=trust_remote_code)  # fmt: skip
    run_export(run_dir, options)


ModelArgument = typer.Argument(
    ..., help="A run dir (or its checkpoint-N), a merged export, a model dir, a hub id or embedded:smollm2-135m."
)
MaxNewTokensOption = typer.Option(256, "--max-new-tokens", min=1, help="Longest answer, in tokens.")
TemperatureOption = typer.Option(0.0, "--temperature", help="0 (default) is greedy; above 0 samples.")
TopPOption = typer.Option(0.9, "--top-p", help="Nucleus sampling (with --temperature above 0).")
SeedOption = typer.Option(None, "--seed", help="Seed for sampling.")
SystemOption = typer.Option(None, "--system", help="System message (default: the run's data.system_prompt).")
FourBitOption = typer.Option(False, "--load-in-4bit", help="Load the base in 4-bit as QLoRA trained it (bitsandbytes).")


@app.command()
def generate(
    model: str = ModelArgument,
    prompt: str = typer.Option(..., "--prompt", help="The instruction or message to answer."),
    max_new_tokens: int = MaxNewTokensOption,
    temperature: float = TemperatureOption,
    top_p: float = TopPOption,
    seed: int | None = SeedOption,
    system: str | None = SystemOption,
    load_in_4bit: bool = FourBitOption,
    trust_remote_code: bool = TrustOption,
    verbose: bool = VerboseOption,
) -> None:
    """Answer one prompt, prompted as the run was trained; only the answer goes to stdout."""
    from velora_cli.infer.generate import Sampling, run_generate

    _quiet(verbose)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    run_generate(model, prompt, sampling, system=system, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code)


@app.command()
def chat(
    model: str = ModelArgument,
    max_new_tokens: int = MaxNewTokensOption,
    temperature: float = TemperatureOption,
    top_p: float = TopPOption,
    seed: int | None = SeedOption,
    system: str | None = SystemOption,
    load_in_4bit: bool = FourBitOption,
    trust_remote_code: bool = TrustOption,
    verbose: bool = VerboseOption,
) -> None:
    """Talk to a model, answers streamed; /reset forgets the conversation, /exit quits."""
    from velora_cli.infer.chat import run_chat
    from velora_cli.infer.generate import Sampling

    _quiet(verbose)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    run_chat(model, sampling, system=system, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code)


@app.command("memory-estimate")
def memory_estimate(
    recipe: Path | None = typer.Argument(None, help="A recipe to estimate (or use --model / --preset)."),
    model: str | None = typer.Option(None, "--model", help="Hub id or checkpoint dir (config only)."),
    preset: str | None = typer.Option(
        None, "--preset", help="llama-7b | llama-13b | llama-3.1-8b | smollm2-135m | llama-60m | llama-130m | ..."
    ),
    method: str | None = typer.Option(
        None, "--method", help="qlora | lora | full | pretrain (the same as --set method=...)."
    ),
    overrides: list[str] | None = SetOption,
    batch: int | None = typer.Option(None, "--batch", min=1, max=1 << 16, help="Micro-batch size."),
    seq: int | None = typer.Option(None, "--seq", min=1, max=1 << 20, help="Sequence length."),
    gpu_mem: str | None = typer.Option(None, "--gpu-mem", help="GPU memory to fit in, e.g. 24GiB."),
    measure: bool = typer.Option(False, "--measure", help="Also run real steps and compare."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the breakdown as JSON here."),
    gpus: int | None = typer.Option(None, "--gpus", min=1, help="Per-GPU figures over this many GPUs per node."),
    nodes: int = typer.Option(1, "--nodes", min=1, help="With --gpus: number of nodes."),
    verbose: bool = VerboseOption,
) -> None:
    """Say how much memory a training run needs, where it goes, and what fits."""
    from velora_cli.memory.command import run_memory_estimate

    _quiet(verbose, transformers_now=False)  # memory.arch quiets it if it needs it
    run_memory_estimate(
        recipe=recipe,
        model=model,
        preset=preset,
        overrides=overrides or [],
        batch=batch,
        seq=seq,
        gpu_mem=gpu_mem,
        measure=measure,
        json_path=json_path,
        method=method,
        gpus=gpus,
        nodes=nodes,
    )


@app.command()
def runs(
    root: Path = typer.Argument(Path("runs"), help="Directory holding run directories."),
    json_out: bool = typer.Option(False, "--json", help="Print each run's summary.json as one JSON list."),
) -> None:
    """List finetune runs side by side from their summary files (method, MMLU, memory)."""
    from velora_cli.finetune.display import list_runs

    list_runs(root, json_out)


recipes_app = typer.Typer(help="The shipped recipes: list them, copy one to edit.", invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
def recipes(ctx: typer.Context) -> None:
    """List the shipped recipes, one line each."""
    from velora_cli.config.shipped import print_recipes

    if ctx.invoked_subcommand is None:
        print_recipes()


@recipes_app.command("copy")
def recipes_copy(
    name: str = typer.Argument(..., help="A shipped recipe, e.g. smollm2_demo."),
    dest: Path | None = typer.Argument(None, help="File or folder to copy to (default: ./NAME.yaml)."),
) -> None:
    """Copy a shipped recipe to edit; its data paths point at the shipped files."""
    from velora_cli.config.shipped import copy_recipe

    copy_recipe(name, dest)


data_app = typer.Typer(help="Look at training data as the model will see it.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("preview")
def data_preview(
    recipe: Path = typer.Argument(..., help="The YAML recipe whose data to show."),
    rows: int = typer.Option(3, "-n", "--rows", min=0, help="How many rows to print."),
    overrides: list[str] | None = SetOption,
    verbose: bool = VerboseOption,
) -> None:
    """The first rows with trained tokens highlighted, lengths, cutoff losses and padding (tokenizer only)."""
    from velora_cli.data.preview import run_preview

    _quiet(verbose)
    run_preview(recipe, overrides or [], rows)


class _DropBitsandbytesKernelHubNotice(logging.Filter):
    """bitsandbytes logs, on every import on CPU, that it could not fetch an optional kernel from the Hugging
    Face hub (`kernels` package); its own CPU kernels are used instead, so the line is noise for our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


# Once, at import: main() runs many times in one process under the tests, and filters would pile up.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropBitsandbytesKernelHubNotice())


def main(argv: list[str] | None = None) -> None:
    try:
        # standalone_mode=False so usage errors reach us and print as one line instead of a boxed panel.
        result = app(args=argv, standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as exc:
        typer.echo(exc.ctx.get_help(), err=True)
        sys.exit(2)
    except click_exceptions.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "velora"
        typer.echo(f"error: {exc.format_message()} (see '{command} --help')", err=True)
        sys.exit(2)
    except click_exceptions.ClickException as exc:
        typer.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except VeloraError as exc:
        # Under torchrun every rank meets the same recipe/data error (exit 2); rank 0 alone says it once.
        if exc.exit_code != 2 or os.environ.get("RANK", "0") == "0":
            typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as exc:  # unforeseeable file-system failures (disk full mid-run): one line, not a traceback
        from velora_cli.common.fs import os_error_line

        typer.echo(f"error: {os_error_line(exc)}", err=True)
        sys.exit(1)
    except Exception as exc:
        from velora_cli.common.errors import damaged_input_line

        line = damaged_input_line(exc)
        if line is None and "VELORA_RANK_LOGS" in os.environ:  # finetune/launch.py's RANK_LOGS
            # A worker under `finetune --nproc-per-node`: stdout is this rank's log file only, and the launcher's
            # one line names it; on the console, a peer's crash would bury that line in the ranks' tracebacks.
            import traceback

            traceback.print_exc(file=sys.stdout)
            sys.exit(1)
        if line is None:
            raise
        typer.echo(f"error: {line}", err=True)
        sys.exit(1)
    leave_process_group()
    if isinstance(result, int) and result:
        sys.exit(result)

