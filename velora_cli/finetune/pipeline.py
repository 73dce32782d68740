"""`velora finetune`: the whole shape of a run, driven by the recipe: train -> export -> evaluate.

Owns the stages and the driver only. Each stage records itself in RUN_DIR/summary.json (summary.RunSummary) when it
completes, so a rerun of the same command skips finished stages (a run whose training finished but whose eval
crashed resumes at the eval; a finished run is a no-op that says so), and `--stages` selects a subset;
`--dry-run` validates everything and trains nothing. Every stage's inputs are checked (finetune.preflight)
before anything is written, and the run directory is locked (rundir.lock.run_lock) while the stages run. `velora runs`
puts the summaries of several runs side by side (finetune.display, which owns the tables).
"""

from __future__ import annotations

import contextlib
import gc
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from velora_cli.common import fs, logs
from velora_cli.common.device import is_main_process
from velora_cli.common.errors import UsageError, VeloraError
from velora_cli.common.memstats import human_bytes
from velora_cli.config.description import RunDescription
from velora_cli.config.load import load_recipe
from velora_cli.config.preference import PREFERENCE_METHODS
from velora_cli.config.recipe import Recipe
from velora_cli.eval.heldout import exact_match
from velora_cli.finetune import display as report
from velora_cli.finetune.preflight import Preflight, check_trainable, preflight
from velora_cli.memory.arch import arch_of_config
from velora_cli.memory.estimate import estimate, settings_from_recipe
from velora_cli.rundir import layout as runs
from velora_cli.rundir import ownership
from velora_cli.rundir.lock import run_lock
from velora_cli.rundir.summary import (
    ExportSummary,
    MmluSummary,
    RunSummary,
    Scores,
    StageRecord,
    TrainSummary,
)
from velora_cli.rundir.verify import sound_checkpoints

STAGES = ("train", "export", "eval")


class TrainingInterrupted(VeloraError):
    exit_code = 130


def console() -> Console:
    return Console(stderr=True)


def select_stages(recipe: Recipe, stages: str | None) -> list[str]:
    if stages is None:
        chosen = ["train"]
        if recipe.export.enabled:
            chosen.append("export")
        if recipe.eval.mmlu.enabled or recipe.eval.perplexity.enabled:
            chosen.append("eval")
        return chosen
    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown or not chosen:
        raise UsageError(f"--stages {stages!r}: choose from {', '.join(STAGES)}")
    return [s for s in STAGES if s in chosen]


def stage_train(recipe: Recipe, run_dir: Path, resume: bool, summary: RunSummary, out: Console,
                checks: Preflight) -> None:  # fmt: skip
    # transformers' Trainer and peft load only once a stage runs (recipe errors stay fast).
    from velora_cli.finetune.plan import rng_preserved

    session = checks.session  # prepared by the pre-flight: model reference, tokenizer, data, the recipe as trained
    with out.status("loading the model and building the trainer"):  # a minute or more on a CPU: say so
        plan = session.setup()
    summary.description = RunDescription.of(recipe)
    if is_main_process():
        report.print_plan(plan.lines(), out)
    fresh = not (resume and sound_checkpoints(run_dir, bool(session.compressed))[0])
    records = checks.heldout

    preference = recipe.method in PREFERENCE_METHODS
    slot, what = ("pairs", "pairs") if preference else ("heldout", "exact match")  # the Scores field, the label
    if preference and records:
        from velora_cli.data.preference import tokenize_pairs
        from velora_cli.finetune.preference import score_pairs

        pairs = tokenize_pairs(records, session.tokenizer, session.recipe)[0]

    def score_heldout():
        d = recipe.data
        if preference:  # pair accuracy and DPO's reward accuracy/margin
            return score_pairs(session.trainer, pairs)
        return exact_match(
            session.model, session.tokenizer, records, template=d.template, cutoff_len=d.cutoff_len,
            system_prompt=d.system_prompt,
        )  # fmt: skip

    before = Scores()
    if fresh:
        with rng_preserved():  # training must not depend on whether (or what) was evaluated first
            # Every rank evaluates: under DDP the Trainer splits the validation rows and gathers the losses.
            before.eval_loss = session.evaluate_loss()
            if records and is_main_process():
                out.print(f"[bold]held-out {what} before training[/] ({len(records)})...")
                setattr(before, slot, score_heldout())
    elif summary.train is not None:
        before = summary.train.before
    result = session.train(resume=resume)
    if result.interrupted:
        raise TrainingInterrupted(
            f"interrupted at step {result.steps}; checkpoint saved in {run_dir}. Run the same command again to resume."
        )
    session.save()
    if not is_main_process():
        return
    after = Scores(eval_loss=result.eval_loss)
    if records:
        out.print(f"[bold]held-out {what} after training[/]...")
        setattr(after, slot, score_heldout())
    summary.train = TrainSummary.from_dict(result.as_dict())
    summary.train.before, summary.train.after = before, after
    report.print_before_after(before, after, out)


