"""The GPU truth script's dry run (issues 16, 28): `bash benchmarks/gpu/run.sh OUT --device cpu --tiny` runs every
stage the GPU run does, on tiny shapes, so a lent GPU's minutes go to measuring rather than debugging."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["qlora", "qlora_velora_vd", "qlora_velora_all", "qlora_gc", "qlora_velora_all_lean_chunked",
           "qlora_gc_chunked", "qlora_gc_mlp_velora_all_lean_chunked", "qlora_offload_lean_chunked"]  # fmt: skip
PLANNED = ["planner_0.25x", "planner_0.10x"]
STAGES = {"env", "planner", "memory", "estimates", "ops", "cuda_tests", "packed", "pretrain", "mmlu_full",
          "checkpoint", "builder_check", "export", "mmlu"}  # fmt: skip


@pytest.mark.slow
def test_dry_run_measures_every_configuration(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "VELORA_GPU_SITE": str(tmp_path / "site")}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu" / "run.sh"), str(out), "--device", "cpu", "--tiny"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert (out / "results.json").is_file(), log[-3000:]
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    stages = data["stages"]
    assert set(stages) == STAGES, sorted(stages)
    errors = {k: v.get("error") or v.get("skipped") for k, v in stages.items() if v.get("error") or v.get("skipped")}
    assert not errors, errors
    assert proc.returncode == 0, log[-3000:]

    memory = stages["memory"]["workloads"]
    assert set(memory) == {"7b_1x2048", "8b_1x8192"}
    assert data["configs"] == CONFIGS
    for wkey, rows in memory.items():
        assert list(rows) == CONFIGS + PLANNED, wkey
        for name, row in rows.items():
            where = f"{wkey}/{name}"
            assert row["error"] is None, (where, row["error"])
            if name == "qlora_offload_lean_chunked":  # apply_lean refuses offload off CUDA; recorded, not an error
                assert row["skipped"].startswith("offload needs CUDA"), where
                continue
            if name in PLANNED and wkey == "7b_1x2048":  # 2 layers: no recompute reaches 0.25x; the planner says so
                assert row["skipped"].startswith("planner: nothing fits"), where
                continue
            for key in ("peak_allocated", "activation_bytes", "allocated_before_step", "tokens_per_s"):
                assert isinstance(row[key], (int, float)) and row[key] > 0, (where, key, row.get(key))
            assert row["finite"] and math.isfinite(row["loss_last"]), where
            est = row["estimate"]
            assert est["total"] > est["tensors"] > 0 and est["activations_and_logits"] > 0, (where, est)
            assert math.isfinite(row["estimate_vs_peak"]), where
        # what the recipe's memory section asks for is what apply_lean did
        assert rows["qlora_gc_chunked"]["lean"]["loss_backend"] == "torch"
        assert rows["qlora_velora_all_lean_chunked"]["lean"]["ops_backend"] == "torch"
        assert rows["qlora"]["lean"]["changes"] == []
        # VeLoRA, the lean techniques and checkpointing keep less for backward than plain QLoRA
        saved = {name: row.get("saved_for_backward") for name, row in rows.items()}
        assert saved["qlora_velora_all"] < saved["qlora_velora_vd"] < saved["qlora"], saved
        assert saved["qlora_velora_all_lean_chunked"] < saved["qlora_velora_all"], saved
        assert saved["qlora_gc_chunked"] < saved["qlora_gc"] < saved["qlora"], saved
        assert saved["qlora_gc_mlp_velora_all_lean_chunked"] < saved["qlora_velora_all_lean_chunked"], saved
    # at the 10-layer shape the planner fits both budgets, with a different configuration for each
    plans = [memory["8b_1x8192"][name]["plan"] for name in PLANNED]
    assert all(p["choice"] and p["budget"] < p["qlora_activations"] for p in plans), plans
    assert plans[0]["choice"] != plans[1]["choice"], plans
    assert memory["8b_1x8192"]["planner_0.10x"]["activation_bytes"] < memory["8b_1x8192"]["qlora"]["activation_bytes"]

    pretrain = stages["pretrain"]["workloads"]["60m_32x256"]
    assert list(pretrain) == data["pretrain_configs"] == ["full", "full_velora_vd", "full_gc"]
    for name, row in pretrain.items():
        assert row["error"] is None and row["tokens_per_s"] > 0 and row["finite"], (name, row)
        assert row["trainable_params"] == pretrain["full"]["trainable_params"] > 0  # every weight trains
        assert row["estimate"]["tensors"] > 0, name
    assert pretrain["full_gc"]["saved_for_backward"] < pretrain["full_velora_vd"]["saved_for_backward"]
    assert pretrain["full_velora_vd"]["saved_for_backward"] < pretrain["full"]["saved_for_backward"]

    ops = stages["ops"]["shapes"]
    assert set(ops) == {"7b_1x2048", "8b_1x8192"}
    for wkey, shape in ops.items():
        assert set(shape["ops"]) == {"loss", "rms_norm", "swiglu"}
        for op, impls in shape["ops"].items():
            assert impls["stock"]["median_ms"] > 0, (wkey, op)
            lean = impls["velora_chunked_torch" if op == "loss" else "velora_lean"]
            assert lean["out_max_rel_diff"] < 0.02 and lean["grad_max_rel_diff"] < 0.02, (wkey, op, lean)
            # Liger (and CCE) cannot run on CPU: skipped, with the reason
            fused = [name for name in impls if name in ("liger_fused", "liger", "cce")]
            assert fused and all("skipped" in impls[name] for name in fused), (wkey, op, impls)

    packed = stages["packed"]
    variants = packed["variants"]
    assert set(variants) == {"padded", "packed_block_diagonal_mask", "packed_per_example_sdpa"}
    assert packed["per_example_attention"] is True
    assert variants["packed_per_example_sdpa"]["processed_tokens"] < variants["padded"]["processed_tokens"]
    assert packed["logits_max_abs_diff_per_example_vs_mask"] < 0.05 * packed["logit_scale"]

    mmlu_full = stages["mmlu_full"]
    assert mmlu_full["questions_in_file"] == 14042 and mmlu_full["complete"]
    assert mmlu_full["questions_done"] == mmlu_full["questions_selected"] == 6  # 2 subjects x 3 in the dry run
    assert mmlu_full["prompts_with_fewer_shots"] > 0  # the tiny context (512) drops shots, as 2,048 does for some
    assert mmlu_full["questions_per_s"] > 0 and mmlu_full["extrapolated_all_questions_s"] > 0

    assert stages["builder_check"]["identical_logits"] and stages["builder_check"]["bytes_ratio"] == 1.0
    counts = stages["cuda_tests"]["counts"]
    assert counts["tests"] >= 7 and counts["failures"] == counts["errors"] == 0  # all skipped without CUDA
    figures = stages["mmlu"]["figures"]
    assert figures["questions"] > 0 and figures["identical_predictions"] == 1.0
    assert figures["fast_questions_per_s"] > 0 and figures["reference_questions_per_s"] > 0
    export = stages["export"]
    assert export["rc"] == 0 and export["exported_bytes"] > 0 and "model.safetensors" in export["files"]
    assert export["check"]["max_abs_logit_diff_vs_peft"] < 0.1
    for name in ("results.md", "run.log", "estimates.json", "pytest_cuda.log"):
        assert (out / name).is_file(), name
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back from $OUT
