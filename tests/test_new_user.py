"""What a new user meets (issue 27): README commands offline, reruns that change nothing, messages that read right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from velora_cli.cli import main
from velora_cli.finetune.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
DEMO_DATA = RECIPES / "data" / "demo_tasks_train.json"


def tiny_recipe(model: str, run_dir: Path) -> Path:
    recipe = {
        "name": "tiny",
        "model": {"name": model, "quantization": "none"},
        "lora": {"r": 4, "alpha": 8},
        "velora": {"enabled": False},
        "data": {"path": str(DEMO_DATA), "template": "chat", "cutoff_len": 48, "val_set_size": 4},
        "train": {"micro_batch_size": 2, "batch_size": 2, "max_steps": 1, "logging_steps": 1, "save_steps": 1},
        "eval": {"heldout": {"enabled": True, "limit": 2}},
        "output": {"dir": str(run_dir)},
    }
    path = run_dir.parent / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_perplexity_only_eval_never_asks_the_hub_for_mmlu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Item 1: the tiny pretrain demo's eval stage is perplexity only; its pre-flight must not need cais/mmlu."""
    from velora_cli.common import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_hub(what: str) -> None:
        raise AssertionError(f"asked the hub for {what}")

    monkeypatch.setattr(hub, "require_hub", no_hub)
    plan = run_pipeline(RECIPES / "tiny_pretrain_demo.yaml", overrides=[], output_dir=tmp_path / "run", dry_run=True)
    assert plan["steps"] == 150


@pytest.mark.slow
def test_stages_train_trains_only_and_a_finished_rerun_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Items 2 and 3: `--stages train` runs no held-out evaluation; rerun, it changes nothing and says so.
    Item 11: the adapter names its base as the recipe does (not a cache path) and its README is a model card."""
    from velora_cli.finetune import pipeline

    def no_eval(*args, **kwargs):
        raise AssertionError("held-out exact match ran under --stages train")

    monkeypatch.setattr(pipeline, "exact_match", no_eval)
    run_dir = tmp_path / "run"
    recipe = tiny_recipe("embedded:smollm2-135m", run_dir)
    main(["finetune", str(recipe), "--stages", "train"])
    summary = (run_dir / "summary.json").read_text()
    assert json.loads(summary)["train"]["steps"] == 1
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in logged if "loss" in r]  # the training records (the validation loss has its own)
    assert trained[-1]["step"] == 1 and 0 < trained[-1]["trained_tokens_per_second"] < trained[-1]["tokens_per_second"]
    adapter = json.loads((run_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "embedded:smollm2-135m"
    card = (run_dir / "README.md").read_text()
    assert "# tiny" in card and "PeftModel.from_pretrained" in card and "## Recipe" in card
    assert "[More Information Needed]" not in card  # PEFT's blank template
    capsys.readouterr()
    main(["finetune", str(recipe), "--stages", "train"])
    err = capsys.readouterr().err
    assert "nothing to do" in err and "summary.json is unchanged" in err
    assert (run_dir / "summary.json").read_text() == summary


def test_a_run_that_is_not_there_is_named_as_a_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 5: `velora generate runs/smollm2_demo` before the demo ran: no hub error."""
    monkeypatch.chdir(tmp_path)
    for make_runs in (False, True):
        if make_runs:
            (tmp_path / "runs").mkdir()
        with pytest.raises(SystemExit) as info:
            main(["generate", "runs/smollm2_demo", "--prompt", "hi"])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: runs/smollm2_demo: run or model directory not found"), err
        assert "Hugging Face" not in err


