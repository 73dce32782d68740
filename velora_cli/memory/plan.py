"""The planner: for a GPU budget, the fastest way to fit a training run, with VeLoRA as one of its levers.

Owns the speed model (relative tokens/s of a configuration against the same method with no technique), the
enumeration of configurations (VeLoRA off / the recipe's layers / all seven, lean ops, chunked loss, recompute
none / every:K / mlp / all, offload on CUDA, and for full/pretrain the optimizer in backward when the recipe allows
it), their memory (memory.estimate) and longest batch-1 context, the Pareto frontier, the choice with a one-line
reason, and resolving a recipe's `memory.checkpointing: auto` before the model is built.

For full/pretrain the weights, gradients and optimizer states are fixed costs the levers do not touch, except the
optimizer in backward, which holds one parameter's gradient instead of all of them. It is a lever of the frontier
only when the recipe can use it (no gradient accumulation, torch AdamW: train.optimizer_in_backward's own rules)
and counts as a departure from the recipe like VeLoRA (it gives up gradient clipping), so the planner prefers
configurations without it at equal speed; `checkpointing: auto` keeps it as the recipe says, as it keeps VeLoRA.

Speed model, stated assumptions (no timing here; tokens/s relative to the same method with nothing else, 1.0):
- a step costs forward + backward FLOPs; forward per token is 2 x (every decoder linear) + causal attention
  (2 x seq x heads x head_dim per layer) + the lm_head (2 x hidden x vocab). Backward costs BACKWARD_PER_FORWARD
  times the forward: with a frozen base it is mostly input gradients (~1x) plus the 4-bit dequantisation and
  attention's backward; 1.2 reproduces the measured cost of full GC on SmolLM2 (0.73x tokens/s, BENCHMARKS.md,
  where the decoder layers are 79% of the forward FLOPs). When every weight trains (full/pretrain) backward also
  computes the weight gradients: BACKWARD_PER_FORWARD_FULL, the usual 2x (the 6N FLOPs per token rule), an
  assumption not yet measured here;
- recompute re-runs its share of the forward: `all` every decoder layer, `every:K` ceil(L/K) of them, `mlp` the
  MLP's share of each layer (gate/up/down FLOPs over the layer's);
- VeLoRA, the chunked loss and the lean ops cost nothing (measured within noise of 1.0x on SmolLM2: the chunked
  loss does the logits-gradient matmul in forward instead of backward, the lean ops re-run an elementwise SiLU);
- packing (data.packing) changes no FLOPs per token in this model: a packed micro-batch is counted as full rows of
  cutoff_len tokens, as an unpacked one is (memory.estimate), and attention is not modelled per example;
- offload (CUDA only) copies the decoder stack's saved bytes to the host in forward and back in backward, over
  PCIe at PCIE_BYTES_PER_S, overlapped with compute at GPU_FLOPS: only the part of a copy longer than its pass
  costs time. Host (pinned) memory is assumed to be sufficient; it is reported, not limited.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from velora_cli.common.errors import RecipeError
from velora_cli.common.memstats import human_bytes
from velora_cli.config.description import method_name
from velora_cli.config.presets import LLAMA_PROJECTIONS
from velora_cli.memory.arch import Arch
from velora_cli.memory.estimate import Estimate, Settings, estimate, largest_fitting, settings_label

BACKWARD_PER_FORWARD = 1.2  # backward FLOP-time per forward (frozen 4-bit base), calibrated on SmolLM2's GC cost
BACKWARD_PER_FORWARD_FULL = 2.0  # every weight trains: input and weight gradients, two matmuls per forward one
GPU_FLOPS = 100e12  # effective training FLOP/s of the GPU (a 24-80 GB bf16 card, dequantisation included)
PCIE_BYTES_PER_S = 20e9  # pinned host <-> device copy bandwidth (PCIe 4.0 x16, effective)
RECOMPUTE = ("none", "every:4", "every:3", "every:2", "mlp", "all")
MAX_SEQ = 1 << 20  # longest context searched (1M tokens)
PAPER_VELORA_LAYERS = ("v_proj", "down_proj")  # the paper's choice for LLaMA (its Table 6): accuracy kept


# --------------------------------------------------------------------------------------------- speed


def _forward_flops(arch: Arch, seq: int) -> tuple[float, float, float]:
    """Forward FLOPs per token: (all decoder layers, their MLPs, the whole model)."""
    linear = sum(2 * i * o for _, i, o, _ in arch.linears)
    mlp = sum(2 * i * o for n, i, o, _ in arch.linears if n in ("gate_proj", "up_proj", "down_proj"))
    attention = 2 * seq * arch.heads * arch.head_dim  # QK^T and PV over seq/2 keys on average
    layers = arch.layers * (linear + attention)
    return layers, arch.layers * mlp, layers + 2 * arch.hidden * arch.vocab


def relative_speed(arch: Arch, s: Settings) -> float:
    """Modelled tokens/s relative to the method with no technique (see the module docstring for the assumptions)."""
    layers, mlp, forward = _forward_flops(arch, s.seq)
    backward = BACKWARD_PER_FORWARD_FULL if s.full else BACKWARD_PER_FORWARD
    base = forward * (1 + backward)
    rec = s.recompute
    extra = 0.0
    if rec.mode in ("all", "every"):
        extra += layers * len(rec.layers(arch.layers)) / arch.layers
    elif rec.mode == "mlp":
        extra += mlp
    if s.offload:
        host = estimate(arch, s).act.host / s.tokens  # bytes per token that travel each way
        copy = host / PCIE_BYTES_PER_S
        extra += GPU_FLOPS * (max(0.0, copy - forward / GPU_FLOPS) + max(0.0, copy - forward * backward / GPU_FLOPS))
    return base / (base + extra)


# -------------------------------------------------------------------------------------------- planner


@dataclass(frozen=True)
class Option:
    """One configuration the planner considered, at the run's micro-batch and sequence length."""

    settings: Settings
    total: int  # bytes, the estimate's total
    speed: float  # relative tokens/s
    max_seq: int  # longest sequence at micro-batch 1 within the budget (0: none)
    host: int = 0  # offloaded bytes

    @property
    def name(self) -> str:
        return label(self.settings)

    def as_dict(self) -> dict[str, Any]:
        s = self.settings
        return {
            "name": self.name, "bytes": self.total, "relative_speed": round(self.speed, 4),
            "max_seq_batch1": self.max_seq, "velora": list(s.velora), "loss": s.loss, "lean_ops": s.lean_ops,
            "checkpointing": str(s.recompute), "offload": s.offload, "host_bytes": self.host,
            "optimizer_in_backward": s.optimizer_in_backward,
        }  # fmt: skip


