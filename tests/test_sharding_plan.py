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
    for key in ("weights", "adapters", "gradients", "optimizer"):  # divided over the two GPUs
        assert sh["per_gpu"][key] == -(-one[key] // 2)
    assert sh["per_gpu"]["activations"] == one["activations"]  # a micro-batch per GPU either way
    assert sh["per_gpu"]["all_gather"] > 0
    ddp = estimate_json(capsys, tmp_path, recipe, "--gpus", "2", "--set", "distributed.strategy=ddp")["sharding"]
    assert ddp["per_gpu"]["weights"] == one["weights"] and ddp["per_gpu_total"] > sh["per_gpu_total"]
    # Two nodes of 2 GPUs: four shards.
    four = estimate_json(capsys, tmp_path, recipe, "--gpus", "2", "--nodes", "2", "--set",
                         "distributed.strategy=fsdp")["sharding"]  # fmt: skip
    assert four["world_size"] == 4 and four["per_gpu"]["weights"] == -(-one["weights"] // 4)


def test_70b_nf4_on_two_24gib_gpus_trains_within_budget_but_loading_does_not_fit(capsys, tmp_path: Path) -> None:
    """Training's per-GPU figures fit 2 x 24 GiB; but every rank quantises the whole 4-bit base onto its own GPU
    before FSDP shards it (only an unquantised base is read by rank 0 alone), so the verdict is on that peak."""
    args = ["--preset", "llama-2-70b", "--gpus", "2", "--gpu-mem", "24GiB", "--seq", "512", "--batch", "1",
            "--set", "memory.checkpointing=all"]  # fmt: skip
    data = estimate_json(capsys, tmp_path, *args)
    sh = data["sharding"]
    assert sh["strategy"] == "fsdp"  # auto: a replica does not fit 24 GiB
    assert "exceeds 24.00 GiB" in sh["reason"]
    assert 20 * 2**30 < sh["per_gpu_total"] < 24 * 2**30  # training alone would fit
    assert sh["load_peak"] > data["components"]["weights"] > 24 * 2**30  # the whole nf4 70B on each GPU at load
    assert sh["peak"] == sh["load_peak"] and sh["margin"] == 24 * 2**30 - sh["load_peak"] < 0
    code, out, _ = run_cli(["memory-estimate", *args], capsys)
    text = " ".join(out.split())
    assert "does NOT fit 24.00 GiB" in text and "the peak is loading" in text


def test_an_unquantised_base_has_no_load_peak_under_fsdp(capsys, tmp_path: Path) -> None:
    """Rank 0 alone reads an unquantised base into CPU memory (models.load.rank0_reads_weights)."""
    sh = estimate_json(capsys, tmp_path, "--preset", "llama-7b", "--method", "full", "--gpus", "2", "--gpu-mem",
                       "80GiB", "--set", "distributed.strategy=fsdp")["sharding"]  # fmt: skip
    assert sh["load_peak"] is None and sh["peak"] == sh["per_gpu_total"]


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