def test_dry_run_plans_for_the_recipes_gpu_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 6 and --json: the 7B recipe's dry run on a CPU machine, offline, with an empty HF cache: planned for a
    CUDA GPU (its paged optimizer needs one), the memory estimated from the known architecture, no refusal."""
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    main(["finetune", str(RECIPES / "llama7b_alpaca.yaml"), "--dry-run", "--json",
          "--output-dir", str(tmp_path / "run")])  # fmt: skip
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    assert plan["planned_for"]["device"] == "cuda" and plan["planned_for"]["compute_dtype"] == "bf16"
    assert "paged_adamw_32bit" in plan["planned_for"]["why"]
    assert 10 * 2**30 < plan["estimated_total_bytes"] < 30 * 2**30
    assert "HF_HUB_OFFLINE" in plan["not_checked"]
    assert "a CUDA GPU" in captured.err and "not checked" in captured.err
    assert not (tmp_path / "run").exists()


def test_runs_lists_json_without_importing_torch(tmp_path: Path) -> None:
    """`velora runs --json` reads summary.json files only: torch (seconds to import) is never loaded."""
    import subprocess
    import sys

    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    summary = {"recipe": "demo", "method": "qlora", "stages": {"train": {"status": "done", "seconds": 2.0}},
               "train": {"steps": 3, "train_loss": 1.5, "peak_memory": {"device": "cpu", "allocated": 1,
                                                                         "reserved": 1, "peak": 2**30}}}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    code = ("import sys; from velora_cli.cli import main; main(['runs', sys.argv[1], '--json']); "
            "print('torch loaded' if 'torch' in sys.modules else 'no torch', file=sys.stderr)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "runs")], capture_output=True, text=True,
                          cwd=REPO, check=True)  # fmt: skip
    assert done.stderr.strip().splitlines()[-1] == "no torch", done.stderr
    listed = json.loads(done.stdout)
    assert [r["run"] for r in listed] == [str(run)]
    assert listed[0]["train"]["steps"] == 3 and listed[0]["train"]["peak_memory"]["peak"] == 2**30


def test_recipes_lists_and_copies_a_recipe_that_still_finds_its_data(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`velora recipes` (one line per shipped recipe) and `velora recipes copy NAME [DEST]` (like tune ls / cp)."""
    from velora_cli.config.load import load_recipe

    main(["recipes"])
    lines = capsys.readouterr().out.splitlines()
    names = {p.stem for p in RECIPES.glob("*.yaml")}
    listed = {line.split()[0] for line in lines if line and line.split()[0] in names}
    assert listed == names
    assert any(line.startswith("smollm2_demo ") and "SmolLM2-135M-Instruct" in line for line in lines)

    monkeypatch.chdir(tmp_path)
    main(["recipes", "copy", "smollm2_demo"])
    copied = tmp_path / "smollm2_demo.yaml"
    assert "velora finetune smollm2_demo.yaml" in capsys.readouterr().out
    recipe = load_recipe(copied, [])
    assert Path(recipe.data.path).is_file() and Path(recipe.eval.mmlu.data_dir).is_dir()
    assert copied.read_text().startswith("# The demo:")  # the comments travel with it
    (tmp_path / "mine").mkdir()
    main(["recipes", "copy", "tiny_pretrain_demo", "mine"])
    assert load_recipe(tmp_path / "mine" / "tiny_pretrain_demo.yaml", []).model.config
    for argv, message in ((["recipes", "copy", "smollm2_demo"], "smollm2_demo.yaml exists"),
                          (["recipes", "copy", "smollm_demo"], "did you mean 'smollm2_demo'")):  # fmt: skip
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_mmlu_prints_each_subject_once_and_an_unbroken_title(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 12: per-subject figures once (as each finishes), the table's title on one line, the model apart."""
    from conftest import run_cli

    code, out, err = run_cli(["eval", "--mmlu", "--model", str(tiny_llama_dir), "--data-dir",
                              str(RECIPES / "data" / "mmlu_mini"), "--subjects", "astronomy,nutrition",
                              "--limit", "1", "--shots", "0"], capsys)  # fmt: skip
    assert code == 0, err
    for subject in ("astronomy", "nutrition"):
        assert (out + err).count(subject) == 1, out + err
    assert "MMLU 0-shot test accuracy" in out.splitlines()[out.splitlines().index("model: " + str(tiny_llama_dir))
                                                          + 1]  # fmt: skip


def test_perplexity_is_one_line_and_no_dash_row_without_validation(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 12: the perplexity line does not break after its `: `; no all-dash `eval loss` row."""
    from conftest import run_cli
    from rich.console import Console

    from velora_cli.finetune.display import print_before_after
    from velora_cli.rundir.summary import Scores

    code, out, err = run_cli(["eval", "--perplexity", "--data", str(RECIPES / "data" / "tiny_corpus.txt"), "--model",
                              str(tiny_llama_dir), "--block", "32", "--limit", "2"], capsys)  # fmt: skip
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("perplexity ") and lines[0].endswith(str(tiny_llama_dir))

    console = Console(record=True, width=100)
    print_before_after(Scores(), Scores(), console)
    assert "eval loss" not in console.export_text()
    print_before_after(Scores(eval_loss=2.5), Scores(eval_loss=2.0), console)
    assert "eval loss" in console.export_text()


def test_a_cut_answer_says_so(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 12: generate (and chat) say when --max-new-tokens cut the answer; stdout keeps the answer only."""
    from conftest import run_cli

    code, out, err = run_cli(["generate", str(tiny_llama_dir), "--prompt", "Count to ten.", "--max-new-tokens", "3"],
                             capsys)  # fmt: skip
    assert code == 0, err
    assert "answer cut at --max-new-tokens 3" in err and "cut" not in out
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Count to ten.\n/exit\n"))
    code, out, err = run_cli(["chat", str(tiny_llama_dir), "--max-new-tokens", "3"], capsys)
    assert code == 0 and "answer cut at --max-new-tokens 3" in err, err


@pytest.mark.parametrize(
    "argv",
    [["--bogus"], ["finetune"], ["finetune", "x.yaml", "--max-steps", "0"], ["nonexistent"], ["runs", "a", "b"],
     ["recipes", "copy"], ["eval", "--quantization", "nf9", "--mmlu"], ["export"]],
)  # fmt: skip
def test_every_error_line_is_lowercase_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Item 12: `error:` everywhere, never click's `Error:`."""
    from conftest import run_cli

    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.startswith("error: ") and "Error:" not in err, err


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    """Item 10: atomically written files and staged folders get the umask's mode, not tempfile's 0600 / 0700."""
    import os
    import stat

    import torch

    from velora_cli.common.fs import staged_dir, write_json_atomic
    from velora_cli.engine import VeloraConfig, apply_velora, save_velora_vectors

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "summary.json", {"a": 1})
        with staged_dir(tmp_path / "export") as folder:
            (folder / "config.json").write_text("{}")
        model = torch.nn.Sequential()
        model.add_module("v_proj", torch.nn.Linear(8, 8))
        apply_velora(model, VeloraConfig(layers=["v_proj"], num_groups=2))
        saved = save_velora_vectors(model, tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "export").stat().st_mode) == 0o755
    assert saved is not None and stat.S_IMODE(saved.stat().st_mode) == 0o644


