"""The whole shape of `velora finetune`: train -> export -> MMLU from the demo recipe, resumable stages, and
`velora runs` comparing run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from transformers import AutoModelForCausalLM

from velora_cli.cli import main
from velora_cli.finetune.pipeline import run_pipeline

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "smollm2_demo.yaml"
QUICK = [
    "train.max_steps=2", "train.micro_batch_size=2", "train.batch_size=2", "train.logging_steps=1",
    "eval.heldout.limit=4", "eval.mmlu.subjects=[astronomy, nutrition]", "eval.mmlu.limit=2", "eval.mmlu.shots=2",
]  # fmt: skip


@pytest.mark.slow
def test_demo_recipe_trains_exports_and_scores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "demo"
    summary = run_pipeline(DEMO, overrides=QUICK, output_dir=run_dir)

    assert (run_dir / "adapter_model.safetensors").is_file()
    assert list(summary["stages"]) == ["train", "export", "eval"]
    assert all(stage["status"] == "done" and stage["seconds"] > 0 for stage in summary["stages"].values())

    merged = Path(summary["export"]["path"])
    assert merged == run_dir / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.dtype == torch.bfloat16
    # The merged export is the trained adapter on the unquantised base: same next-token choices.
    from peft import PeftModel
    from transformers import AutoTokenizer

    from velora_cli.models.load import resolve_model

    base_dir = resolve_model("embedded:smollm2-135m").path
    adapter_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run_dir).eval()
    ids = AutoTokenizer.from_pretrained(merged)("Convert 3 kilometers to meters. The answer is", return_tensors="pt")
    with torch.no_grad():
        expected = adapter_model(**ids).logits.argmax(-1)
        got = model(**ids).logits.argmax(-1)
    assert (expected == got).float().mean() >= 0.9

    mmlu = json.loads((run_dir / "eval" / "mmlu.json").read_text())
    assert mmlu["overall"]["n"] == 4 and set(mmlu["subjects"]) == {"astronomy", "nutrition"}
    assert mmlu["shots"] == 2
    # Each accuracy is a count of correct answers over n, and overall pools the subjects' counts.
    correct = {s: round(r["acc"] * r["n"]) for s, r in mmlu["subjects"].items()}
    assert all(correct[s] / r["n"] == r["acc"] for s, r in mmlu["subjects"].items())
    assert mmlu["overall"]["acc"] == sum(correct.values()) / mmlu["overall"]["n"]

    saved = json.loads((run_dir / "summary.json").read_text())
    for key in ("recipe", "base_model", "quantization", "velora", "train", "export", "eval", "stages", "wall_seconds"):
        assert key in saved, key
    train = saved["train"]
    assert saved["recipe"] == "smollm2_demo" and saved["quantization"] == "nf4"
    assert saved["velora"]["enabled"] and saved["velora"]["layers"] == ["v_proj", "down_proj"]
    assert train["steps"] == 2 and train["train_loss"] > 0 and train["tokens_per_second"] > 0
    assert train["peak_memory"]["peak"] > 0 and train["activation_bytes_per_token"] > 0
    assert train["velora_saved_bytes_per_token"] > 0
    assert train["after"]["heldout"]["n"] == 4
    for when in ("before", "after"):  # exact match is the share of the 4 tasks whose greedy answer is right
        heldout = train[when]["heldout"]
        assert len(heldout["examples"]) == 4
        assert heldout["exact_match"] == sum(e["correct"] for e in heldout["examples"]) / 4
    assert saved["eval"]["mmlu"]["overall"] == mmlu["overall"] and "categories" in saved["eval"]["mmlu"]
    out = capsys.readouterr()
    assert "run summary: smollm2_demo" in out.err and "MMLU" in out.err

    # A rerun of just the eval stage reuses the trained adapter: no training, same adapter bytes.
    adapter = (run_dir / "adapter_model.safetensors").read_bytes()
    metrics = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "eval" / "mmlu.json").unlink()
    again = run_pipeline(DEMO, overrides=QUICK, output_dir=run_dir, stages="eval")
    assert (run_dir / "eval" / "mmlu.json").is_file()
    assert (run_dir / "adapter_model.safetensors").read_bytes() == adapter
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert again["train"]["steps"] == 2  # the earlier stages' results are kept in the summary

    # A rerun of the whole command is a no-op that says so (every stage is done).
    capsys.readouterr()
    summary_text = (run_dir / "summary.json").read_text()
    run_pipeline(DEMO, overrides=QUICK, output_dir=run_dir, stages=None)
    assert "nothing to do" in capsys.readouterr().err
    assert (run_dir / "summary.json").read_text() == summary_text
    assert (run_dir / "metrics.jsonl").read_text() == metrics

    # `velora runs` lists it in the paper's Table 3 layout.
    main(["runs", str(tmp_path)])
    listing = capsys.readouterr().out
    assert "demo" in listing and "QLoRA + VeLoRA (v_proj,down_proj)" in listing


def test_stage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["finetune", str(DEMO), "--stages", "train,deploy", "--output-dir", str(tmp_path / "x")])
    assert info.value.code == 2
    assert "--stages 'train,deploy': choose from train, export, eval" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["finetune", str(DEMO), "--stages", "eval", "--output-dir", str(tmp_path / "empty")])
    assert info.value.code == 2
    assert "no trained adapter yet; run the train stage first" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["runs", str(tmp_path / "nothing")])
    assert info.value.code == 2


@pytest.mark.slow
def test_one_finetune_reads_the_data_once_and_resolves_the_model_once(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The recipe is resolved once: the pre-flight's prepared data, tokenizer and model reference serve training,
    the export stage and the saved recipe.yaml (the data's detected format included) - nothing is read twice."""
    import sys

    import yaml

    import velora_cli.models.load as load

    rows = [{"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)} for i in range(12)]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    recipe = {"method": "lora", "model": {"name": str(tiny_llama_dir)}, "data": {"path": "rows.json", "val_set_size": 4,
              "cutoff_len": 64}, "train": {"max_steps": 1, "micro_batch_size": 2, "batch_size": 2},
              "eval": {"heldout": {"enabled": True, "limit": 2}}, "export": {"enabled": True}}  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    opened: list[str] = []
    counting = [True]
    target = str(data.resolve())
    sys.addaudithook(lambda event, args: counting[0] and event == "open" and str(args[0]) == target
                     and opened.append(event))  # fmt: skip
    resolved: list[str] = []
    original = load.resolve_model

    def counted(reference: str):
        resolved.append(reference)
        return original(reference)

    for name, module in list(sys.modules.items()):
        if name.startswith("velora_cli") and getattr(module, "resolve_model", None) is original:
            monkeypatch.setattr(module, "resolve_model", counted)
    try:
        code, _, err = run_cli(["finetune", str(tmp_path / "recipe.yaml"), "--output-dir", str(tmp_path / "run")],
                               capsys)  # fmt: skip
    finally:
        counting[0] = False
    assert code == 0, err
    assert (tmp_path / "run" / "merged" / "model.safetensors").is_file()
    assert len(opened) == 1  # the training file: read once, by the pre-flight
    assert resolved == [str(tiny_llama_dir)]  # one resolution for pre-flight, training and export
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["data"]["format"] == "alpaca" and saved["data"]["path"] == target