@dataclass
class PlanResult:
    budget: int
    options: list[Option]  # every configuration considered
    frontier: list[Option]  # Pareto-optimal in (memory, speed), most memory first
    choice: Option | None
    reason: str
    baseline: str = "QLoRA"  # what the speeds are relative to

    def as_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "frontier": [o.as_dict() for o in self.frontier],
            "choice": self.choice.as_dict() if self.choice else None,
            "reason": self.reason,
        }


def label(s: Settings) -> str:
    return settings_label(s)


def baseline(s: Settings) -> str:
    """What speeds are relative to: the method with no technique (QLoRA, LoRA, full or pretrain)."""
    return method_name(s.method, s.quantization)


def _approximation(s: Settings) -> int:
    """How far a configuration strays from the exact method: VeLoRA compresses (more layers, further); the
    optimizer in backward gives up gradient clipping."""
    return len(s.velora) + int(s.optimizer_in_backward)


def candidates(
    s: Settings,
    velora: list[tuple[str, ...]] | None = None,
    loss: list[str] | None = None,
    lean_ops: list[bool] | None = None,
    recompute: tuple[str, ...] = RECOMPUTE,
    offload: list[bool] | None = None,
    optimizer_in_backward: list[bool] | None = None,
) -> list[Settings]:
    """Settings for every combination of the levers (None: the planner's full range for that lever; the optimizer
    in backward: as `s` has it)."""
    every = LLAMA_PROJECTIONS if s.full else tuple(m for m in LLAMA_PROJECTIONS if m in s.targets)
    velora = velora if velora is not None else [(), PAPER_VELORA_LAYERS, every]
    offload = offload if offload is not None else ([False, True] if s.device == "cuda" else [False])
    out, seen = [], set()
    for vel, lo, lean, rec, off, oib in itertools.product(
        velora,
        loss or ["full", "chunked"],
        lean_ops if lean_ops is not None else [False, True],
        recompute,
        offload,
        optimizer_in_backward or [s.optimizer_in_backward],
    ):
        c = dataclasses.replace(
            s, velora=vel, loss=lo, lean_ops=lean, checkpointing=rec, offload=off, optimizer_in_backward=oib,
            gradient_checkpointing=False,
        )  # fmt: skip
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def plan(
    arch: Arch, settings: list[Settings], budget: int, size: Callable[[Estimate], float] | None = None
) -> PlanResult:
    """Evaluate every configuration; choose the fastest that fits (ties: less VeLoRA, then less memory).

    `size`: what must fit the budget (default: the estimate's total; the benchmarks budget the bytes saved for
    backward, `lambda e: e.act.meter_view`). every:K with K above the model's layer count is left out (it would
    checkpoint layer 0 only, as every:L does)."""
    options = []
    for s in settings:
        if s.recompute.mode == "every" and s.recompute.every > arch.layers:
            continue
        est = estimate(arch, s)
        if size is not None:
            est.components = {"activations": int(size(est))}
        one = dataclasses.replace(s, batch=1)
        options.append(Option(s, est.total, relative_speed(arch, s), largest_fitting(arch, one, budget, "seq", MAX_SEQ),
                              int(est.act.host)))  # fmt: skip
    frontier = pareto(options)
    fitting = [o for o in options if o.total <= budget]
    if not fitting:
        smallest = min(options, key=lambda o: o.total)
        reason = (
            f"nothing fits {human_bytes(budget)} at micro-batch {smallest.settings.batch} x seq "
            f"{smallest.settings.seq}: the smallest, {smallest.name}, needs {human_bytes(smallest.total)}"
        )
        return PlanResult(budget, options, frontier, None, reason, baseline(smallest.settings))
    choice = min(fitting, key=lambda o: (-round(o.speed, 6), _approximation(o.settings), o.total))
    faster = [o for o in options if round(o.speed, 6) > round(choice.speed, 6)]
    why = f"{choice.name}: the fastest that fits ({choice.speed:.2f}x {baseline(choice.settings)}'s tokens/s, "
    why += f"{choice.total / 2**30:.2f} of {budget / 2**30:.2f} GiB)"
    if faster:
        near = min(faster, key=lambda o: o.total)
        why += f"; faster needs more: {near.name} {near.speed:.2f}x at {near.total / 2**30:.3f} GiB"
    if set(choice.settings.velora) - set(PAPER_VELORA_LAYERS):
        # The speed model has no accuracy term; this is the one lever that trades it (BENCHMARKS.md, convergence).
        why += "; VeLoRA beyond v,d approximates more weight gradients than the paper's setting and can cost accuracy"
    return PlanResult(budget, options, frontier, choice, why, baseline(choice.settings))