def export_target(recipe: Recipe, run_dir: Path) -> Path:
    from velora_cli.export.options import default_out

    return Path(recipe.export.dir) if recipe.export.dir else default_out(run_dir, None, adapter_only=False)


def stage_export(recipe: Recipe, run_dir: Path, summary: RunSummary, out: Console, checks: Preflight,
                 force: bool = False) -> None:  # fmt: skip
    from velora_cli.export.merge import export_run  # merging loads peft and a full-precision model
    from velora_cli.export.options import ExportOptions

    target = export_target(recipe, run_dir)
    out.print(f"[bold]export[/]: merging the adapter into {recipe.export.dtype} weights -> {target}")
    # Not forced: velora's own earlier export is replaced, anyone else's folder only with `finetune --force`.
    options = ExportOptions(out=target, dtype=recipe.export.dtype, force=force,
                            trust_remote_code=recipe.model.trust_remote_code)  # fmt: skip
    path = export_run(run_dir, options=options, recipe=recipe, source=checks.source)
    summary.export = ExportSummary(path=str(path), dtype=recipe.export.dtype)


def stage_perplexity(recipe: Recipe, run_dir: Path, summary: RunSummary, out: Console, checks: Preflight) -> None:
    """eval.perplexity: the trained model on held-out text (eval.perplexity.path, else the run's held-out split)."""
    from velora_cli.eval.command import load_eval_model
    from velora_cli.eval.perplexity import file_blocks, perplexity

    p, d = recipe.eval.perplexity, recipe.data
    model, tokenizer, description = load_eval_model(str(run_dir), trust_remote_code=recipe.model.trust_remote_code,
                                                    recipe=recipe, source=checks.source)  # fmt: skip
    if p.path:
        blocks = file_blocks(p.path, tokenizer, d.cutoff_len, d.text_field)
    else:
        from velora_cli.data.corpus import load_text_sets

        if not recipe.text_data:
            raise UsageError("eval.perplexity without eval.perplexity.path needs text data (data.format: text)")
        blocks = load_text_sets(d, tokenizer, recipe.train.seed)[1]
        if blocks is None:
            raise UsageError("eval.perplexity: no held-out text; set data.val_set_size or eval.perplexity.path")
    result = perplexity(model, blocks, batch_size=recipe.train.micro_batch_size, limit=p.limit)
    summary.extra["perplexity"] = {**result, "model": description}
    out.print(f"held-out perplexity: {result['perplexity']:.3f} over {result['tokens']} tokens")
    del model
    gc.collect()


def stage_eval(recipe: Recipe, run_dir: Path, summary: RunSummary, out: Console, checks: Preflight) -> None:
    from velora_cli.eval.command import load_eval_model  # the scorer and peft: only once a stage runs
    from velora_cli.eval.mmlu_data import load_mmlu
    from velora_cli.eval.summary import evaluate_loaded

    if recipe.eval.perplexity.enabled:
        stage_perplexity(recipe, run_dir, summary, out, checks)
        if not recipe.eval.mmlu.enabled:
            return
    m = recipe.eval.mmlu
    use_merged = m.use_merged and summary.export is not None
    reference = summary.export.path if use_merged else str(run_dir)
    which = "the merged export" if use_merged else "the adapter model"
    out.print(f"[bold]eval[/]: {m.shots}-shot MMLU ({m.split}) on {which}")
    model, tokenizer, description = load_eval_model(reference, trust_remote_code=recipe.model.trust_remote_code,
                                                    recipe=recipe, source=checks.source)  # fmt: skip
    data_dir = Path(m.data_dir) if m.data_dir else None
    data = checks.mmlu or load_mmlu(data_dir, split=m.split, subjects=m.subjects, limit=m.limit, shots=m.shots)
    result, _ = evaluate_loaded(
        model, tokenizer, data, data_dir=data_dir, limit=m.limit, shots=m.shots, batch_size=m.batch_size,
        split=m.split, progress=None, model_name=description,
    )  # fmt: skip
    fs.write_json_atomic(run_dir / runs.MMLU_FILE, result)
    summary.mmlu = MmluSummary.from_dict({**result, "path": str(run_dir / runs.MMLU_FILE)})
    out.print(f"MMLU overall: {100 * result['overall']['acc']:.2f}% of {result['overall']['n']} questions")
    del model
    gc.collect()


