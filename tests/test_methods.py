"""method: lora / full / pretrain on the tiny LLaMA: validation of bad combinations, training, resume bit-for-bit,
export, plain-text corpora with perplexity, the optimizer in backward against ordinary AdamW, and the memory model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import c4_like
from safetensors.torch import load_file

from velora_cli.common.errors import RecipeError
from velora_cli.config.load import dump_recipe, validate_recipe
from velora_cli.finetune.pipeline import run_pipeline
from velora_cli.finetune.session import FinetuneSession

DEMO_DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "demo_tasks_train.json"


def corpus(tmp_path: Path, n: int = 60) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the river {i % 7} ran past the mill and {i * 3} geese flew over."
                                for i in range(n)))  # fmt: skip
    return path


def recipe(model_dir: Path, run_dir: Path, method: str = "full", **train) -> dict:
    data = {
        "name": "m", "method": method, "model": {"name": str(model_dir)},
        "velora": {"layers": ["v", "d"], "num_groups": 8},
        "data": {"path": str(DEMO_DATA), "template": "chat", "cutoff_len": 48, "val_set_size": 4},
        "train": {"micro_batch_size": 2, "batch_size": 2, "max_steps": 4, "learning_rate": 1e-3, "logging_steps": 2,
                  "save_steps": 2, "save_total_limit": 3, "group_by_length": False, **train},
        "output": {"dir": str(run_dir)},
    }  # fmt: skip
    return data


def run(data: dict, callbacks=()) -> FinetuneSession:
    session = FinetuneSession(validate_recipe(data), Path(data["output"]["dir"]))
    session.setup()
    for cb in callbacks:
        session.trainer.add_callback(cb)
    session.train(display=False)
    session.save()
    return session


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "pretrain"}, "method 'pretrain' needs model.config"),
        ({"model": {"quantization": "nf4"}}, "model.quantization='nf4' cannot be trained"),
        ({"lora": {"r": 4}}, "remove the lora section"),
        ({"train": {"batch_size": 4, "micro_batch_size": 2, "optimizer_in_backward": True}}, "no accumulation"),
        ({"method": "qlora", "train": {"optimizer_in_backward": True}}, "for method full or pretrain"),
        ({"method": "qlora", "model": {"config": "llama-60m"}}, "model.config is for method: pretrain"),
        ({"method": "lora", "model": {"quantization": "nf4"}}, "is method: qlora"),
    ],
)
def test_bad_method_combinations_are_refused_in_one_line(change: dict, message: str) -> None:
    data = {"method": "full", "data": {"path": "x.json"}}
    for key, value in change.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(RecipeError) as err:
        validate_recipe(data)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_full_recipe_defaults_to_unquantised_and_round_trips() -> None:
    rec = validate_recipe({"method": "full", "data": {"path": "x.json"}, "velora": {"num_groups": {"v": 4, "d": 8}}})
    assert rec.model.quantization == "none" and rec.full and not rec.text_data
    again = validate_recipe(yaml.safe_load(dump_recipe(rec)))  # the run dir's recipe.yaml reloads
    assert again.method == "full" and again.velora.num_groups == {"v": 4, "d": 8}
    assert validate_recipe({"method": "pretrain", "model": {"config": "llama-60m"}, "data": {"path": "t"}}).text_data


def test_paper_sizes_have_galores_shapes() -> None:
    from transformers import LlamaForCausalLM

    from velora_cli.config.presets import size_config

    with torch.device("meta"):
        sizes = {n: sum(p.numel() for p in LlamaForCausalLM(size_config(n)).parameters())
                 for n in ("llama-60m", "llama-130m")}  # fmt: skip
    assert 55e6 < sizes["llama-60m"] < 62e6 and 125e6 < sizes["llama-130m"] < 140e6
    # the official scripts' groups divide the layers' input widths: 512/64, 1376/86; 768/64, 2048/64
    assert size_config("llama-60m").intermediate_size % 86 == 0


class CrashAt:
    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class _Crash(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    raise RuntimeError("simulated crash")

        return _Crash()


@pytest.mark.slow
def test_full_training_saves_resumes_bit_for_bit_and_exports(tmp_path: Path, tiny_llama_dir: Path) -> None:
    straight = run(recipe(tiny_llama_dir, tmp_path / "straight"))
    run_dir = tmp_path / "straight"
    assert (run_dir / "model.safetensors").is_file() and not (run_dir / "adapter_config.json").exists()
    assert (run_dir / "checkpoint-2" / "velora_projections.safetensors").is_file()
    trained, start = load_file(str(run_dir / "model.safetensors")), load_file(str(tiny_llama_dir / "model.safetensors"))
    assert all(not torch.equal(trained[k], start[k]) for k in trained if "layers.0" in k)  # every weight trains
    assert straight.compressed == ["model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj",
                                   "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"]  # fmt: skip

    crashed = recipe(tiny_llama_dir, tmp_path / "crashed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crashed, [CrashAt(3)])
    run(crashed)  # resumes from checkpoint-2
    resumed = load_file(str(tmp_path / "crashed" / "model.safetensors"))
    for key in trained:
        assert torch.equal(trained[key], resumed[key]), key

    from transformers import AutoModelForCausalLM

    from velora_cli.export.merge import export_run

    out = export_run(run_dir, tmp_path / "export", dtype="fp32")
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(exported.state_dict()["model.layers.0.mlp.down_proj.weight"],
                       trained["model.layers.0.mlp.down_proj.weight"])  # fmt: skip
    assert (out / "tokenizer.json").is_file() and "fully fine-tuned" in (out / "README.md").read_text()


def test_lora_method_trains_an_unquantised_adapter(tmp_path: Path, tiny_llama_dir: Path) -> None:
    data = recipe(tiny_llama_dir, tmp_path / "lora", method="lora", max_steps=2)
    data["lora"] = {"r": 4, "alpha": 8}
    run(data)
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "lora" / "recipe.yaml").read_text())["model"]["quantization"] == "none"


@pytest.mark.slow
def test_optimizer_in_backward_equals_adamw(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Same seed and batches: the per-parameter AdamW steps in backward give ordinary AdamW's weights (no clipping:
    the ordinary run's max_grad_norm is too large to clip; optimizer_in_backward clips nothing)."""
    common = {"max_grad_norm": 1e9, "weight_decay": 0.1, "warmup_steps": 1, "save_steps": 2}
    run(recipe(tiny_llama_dir, tmp_path / "plain", **common))
    run(recipe(tiny_llama_dir, tmp_path / "layerwise", optimizer_in_backward=True, **common))
    a = load_file(str(tmp_path / "plain" / "model.safetensors"))
    b = load_file(str(tmp_path / "layerwise" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    # its checkpoints carry every inner optimizer's state, so it resumes exactly too
    crashed = recipe(tiny_llama_dir, tmp_path / "crashed", optimizer_in_backward=True, **common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crashed, [CrashAt(3)])
    run(crashed)
    c = load_file(str(tmp_path / "crashed" / "model.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)


@pytest.mark.slow
def test_pretrain_on_text_packs_blocks_and_scores_perplexity(tmp_path: Path, tiny_llama_dir: Path) -> None:
    text = corpus(tmp_path)
    data = recipe(tiny_llama_dir, tmp_path / "pre", method="pretrain", max_steps=3)
    data["model"] = {"config": str(tiny_llama_dir)}
    data["data"] = {"path": str(text), "cutoff_len": 32, "val_set_size": 6}
    data["eval"] = {"perplexity": {"enabled": True}}
    path = tmp_path / "pre.yaml"
    path.write_text(yaml.safe_dump(data))
    summary = run_pipeline(path, overrides=[])
    ppl = summary["perplexity"]
    assert summary["method"] == "pretrain" and ppl["perplexity"] > 1 and ppl["tokens"] == ppl["blocks"] * 31
    trained = load_file(str(tmp_path / "pre" / "model.safetensors"))
    start = load_file(str(tiny_llama_dir / "model.safetensors"))
    assert not torch.equal(trained["model.embed_tokens.weight"], start["model.embed_tokens.weight"])  # fresh init

    from velora_cli.cli import main

    main(["eval", "--perplexity", "--data", str(text), "--model", str(tmp_path / "pre"), "--block", "32",
          "--json", str(tmp_path / "ppl.json")])  # fmt: skip
    assert json.loads((tmp_path / "ppl.json").read_text())["perplexity"] > 1


def test_corpus_packs_without_padding_and_holds_out_whole_documents(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    from velora_cli.config.recipe import DataSection
    from velora_cli.data.corpus import iter_documents, load_text_sets

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(20)))
    assert len(list(iter_documents(str(rows)))) == 20
    corpus(tmp_path)
    assert len(list(iter_documents(str(tmp_path / "*.txt")))) == 60
    train, val, docs = load_text_sets(DataSection(path=str(rows), cutoff_len=16, val_set_size=4), tok, seed=1)
    assert docs == 20 and set(train["length"]) == {16} and set(val["length"]) == {16}
    assert all(row["labels"] == row["input_ids"] for row in train)
    assert tok.eos_token_id in sum(train["input_ids"], [])


def test_memory_estimate_counts_full_training_states() -> None:
    import dataclasses

    from velora_cli.memory.arch import arch_for
    from velora_cli.memory.estimate import Settings, estimate

    arch = arch_for(preset="llama-60m")
    s = Settings(batch=1, seq=256, quantization="none", compute="fp32", method="pretrain", targets=(),
                 velora=("v_proj", "down_proj"), num_groups=64)  # fmt: skip
    full = estimate(arch, s).components
    n = arch.total_params
    assert full["weights"] == 4 * n and full["gradients"] == 4 * n and full["optimizer"] == 8 * n
    layerwise = estimate(arch, dataclasses.replace(s, optimizer_in_backward=True)).components
    assert layerwise["gradients"] == 4 * 32000 * 512  # the largest tensor: the (untied) embedding or lm_head
    plain = estimate(arch, dataclasses.replace(s, velora=())).components
    assert plain["activations"] > full["activations"]


def pretrain_recipe(tmp_path: Path, model_dir: Path, **train) -> Path:
    data = recipe(model_dir, tmp_path / "runs" / "pre", method="pretrain", **train)
    data["model"] = {"config": str(model_dir)}
    data["data"] = {"path": str(corpus(tmp_path)), "cutoff_len": 32, "val_set_size": 6}
    path = tmp_path / "pre.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def crashing(monkeypatch, step: int | None = None) -> None:
    """The next `velora finetune` in this process crashes during step `step` (None: while saving the final
    model, after its last checkpoint), as a kill -9 would stop it."""
    setup = FinetuneSession.setup

    def crash_setup(self):
        plan = setup(self)
        self.trainer.add_callback(CrashAt(step))
        return plan

    def crash_save(self):
        raise RuntimeError("simulated crash")

    if step is None:
        monkeypatch.setattr(FinetuneSession, "save", crash_save)
    else:
        monkeypatch.setattr(FinetuneSession, "setup", crash_setup)


def cli_exit(argv: list[str], capsys) -> tuple[int, str]:
    from velora_cli.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, capsys.readouterr().err


@pytest.mark.slow
def test_pretrain_from_the_cli_resumes_bit_for_bit_exports_and_lists(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch, capsys
) -> None:
    """Crashes during step 3 and after the last checkpoint, each rerun continuing: the same weights as a straight
    run; `velora export` gives a model with the trained logits; the panel and `velora runs` name the architecture."""
    from transformers import AutoModelForCausalLM

    from velora_cli.cli import main

    path = pretrain_recipe(tmp_path, tiny_llama_dir)
    straight, crashed = tmp_path / "runs" / "pre", tmp_path / "runs" / "crashed"
    main(["finetune", str(path)])
    err = capsys.readouterr().err
    assert f"model={tiny_llama_dir} (from scratch, fp32)" in err and "embedded:" not in err
    crashing(monkeypatch, step=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["finetune", str(path), "--output-dir", str(crashed)])
    monkeypatch.undo()
    # checkpoint-2 holds an ordinary AdamW state: the optimizer in backward cannot take it over
    code, err = cli_exit(["finetune", str(path), "--output-dir", str(crashed),
                          "--set", "train.optimizer_in_backward=true"], capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "checkpoint-2: written with train.optimizer_in_backward=false" in err
    crashing(monkeypatch, step=None)
    with pytest.raises(RuntimeError, match="simulated crash"):  # resumed at 2, trained 3-4, saved checkpoint-4
        main(["finetune", str(path), "--output-dir", str(crashed)])
    monkeypatch.undo()
    main(["finetune", str(path), "--output-dir", str(crashed)])  # finishes from checkpoint-4, no step trained
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(crashed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    main(["export", str(straight), "--out", str(tmp_path / "export"), "--dtype", "fp32"])
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    with torch.no_grad():
        trained = AutoModelForCausalLM.from_pretrained(straight)(ids).logits
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")(ids).logits
    assert torch.equal(trained, exported)
    capsys.readouterr()
    main(["runs", str(tmp_path / "runs")])
    listing = capsys.readouterr().out
    assert f"{tiny_llama_dir} (from scratch)" in listing and "pretrain + VeLoRA (v_proj,down_proj)" in listing


@pytest.mark.slow
def test_full_from_the_cli_names_the_model_and_exports_its_logits(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch, capsys
) -> None:
    """A full run with the optimizer in backward: its checkpoint cannot resume ordinary AdamW; panel, summary table
    and `velora runs` say `full`; the export's logits equal the trained model's."""
    from transformers import AutoModelForCausalLM

    from velora_cli.cli import main

    run_dir = tmp_path / "runs" / "full"
    data = recipe(tiny_llama_dir, run_dir, max_steps=2, save_steps=1, optimizer_in_backward=True)
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(data))
    crashing(monkeypatch, step=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["finetune", str(path)])
    monkeypatch.undo()
    code, err = cli_exit(["finetune", str(path), "--set", "train.optimizer_in_backward=false"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"{run_dir / 'checkpoint-1'}: written with train.optimizer_in_backward=true" in err
    monkeypatch.setenv("COLUMNS", "250")  # the tables' rows unwrapped
    main(["finetune", str(path)])
    err = capsys.readouterr().err
    assert f"model={tiny_llama_dir} (full, fp32)" in err and f"{tiny_llama_dir} (full)" in err  # panel, summary
    main(["export", str(run_dir), "--out", str(tmp_path / "export"), "--dtype", "fp32"])
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    with torch.no_grad():
        trained = AutoModelForCausalLM.from_pretrained(run_dir)(ids).logits
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")(ids).logits
    assert torch.equal(trained, exported)
    capsys.readouterr()
    main(["runs", str(tmp_path / "runs")])
    assert "full + VeLoRA (v_proj,down_proj)" in capsys.readouterr().out


def test_streaming_dataset_trains_with_a_held_out_split_and_needs_max_steps(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch, capsys
) -> None:
    """data.streaming on a local dataset takes the hub's path (datasets.load_dataset(path, subset, split=...,
    streaming=True)): held-out blocks from the first val_set_size documents of val_split, training on the fly."""
    import datasets
    from transformers import AutoTokenizer

    monkeypatch.setenv("COLUMNS", "250")  # the plan table's rows unwrapped
    source = c4_like(tmp_path / "c4")
    calls = []
    load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or load(*a, **k))
    data = recipe(tiny_llama_dir, tmp_path / "stream", method="pretrain", max_steps=3, save_steps=10)
    data["model"] = {"config": str(tiny_llama_dir)}
    data["data"] = {"path": str(source), "subset": "en", "streaming": True, "val_split": "validation",
                    "val_set_size": 4, "cutoff_len": 32}  # fmt: skip
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(data))
    summary = run_pipeline(path, overrides=[])
    assert summary["train"]["steps"] == 3 and summary["train"]["before"]["eval_loss"] > summary["train"]["eval_loss"]
    assert {(a, k["split"], k["streaming"]) for a, k in calls} == {((str(source), "en"), s, True)
                                                                   for s in ("train", "validation")}  # fmt: skip
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts = [f"validation page {i}: the mill by the river {i % 5} " * 3 for i in range(4)]
    blocks = sum(len(tok(t, add_special_tokens=False).input_ids) + 1 for t in texts) // 32
    assert f"streamed train / {blocks} val rows, format=text" in capsys.readouterr().err  # the plan

    del data["train"]["max_steps"]
    path.write_text(yaml.safe_dump(data))
    code, err = cli_exit(["finetune", str(path), "--output-dir", str(tmp_path / "no-max")], capsys)
    assert (code, err) == (2, "error: data.streaming reads an endless stream: set train.max_steps\n")
    code, err = cli_exit(["finetune", str(path), "--set", "data.val_set_size=0.1", "--max-steps", "2"], capsys)
    assert code == 2 and "data.val_set_size=0.1 is a fraction, and a stream has no length" in err
    assert not (tmp_path / "no-max").exists()


@pytest.mark.parametrize(
    ("name", "content", "streaming", "message"),
    [
        ("bin.txt", b"\xff\xfe\x00text", False, "bin.txt: not UTF-8 text (byte 0)"),
        ("empty.txt", b"", False, "empty.txt: no text"),
        ("bad.parquet", b"not parquet at all", False, "bad.parquet: cannot load dataset: Parquet magic bytes"),
        ("bad.jsonl", b'{"text": "a"}\n{oops\n', True, "bad.jsonl: invalid JSON at line 2"),
        ("dir/train.jsonl", b'{"text": "a"}\n{oops\n', True, "dir: unreadable after 0 rows: JSON parse error"),
        ("empty.txt", b"", True, "empty.txt: fewer than data.cutoff_len=16 tokens of training text"),
    ],
)
def test_bad_corpus_files_are_one_line(
    tmp_path: Path, tiny_llama_dir: Path, name: str, content: bytes, streaming: bool, message: str, capfd
) -> None:
    from transformers import AutoTokenizer

    from velora_cli.common.errors import DataError
    from velora_cli.common.logs import configure
    from velora_cli.config.recipe import DataSection
    from velora_cli.data.corpus import load_text_sets

    configure()  # as every command: the libraries' own log lines go to the log file
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    source = path.parent if name.startswith("dir/") else path
    section = DataSection(path=str(source), format="text", cutoff_len=16, streaming=streaming)
    with pytest.raises(DataError) as err:
        load_text_sets(section, AutoTokenizer.from_pretrained(tiny_llama_dir), seed=0)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert capfd.readouterr().err == ""  # nothing else printed beside the error line
