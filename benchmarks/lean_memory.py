"""Bytes saved for backward per token on SmolLM2 nf4 + LoRA, stock vs each lean technique (not a timed benchmark).

One model per stack (QLoRA r=8 on all seven projections, optionally VeLoRA on all seven), the techniques applied
and removed in turn with apply_lean / remove_lean, one metered training step each on the same batch (labels =
input ids, as benchmarks/activation_memory.py). With --grads, each configuration's loss and worst per-tensor
gradient difference against the stock path (max|diff| / max|grad|) are printed too, and the noise floor: the
stock path itself run with one thread instead of the default (another BLAS summation order).

    python benchmarks/lean_memory.py [--batch 2] [--seq 256] [--compute fp32|bf16] [--grads] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from velora_cli.config.load import validate_recipe  # noqa: E402
from velora_cli.config.presets import DEFAULT_MODEL  # noqa: E402
from velora_cli.engine.lean import apply_lean, remove_lean  # noqa: E402
from velora_cli.engine.meter import ActivationMeter  # noqa: E402
from velora_cli.models.build import build_training_model  # noqa: E402
from velora_cli.models.load import resolve_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TECHNIQUES: dict[str, dict[str, Any] | None] = {
    "stock": None,
    "chunked": {"loss": "chunked", "lean_ops": False},
    "lean_ops": {"loss": "full", "lean_ops": True},
    "gc_every2": {"loss": "full", "lean_ops": False, "checkpointing": "every:2"},
    "gc_every3": {"loss": "full", "lean_ops": False, "checkpointing": "every:3"},
    "gc_mlp": {"loss": "full", "lean_ops": False, "checkpointing": "mlp"},
    "gc_all": {"loss": "full", "lean_ops": False, "checkpointing": "all"},
    "lean+chunked": {"loss": "chunked", "lean_ops": True},
    "gc_mlp+lean+chunked": {"loss": "chunked", "lean_ops": True, "checkpointing": "mlp"},
    "gc_all+chunked": {"loss": "chunked", "lean_ops": False, "checkpointing": "all"},
}


def build(velora: bool, compute: str, tmp: Path) -> torch.nn.Module:
    recipe = validate_recipe({
        "model": {"name": str(resolve_model(DEFAULT_MODEL).path), "quantization": "nf4", "compute_dtype": compute},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": TARGETS},
        "velora": {"layers": TARGETS, "num_groups": 32} if velora else {"enabled": False},
        "data": {"path": str(tmp / "unused.json")},
        "output": {"dir": str(tmp / "run")},
    })  # fmt: skip
    torch.manual_seed(0)
    model, _ = build_training_model(recipe, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so every adapter gradient is non-trivial
            param.data.normal_(0.0, 0.01, generator=g)
    return model.train()


class TotalsOnly(ActivationMeter):
    """The meter without per-op attribution, for checkpointed models.

    Attribution reads every graph node's saved tensors; for a node inside a non-reentrant checkpointed region that
    read runs checkpoint's unpack hook, which recomputes the whole region outside backward (a new graph-task id
    each time, kept until backward): one recompute per saved tensor, gigabytes on SmolLM2. Totals need no walk.
    """

    def _capture_output(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        pass


def step(
    model: torch.nn.Module, ids: torch.Tensor, attribute: bool = True
) -> tuple[int, dict[str, int], float, dict[str, torch.Tensor]]:
    torch.manual_seed(3)  # the same dropout masks every time
    with (ActivationMeter if attribute else TotalsOnly)(model) as meter:
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return meter.total_bytes, meter.by_op() if attribute else {}, out.loss.item(), grads


def worst(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    return max(((grads[n] - r).abs().max() / r.abs().max()).item() for n, r in ref.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--compute", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--grads", action="store_true", help="also compare loss and gradients with the stock path")
    parser.add_argument("--only", nargs="*", help="technique names to run (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tokens = args.batch * args.seq
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for velora in (False, True):
            stack = "qlora_velora_all" if velora else "qlora"
            model = build(velora, args.compute, Path(tmp))
            step(model, ids)  # VeLoRA's v is set by the first batch; meter from the second on
            ref_bytes, _, ref_loss, ref_grads = step(model, ids)
            if args.grads:
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                floor = worst(step(model, ids)[3], ref_grads)
                torch.set_num_threads(threads)
                print(f"[{stack}] noise floor (stock, 1 thread vs {threads}): worst grad rel diff {floor:.2e}")
            base = results.get("qlora/stock", {}).get("bytes_per_token", ref_bytes / tokens)
            for name, lean in TECHNIQUES.items():
                if args.only and name not in args.only:
                    continue
                if lean is not None:
                    apply_lean(model, **lean)
                checkpointed = lean is not None and lean.get("checkpointing", "none") != "none"
                if lean is None:
                    nbytes, by_op, loss, grads = ref_bytes, {}, ref_loss, None
                else:
                    nbytes, by_op, loss, grads = step(model, ids, attribute=not checkpointed)
                if lean is not None:
                    remove_lean(model)
                    by_op = {k: v // tokens for k, v in list(by_op.items())[:5]}
                row: dict[str, Any] = {"bytes_per_token": nbytes / tokens, "vs_qlora": nbytes / tokens / base}
                line = f"[{stack}] {name:22s} {nbytes / tokens / 1024:8.1f} KB/token  {row['vs_qlora']:6.3f}x QLoRA"
                if args.grads and grads is not None:
                    row["loss_diff"] = loss - ref_loss
                    row["worst_grad_rel_diff"] = worst(grads, ref_grads)
                    line += f"  loss diff {loss - ref_loss:+.1e}  worst grad {row['worst_grad_rel_diff']:.1e}"
                print(line + (f"  top {by_op}" if by_op else ""), flush=True)
                results[f"{stack}/{name}"] = row
            del model
    if args.json:
        args.json.write_text(json.dumps({"tokens": tokens, "compute": args.compute, "configs": results}, indent=2))


if __name__ == "__main__":
    main()
