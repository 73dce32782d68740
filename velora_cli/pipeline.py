"""`velora finetune`: the whole shape of a run, driven by the recipe: train -> export -> evaluate.

Each stage records itself in RUN_DIR/summary.json when it completes, so a rerun of the same command skips
finished stages (a run whose training finished but whose eval crashed resumes at the eval), and `--stages`
selects a subset. `velora runs` puts the summaries of several runs side by side.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from velora_cli import rundir
from velora_cli.errors import UsageError, VeloraError
from velora_cli.memstats import human_bytes
from velora_cli.recipe import Recipe, load_recipe

STAGES = ("train", "export", "eval")


class TrainingInterrupted(VeloraError):
    exit_code = 130


def console() -> Console:
    return Console(stderr=True)


def _resolve_relative(recipe: Recipe, base: Path) -> None:
    """Relative data paths are read beside the recipe file when they exist there (else as given: CWD or hub)."""

    def fix(value: str | None) -> str | None:
        if value and not Path(value).is_absolute() and (base / value).exists():
            return str((base / value).resolve())
        return value

    recipe.data.path = fix(recipe.data.path)
    recipe.data.val_path = fix(recipe.data.val_path)
    recipe.eval.heldout.path = fix(recipe.eval.heldout.path)
    recipe.eval.mmlu.data_dir = fix(recipe.eval.mmlu.data_dir)


def select_stages(recipe: Recipe, stages: str | None) -> list[str]:
    if stages is None:
        chosen = ["train"]
        if recipe.export.enabled:
            chosen.append("export")
        if recipe.eval.mmlu.enabled:
            chosen.append("eval")
        return chosen
    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown or not chosen:
        raise UsageError(f"--stages {stages!r}: choose from {', '.join(STAGES)}")
    return [s for s in STAGES if s in chosen]


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / rundir.SUMMARY_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}


def _velora_summary(recipe: Recipe) -> dict[str, Any]:
    v = recipe.velora
    if not v.enabled:
        return {"enabled": False}
    return {
        "enabled": True,
        "layers": v.module_names,
        "num_groups": v.num_groups,
        "subtoken_size": v.subtoken_size,
        "init": v.init,
        "scale": v.scale,
    }


def _heldout_records(recipe: Recipe, session) -> list[dict[str, str]]:
    from velora_cli.data import load_records

    h = recipe.eval.heldout
    records = load_records(h.path).records if h.path else list(session.val_records)
    return records[: h.limit]


# ---------------------------------------------------------------------------------------------- stages


def stage_train(recipe: Recipe, run_dir: Path, resume: bool, summary: dict[str, Any], out: Console) -> None:
    from velora_cli.heldout import exact_match
    from velora_cli.train import FinetuneSession, is_main_process, rng_preserved

    session = FinetuneSession(recipe, run_dir)
    plan = session.setup()
    if is_main_process():
        _print_plan(plan, out)
    fresh = not (resume and rundir.checkpoints(run_dir))
    heldout = recipe.eval.heldout
    records = _heldout_records(recipe, session) if heldout.enabled else []

    def score_heldout() -> dict[str, Any]:
        d = recipe.data
        return exact_match(
            session.model, session.tokenizer, records, template=d.template, cutoff_len=d.cutoff_len,
            system_prompt=d.system_prompt,
        )  # fmt: skip

    before: dict[str, Any] = {}
    if fresh:
        with rng_preserved():  # training must not depend on whether (or what) was evaluated first
            # Every rank evaluates: under DDP the Trainer splits the validation rows and gathers the losses.
            before["eval_loss"] = session.evaluate_loss()
            if records and is_main_process():
                out.print(f"[bold]held-out exact match before training[/] ({len(records)} tasks)...")
                before["heldout"] = score_heldout()
    elif "before" in summary.get("train", {}):
        before = summary["train"]["before"]
    result = session.train(resume=resume)
    if result.interrupted:
        raise TrainingInterrupted(
            f"interrupted at step {result.steps}; checkpoint saved in {run_dir}. Run the same command again to resume."
        )
    session.save()
    if not is_main_process():
        return
    after: dict[str, Any] = {"eval_loss": result.eval_loss}
    if records:
        out.print("[bold]held-out exact match after training[/]...")
        after["heldout"] = score_heldout()
    summary["train"] = {**result.as_dict(), "before": before, "after": after}
    _print_before_after(before, after, out)


def stage_export(recipe: Recipe, run_dir: Path, summary: dict[str, Any], out: Console) -> None:
    from velora_cli.export import export_run

    target = Path(recipe.export.dir) if recipe.export.dir else run_dir / "merged"
    out.print(f"[bold]export[/]: merging the adapter into {recipe.export.dtype} weights -> {target}")
    path = export_run(run_dir, target, dtype=recipe.export.dtype, force=True)
    summary["export"] = {"path": str(path), "dtype": recipe.export.dtype}


def stage_eval(recipe: Recipe, run_dir: Path, summary: dict[str, Any], out: Console) -> None:
    from velora_cli.mmlu import evaluate_mmlu, load_eval_model

    m = recipe.eval.mmlu
    use_merged = m.use_merged and "export" in summary
    reference = summary["export"]["path"] if use_merged else str(run_dir)
    which = "the merged export" if use_merged else "the adapter model"
    out.print(f"[bold]eval[/]: {m.shots}-shot MMLU ({m.split}) on {which}")
    model, tokenizer, description = load_eval_model(reference)
    data_dir = Path(m.data_dir) if m.data_dir else None
    result = evaluate_mmlu(
        model,
        tokenizer,
        data_dir=data_dir,
        subjects=m.subjects,
        limit=m.limit,
        shots=m.shots,
        batch_size=m.batch_size,
        split=m.split,
    )
    result["model"] = description
    rundir.write_json_atomic(run_dir / rundir.MMLU_FILE, result)
    summary["eval"] = {
        "mmlu": {
            "overall": result["overall"],
            "categories": result["categories"],
            "path": str(run_dir / rundir.MMLU_FILE),
        }
    }
    out.print(f"MMLU overall: {100 * result['overall']['acc']:.2f}% of {result['overall']['n']} questions")
    del model
    gc.collect()


# ------------------------------------------------------------------------------------------------ driver


def run_pipeline(
    recipe_path: Path,
    *,
    overrides: list[str],
    output_dir: Path | None = None,
    max_steps: int | None = None,
    resume: bool = True,
    dry_run: bool = False,
    stages: str | None = None,
) -> dict[str, Any]:
    recipe = load_recipe(recipe_path, overrides)
    from velora_cli.train import check_trainable, is_main_process  # heavy imports only for a valid recipe

    if output_dir is not None:
        recipe.output.dir = str(output_dir)
    if max_steps is not None:
        recipe.train.max_steps = max_steps
    _resolve_relative(recipe, Path(recipe_path).resolve().parent)
    chosen = select_stages(recipe, stages)
    check_trainable(recipe)
    run_dir = recipe.run_dir()
    out = console()
    if dry_run:
        return dry_run_plan(recipe, run_dir, out)

    summary = read_summary(run_dir) if resume else {}
    summary.setdefault("stages", {})
    started = time.monotonic()
    for stage in chosen:
        done = summary["stages"].get(stage, {}).get("status") == "done"
        if stage == "train" and done and resume and stages is None and (run_dir / rundir.ADAPTER_CONFIG).is_file():
            out.print(f"[dim]train: already done in {run_dir} (use --no-resume to train again)[/]")
            continue
        if stage != "train" and not (run_dir / rundir.ADAPTER_CONFIG).is_file():
            raise UsageError(f"{run_dir}: no trained adapter yet; run the train stage first")
        t0 = time.monotonic()
        {
            "train": lambda: stage_train(recipe, run_dir, resume, summary, out),
            "export": lambda: stage_export(recipe, run_dir, summary, out),
            "eval": lambda: stage_eval(recipe, run_dir, summary, out),
        }[stage]()
        if not is_main_process():
            return summary
        gc.collect()  # the stage's model (and the Trainer's reference cycles) go before the next stage loads one
        summary["stages"][stage] = {"status": "done", "seconds": round(time.monotonic() - t0, 2)}
        _write_summary(recipe, run_dir, summary)
    summary["wall_seconds"] = round(time.monotonic() - started, 2)
    _write_summary(recipe, run_dir, summary)
    print_summary(summary, out)
    return summary


def _write_summary(recipe: Recipe, run_dir: Path, summary: dict[str, Any]) -> None:
    summary.update(
        recipe=recipe.name,
        base_model=recipe.model.name,
        quantization=recipe.model.quantization,
        velora=_velora_summary(recipe),
        lora={
            "r": recipe.lora.r,
            "alpha": recipe.lora.alpha,
            "dropout": recipe.lora.dropout,
            "target_modules": recipe.lora.module_names,
        },
        gradient_checkpointing=recipe.train.gradient_checkpointing,
    )
    rundir.write_json_atomic(run_dir / rundir.SUMMARY_FILE, summary)


def dry_run_plan(recipe: Recipe, run_dir: Path, out: Console) -> dict[str, Any]:
    """Validate the recipe and data, check layer shapes on a weightless model, estimate memory; train nothing."""
    from velora_cli.memory_model import arch_for, estimate, settings_from_recipe
    from velora_cli.train import FinetuneSession

    session = FinetuneSession(recipe, run_dir)
    session.setup_data()
    _check_shapes(recipe)
    arch = arch_for(model=_config_source(recipe), trust_remote_code=recipe.model.trust_remote_code)
    est = estimate(arch, settings_from_recipe(recipe, device=session.device.type))
    table = Table(title=f"dry run: {recipe.name}", show_header=False)
    table.add_row("train rows", str(len(session.train_set)))
    table.add_row("val rows", str(len(session.val_set) if session.val_set is not None else 0))
    table.add_row("steps", str(session.total_steps()))
    table.add_row("gradient accumulation", str(session.gradient_accumulation()))
    table.add_row("estimated peak memory", human_bytes(est.total))
    table.add_row("run dir", str(run_dir))
    out.print(table)
    out.print("[green]recipe is valid; nothing was trained or written[/]")
    return {"steps": session.total_steps(), "estimated_total_bytes": est.total}


def _config_source(recipe: Recipe) -> str:
    from velora_cli.models import resolve_model

    return resolve_model(recipe.model.name).path


def _check_shapes(recipe: Recipe) -> None:
    """LoRA targets exist and VeLoRA's grouping divides every compressed layer's input depth, checked on a
    meta-device model so a 13B recipe is validated without loading weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from velora_cli.errors import RecipeError
    from velora_cli.models import load_config, resolve_model

    config = load_config(resolve_model(recipe.model.name), recipe.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for target in recipe.lora.module_names:
        if not any(n.split(".")[-1] == target for n in linears):
            raise RecipeError(f"lora.target_modules: {target!r} matches no linear layer of {recipe.model.name}")
    if not recipe.velora.enabled:
        return
    field = "num_groups" if recipe.velora.num_groups else "subtoken_size"
    value = recipe.velora.num_groups or recipe.velora.subtoken_size
    for name, layer in linears.items():
        if name.split(".")[-1] in recipe.velora.module_names and layer.in_features % value:
            raise RecipeError(f"velora.{field}={value} does not divide the input depth {layer.in_features} of {name}")


# ----------------------------------------------------------------------------------------------- reports


def _print_plan(plan, out: Console) -> None:
    table = Table(title="plan", show_header=False, title_justify="left")
    for key, value in plan.lines():
        table.add_row(key, value)
    out.print(table)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, fmt: str = "{:.4f}") -> str:
    return "-" if value is None else fmt.format(value)


