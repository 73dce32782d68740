"""FSDP2 with the `memory:` techniques on sharded modules (issue 26 item 4): full fine-tuning with recompute, lean
ops and the chunked loss, and pre-training from scratch, each a 2-process run equal to a 1-process run on the same
global batch. The helpers (recipe, launcher, equality) are tests/test_fsdp.py's."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_fsdp import assert_same_run, pytestmark, recipe, velora, write  # noqa: F401  (pytestmark: slow, gloo)

MEMORY = {"checkpointing": "all", "lean_ops": True, "loss": "chunked", "chunk_size": 32}


@pytest.mark.parametrize(
    ("method", "memory"),
    [("full", MEMORY), ("full", {"checkpointing": "mlp"}), ("pretrain", MEMORY), ("lora", MEMORY)],
    ids=["full-all-lean-chunked", "full-mlp", "pretrain-all-lean-chunked", "lora-velora-all-lean-chunked"],
)
def test_memory_techniques_on_sharded_modules_equal_one_process(
    method: str, memory: dict, tmp_path: Path, tiny_llama_dir: Path
) -> None:
    def spec(run: Path) -> dict:
        r = recipe(tiny_llama_dir, run, method)
        r["memory"] = memory
        if method == "pretrain":  # the tiny model's shape from scratch, its tokenizer, the same demo rows
            r["model"] = {"config": str(tiny_llama_dir), "tokenizer": str(tiny_llama_dir)}
            r["velora"] = {"enabled": True, "layers": ["v", "d"], "num_groups": 4}
            r["data"] = {"path": r["data"]["path"], "cutoff_len": 96, "text_field": "output"}  # plain text rows
            r.pop("lora")
        return r

    one, two = tmp_path / "one", tmp_path / "two"
    proc = velora([str(write(tmp_path, "one", spec(one)))], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = velora([str(write(tmp_path, "two", spec(two))), "--nproc-per-node", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "(FSDP)" in proc.stdout + proc.stderr
    assert_same_run(one, two)


def test_fsdp_cpu_offload_on_cpu_is_one_line_before_launching(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """FSDP2's CPUOffloadPolicy copies each shard to the GPU for compute: on CPU processes it raised
    `RuntimeError: Cannot access accelerator device when none is available` from every rank."""
    r = recipe(tiny_llama_dir, tmp_path / "run", "full")
    r["distributed"]["fsdp"] = {"cpu_offload": True}
    proc = velora([str(write(tmp_path, "r", r)), "--nproc-per-node", "2"], tmp_path)
    assert proc.returncode == 2
    assert [x for x in proc.stderr.splitlines() if x.strip()] == [
        "error: distributed.fsdp.cpu_offload moves the shards between GPU and host memory and needs CUDA; CPU "
        "processes hold them in host memory already: remove it on CPU"
    ]
    assert not (tmp_path / "run").exists()
