"""Fast checks of sharded training's plan: the `distributed:` recipe section, per-GPU memory for DDP and FSDP
(memory-estimate --gpus / --nodes, --json), the auto choice, and the launcher's one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]


def test_distributed_section_defaults_and_errors(tmp_path: Path) -> None:
    from velora_cli.common.errors import RecipeError
    from velora_cli.config.load import validate_recipe

    recipe = validate_recipe({"data": {"path": "x.json"}})
    d = recipe.distributed
    assert (d.strategy, d.fsdp.cpu_offload, d.fsdp.reshard_after_forward, d.fsdp.state_dict) == (
        "auto", False, True, "sharded")  # fmt: skip
    with pytest.raises(RecipeError, match=r"distributed\.strategy"):
        validate_recipe({"data": {"path": "x.json"}, "distributed": {"strategy": "zero3"}})
    with pytest.raises(RecipeError, match=r"distributed\.fsdp\.state_dict"):
        validate_recipe({"data": {"path": "x.json"}, "distributed": {"fsdp": {"state_dict": "half"}}})
    full = validate_recipe({"data": {"path": "x.json"}, "distributed": {"fsdp": {"state_dict": "full"}}})
    assert full.distributed.fsdp.state_dict == "full"


def estimate_json(capsys, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "est.json"
    code, stdout, err = run_cli(["memory-estimate", *args, "--json", str(out)], capsys)
    assert code == 0, err
    return json.loads(out.read_text())


def test_llama7b_fsdp_on_two_gpus_is_below_one_gpu(capsys, tmp_path: Path) -> None:
    recipe = str(REPO / "recipes" / "llama7b_alpaca.yaml")
    data = estimate_json(capsys, tmp_path, recipe, "--gpus", "2", "--set", "distributed.strategy=fsdp")
    sh = data["sharding"]
    assert sh["strategy"] == "fsdp" and sh["world_size"] == 2
    assert sh["per_gpu_total"] < sh["one_gpu_total"] == data["total"]
    one = data["components"]
    for key in ("adapters", "gradients", "optimizer"):  # divided over the two GPUs
        assert sh["per_gpu"][key] == -(-one[key] // 2)
    # The weights too, but for the nf4 quant states (absmax, code tables), which every rank holds whole.
    states = LLAMA7B_QUANT_STATES
    assert sh["per_gpu"]["weights"] == -(-(one["weights"] - states) // 2) + states
    assert sh["per_gpu"]["activations"] == one["activations"]  # a micro-batch per GPU either way
    assert sh["per_gpu"]["all_gather"] > 0
    ddp = estimate_json(capsys, tmp_path, recipe, "--gpus", "2", "--set", "distributed.strategy=ddp")["sharding"]
    assert ddp["per_gpu"]["weights"] == one["weights"] and ddp["per_gpu_total"] > sh["per_gpu_total"]
    # Two nodes of 2 GPUs: four shards.
    four = estimate_json(capsys, tmp_path, recipe, "--gpus", "2", "--nodes", "2", "--set",
                         "distributed.strategy=fsdp")["sharding"]  # fmt: skip
    assert four["world_size"] == 4 and four["per_gpu"]["weights"] == -(-(one["weights"] - states) // 4) + states


def _nf4_state_bytes(n: int) -> int:
    """bitsandbytes' QuantState of an n-weight nf4 tensor with double quantisation: a uint8 absmax per 64 weights,
    an fp32 absmax per 256 of those, the fp32 offset, the 16-entry code and the 256-entry nested code."""
    blocks = -(-n // 64)
    return blocks + -(-blocks // 256) * 4 + 4 + 16 * 4 + 256 * 4


# LLaMA-7B: 32 layers of q, k, v, o (4096 x 4096) and gate, up, down (4096 x 11008)
LLAMA7B_QUANT_STATES = 32 * (4 * _nf4_state_bytes(4096 * 4096) + 3 * _nf4_state_bytes(4096 * 11008))


def test_70b_nf4_on_two_24gib_gpus_fits_and_rank0_loads_into_cpu_memory(capsys, tmp_path: Path) -> None:
    """Answer.AI's case: the nf4 70B does not fit one 24 GiB GPU, its FSDP shards do. Rank 0 alone reads and
    quantises the base in CPU memory (models.load.rank0_reads_weights), so the GPUs never hold it whole."""
    args = ["--preset", "llama-2-70b", "--gpus", "2", "--gpu-mem", "24GiB", "--seq", "512", "--batch", "1",
            "--set", "memory.checkpointing=all"]  # fmt: skip
    data = estimate_json(capsys, tmp_path, *args)
    sh = data["sharding"]
    assert sh["strategy"] == "fsdp"  # auto: a replica does not fit 24 GiB
    assert "exceeds 24.00 GiB" in sh["reason"]
    assert data["components"]["weights"] > 24 * 2**30  # the whole nf4 70B: over one GPU
    assert 20 * 2**30 < sh["per_gpu_total"] < 24 * 2**30 and sh["load_peak"] is None
    assert sh["peak"] == sh["per_gpu_total"] and sh["margin"] == 24 * 2**30 - sh["per_gpu_total"] > 0
    # Rank 0's host memory: the 4-bit base, and the largest weight (28672 x 8192 in bf16) while it is quantised.
    assert sh["host_load"] == data["components"]["weights"] + 28672 * 8192 * 2
    code, out, _ = run_cli(["memory-estimate", *args], capsys)
    text = " ".join(out.split())
    assert code == 0 and "fits 24.00 GiB" in text and "rank 0's CPU memory while loading" in text


def test_a_pretrain_run_loads_whole_on_every_gpu_and_int8_does_not_shard(capsys, tmp_path: Path) -> None:
    """A pretrain initialisation happens on every rank before sharding: its load peak is the whole model."""
    data = estimate_json(capsys, tmp_path, "--preset", "llama-7b", "--method", "pretrain", "--gpus", "2",
                         "--set", "distributed.strategy=fsdp")  # fmt: skip
    sh = data["sharding"]
    assert sh["load_peak"] > data["components"]["weights"] and sh["host_load"] is None
    sh = estimate_json(capsys, tmp_path, "--preset", "llama-7b", "--set", "model.quantization=int8", "--gpus", "2",
                       "--gpu-mem", "8GiB")["sharding"]  # fmt: skip
    assert sh["strategy"] == "ddp" and sh["reason"] == "int8 weights do not shard under FSDP"
    code, _, err = run_cli(["memory-estimate", "--preset", "llama-7b", "--set", "model.quantization=int8",
                            "--gpus", "2", "--set", "distributed.strategy=fsdp"], capsys)  # fmt: skip
    assert code == 2 and "model.quantization: int8 does not shard under FSDP" in err


def test_an_unquantised_base_has_no_load_peak_under_fsdp(capsys, tmp_path: Path) -> None:
    """Rank 0 alone reads an unquantised base into CPU memory (models.load.rank0_reads_weights): the bf16 weights."""
    sh = estimate_json(capsys, tmp_path, "--preset", "llama-7b", "--method", "full", "--gpus", "2", "--gpu-mem",
                       "80GiB", "--set", "distributed.strategy=fsdp")["sharding"]  # fmt: skip
    assert sh["load_peak"] is None and sh["peak"] == sh["per_gpu_total"]
    assert sh["host_load"] == 6738415616 * 2  # LLaMA-7B's parameters in bf16


def test_auto_picks_ddp_when_a_replica_fits(capsys, tmp_path: Path) -> None:
    sh = estimate_json(capsys, tmp_path, "--preset", "smollm2-135m", "--gpus", "8", "--gpu-mem", "24GiB")["sharding"]
    assert sh["strategy"] == "ddp" and "fits" in sh["reason"]


def test_launcher_refusals_are_one_line(capsys, tmp_path: Path) -> None:
    import os

    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {path: x.json}\n", encoding="utf-8")
    code, _, err = run_cli(["finetune", str(recipe), "--nproc-per-node", str((os.cpu_count() or 1) + 1)], capsys)
    assert code == 2 and err.count("\n") == 1 and "more processes than this machine's" in err
    code, _, err = run_cli(["finetune", str(recipe), "--nproc-per-node", "1", "--nnodes", "2"], capsys)
    assert code == 2 and err.strip() == "error: --nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # launcher flags without --nproc-per-node launch too (one process per node), so they are checked: they used
        # to be ignored and the run trained alone in this process
        (["--nnodes", "2"], "error: --nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)"),
        (["--node-rank", "1"], "error: --node-rank 1 is outside 0..0 (--nnodes 1)"),
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:29400"], "error: --node-rank 2 is outside 0..1"),
        (["--nnodes", "2", "--rdzv-endpoint", "node0"], "error: --rdzv-endpoint 'node0': expected HOST:PORT"),
        (["--nnodes", "2", "--rdzv-endpoint", "node0:99999"], "error: --rdzv-endpoint 'node0:99999': expected"),
        (["--nnodes", "2", "--dry-run"], "error: --nnodes > 1 needs --rdzv-endpoint"),  # a dry run checks them too
    ],
)
def test_launcher_flags_are_checked_with_or_without_nproc(
    flags: list[str], message: str, capsys, tmp_path: Path
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {{path: x.json}}\noutput: {{dir: {tmp_path / 'run'}}}\n", encoding="utf-8")
    code, _, err = run_cli(["finetune", str(recipe), *flags], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(message), err
    assert not (tmp_path / "run").exists()


def test_child_arguments_drop_the_launcher_flags() -> None:
    from velora_cli.finetune.launch import Launch, child_arguments, torchrun_arguments

    child = child_arguments(Path("r.yaml"), ["train.seed=1"], Path("out"), 5, False, "train", False)
    assert child == ["r.yaml", "--set", "train.seed=1", "--output-dir", "out", "--max-steps", "5", "--no-resume",
                     "--stages", "train"]  # fmt: skip
    args = torchrun_arguments(Launch(8, 2, 1, "10.0.0.1:29400"), 900, child, Path("out/logs/node1"))
    assert args[-len(child) - 3 :] == ["-m", "velora_cli", "finetune", *child]
    assert "--standalone" not in args and args[args.index("--rdzv-endpoint") + 1] == "10.0.0.1:29400"
    # Each rank's streams to its log in out/logs/node1; local rank 0's stderr (velora's display) also on the console.
    assert args[args.index("--log-dir") + 1] == str(Path("out/logs/node1"))
    assert args[args.index("--redirects") + 1] == "0:1,1:3,2:3,3:3,4:3,5:3,6:3,7:3"
    assert "--standalone" in torchrun_arguments(Launch(2), 900, child, Path("logs"))