def test_memory_estimate_of_a_full_run_reads_right(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 9: no `LoRA r=8 on ,` header for a full run; `(no)` figures with the digits that tell them from the
    budget; GiB only; a CPU-only machine is told the plan is for a CUDA GPU."""
    import re

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("COLUMNS", "200")
    main(["memory-estimate", "--method", "full", "--model", "embedded:smollm2-135m", "--gpu-mem", "2GiB"])
    out = capsys.readouterr().out
    assert "LoRA r=" not in out and "every weight trained (no LoRA)" in out
    assert "planned for a CUDA GPU (this machine has none" in out
    assert not re.search(r"\b2\.00 \(no\)", out) and re.search(r"\b2\.00\d+ \(no\)", out), out
    assert not re.search(r"\d GB\b", out)


def test_eval_quantization_has_one_rule_stated_in_help(
    tiny_lora_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 4: a run is evaluated on its recipe's base quantization (nf4 here); --help says so, and an explicit
    other value is refused instead of silently ignored."""
    from conftest import run_cli

    code, out, _ = run_cli(["eval", "--help"], capsys)
    assert code == 0
    flat = " ".join(out.replace("│", " ").split())
    assert "A run dir is evaluated as it was trained, on its recipe's quantization (nf4 for QLoRA)" in flat, flat
    code, _, err = run_cli(["eval", "--mmlu", "--model", str(tiny_lora_run), "--quantization", "none", "--data-dir",
                            str(RECIPES / "data" / "mmlu_mini"), "--limit", "1"], capsys)  # fmt: skip
    assert code == 2 and "--quantization none: " in err and "trained on a nf4 base" in err, err


def test_live_panel_at_the_first_step_mid_step_and_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 8: the rendered panel (rich's recorded text) says what is going on before the first logging step, its
    clock runs during a long step, and the final panel keeps lr, grad norm, speed and the last step's loss."""
    from rich.console import Console

    from velora_cli.finetune import display as shown

    clock = [1000.0]
    monkeypatch.setattr(shown.time, "monotonic", lambda: clock[0])
    panel = shown.TrainingDisplay("demo", 10, {"model": "tiny"}, console=Console(record=True, width=100))

    def text() -> str:
        console = Console(record=True, width=100)
        console.print(panel._render())
        return console.export_text()

    panel.start()  # not a terminal: no Live, the panel is still what a terminal would show
    first = text()
    assert "0/10" in first and "step 1 running" in first and "0:00 elapsed" in first
    clock[0] += 95.0  # a long first step: the clock moves without a tick
    assert "1:35 elapsed" in text()
    panel.tick(1)
    panel.update({"step": 1, "epoch": 0.1, "loss": 2.3456, "learning_rate": 2e-4, "grad_norm": 0.75,
                  "tokens_per_second": 812.0, "trained_tokens_per_second": 301.0, "samples_per_second": 1.5})
    mid = text()
    assert "loss" in mid and "2.3456" in mid and "2.00e-04" in mid and "grad norm 0.750" in mid
    assert "812 tok/s (301 trained)" in mid
    clock[0] += 30.0
    panel.tick(5)  # between logging steps: the step, and the clock, move on
    assert "5/10" in text() and "2:05 elapsed" in text()
    panel.update({"step": 10, "epoch": 1.0, "loss": 1.2345, "learning_rate": 1e-5, "grad_norm": 0.5,
                  "tokens_per_second": 820.0, "trained_tokens_per_second": 305.0, "samples_per_second": 1.6})
    panel.update({"step": 10, "epoch": 1.0})  # the Trainer's closing record: runtime figures, no loss
    end = text()
    assert "10/10 (100%)" in end and "1.2345" in end and "1.00e-05" in end and "820 tok/s (305 trained)" in end
    assert shown.human_duration(1811.5) == "30 min 12 s" and shown.human_duration(42.25) == "42.2 s"


@pytest.mark.slow
def test_gguf_conversion_is_one_line_of_ours(
    tiny_lora_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 7: converting a GGUF model (the first command's embedded model) prints velora's one line, not
    transformers' raw `Converting and de-quantizing GGUF tensors` bar (that goes to the log file)."""
    from velora_cli.common import logs
    from velora_cli.export.merge import export_run
    from velora_cli.models.load import resolve_model

    folder = export_run(tiny_lora_run, tmp_path / "gguf", fmt="gguf", quant="f32")
    monkeypatch.setenv("VELORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VELORA_VERBOSE", raising=False)
    logs.configure(False)
    capsys.readouterr()
    source = resolve_model(str(folder / "model.gguf"))
    err = capsys.readouterr().err
    assert (Path(source.path) / "model.safetensors").is_file()
    assert err.startswith("converting model.gguf once into a checkpoint under") and len(err.splitlines()) == 1, err
    assert "de-quantizing" not in err


def test_plain_log_has_no_empty_closing_line_and_gives_the_measured_saving() -> None:
    """Item 8 without a terminal: no `[train] step 4/4 | epoch ...` line for the Trainer's closing record, and a
    note measured during training (VeLoRA's saving, summary.json's figure) is printed again when it changed."""
    from rich.console import Console

    from velora_cli.finetune.display import TrainingDisplay

    console = Console(record=True, width=200)
    panel = TrainingDisplay("demo", 4, {"VeLoRA saves": "487.50 KiB/token"}, console=console)
    panel.start()
    panel.update({"step": 4, "epoch": 1.0, "loss": 1.5, "learning_rate": 1e-3})
    panel.update({"step": 4, "epoch": 1.0})
    panel.notes["VeLoRA saves"] = "485.25 KiB/token"
    panel.stop()
    lines = console.export_text().splitlines()
    steps = [line for line in lines if line.startswith("[train] step")]
    assert steps == ["[train] step 4/4 | epoch 1.00 | loss 1.5000 | lr 1.00e-03"]
    assert lines[-1] == "[train] demo: VeLoRA saves=485.25 KiB/token"