def _print_before_after(before: dict[str, Any], after: dict[str, Any], out: Console) -> None:
    table = Table(title="before / after training", title_justify="left")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("eval loss", _num(before.get("eval_loss")), _num(after.get("eval_loss")))
    if "heldout" in after:
        table.add_row(
            f"held-out answer loss (n={after['heldout']['n']})",
            _num(before.get("heldout", {}).get("loss")),
            _num(after["heldout"]["loss"]),
        )
        table.add_row(
            f"held-out exact match (n={after['heldout']['n']})",
            _pct(before.get("heldout", {}).get("exact_match")),
            _pct(after["heldout"]["exact_match"]),
        )
    out.print(table)


def print_summary(summary: dict[str, Any], out: Console) -> None:
    train = summary.get("train", {})
    table = Table(title=f"run summary: {summary.get('recipe')}", show_header=False, title_justify="left")
    velora = summary.get("velora", {})
    table.add_row("base model", f"{summary.get('base_model')} ({summary.get('quantization')})")
    table.add_row(
        "VeLoRA",
        f"{', '.join(velora.get('layers', []))} / {velora.get('num_groups') or velora.get('subtoken_size')} "
        f"groups, init {velora.get('init')}, scale {velora.get('scale')}"
        if velora.get("enabled")
        else "off",
    )
    if train:
        table.add_row("steps", str(train.get("steps")))
        table.add_row("train / eval loss", f"{_num(train.get('train_loss'))} / {_num(train.get('eval_loss'))}")
        table.add_row("tokens/s", _num(train.get("tokens_per_second"), "{:.0f}"))
        peak = train.get("peak_memory", {})
        kind = "CUDA peak" if str(peak.get("device", "")).startswith("cuda") else "peak RSS"
        table.add_row("peak memory", f"{human_bytes(peak.get('peak', 0))} ({kind})")
        if train.get("activation_bytes_per_token"):
            table.add_row("activations saved for backward", f"{human_bytes(train['activation_bytes_per_token'])}/token")
        if train.get("velora_saved_bytes_per_token"):
            table.add_row("VeLoRA saving", f"{human_bytes(train['velora_saved_bytes_per_token'])}/token")
        heldout = train.get("after", {}).get("heldout")
        if heldout:
            before = train.get("before", {}).get("heldout", {}).get("exact_match")
            table.add_row("held-out exact match", f"{_pct(before)} -> {_pct(heldout['exact_match'])}")
    mmlu = summary.get("eval", {}).get("mmlu")
    if mmlu:
        cats = ", ".join(f"{k} {_pct(v['acc'])}" for k, v in mmlu.get("categories", {}).items())
        table.add_row("MMLU", f"{_pct(mmlu['overall']['acc'])} (n={mmlu['overall']['n']}); {cats}")
    if "export" in summary:
        table.add_row("merged export", summary["export"]["path"])
    for stage, info in summary.get("stages", {}).items():
        table.add_row(f"{stage} time", f"{info.get('seconds', 0):.1f} s")
    out.print(table)


