"""GPU truth (issues 16, 28): every velora claim a GPU can check, measured on one GPU in one prepared run.

On random-initialised LLaMA-shaped models (weights do not change memory or speed), in bf16, stages in order of
value, each with its share of the time budget (a stage that would overrun is skipped, with the reason):

- memory (stage_memory.py): QLoRA (nf4 + double quant, LoRA r=32 on all seven projections, dropout 0.05, AdamW)
  at 7B 1x2048 and Llama-3-8B-shaped 1x8192: stock QLoRA, + VeLoRA v,d, + VeLoRA all, + GC, VeLoRA all + lean ops
  + chunked loss, GC + chunked, MLP-only recompute (+ VeLoRA all + lean + chunked), activation offload (+ lean +
  chunked), and the planner's choice at 0.25x and 0.10x of QLoRA's GPU activations: CUDA peak, activation share,
  tokens/s and `velora memory-estimate --json`'s prediction side by side (estimates.py, in the background);
- ops (stage_kernels.py): stock vs velora's torch ops vs Liger Kernel (and Cut Cross-Entropy) for the loss,
  RMSNorm and SwiGLU at both shapes: time, memory, agreement;
- cuda_tests (stage_checks.py): `pytest -m cuda`;
- packed (stage_kernels.py): padded batches vs packed rows on stock SDPA vs per-example SDPA, 1B shape;
- pretrain (stage_pretrain.py): full vs full + VeLoRA v,d vs full + GC at GaLore's LLaMA-60M shape;
- mmlu_full (stage_mmlu.py): the cached MMLU scorer on a 7B shape over all 14,042 questions' prompt lengths;
- checkpoint, builder_check, export, mmlu (stage_checks.py): the in-place nf4 build vs a BitsAndBytesConfig
  load, `velora export` checked against PEFT, the cached scorer vs the per-question reference.

Everything goes through stable interfaces: transformers / peft / bitsandbytes, the engine's public API
(`velora_cli.engine`, `velora_cli.engine.lean.apply_lean`), and the CLI and benchmark scripts as commands.
results.json is rewritten after every configuration and stage, so a run cut short keeps what it measured; a
failing stage records its error and the next one runs. `--tiny --device cpu` runs the same code on tiny shapes.

    python benchmarks/gpu/measure.py OUT_DIR [--device cuda|cpu] [--tiny] [--budget-s 345] [--stages a,b]

Usually run through benchmarks/gpu/run.sh, which installs the carried wheels first.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # velora_cli; this folder is sys.path[0] already

import torch  # noqa: E402
from bench_common import (  # noqa: E402
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_R,
    LR,
    NUM_GROUPS,
    SHAPES,
    TARGETS,
    Clock,
    Results,
    Workload,
    error_text,
    log,
    stage,
)
from bench_report import env_stage, summary_markdown  # noqa: E402
from stage_checks import builder_check_stage, checkpoint_stage, cuda_tests_stage, export_stage, mmlu_stage  # noqa: E402
from stage_kernels import ops_stage, packed_stage  # noqa: E402
from stage_memory import (  # noqa: E402
    CONFIGS,
    attach_estimates,
    estimate_argv,
    memory_stage,
    planned_configs,
    start_estimates,  # noqa: E402
)
from stage_mmlu import mmlu_full_stage  # noqa: E402
from stage_pretrain import FULL_CONFIGS, pretrain_stage  # noqa: E402

STAGES = "memory,ops,cuda_tests,packed,pretrain,mmlu_full,builder_check,export,mmlu"


def settings(args: argparse.Namespace) -> None:
    """Shapes, step counts and time shares: the GPU run's, or the dry run's tiny ones (same keys)."""
    if args.tiny:
        args.workloads = [Workload("7b_1x2048", "tiny-7b", 1, 128, steps=1, budget_s=300),
                          Workload("8b_1x8192", "tiny-8b", 1, 128, steps=1, budget_s=300)]  # fmt: skip
        args.pretrain_workload = Workload("60m_32x256", "tiny-60m", 4, 64, steps=1, budget_s=60)
        args.packed_workload = Workload("1b_packed", "tiny-1b", 4, 128)
        args.packed_examples, args.packed_median, args.packed_rows = 12, 30, 2
        args.ops_tokens, args.ops_reps = 64, 2
        # the first subject, and the one with the longest shots (over the context: shots dropped, as at 2,048)
        args.mmlu_subjects = ["abstract_algebra", "high_school_european_history"]
        args.mmlu_limit, args.mmlu_batch, args.mmlu_budget_s = 3, 8, 60
        args.mmlu_repeat, args.agreement_limit = 1, 2
        args.export_shape, args.pytest_timeout, args.sub_timeout = "tiny-1b", 240, 240
        args.warmup, args.config_need_s, default_budget = 1, 1, 900
    else:
        args.workloads = [Workload("7b_1x2048", "llama-7b", 1, 2048, steps=3, budget_s=70),
                          Workload("8b_1x8192", "llama-8b", 1, 8192, steps=2, budget_s=140)]  # fmt: skip
        args.pretrain_workload = Workload("60m_32x256", "llama-60m", 32, 256, steps=10, budget_s=20)
        args.packed_workload = Workload("1b_packed", "llama-1b", 8, 1024)
        args.packed_examples, args.packed_median, args.packed_rows = 96, 200, 4
        args.ops_tokens, args.ops_reps = 8192, 5
        args.mmlu_subjects, args.mmlu_limit, args.mmlu_batch, args.mmlu_budget_s = None, None, 8, 45
        args.mmlu_repeat, args.agreement_limit = 8, 1000
        args.export_shape, args.pytest_timeout, args.sub_timeout = "llama-1b", 90, 150
        args.warmup, args.config_need_s, default_budget = 1, 10, 345
    args.budget = args.budget_s if args.budget_s is not None else default_budget


def estimate_requests(args: argparse.Namespace, planned: dict[str, list[Any]]) -> dict[str, list[str]]:
    requests = {}
    for w in args.workloads:
        for cfg in CONFIGS + planned[w.key]:
            if cfg.plan_error is None:
                requests[f"memory/{w.key}/{cfg.name}"] = estimate_argv(args, "memory", w, cfg)
    w = args.pretrain_workload
    for cfg in FULL_CONFIGS:
        requests[f"pretrain/{w.key}/{cfg.name}"] = estimate_argv(args, "pretrain", w, cfg, method="full")
    return requests


def planner_stage(args: argparse.Namespace, planned: dict[str, list[Any]]) -> dict[str, Any]:
    for w in args.workloads:
        planned[w.key] = planned_configs(args, w)
    return {w: {c.name: {**(c.plan or {}), "velora": list(c.velora), "memory": c.memory, "error": c.plan_error}
                for c in cfgs} for w, cfgs in planned.items()}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and few steps (the CPU dry run)")
    parser.add_argument("--budget-s", type=float, default=None, help="skip stages that would overrun this")
    parser.add_argument("--stages", default=STAGES, help=f"comma-separated subset of {STAGES}")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary checkpoint/run directories")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible (use --device cpu --tiny for the dry run)")
    wanted = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(wanted) - set(STAGES.split(",")))
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)} (known: {STAGES})")
    args.out.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()
    args.torch_device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    settings(args)
    clock = args.clock = Clock(args.budget)
    args.work = Path(tempfile.mkdtemp(prefix="velora-gpu-"))
    args.ckpt = args.estimates = args.estimates_proc = None
    tiny = args.tiny

    results = Results(args.out, {
        "issue": 28, "command": " ".join(sys.argv), "device": args.device, "tiny": tiny, "budget_s": args.budget,
        "settings": {"lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_dropout": LORA_DROPOUT, "targets": TARGETS,
                     "num_groups": NUM_GROUPS, "optimizer": "AdamW (torch)", "lr": LR, "dtype": "bf16",
                     "quantization": "nf4 + double quant", "warmup_steps": args.warmup},
        "workloads": {w.key: {"shape": w.shape, "batch": w.batch, "seq": w.seq, "timed_steps": w.steps,
                              "budget_s": w.budget_s, **SHAPES[w.shape]}
                      for w in [*args.workloads, args.pretrain_workload, args.packed_workload]},
        "configs": [c.name for c in CONFIGS],
        "pretrain_configs": [c.name for c in FULL_CONFIGS],
        "stages": {},
    })  # fmt: skip
    began = time.perf_counter()
    planned: dict[str, list[Any]] = {w.key: [] for w in args.workloads}
    try:
        stage(results, "env", clock, 0, lambda: env_stage(args))
        if "memory" in wanted or "pretrain" in wanted:
            stage(results, "planner", clock, 0, lambda: planner_stage(args, planned))
            try:
                args.estimates_proc = start_estimates(args, estimate_requests(args, planned))
            except Exception as exc:  # noqa: BLE001 - the measurements are worth having without estimates
                results.data["stages"]["estimates"] = {"error": error_text(exc)}
        if "memory" in wanted:
            stage(results, "memory", clock, 30, lambda: memory_stage(args, results, planned))
        if args.estimates_proc is not None:
            stage(results, "estimates", clock, 0, lambda: attach_estimates(args, results))
        plan = [
            ("ops", 10, lambda: ops_stage(args)),
            ("cuda_tests", 40, lambda: cuda_tests_stage(args)),
            ("packed", 15, lambda: packed_stage(args, args.packed_workload)),
            ("pretrain", 15, lambda: pretrain_stage(args, results, args.pretrain_workload)),
            ("mmlu_full", 30, lambda: mmlu_full_stage(args, "tiny-7b" if tiny else "llama-7b")),
        ]
        for name, need, fn in plan:
            if name in wanted:
                stage(results, name, clock, 5 if tiny else need, fn)
        if "pretrain" in wanted and args.estimates is not None:
            attach_estimates(args, results)
        if {"builder_check", "export", "mmlu"} & set(wanted):
            stage(results, "checkpoint", clock, 5 if tiny else 25, lambda: checkpoint_stage(args))
        for name, need, fn in [("builder_check", 25, lambda: builder_check_stage(args)),
                               ("export", 45, lambda: export_stage(args)),
                               ("mmlu", 40, lambda: mmlu_stage(args))]:  # fmt: skip
            if name in wanted and args.ckpt:
                stage(results, name, clock, 5 if tiny else need, fn)
    finally:
        if args.estimates_proc is not None and args.estimates_proc.poll() is None:
            args.estimates_proc.kill()
        results.data["wall_s"] = round(time.perf_counter() - began, 1)
        results.save()
        (args.out / "results.md").write_text(summary_markdown(results.data), encoding="utf-8")
        if not args.keep_work:
            shutil.rmtree(args.work, ignore_errors=True)
    print(summary_markdown(results.data), flush=True)
    errors = [k for k, v in results.data["stages"].items() if isinstance(v, dict) and v.get("error")]
    log(f"done in {results.data['wall_s']} s; stage errors: {errors or 'none'}; results in {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