def run_pipeline(
    recipe_path: Path,
    *,
    overrides: list[str],
    output_dir: Path | None = None,
    max_steps: int | None = None,
    resume: bool = True,
    dry_run: bool = False,
    stages: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run the chosen stages; return summary.json's content (or, with `dry_run`, the planned steps and memory).
    `force`: write into an existing folder velora did not create (rundir.ownership)."""
    flags = {"output.dir": str(output_dir) if output_dir is not None else None, "train.max_steps": max_steps}
    recipe = load_recipe(recipe_path, overrides, {k: v for k, v in flags.items() if v is not None})
    chosen = select_stages(recipe, stages)
    check_trainable(recipe, planning=dry_run)
    run_dir = recipe.run_dir()
    out = console()
    if dry_run:
        return dry_run_plan(recipe, run_dir, out, chosen)

    summary = (RunSummary.load(run_dir) if resume else None) or RunSummary()
    has_adapter = runs.has_weights(run_dir)  # an adapter, or a whole model (method full/pretrain)
    # A rerun, with or without --stages, skips a stage that is done and whose output is still there: a finished
    # run's summary.json keeps the figures of the run that trained it.
    todo = [s for s in chosen if not (resume and has_adapter and stage_done(summary, s))]
    if not todo:
        out.print(f"nothing to do: {run_dir} has finished {', '.join(chosen)}; summary.json is unchanged "
                  "(--no-resume trains again; `velora eval` scores again)")  # fmt: skip
        return summary.as_dict()
    for stage in chosen:
        if stage not in todo:
            out.print(f"[dim]{stage}: already done in {run_dir}[/]")
    # Someone else's folder is refused before anything (a lock file included) is written into it.
    ownership.refuse_foreign(run_dir, ownership.RUN_MARKER, "output.dir", force=force)
    if "export" in todo:
        ownership.refuse_foreign(export_target(recipe, run_dir), ownership.EXPORT_MARKER, "export.dir", force=force)
    with contextlib.ExitStack() as stack:
        if ownership.owned(run_dir, ownership.RUN_MARKER):  # an existing run: a second process stops here
            stack.enter_context(run_lock(run_dir))
        checks = preflight(recipe, todo, run_dir, has_adapter=has_adapter, resume=resume)
        if stages is not None and "eval" not in chosen:
            checks.heldout = []  # the held-out exact match is an evaluation: `--stages train` trains only
        ownership.claim(run_dir, ownership.RUN_MARKER)  # creates the run dir once everything checked out
        stack.enter_context(run_lock(run_dir))
        stack.enter_context(logs.also_to(run_dir / "velora.log"))
        # From here on every stage runs with the one recipe the pre-flight settled (finetune.prepare).
        return _run_stages(checks.recipe, run_dir, todo, resume, summary, out, checks, force)


def stage_done(summary: RunSummary, stage: str) -> bool:
    """`stage` is recorded done and what it wrote is still there (an export or MMLU file deleted since is redone)."""
    if not summary.done(stage):
        return False
    if stage == "export" and summary.export is not None:
        return Path(summary.export.path).is_dir()
    if stage == "eval" and summary.mmlu is not None and summary.mmlu.path:
        return Path(summary.mmlu.path).is_file()
    return True


def _run_stages(recipe: Recipe, run_dir: Path, todo: list[str], resume: bool, summary: RunSummary, out: Console,
                checks: Preflight, force: bool = False) -> dict[str, Any]:  # fmt: skip
    started = time.monotonic()
    for stage in todo:
        t0 = time.monotonic()
        {
            "train": lambda: stage_train(recipe, run_dir, resume, summary, out, checks),
            "export": lambda: stage_export(recipe, run_dir, summary, out, checks, force),
            "eval": lambda: stage_eval(recipe, run_dir, summary, out, checks),
        }[stage]()
        if not is_main_process():
            return summary.as_dict()
        gc.collect()  # the stage's model (and the Trainer's reference cycles) go before the next stage loads one
        summary.stages[stage] = StageRecord("done", round(time.monotonic() - t0, 2))
        _write_summary(recipe, run_dir, summary)
    summary.wall_seconds = round(time.monotonic() - started, 2)
    _write_summary(recipe, run_dir, summary)
    report.print_summary(summary, out)
    return summary.as_dict()


def _write_summary(recipe: Recipe, run_dir: Path, summary: RunSummary) -> None:
    if summary.description is None:  # the train stage sets it from the recipe as trained
        summary.description = RunDescription.of(recipe)
    summary.write(run_dir)


def dry_run_plan(recipe: Recipe, run_dir: Path, out: Console, stages: list[str] = ("train",)) -> dict[str, Any]:
    """Validate the recipe, data and shapes (the pre-flight of every stage), estimate memory; write nothing.

    It plans for the machine the recipe targets: a recipe that needs CUDA (a paged optimizer, flash-attention,
    offload) is planned for a CUDA GPU in bf16 on any machine. When the hub is off or unreachable and the model,
    tokenizer or data are not cached, the architecture comes from the shipped recipes' known models and the plan
    says what it could not check."""
    from velora_cli.common.errors import HubUnavailable
    from velora_cli.common.fs import check_writable
    from velora_cli.finetune.preflight import needs_cuda

    check_writable(run_dir, "output.dir", directory=True)
    reason = needs_cuda(recipe)
    device = "cuda" if reason else str(session_device())
    planned = "this machine" if not reason else f"a CUDA GPU ({reason} needs one)"
    plan: dict[str, Any] = {"recipe": recipe.name, "method": RunDescription.of(recipe).method, "run_dir": str(run_dir)}
    rows: list[tuple[str, str]] = []
    try:
        checks = preflight(recipe, [s for s in STAGES if s in {"train", *stages}], run_dir, has_adapter=False,
                           planning=True)  # fmt: skip
    except HubUnavailable as exc:
        from velora_cli.memory.arch import recipe_arch

        est = estimate(recipe_arch(recipe), settings_from_recipe(recipe, device=device))
        plan["not_checked"] = str(exc)
        rows.append(("not checked (offline)", str(exc)))
    else:
        session, recipe = checks.session, checks.recipe  # checkpointing: auto -> the planner's choice
        prepared = session.prepared
        arch = arch_of_config(prepared.config, recipe.model.name if prepared.source else str(recipe.model.config))
        est = estimate(arch, settings_from_recipe(recipe, device=device))
        plan.update(train_rows=session.counts.examples, steps=session.total_steps(),
                    val_rows=len(session.val_set) if session.val_set is not None else 0,
                    gradient_accumulation=session.gradient_accumulation())  # fmt: skip
        rows += [(key.replace("_", " "), str(plan[key]))
                 for key in ("train_rows", "val_rows", "steps", "gradient_accumulation")]  # fmt: skip
        if recipe.data.packing and not recipe.text_data:
            rows.insert(1, ("packed sequences", str(len(session.train_set))))
        for count, what in ((session.counts.truncated, "truncated"), (session.counts.dropped, "dropped")):
            if count:
                rows.insert(1, (f"rows {what} by cutoff_len", str(count)))
        if prepared.memory_choice:
            plan["planner"] = prepared.memory_choice
            rows.append(("planner", prepared.memory_choice))
    compute = settings_from_recipe(recipe, device=device).compute
    plan.update(planned_for={"device": device, "compute_dtype": compute, "why": planned},
                estimated_total_bytes=est.total)  # fmt: skip
    rows += [("method", plan["method"]), ("planned for", f"{planned}: {device}, {compute}"),
             ("estimated peak memory", human_bytes(est.total)), ("run dir", str(run_dir))]  # fmt: skip
    report.print_dry_run(recipe.name, rows, out, complete="not_checked" not in plan)
    return plan


def session_device() -> str:
    from velora_cli.common.device import default_device

    return default_device().type