def list_runs(root: Path) -> None:
    """The paper's Table 3 layout: method, MMLU, memory - one row per run under `root`."""
    runs = sorted(p for p in root.glob("*") if (p / rundir.SUMMARY_FILE).is_file()) if root.is_dir() else []
    if not runs:
        raise UsageError(f"no runs with {rundir.SUMMARY_FILE} under {root}/")
    table = Table(title=f"runs in {root}")
    for column in ("run", "base", "method", "steps", "eval loss", "MMLU", "peak memory", "act./token", "tok/s"):
        table.add_column(column, justify="left" if column in ("run", "base", "method") else "right")
    for path in runs:
        s = read_summary(path)
        train = s.get("train", {})
        v = s.get("velora", {})
        method = ("QLoRA" if s.get("quantization") not in (None, "none") else "LoRA") + (
            f" + VeLoRA ({','.join(v.get('layers', []))})" if v.get("enabled") else ""
        )
        if s.get("gradient_checkpointing"):
            method += " + GC"
        mmlu = s.get("eval", {}).get("mmlu", {}).get("overall", {}).get("acc")
        peak = train.get("peak_memory", {}).get("peak")
        act = train.get("activation_bytes_per_token")
        table.add_row(
            path.name,
            str(s.get("base_model", "-")),
            method,
            str(train.get("steps", "-")),
            _num(train.get("eval_loss")),
            _pct(mmlu),
            human_bytes(peak) if peak else "-",
            human_bytes(act) if act else "-",
            _num(train.get("tokens_per_second"), "{:.0f}"),
        )
    # Off a terminal rich would wrap at 80 columns; a listing meant for logs and pipes stays one row per run.
    Console(width=None if sys.stdout.isatty() else 220).print(table)
