"""`velora memory-estimate`: resolve what to estimate, estimate it, optionally measure it, report and save.

Owns turning the command line (a recipe, or --model / --preset with --set / --batch / --seq shortcuts, and
--gpu-mem or the recipe's memory.budget) into a Recipe, an Arch and Settings; it leaves the arithmetic to
memory.estimate, the frontier and choice for the budget to memory.plan, the real run to memory.measure and the
tables to report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from velora_cli.common.device import gpu_present
from velora_cli.common.errors import RecipeError, UsageError
from velora_cli.common.fs import check_writable, write_json_atomic
from velora_cli.common.memstats import parse_bytes
from velora_cli.config.load import apply_overrides, dump_recipe, load_recipe, load_yaml, validate_recipe
from velora_cli.config.recipe import Recipe
from velora_cli.memory import report
from velora_cli.memory.arch import arch_for, check_preset, recipe_arch
from velora_cli.memory.estimate import (
    Estimate,
    estimate,
    largest_fitting,
    paper_totals,
    settings_from_recipe,
    to_json,
    variants,
)
from velora_cli.memory.plan import plan_micro_batches, resolve_auto


def parse_memory(text: str, what: str = "--gpu-mem") -> int:
    """'24GiB' -> bytes. GiB/MiB (and bare G/M) are binary, GB/MB decimal."""
    return parse_bytes(text or "", what, "24GiB, 80GB or 40960MiB")


def _default_recipe(model: str | None) -> Recipe:
    data: dict[str, Any] = {"data": {"path": "unused.json"}}
    if model:
        data["model"] = {"name": model}
    return Recipe.model_validate(data)


def resolve_inputs(
    recipe: Path | None,
    model: str | None,
    preset: str | None,
    overrides: list[str],
    batch: int | None,
    seq: int | None,
    method: str | None = None,
):
    """(recipe, arch): from a recipe file, or the recipe defaults with --model/--preset; CLI shortcuts applied."""
    if model and preset:
        raise UsageError("give either --model or --preset, not both")
    if preset is not None:
        check_preset(preset)  # fails early with a did-you-mean
    extra = []
    if method is not None:
        extra.append(f"method={method}")
        if method == "pretrain" and recipe is None and (preset or model):
            extra.append(f"model.config={preset or model}")  # the architecture pretrain initialises
    extra += overrides
    if batch is not None:
        extra.append(f"train.micro_batch_size={batch}")
        extra.append(f"train.batch_size={batch}")  # keep batch_size a multiple; accumulation does not change memory
    if seq is not None:
        extra.append(f"data.cutoff_len={seq}")
    if recipe is not None:
        rec = load_recipe(recipe, extra)
    else:
        rec = _default_recipe(model)
        data = apply_overrides(rec.model_dump(mode="json", exclude_unset=True), extra)  # defaults stay defaults
        rec = validate_recipe(data, source="--set")
    if preset is not None:
        return rec, arch_for(preset=preset)
    if model is not None and rec.method != "pretrain":
        return rec, arch_for(model=model, trust_remote_code=rec.model.trust_remote_code)
    return rec, recipe_arch(rec)


def optimizer_in_backward_lever(rec: Recipe) -> list[bool] | None:
    """[False, True] when a full/pretrain recipe could step the optimizer in backward but does not (the recipe's
    own rules decide: no gradient accumulation, torch AdamW); None (as the recipe has it) otherwise."""
    if not rec.full or rec.train.optimizer_in_backward:
        return None
    data = apply_overrides(load_yaml(dump_recipe(rec)), ["train.optimizer_in_backward=true"])
    try:
        validate_recipe(data)
    except RecipeError:
        return None
    return [False, True]


def run_memory_estimate(
    *,
    recipe: Path | None,
    model: str | None,
    preset: str | None,
    overrides: list[str],
    batch: int | None,
    seq: int | None,
    gpu_mem: str | None,
    measure: bool,
    json_path: Path | None,
    method: str | None = None,
    gpus: int | None = None,
    nodes: int = 1,
) -> Estimate:
    budget = parse_memory(gpu_mem) if gpu_mem is not None else None
    if json_path is not None:
        check_writable(json_path, "--json", directory=False)
    rec, arch = resolve_inputs(recipe, model, preset, overrides, batch, seq, method)
    if budget is None:
        budget = rec.memory.budget_bytes
    s = settings_from_recipe(rec, device="cuda")
    memory_plan = None
    if s.checkpointing == "auto":
        if budget is None:
            raise UsageError("memory.checkpointing=auto needs a budget: --gpu-mem 24GiB or memory.budget")
        rec, _ = resolve_auto(rec, arch, s, budget)
        s = settings_from_recipe(rec, device="cuda")
    if budget is not None:
        levers = optimizer_in_backward_lever(rec)
        memory_plan = plan_micro_batches(arch, s, budget, rec.train.batch_size, optimizer_in_backward=levers)
    velora_layers = tuple(rec.velora.module_names)
    est = estimate(arch, s)
    largest = None
    if budget is not None:
        largest = (largest_fitting(arch, s, budget, "batch"), largest_fitting(arch, s, budget, "seq", limit=1 << 18))
    report.print_estimate(est, variants(arch, s, velora_layers), budget, largest, paper_totals(arch, s, velora_layers),
                          gpu_present())  # fmt: skip
    if memory_plan is not None:
        report.print_memory_plan(memory_plan, s.seq, memory_plan.options[0].settings.batch)
    sharding = None
    if gpus is not None:  # per-GPU figures of the run spread over gpus x nodes (memory.sharding)
        from rich.console import Console

        from velora_cli.memory.sharding import choose, print_sharding

        sharding = choose(est, rec.distributed.strategy, gpus, nodes, budget)
        print_sharding(sharding, Console())
    if measure:
        if preset is not None:
            raise UsageError("--measure needs real weights: use a recipe or --model, not --preset")
        if s.pairs:
            raise UsageError("--measure runs SFT steps; DPO's pair layout is measured by benchmarks/dpo_memory.py")
        from velora_cli.common.device import default_device
        from velora_cli.common.logs import quiet_transformers
        from velora_cli.memory.measure import measure_training  # torch and the model: only for a real run

        quiet_transformers()
        run_s = settings_from_recipe(rec, device=default_device().type)
        measured = measure_training(rec, run_s)
        run_est = estimate(arch, run_s)
        report.print_measured(run_est, measured)
        est.measured = {k: v for k, v in measured.items() if k != "by_op"}
        est.measured["estimated_saved_for_backward"] = int(run_est.act.meter_view)
    if json_path is not None:
        data = to_json(est)
        if memory_plan is not None:
            data["plan"] = memory_plan.as_dict()
        if sharding is not None:
            data["sharding"] = sharding.as_dict()
        write_json_atomic(json_path, data)
    return est
