"""FSDP2 on CPU (gloo), launched by `velora finetune --nproc-per-node`: what users of sharded training depend on.

A 2-process FSDP run of LoRA and of full fine-tuning equals a 1-process run on the same global batch (per-step loss
and final weights); two launcher processes with --nnodes 2 and a rendezvous on 127.0.0.1 train one run into one run
directory; a rank killed mid-run is one error line, and the same command then resumes from the sharded checkpoint
and ends equal to an uninterrupted run. The saved adapter is a normal PEFT adapter loaded in one process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO_TASKS = REPO / "recipes" / "data" / "demo_tasks_train.json"
TIMEOUT = 240

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="torch.distributed with gloo is not available",
    ),
]

# Loaded by every worker (sitecustomize on PYTHONPATH): SIGKILL rank KILL_RANK once step KILL_STEP's optimizer step
# is done and before the next checkpoint, so only the earlier checkpoint survives (KILL_HOW=raise: a RuntimeError).
KILLER = """
import os
if os.environ.get("KILL_STEP") and os.environ.get("RANK") == os.environ.get("KILL_RANK"):
    import signal
    from transformers import TrainerCallback
    import velora_cli.finetune.session as session

    class _Kill(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # KILL_AT=save: once step KILL_STEP's checkpoint is whole
            if os.environ.get("KILL_AT") == "save" and state.global_step == int(os.environ["KILL_STEP"]):
                os.kill(os.getpid(), signal.SIGKILL)

        def on_step_end(self, args, state, control, **kwargs):
            if os.environ.get("KILL_AT") != "save" and state.global_step == int(os.environ["KILL_STEP"]):
                if os.environ.get("KILL_HOW") == "raise":
                    raise RuntimeError("a bug in rank " + os.environ["RANK"])
                os.kill(os.getpid(), signal.SIGKILL)

    _setup = session.FinetuneSession.setup

    def setup(self):
        plan = _setup(self)
        self.trainer.add_callback(_Kill())
        return plan

    session.FinetuneSession.setup = setup

if os.environ.get("DIVERGE_RANK", "none") == os.environ.get("RANK"):  # this rank's model freezes what rank 0's trains
    import velora_cli.finetune.session as session

    _build = session.build_training_model

    def build_frozen(*args, **kwargs):
        model, compressed = _build(*args, **kwargs)
        next(p for p in model.parameters() if p.requires_grad).requires_grad_(False)
        return model, compressed

    session.build_training_model = build_frozen

if os.environ.get("RECORD_DIR"):  # what each rank holds once its model is built (before it is sharded)
    import json, resource
    import torch
    from safetensors.torch import save_file
    import velora_cli.finetune.session as session
    import velora_cli.models.full as full
    from velora_cli.engine import velora_state_dict

    def recorded(build):
        def build_and_record(*args, **kwargs):
            model, compressed = build(*args, **kwargs)
            held = [t for t in (*model.parameters(), *model.buffers()) if not t.is_meta]
            record = {"bytes": sum(t.numel() * t.element_size() for t in held),
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
            with open(os.path.join(os.environ["RECORD_DIR"], f"load-{os.environ['RANK']}.json"), "w") as f:
                json.dump(record, f)
            return model, compressed
        return build_and_record

    session.build_training_model = recorded(session.build_training_model)
    full.build_full_model = recorded(full.build_full_model)

    import velora_cli.models.load as load
    _load_base_model = load.load_base_model

    def load_and_record_threads(*args, **kwargs):  # torch's CPU threads while this rank loads its base
        with open(os.path.join(os.environ["RECORD_DIR"], f"threads-{os.environ['RANK']}.json"), "w") as f:
            json.dump(torch.get_num_threads(), f)
        return _load_base_model(*args, **kwargs)

    load.load_base_model = load_and_record_threads
    _train_for_record = session.FinetuneSession.train

    def train(self, *args, **kwargs):
        result = _train_for_record(self, *args, **kwargs)
        vectors = velora_state_dict(self.model)
        if vectors:
            save_file(vectors, os.path.join(os.environ["RECORD_DIR"], f"vectors-{os.environ['RANK']}.safetensors"))
        return result

    session.FinetuneSession.train = train
"""


def recipe(model_dir: Path, run_dir: Path, method: str = "lora", **train: object) -> dict:
    r = {
        "name": "fsdp",
        "method": method,
        # qlora: nf4 codes stored in fp32 (the compute dtype) so FSDP shards them too (models/load.py)
        "model": {"name": str(model_dir), "quantization": "nf4" if method == "qlora" else "none"},
        "velora": {"enabled": method != "full", "layers": ["v", "d"], "num_groups": 4},
        "data": {"path": str(DEMO_TASKS), "cutoff_len": 96, "template": "alpaca"},
        # group_by_length off: its mega-batches depend on the number of processes, so rows would differ per step.
        "train": {"micro_batch_size": 1, "batch_size": 4, "max_steps": 3, "learning_rate": 1e-2, "logging_steps": 1,
                  "save_steps": 2, "group_by_length": False, **train},  # fmt: skip
        "distributed": {"strategy": "fsdp"},
        "output": {"dir": str(run_dir)},
    }
    if method != "full":
        r["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["qkvogud"]}
    return r


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(KILLER, encoding="utf-8")
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COLUMNS="200",
             PYTHONPATH=os.pathsep.join([str(hooks), str(REPO), e.get("PYTHONPATH", "")]), **extra)  # fmt: skip
    return e


def velora(args: list[str], tmp_path: Path, **extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "velora_cli", "finetune", *args]
    return subprocess.run(command, cwd=tmp_path, env=env(tmp_path, **extra), capture_output=True, text=True,
                          timeout=TIMEOUT)  # fmt: skip


def write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (run_dir / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(run_dir / name))


def weights_of(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def assert_same_run(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb] and la
    for (_, x), (_, y) in zip(la, lb, strict=True):
        assert x == pytest.approx(y, rel=1e-5)
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-5, msg=key)


def loaded_bytes(records: Path) -> list[int]:
    """Per rank: the bytes of parameters and buffers held in memory (not on meta) once the model was built."""
    return [json.loads((records / f"load-{rank}.json").read_text())["bytes"] for rank in (0, 1)]


@pytest.mark.parametrize(("method", "init"), [("lora", None), ("lora", "random"), ("qlora", None), ("full", None)])
def test_two_process_fsdp_equals_one_process(method: str, init: str | None, tmp_path: Path,
                                             tiny_llama_dir: Path) -> None:  # fmt: skip
    """`init`: VeLoRA's v drawn at random when the model is built - rank 1, which builds on meta, must get rank 0's."""
    one, two, records = tmp_path / "one", tmp_path / "two", tmp_path / "records"
    records.mkdir()
    recipes = [recipe(tiny_llama_dir, run, method) for run in (one, two)]
    for r in recipes:
        r["velora"].update({"init": init} if init else {})
    assert velora([str(write(tmp_path, "one", recipes[0]))], tmp_path).returncode == 0
    proc = velora([str(write(tmp_path, "two", recipes[1])), "--nproc-per-node", "2"], tmp_path,
                  RECORD_DIR=str(records))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "4 = 1 micro x 2 accumulation x 2 processes (FSDP)" in proc.stdout + proc.stderr
    assert_same_run(one, two)
    # Low-CPU-RAM loading: rank 0 alone reads (and quantises) the weights, rank 1 builds its model on meta and gets
    # its shards from rank 0 (a few KiB of RoPE and VeLoRA buffers stay real).
    base_bytes = sum(t.numel() * t.element_size() for t in weights_of(tiny_llama_dir).values())
    rank0, rank1 = loaded_bytes(records)
    assert rank0 >= base_bytes * (0.3 if method == "qlora" else 1) and rank1 < base_bytes / 100
    # Each worker runs on 1 thread here (OMP_NUM_THREADS=1, torchrun's default); rank 0 reads on all the cores.
    threads = [json.loads((records / f"threads-{rank}.json").read_text()) for rank in (0, 1)]
    assert threads == [len(os.sched_getaffinity(0)), 1]
    if method != "full":  # VeLoRA's vectors: the same on both ranks, and those of the one-process run
        from safetensors.torch import load_file

        ranks = [load_file(str(records / f"vectors-{rank}.safetensors")) for rank in (0, 1)]
        single = load_file(str(one / "velora_projections.safetensors"))
        assert sorted(ranks[0]) == sorted(ranks[1]) == sorted(single)
        for key in single:
            assert torch.equal(ranks[0][key], ranks[1][key]), key
            torch.testing.assert_close(ranks[0][key], single[key], rtol=0, atol=1e-6, msg=key)
    # Checkpoints hold the shards (torch.distributed.checkpoint), the final files are whole, written once.
    assert (two / "checkpoint-3" / "pytorch_model_fsdp_0").is_dir()
    assert not list(two.glob("*fsdp*"))
    if method != "full":  # a normal PEFT adapter, loaded by one process onto the unsharded base
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, two)
        saved = weights(two)
        name = next(k for k in saved if "lora_B" in k)
        loaded = dict(model.named_parameters())[name.replace("lora_B.weight", "lora_B.default.weight")]
        assert torch.equal(loaded.detach(), saved[name]) and saved[name].abs().max() > 0
        assert (two / "velora_projections.safetensors").is_file()


def test_continuing_an_adapter_under_fsdp_equals_one_process(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """model.adapter (QLoRA): rank 0 loads the adapter, rank 1 attaches its config on meta - trainable, as the loaded
    one is (a saved adapter config says inference mode; rank 1's LoRA was frozen and the run hung)."""
    base = tmp_path / "base"
    assert velora([str(write(tmp_path, "base", recipe(tiny_llama_dir, base, "qlora", max_steps=2)))],
                  tmp_path).returncode == 0  # fmt: skip
    runs = []
    for name, extra in (("one", []), ("two", ["--nproc-per-node", "2"])):
        r = recipe(tiny_llama_dir, tmp_path / name, "qlora", max_steps=2)
        r["model"]["adapter"] = str(base)
        del r["lora"]
        proc = velora([str(write(tmp_path, name, r)), *extra], tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs.append(tmp_path / name)
    assert_same_run(*runs)


def test_a_rank_that_builds_another_model_is_an_error_not_a_hang(tmp_path: Path, tiny_llama_dir: Path) -> None:
    run = tmp_path / "run"
    proc = velora([str(write(tmp_path, "r", recipe(tiny_llama_dir, run, "qlora"))), "--nproc-per-node", "2"],
                  tmp_path, DIVERGE_RANK="1")  # fmt: skip
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    log = "".join(p.read_text() for p in rank_logs(errors).glob("*/stdout.log"))
    assert "rank 1 built a model different from rank 0's" in log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_train_one_run(tmp_path: Path, tiny_llama_dir: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert velora([str(write(tmp_path, "one", recipe(tiny_llama_dir, one)))], tmp_path).returncode == 0
    path = write(tmp_path, "two", recipe(tiny_llama_dir, two))
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "velora_cli", "finetune", str(path), "--nproc-per-node", "1", "--nnodes", "2",
             "--node-rank", str(rank), "--rdzv-endpoint", endpoint],  # fmt: skip
            cwd=tmp_path, env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in (0, 1)
    ]
    results = [node.communicate(timeout=TIMEOUT) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-3000:] for _, err in results]
    assert_same_run(one, two)  # 2 nodes x 1 process: the same global batch as one process


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_killed_rank_is_one_line_and_the_rerun_resumes_exactly(method: str, tmp_path: Path,
                                                               tiny_llama_dir: Path) -> None:  # fmt: skip
    """qlora: the rerun's rank 1 builds on meta again and gets rank 0's codes and quant states, then the shards of
    the checkpoint (weights, optimizer, vectors, data position)."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = ["--nproc-per-node", "2"]
    proc = velora([str(write(tmp_path, "whole", recipe(tiny_llama_dir, whole, method, max_steps=4))), *args],
                  tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    path = write(tmp_path, "killed", recipe(tiny_llama_dir, killed, method, max_steps=4))
    proc = velora([str(path), *args], tmp_path, KILL_RANK="1", KILL_STEP="3")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    logs = rank_logs(errors)
    assert errors == [f"error: rank 1 was killed by signal 9 on {socket.gethostname()}; the other ranks were "
                      f"stopped and the complete checkpoints in {killed} are kept: run the same command to resume "
                      f"(each rank's output: {logs})"]
    assert proc.stderr.splitlines()[-1] == errors[0]  # the launcher's word is the last (no torchrun report after it)
    # Rank 0 meets the broken connection (or torchrun's SIGTERM): whatever it says goes to its log, not above the line.
    assert "Traceback" not in proc.stderr and "[rank" not in proc.stderr
    assert logs.parent.parent.parent == killed / "logs" and sorted(p.name for p in logs.iterdir()) == ["0", "1"]
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2"]
    proc = velora([str(path), *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_run(whole, killed)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_full_state_dict_checkpoints_are_whole_and_resume_exactly(method: str, tmp_path: Path,
                                                                  tiny_llama_dir: Path) -> None:  # fmt: skip
    """distributed.fsdp.state_dict: full - rank 0 writes each checkpoint whole (the adapter or model as one process
    saves it, and accelerate's gathered model and optimizer), and a rank killed mid-run resumes from it exactly."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = ["--nproc-per-node", "2", "--set", "distributed.fsdp.state_dict=full"]
    proc = velora([str(write(tmp_path, "whole", recipe(tiny_llama_dir, whole, method, max_steps=4))), *args],
                  tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    path = write(tmp_path, "killed", recipe(tiny_llama_dir, killed, method, max_steps=4))
    proc = velora([str(path), *args], tmp_path, KILL_RANK="1", KILL_STEP="3")
    assert proc.returncode == 1
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2"]
    saved = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    files = {p.name for p in (killed / "checkpoint-2").iterdir()}
    assert {saved, "pytorch_model_fsdp.bin", "optimizer.bin"} <= files and "pytorch_model_fsdp_0" not in files
    proc = velora([str(path), *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_run(whole, killed)


@pytest.mark.parametrize("state_dict", ["sharded", "full"])
def test_killed_after_the_last_checkpoint_the_rerun_finishes_from_it(state_dict: str, tmp_path: Path,
                                                                      tiny_llama_dir: Path) -> None:  # fmt: skip
    """Killed once the final step's checkpoint is written but before the adapter is saved: the rerun trains nothing
    more and writes the adapter of the uninterrupted run (it used to look for an adapter file in a sharded one)."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = ["--nproc-per-node", "2", "--set", f"distributed.fsdp.state_dict={state_dict}"]
    proc = velora([str(write(tmp_path, "whole", recipe(tiny_llama_dir, whole, max_steps=4))), *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    path = write(tmp_path, "killed", recipe(tiny_llama_dir, killed, max_steps=4))
    proc = velora([str(path), *args], tmp_path, KILL_RANK="0", KILL_STEP="4", KILL_AT="save")
    assert proc.returncode == 1 and not (killed / "adapter_model.safetensors").exists()
    assert "checkpoint-4" in {p.name for p in killed.glob("checkpoint-*")}
    proc = velora([str(path), *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_run(whole, killed)


def rank_logs(errors: list[str]) -> Path:
    """The directory of per-rank logs the launcher's error line names."""
    assert len(errors) == 1 and errors[0].endswith(")"), errors
    return Path(errors[0].rsplit("(each rank's output: ", 1)[1][:-1])


def test_a_rank_that_raises_is_one_line_naming_its_log(tmp_path: Path, tiny_llama_dir: Path) -> None:
    run = tmp_path / "run"
    path = write(tmp_path, "r", recipe(tiny_llama_dir, run))
    proc = velora([str(path), "--nproc-per-node", "2"], tmp_path, KILL_RANK="1", KILL_STEP="1", KILL_HOW="raise")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    logs = rank_logs(errors)
    assert errors[0].startswith(f"error: rank 1 exited with code 1 on {socket.gethostname()}; the other ranks were "
                                "stopped")  # fmt: skip
    assert proc.stderr.splitlines()[-1] == errors[0] and "Traceback" not in proc.stderr
    # The traceback is in rank 1's own log, and only there; rank 0's console output (the plan) is in the console.
    log = (logs / "1" / "stdout.log").read_text()
    assert "Traceback (most recent call last)" in log and "RuntimeError: a bug in rank 1" in log
    assert "plan" in proc.stderr and "a bug in rank" not in proc.stderr


def test_a_node_that_never_joins_is_one_line(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path = write(tmp_path, "r", recipe(tiny_llama_dir, tmp_path / "run"))
    endpoint = f"127.0.0.1:{free_port()}"
    proc = velora([str(path), "--nproc-per-node", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint,
                   "--set", "distributed.rdzv_timeout=5"], tmp_path)  # fmt: skip
    assert proc.returncode == 1
    assert [x for x in proc.stderr.splitlines() if x.strip()] == [
        f"error: the nodes did not all join at {endpoint} within 5 s (distributed.rdzv_timeout): "
        "RendezvousTimeoutError"
    ]
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_fsdp_qlora_on_two_gpus_holds_shards_only(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """On GPUs (NCCL, bf16): rank 0 quantises the base in CPU memory, each GPU receives its shard of the codes and
    all quant states; the run's losses follow a one-GPU run's (bf16 tolerance) and the adapter loads in one process."""
    one, two, records = tmp_path / "one", tmp_path / "two", tmp_path / "records"
    records.mkdir()
    assert velora([str(write(tmp_path, "one", recipe(tiny_llama_dir, one, "qlora")))], tmp_path).returncode == 0
    proc = velora([str(write(tmp_path, "two", recipe(tiny_llama_dir, two, "qlora"))), "--nproc-per-node", "2"],
                  tmp_path, RECORD_DIR=str(records))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = loaded_bytes(records)
    base_bytes = sum(t.numel() * t.element_size() for t in weights_of(tiny_llama_dir).values())
    assert rank1 < base_bytes / 100  # rank 1 built on meta
    for (s1, x), (s2, y) in zip(losses(one), losses(two), strict=True):
        assert s1 == s2 and x == pytest.approx(y, rel=2e-2)
    assert (two / "adapter_model.safetensors").is_file() and (two / "velora_projections.safetensors").is_file()
