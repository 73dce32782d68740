"""method: dpo on the tiny LLaMA: the recipe section, pairs refused in one line, held-out rewards raised by a few
steps, VeLoRA and the lean techniques against the stock path on the first step, resume bit-for-bit from an SFT
adapter, and the result exported like an SFT run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli
from safetensors.torch import load_file

from velora_cli.common.errors import DataError, RecipeError
from velora_cli.config.load import dump_recipe, validate_recipe
from velora_cli.finetune.session import FinetuneSession

DEMO_PAIRS = Path(__file__).resolve().parents[1] / "recipes" / "data" / "dpo_pairs_train.json"


def style_pairs(path: Path, start: int, n: int) -> Path:
    """Plain-text pairs with one learnable preference: a polite full sentence over a curt refusal, for any prompt."""
    rows = [{"prompt": f"Question {i}: what is {i} plus {i + 3}?\nAnswer:", "chosen": f" Sure, it is {2 * i + 3}.",
             "rejected": " No."} for i in range(start, start + n)]  # fmt: skip
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def recipe(model_dir: Path, run_dir: Path, data_path: Path, **sections) -> dict:
    data = {
        "name": "dpo", "method": "dpo", "model": {"name": str(model_dir)}, "lora": {"dropout": 0.0},
        "velora": {"layers": ["v", "d"], "num_groups": 8},
        "data": {"path": str(data_path), "cutoff_len": 96},
        "train": {"micro_batch_size": 4, "batch_size": 4, "max_steps": 4, "learning_rate": 1e-3, "logging_steps": 2,
                  "save_steps": 2, "save_total_limit": 3},
        "output": {"dir": str(run_dir)},
    }  # fmt: skip
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


def session_for(data: dict) -> FinetuneSession:
    session = FinetuneSession(validate_recipe(data), Path(data["output"]["dir"]))
    session.setup()
    return session


# ------------------------------------------------------------------------------------------------ recipe


def test_preference_section_is_for_dpo_and_left_out_of_other_recipes() -> None:
    sft = validate_recipe({"data": {"path": "x.json"}})
    assert "preference" not in yaml.safe_load(dump_recipe(sft))  # SFT recipe.yaml files stay as they were
    dpo = validate_recipe({"method": "dpo", "data": {"path": "x.json"}, "preference": {"beta": 0.2}})
    dumped = yaml.safe_load(dump_recipe(dpo))
    assert dumped["preference"]["beta"] == 0.2 and dumped["model"]["quantization"] == "nf4"  # QLoRA by default
    assert validate_recipe(dumped) == dpo
    with pytest.raises(RecipeError, match="the preference section is for method: dpo, not 'qlora'"):
        validate_recipe({"data": {"path": "x.json"}, "preference": {"beta": 0.2}})
    with pytest.raises(RecipeError, match="preference.loss_type"):
        validate_recipe({"method": "dpo", "data": {"path": "x.json"}, "preference": {"loss_type": "orpo"}})


# ------------------------------------------------------------------------------------------------ bad pairs

BAD_PAIRS = [
    ({"prompt": "Q?", "chosen": "", "rejected": "no"}, "row 1: `chosen` is empty; a pair needs two completions"),
    ({"prompt": "Q?", "chosen": "yes", "rejected": "yes"}, "row 1: `chosen` and `rejected` are identical"),
    ({"prompt": "word " * 100, "chosen": "yes", "rejected": "no"},
     "row 1: the prompt is 100 tokens and leaves no room for a completion within data.cutoff_len=96"),
    ({"prompt": "Q?", "chosen": "yes"}, "row 1: a preference pair needs `chosen` and `rejected`"),
    ({"prompt": "Q?", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
     "row 1: prompt, chosen and rejected must all be strings or all message lists"),
]  # fmt: skip


@pytest.mark.parametrize(("bad", "message"), BAD_PAIRS)
def test_bad_pairs_are_refused_in_one_line_before_training(
    tmp_path: Path, tiny_llama_dir: Path, capsys, bad: dict, message: str
) -> None:
    rows = [{"prompt": "Q?", "chosen": "yes", "rejected": "no"}, bad]
    data_path = tmp_path / "pairs.json"
    data_path.write_text(json.dumps(rows), encoding="utf-8")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(tiny_llama_dir, tmp_path / "run", data_path)))
    code, _, err = run_cli(["finetune", str(path), "--dry-run"], capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert f"{data_path}: {message}" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_missing_starting_adapter_is_one_line(tmp_path: Path, tiny_llama_dir: Path, capsys) -> None:
    path = tmp_path / "r.yaml"
    data = recipe(tiny_llama_dir, tmp_path / "run", DEMO_PAIRS, model={"adapter": str(tmp_path / "runs" / "sft")})
    path.write_text(yaml.safe_dump(data))
    code, _, err = run_cli(["finetune", str(path), "--dry-run"], capsys)
    assert code == 2 and f"model.adapter {tmp_path}/runs/sft: no adapter_config.json there" in err, err


def test_skip_bad_rows_skips_bad_pairs_and_counts_them(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    from velora_cli.data.preference import load_preference_data

    rows = [{"prompt": "Q?", "chosen": "yes", "rejected": "no"}] * 3 + [b for b, _ in BAD_PAIRS]
    data_path = tmp_path / "pairs.json"
    data_path.write_text(json.dumps(rows), encoding="utf-8")
    data = recipe(tiny_llama_dir, tmp_path / "run", data_path, data={"skip_bad_rows": True})
    loaded = load_preference_data(validate_recipe(data), AutoTokenizer.from_pretrained(tiny_llama_dir))
    assert (loaded.counts.examples, loaded.counts.skipped, loaded.format) == (3, 5, "prompt_completion")
    with pytest.raises(DataError, match="holds prompt_completion pairs, but data.format='messages'"):
        data["data"] |= {"format": "messages"}
        load_preference_data(validate_recipe(data), AutoTokenizer.from_pretrained(tiny_llama_dir))


def test_preview_shows_a_pair_with_its_masks(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from rich.console import Console

    from velora_cli.data.preview import run_preview

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(tiny_llama_dir, tmp_path / "run", DEMO_PAIRS)))
    console = Console(record=True, width=200)
    stats = run_preview(path, [], 1, console)
    text = console.export_text()
    assert "pair 0: prompt" in text and "chosen" in text and "rejected" in text
    assert "What is 85 minus 49?" in text and "36" in text
    assert stats["rows"] == 480 and stats["truncated"] == 0 and stats["max"] <= 96


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_a_few_dpo_steps_raise_held_out_reward_accuracy_and_margin(tmp_path: Path, tiny_llama_dir: Path, capsys):
    train, held = style_pairs(tmp_path / "train.json", 0, 64), style_pairs(tmp_path / "held.json", 500, 16)
    data = recipe(tiny_llama_dir, tmp_path / "run", train, train={"max_steps": 8, "learning_rate": 1e-2},
                  eval={"heldout": {"enabled": True, "path": str(held)}})  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    code, _, err = run_cli(["finetune", str(path)], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["train"]
    before, after = summary["before"]["pairs"], summary["after"]["pairs"]
    assert before["n"] == after["n"] == 16
    assert before["reward_margin"] == 0 and before["reward_accuracy"] == 0  # the untrained model is the reference
    assert after["reward_accuracy"] == 1.0 and after["reward_margin"] > 0.1
    # summed log-probabilities favour the one-token refusal on both sides of training (DPO moves the ratio to the
    # reference, not the raw likelihoods past the length gap in 8 steps)
    assert after["pair_accuracy"] >= before["pair_accuracy"]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in metrics if "reward_accuracy" in m]
    # logging_steps 2, plus the first step (issue 27: the panel and metrics.jsonl have figures from step 1)
    assert [m["step"] for m in logged] == [1, 2, 4, 6, 8] and logged[-1]["reward_margin"] > logged[0]["reward_margin"]
    assert "held-out reward accuracy (n=16)" in err


def first_step(data: dict) -> tuple[float, dict[str, torch.Tensor], list[str]]:
    """Loss and adapter gradients of the first micro-batch, as the Trainer computes them."""
    session = session_for(data)
    session.model.train()  # as Trainer.train() sets it: recompute runs in training mode only
    trainer = session.trainer
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(session.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in session.model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, session.compressed


@pytest.mark.slow
def test_velora_and_lean_techniques_match_the_stock_first_step(
    tmp_path: Path, tiny_llama_dir: Path, tiny_lora_run: Path
) -> None:
    # From an adapter with non-zero A and B: a fresh one (B = 0) would give every A a zero first gradient.
    stock = {"loss": "full", "lean_ops": False, "checkpointing": "none"}
    base = recipe(tiny_llama_dir, tmp_path / "a", DEMO_PAIRS, model={"adapter": str(tiny_lora_run)})
    loss0, grads0, _ = first_step(base | {"velora": {"enabled": False}, "memory": stock})
    lean = {"loss": "chunked", "lean_ops": True, "checkpointing": "all"}
    loss1, grads1, _ = first_step(base | {"velora": {"enabled": False}, "memory": lean})
    # The policy starts as its reference, so the first loss is log 2 (up to kernel rounding: the reference forward
    # runs without grad); the gradients are the check.
    assert loss0 == pytest.approx(0.693147, rel=1e-3) and loss1 == pytest.approx(loss0, rel=1e-6)
    assert grads1.keys() == grads0.keys() and all(float(g.abs().max()) > 0 for g in grads0.values())
    for name, grad in grads0.items():  # every technique here is exact
        assert torch.allclose(grads1[name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max())), name
    loss2, grads2, compressed = first_step(base | {"memory": lean})
    assert loss2 == pytest.approx(loss0, rel=1e-6) and compressed
    approximated = {f"{layer}.lora_A.default.weight" for layer in compressed}
    exact = [n for n in grads0 if not any(n.endswith(a.split("model.", 1)[1]) for a in approximated)]
    assert len(exact) == len(grads0) - len(compressed)
    for name in exact:  # VeLoRA changes only the gradient of the compressed A projections
        assert torch.allclose(grads2[name], grads0[name], rtol=1e-5, atol=1e-5 * float(grads0[name].abs().max()))
    assert any(not torch.allclose(grads2[n], grads0[n], rtol=1e-3) for n in grads0 if n not in exact)  # it is on


@pytest.mark.slow
def test_dpo_from_an_sft_adapter_resumes_bit_for_bit_and_exports(
    tmp_path: Path, tiny_llama_dir: Path, tiny_lora_run: Path, capsys
) -> None:
    from test_methods import CrashAt

    def run(data, callbacks=()):
        session = session_for(data)
        for cb in callbacks:
            session.trainer.add_callback(cb)
        session.train(display=False)
        session.save()

    start = {"adapter": str(tiny_lora_run)}
    straight = recipe(tiny_llama_dir, tmp_path / "straight", DEMO_PAIRS, model=start)
    run(straight)
    out = tmp_path / "straight"
    trained = load_file(str(out / "adapter_model.safetensors"))
    sft = load_file(str(tiny_lora_run / "adapter_model.safetensors"))
    assert trained.keys() == sft.keys() and not (out / "ref").exists()  # the frozen reference copy is not saved
    assert all(not torch.equal(trained[k], sft[k]) for k in trained if "lora_B" in k)  # it started from the SFT B

    crashed = recipe(tiny_llama_dir, tmp_path / "crashed", DEMO_PAIRS, model=start)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crashed, [CrashAt(3)])
    run(crashed)  # resumes from checkpoint-2
    resumed = load_file(str(tmp_path / "crashed" / "adapter_model.safetensors"))
    for key in trained:
        assert torch.equal(trained[key], resumed[key]), key

    from velora_cli.export.merge import export_run

    merged = export_run(out, tmp_path / "export", dtype="fp32")
    assert (merged / "model.safetensors").is_file()
    recorded = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recorded["method"] == "dpo" and recorded["data"]["format"] == "messages"  # chat prompts as trained
    code, answer, err = run_cli(["generate", str(out), "--prompt", "What is 2 plus 2?", "--max-new-tokens", "3"],
                                capsys)  # fmt: skip
    assert code == 0 and answer.strip(), err


def test_memory_estimate_counts_two_rows_per_pair_and_no_logits() -> None:
    from velora_cli.memory.arch import recipe_arch
    from velora_cli.memory.estimate import estimate, settings_from_recipe

    sft = validate_recipe({"data": {"path": "x.json", "cutoff_len": 256}, "train": {"micro_batch_size": 4}})
    dpo = validate_recipe({"method": "dpo", "data": {"path": "x.json", "cutoff_len": 256},
                           "train": {"micro_batch_size": 2}})  # fmt: skip
    arch = recipe_arch(sft)
    a, b = (estimate(arch, settings_from_recipe(r)) for r in (sft, dpo))
    assert b.settings.sequences == 4 and b.settings.tokens == a.settings.tokens == 4 * 256
    assert b.act.layers == a.act.layers  # 2 pairs = 4 rows: the decoder stack saves the same
    assert b.act.logits_saved == 4 * 255 * (arch.hidden * 2 + 17)  # TRL's head: hidden states, no logits


@pytest.mark.slow
def test_memory_estimate_matches_the_meter_on_dpo(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from velora_cli.engine.meter import ActivationMeter
    from velora_cli.memory.arch import recipe_arch
    from velora_cli.memory.estimate import estimate, settings_from_recipe

    rows = [{"prompt": f"Question {i}?", "chosen": " Yes.", "rejected": " No."} for i in range(10, 14)]
    data_path = tmp_path / "pairs.json"
    data_path.write_text(json.dumps(rows), encoding="utf-8")
    for memory in ({"loss": "full", "lean_ops": False}, {"lean_ops": True, "checkpointing": "all"}):
        session = session_for(recipe(tiny_llama_dir, tmp_path / "run", data_path, memory=memory,
                                     lora={"dropout": 0.05}))  # fmt: skip
        session.model.train()
        trainer = session.trainer
        batch = trainer._prepare_inputs(trainer.data_collator([session.train_set[i] for i in range(4)]))
        assert bool(batch["attention_mask"].all())  # equal lengths: no padding
        with ActivationMeter(session.model, attribute=False) as meter:
            trainer.compute_loss(session.model, batch)
        settings = settings_from_recipe(session.recipe, device="cpu")
        settings = type(settings)(**{**settings.__dict__, "batch": 4, "seq": batch["input_ids"].shape[1]})
        predicted = estimate(recipe_arch(session.recipe), settings).act.meter_view
        assert predicted == pytest.approx(meter.total_bytes, rel=0.05), memory


def test_dpo_under_fsdp_is_refused_in_one_line() -> None:
    with pytest.raises(RecipeError, match="method 'dpo' runs on one GPU or under DDP, not FSDP yet"):
        validate_recipe({"method": "dpo", "data": {"path": "x.json"}, "distributed": {"strategy": "fsdp"}})


@pytest.mark.slow
def test_dpo_killed_mid_step_reruns_to_the_uninterrupted_adapter(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """kill -9 in step 3 (no cleanup of ours runs), rerun the same command: bit-for-bit the uninterrupted adapter."""
    import subprocess
    import sys

    from test_faults import ENV, TESTS, killed_at

    def command(name: str) -> list[str]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe(tiny_llama_dir, tmp_path / name, DEMO_PAIRS)))
        return ["finetune", str(path), "--stages", "train"]

    def finetune(args: list[str]) -> None:
        done = subprocess.run([sys.executable, "-m", "velora_cli", *args], capture_output=True, text=True, env=ENV,
                              cwd=TESTS.parent, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr

    finetune(command("straight"))
    killed = killed_at("step", 3, *command("killed"))
    assert killed.returncode == -9 and not (tmp_path / "killed" / "adapter_model.safetensors").exists()
    finetune(command("killed"))
    straight = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "adapter_model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
