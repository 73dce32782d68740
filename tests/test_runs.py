"""runs: summary.json read and written through the typed RunSummary in the layout earlier versions wrote, and
the one staged-write helper (files and directories appear whole or not at all)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from velora_cli.common.fs import staged, staged_dir, write_text_atomic
from velora_cli.rundir.layout import SUMMARY_FILE
from velora_cli.rundir.summary import RunSummary, summaries

HELDOUT = {"exact_match": 0.25, "loss": 2.0, "n": 4, "examples": [{"instruction": "i", "expected": "e",
                                                                  "greedy": "g", "correct": True}]}  # fmt: skip
SUMMARY = {  # the layout of summary.json as velora 0.x's pipeline wrote it (an untyped dict)
    "stages": {"train": {"status": "done", "seconds": 12.3}, "export": {"status": "done", "seconds": 4.5}},
    "train": {
        "run_dir": "runs/demo", "steps": 2, "interrupted": False, "train_loss": 1.2, "eval_loss": 1.1,
        "tokens_per_second": 100.0, "activation_bytes_per_token": 1000.0, "velora_saved_bytes_per_token": 500.0,
        "peak_memory": {"device": "cpu", "allocated": 1, "reserved": 1, "peak": 2}, "seconds": 3.0,
        "before": {"eval_loss": 1.5, "heldout": HELDOUT}, "after": {"eval_loss": 1.1, "heldout": HELDOUT},
    },
    "recipe": "demo", "base_model": "embedded:smollm2-135m", "quantization": "nf4",
    "velora": {"enabled": True, "layers": ["v_proj", "down_proj"], "num_groups": 32, "subtoken_size": None,
               "init": "batch_average_once", "scale": 1.0},
    "lora": {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
    "gradient_checkpointing": False,
    "export": {"path": "runs/demo/merged", "dtype": "bf16"},
    "eval": {"mmlu": {"overall": {"acc": 0.5, "n": 4}, "categories": {"STEM": {"acc": 0.5, "n": 4}}, "path": "p"}},
    "wall_seconds": 20.0,
}  # fmt: skip


def test_summary_json_round_trips_through_the_typed_summary(tmp_path: Path) -> None:
    (tmp_path / SUMMARY_FILE).write_text(json.dumps(SUMMARY))
    summary = RunSummary.load(tmp_path)
    assert summary is not None and summary.done("train") and not summary.done("eval")
    assert summary.train.peak_memory.peak == 2 and summary.train.before.heldout.exact_match == 0.25
    assert summary.mmlu.overall.acc == 0.5 and summary.export.dtype == "bf16"
    assert summary.description.method == "QLoRA + VeLoRA (v_proj,down_proj)"
    summary.write(tmp_path / "again")
    assert json.loads((tmp_path / "again" / SUMMARY_FILE).read_text()) == SUMMARY


def test_unknown_fields_are_kept_and_a_damaged_summary_reads_as_none(tmp_path: Path) -> None:
    newer = {**SUMMARY, "future": {"x": 1}, "train": {**SUMMARY["train"], "new_figure": 7}}
    (tmp_path / SUMMARY_FILE).write_text(json.dumps(newer))
    RunSummary.load(tmp_path).write(tmp_path)
    assert json.loads((tmp_path / SUMMARY_FILE).read_text()) == newer
    (tmp_path / SUMMARY_FILE).write_text("{not json")
    assert RunSummary.load(tmp_path) is None
    assert RunSummary.load(tmp_path / "missing") is None
    assert [(p.name, s.train) for p, s in summaries(tmp_path.parent) if p == tmp_path] == [(tmp_path.name, None)]


def test_staged_writes_appear_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"), staged_dir(target) as staging:
        (staging / "new.txt").write_text("half")
        raise OSError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in target.iterdir()] == ["old.txt"]
    with staged_dir(target) as staging:
        (staging / "new.txt").write_text("new")
        assert [p.name for p in target.iterdir()] == ["old.txt"]  # nothing changes until the block completes
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in target.iterdir()] == ["new.txt"]

    path = tmp_path / "deep" / "file.json"
    write_text_atomic(path, "one")
    with pytest.raises(RuntimeError), staged(path) as tmp:
        tmp.write_text("two")
        raise RuntimeError
    assert path.read_text() == "one" and [p.name for p in path.parent.iterdir()] == ["file.json"]


def test_runs_listing_describes_the_memory_techniques_that_ran(tmp_path: Path, capsys) -> None:
    """`velora runs` labels a run from its resolved memory section (the planner's checkpointing choice, chunked
    loss, lean ops, offload), a full-method run by its method, and an older summary (no `memory`) by its GC flag."""
    from velora_cli.cli import main

    memory = {"loss": "chunked", "lean_ops": True, "checkpointing": "every:2", "offload": True,
              "optimizer_in_backward": False}  # fmt: skip
    rows = {
        "planned": {**SUMMARY, "memory": memory},
        "full": {**SUMMARY, "method": "full", "quantization": "none", "velora": {"enabled": False},
                 "memory": {**memory, "checkpointing": "mlp", "offload": False, "optimizer_in_backward": True}},
        "legacy": {**SUMMARY, "gradient_checkpointing": True},
    }  # fmt: skip
    for name, data in rows.items():
        data = {k: v for k, v in data.items() if not (k == "gradient_checkpointing" and "memory" in data)}
        (tmp_path / name).mkdir()
        (tmp_path / name / SUMMARY_FILE).write_text(json.dumps(data))
    main(["runs", str(tmp_path)])
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("│ ")}
    assert "QLoRA + VeLoRA (v_proj,down_proj) + lean + chunked + GC every:2 + offload" in lines["planned"]
    assert "full + lean + chunked + GC mlp + optimizer in backward" in lines["full"]
    assert "QLoRA + VeLoRA (v_proj,down_proj) + GC " in lines["legacy"] and "lean" not in lines["legacy"]
    again = RunSummary.load(tmp_path / "planned")
    assert again.description.memory.checkpointing == "every:2" and "gradient_checkpointing" not in (
        again.as_dict())  # fmt: skip
