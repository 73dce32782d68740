"""The GPU truth script's dry run (issue 16): `bash benchmarks/gpu/run.sh OUT --device cpu --tiny` runs every stage
the GPU run does, on tiny shapes, so a lent GPU's minutes go to measuring rather than debugging."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
    errors = {k: v.get("error") or v.get("skipped") for k, v in stages.items() if v.get("error") or v.get("skipped")}
    assert not errors, errors
    assert proc.returncode == 0, log[-3000:]

    memory = stages["memory"]["workloads"]
    assert set(memory) == {"7b_1x512", "7b_1x2048", "1b_8x1024"}
    for wkey, rows in memory.items():
        assert list(rows) == data["configs"] == ["qlora", "qlora_velora_vd", "qlora_velora_all", "qlora_gc"]
        for name, row in rows.items():
            where = f"{wkey}/{name}"
            assert row["error"] is None, (where, row["error"])
            for key in ("peak_allocated", "activation_bytes", "allocated_before_step", "tokens_per_s"):
                assert isinstance(row[key], (int, float)) and row[key] > 0, (where, key, row.get(key))
            assert row["finite"] and math.isfinite(row["loss_last"]), where
            est = row["estimate"]
            assert est["total"] > est["tensors"] > 0 and est["activations_and_logits"] > 0, (where, est)
            assert math.isfinite(row["estimate_vs_peak"]), where
    # VeLoRA and checkpointing keep less for backward than plain QLoRA, on every workload
    for rows in memory.values():
        assert rows["qlora_velora_vd"]["saved_for_backward"] < rows["qlora"]["saved_for_backward"]
        assert rows["qlora_velora_all"]["saved_for_backward"] < rows["qlora_velora_vd"]["saved_for_backward"]
        assert rows["qlora_gc"]["activation_bytes"] < rows["qlora"]["activation_bytes"]

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
