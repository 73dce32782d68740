"""What `velora memory-estimate` prints: the estimate table, the measured comparison and the planner's options."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from velora_cli.common.memstats import human_bytes
from velora_cli.memory.estimate import COMPONENTS, OVERHEAD_CONTEXT, OVERHEAD_FRACTION, Estimate
from velora_cli.memory.plan import PlanResult


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _gib_against(n: float, budget: float) -> str:
    """`n` in GiB with the digits it takes to tell it from `budget` (2.004 against 2.00 GiB, not 2.00 (no))."""
    digits = 2
    while digits < 5 and (f"{n / 2**30:.{digits}f}" == f"{budget / 2**30:.{digits}f}") and n != budget:
        digits += 1
    return f"{n / 2**30:.{digits}f}"


def target_line(device: str, cuda_here: bool) -> str:
    """Which machine the estimate is for: a CUDA GPU always (what the recipe is planned to run on); said plainly
    when this machine has none, so a CPU's figures are not mistaken for it."""
    if device == "cuda" and not cuda_here:
        return "planned for a CUDA GPU (this machine has none; its own run would differ: fp32, no CUDA context)"
    return f"planned for {device}"


def print_estimate(
    est: Estimate,
    variants: list[tuple[str, Estimate]],
    budget: int | None,
    largest: tuple[int, int] | None,
    paper: dict[str, dict[str, float]] | None,
    cuda_here: bool = True,
) -> None:
    """The memory-estimate table: components per variant, the budget verdict and the paper's accounting."""
    arch, s = est.arch, est.settings
    console = Console()
    title = (
        f"{arch.name}: {arch.total_params / 1e9:.2f}B params, {s.quantization}"
        f"{' + double quant' if s.quantization in ('nf4', 'fp4') and s.double_quant else ''}, {s.compute} compute, "
        f"micro-batch {s.batch}{' pairs (2 rows each)' if s.pairs else ''} x seq {s.seq}, "
        + (f"LoRA r={s.lora_r} on {','.join(t[0] for t in s.targets)}, dropout {s.lora_dropout}, " if s.targets
           else "every weight trained (no LoRA), ")
        + f"{s.attn}, {s.optimizer}, {s.device}"
    )  # fmt: skip
    table = Table(title=title, title_justify="left")
    table.add_column("GiB")
    for label, v in variants:
        mine = v.settings.velora == s.velora and v.settings.recompute == s.recompute
        table.add_column(label + (" *" if mine else ""), justify="right")
    for comp in COMPONENTS:
        table.add_row(comp, *(_gib(v.components[comp]) for _, v in variants))
    table.add_row("total", *(f"[bold]{_gib(v.total)}[/bold]" for _, v in variants))
    if budget is not None:
        table.add_row("fits", *("yes" if v.total <= budget else "[red]no[/red]" for _, v in variants))
    console.print(table)
    console.print(target_line(s.device, cuda_here))
    console.print(
        f"* = this recipe. overhead = {OVERHEAD_CONTEXT // 2**20} MiB CUDA context + "
        f"{OVERHEAD_FRACTION:.0%} allocator slack (an assumption, not measured here). "
        "activations assume unpadded sequences (padding adds a mask and, for GQA, repeated k/v)."
    )
    per_layer = ", ".join(f"{k} {v:,.0f}" for k, v in est.act.per_layer.items() if v)
    console.print(f"per decoder layer, bytes/token: {per_layer} (total {sum(est.act.per_layer.values()):,.0f})")
    if budget is not None and largest is not None:
        mb, ms = largest
        verdict = "fits" if est.total <= budget else "does NOT fit"
        console.print(
            f"{human_bytes(budget)}: this recipe {verdict} ({human_bytes(est.total)}); "
            f"largest micro-batch at seq {s.seq}: {mb or 'none'}; largest seq at micro-batch {s.batch}: {ms or 'none'}"
        )
    if paper is not None:
        console.print(
            "paper accounting (4-bit weights + fp16 adapters + fp16 inputs of trainable layers): "
            + ", ".join(f"{k} {human_bytes(v['total'])}" for k, v in paper.items())
        )


def print_measured(run_est: Estimate, measured: dict[str, Any]) -> None:
    """Estimated vs measured bytes per component, for the settings of the measuring run's device."""
    table = Table(title=f"estimated vs measured ({run_est.settings.device}, {run_est.settings.compute})")
    for col in ("component", "estimated", "measured", "diff"):
        table.add_column(col, justify="left" if col == "component" else "right")
    rows = [(k, run_est.components[k], measured[k]) for k in ("weights", "adapters", "gradients", "optimizer")]
    rows.append(("saved for backward", int(run_est.act.meter_view), measured["saved_for_backward"]))
    for name, e, m in rows:
        table.add_row(name, human_bytes(e), human_bytes(m), f"{(e - m) / m:+.1%}" if m else "-")
    Console().print(table)
    if "cuda_peak_allocated" in measured:
        Console().print(f"CUDA peak allocated {human_bytes(measured['cuda_peak_allocated'])}")


def print_memory_plan(result: PlanResult, seq: int, batch: int) -> None:
    """The planner's frontier (memory, modelled speed, longest batch-1 context in the budget) and its choice."""
    console = Console()
    table = Table(
        title=f"frontier for {human_bytes(result.budget)} (micro-batch {batch} x seq {seq}; "
        f"speed: modelled tokens/s vs {result.baseline})",
        title_justify="left",
    )
    for col in ("configuration", "GiB", "speed", "max seq @ batch 1", "host GiB"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for option in result.frontier:
        mark = " <" if option is result.choice else ""
        fits = "" if option.total <= result.budget else " [red](no)[/red]"
        table.add_row(
            option.name + mark,
            _gib_against(option.total, result.budget) + fits,
            f"{option.speed:.2f}x",
            f"{option.max_seq:,}" if option.max_seq else "none",
            _gib(option.host) if option.host else "-",
        )
    console.print(table)
    console.print(("choice: " if result.choice else "no choice: ") + result.reason)