def plan_micro_batches(
    arch: Arch, s: Settings, budget: int, batch_size: int, optimizer_in_backward: list[bool] | None = None
) -> PlanResult:
    """plan() over every lever at the run's micro-batch; when nothing fits there, at the largest smaller
    micro-batch that divides `batch_size` and fits: more gradient accumulation, the same batch, the same
    training (the speed model has no term for a small micro-batch's lower GPU efficiency, so this is a fallback,
    not a lever it trades against the others)."""
    result = plan(arch, candidates(s, optimizer_in_backward=optimizer_in_backward), budget)
    if result.choice is not None:
        return result
    for micro in sorted((m for m in range(1, s.batch) if batch_size % m == 0), reverse=True):
        levers = candidates(dataclasses.replace(s, batch=micro), optimizer_in_backward=optimizer_in_backward)
        smaller = plan(arch, levers, budget)
        if smaller.choice is not None:
            smaller.reason = (
                f"nothing fits at micro-batch {s.batch}; at micro-batch {micro} (set train.micro_batch_size={micro}: "
                f"{batch_size // micro} accumulation steps per batch of {batch_size}) {smaller.reason}"
            )
            return smaller
    return result


def pareto(options: list[Option]) -> list[Option]:
    """Options no other beats on memory, speed and VeLoRA at once (most memory first)."""

    def beats(a: Option, b: Option) -> bool:
        no_worse = (
            a.total <= b.total
            and a.speed >= b.speed - 1e-9
            and _approximation(a.settings) <= _approximation(b.settings)
        )
        better = (
            a.total < b.total or a.speed > b.speed + 1e-9 or _approximation(a.settings) < _approximation(b.settings)
        )
        return no_worse and better

    front = [o for o in options if not any(beats(other, o) for other in options)]
    return sorted(front, key=lambda o: (-o.total, _approximation(o.settings)))


# ------------------------------------------------------------------------------------- recipe's auto


def resolve_auto(recipe: Any, arch: Arch, s: Settings, budget: int | None) -> tuple[Any, PlanResult]:
    """A copy of `recipe` with memory.checkpointing (and, on CUDA unless set, offload) chosen by the planner.

    VeLoRA, the loss, the lean ops and the optimizer in backward stay as the recipe has them: VeLoRA and the
    optimizer in backward change the training math, which is the user's call, and the other two are exact.
    Raises RecipeError (one line) when nothing fits."""
    mem = recipe.memory
    if budget is None:
        raise RecipeError("memory.checkpointing=auto needs memory.budget (e.g. 22GiB) when no GPU is in use")
    offload = [mem.offload] if "offload" in mem.model_fields_set else None
    options = candidates(s, velora=[s.velora], loss=[s.loss], lean_ops=[s.lean_ops], offload=offload)
    result = plan(arch, options, budget)
    if result.choice is None:
        raise RecipeError(
            f"memory.checkpointing=auto: {result.reason}; lower data.cutoff_len or train.micro_batch_size"
        )
    chosen = result.choice.settings
    memory = mem.model_copy(update={"checkpointing": str(chosen.recompute), "offload": chosen.offload})
    return recipe.model_copy(update={"memory": memory}), result
