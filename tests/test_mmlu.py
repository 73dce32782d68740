"""`velora eval --mmlu`: prompt format, data loading, scoring (fast path vs reference), results and CLI errors.

The fixture recipes/data/mmlu_mini (also the demo recipe's MMLU set) holds original questions written for this
project in the MMLU CSV layout (four subjects, one per category).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from velora_cli.common.errors import UsageError
from velora_cli.eval.command import load_eval_model
from velora_cli.eval.mmlu_data import (
    SPLITS,
    SUBJECT_CATEGORIES,
    UNCATEGORIZED,
    SubjectData,
    available_subjects,
    category_of,
    load_mmlu,
    read_csv,
)
from velora_cli.eval.mmlu_prompts import build_prompt, prompt_prefix, shots_for
from velora_cli.eval.scorer import MmluScorer, score_mmlu
from velora_cli.eval.summary import evaluate_mmlu, summarize

FIXTURE = Path(__file__).resolve().parents[1] / "recipes" / "data" / "mmlu_mini"


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path):
    model, tokenizer, _ = load_eval_model(tiny_llama_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def fixture_data() -> dict[str, SubjectData]:
    return load_mmlu(FIXTURE)


# ------------------------------------------------------------------------------------------ data and prompts


def test_prompt_is_byte_for_byte_the_protocol() -> None:
    data = load_mmlu(FIXTURE, subjects=["philosophy"])["philosophy"]
    question = data.questions[2]  # a quoted CSV field spanning three lines
    prompt = build_prompt("philosophy", shots_for(data, question, 2), question)
    assert prompt == (
        "The following are multiple choice questions (with answers) about philosophy.\n\n"
        'Which philosopher wrote "Meditations on First Philosophy"?\n'
        "A. René Descartes\nB. David Hume\nC. John Locke\nD. Thomas Hobbes\nAnswer: A\n\n"
        "The branch of philosophy that studies knowledge and justified belief is called:\n"
        "A. ethics\nB. aesthetics\nC. epistemology\nD. metaphysics\nAnswer: C\n\n"
        "Consider the argument:\nAll whales are mammals. Moby is a whale. Therefore, Moby is a mammal.\n"
        "This argument is best described as:\n"
        "A. inductive\nB. deductive and valid\nC. circular\nD. invalid\nAnswer:"
    )
    header = prompt_prefix("high_school_geography", [])
    assert header == "The following are multiple choice questions (with answers) about high school geography.\n\n"


def test_local_data_splits_limit_and_shots(fixture_data: dict[str, SubjectData]) -> None:
    assert sorted(fixture_data) == ["astronomy", "high_school_geography", "nutrition", "philosophy"]
    assert sum(len(d.questions) for d in fixture_data.values()) == 17
    assert [len(d.shots) for d in fixture_data.values()] == [5, 5, 5, 5]
    val = load_mmlu(FIXTURE, split="validation", subjects=["nutrition"], limit=1)["nutrition"]
    assert [(q.question, q.answer) for q in val.questions] == [
        ("Which vitamin is needed for normal blood clotting?", 0)
    ]
    # Evaluating dev itself: a question is never its own shot.
    dev = load_mmlu(FIXTURE, split="dev", subjects=["astronomy"])["astronomy"]
    assert [s.index for s in shots_for(dev, dev.questions[1], 5)] == [0, 2, 3, 4]


def test_category_mapping_covers_the_57_subjects() -> None:
    counts: dict[str, int] = {}
    for category in SUBJECT_CATEGORIES.values():
        counts[category] = counts.get(category, 0) + 1
    assert counts == {"STEM": 19, "humanities": 13, "social sciences": 12, "other": 13}
    assert category_of("anatomy") == "STEM"  # lm-eval's choice (the original categories.py: other)
    assert category_of("professional_law") == "humanities"
    assert category_of("my_own_subject") == UNCATEGORIZED


def test_shared_mmlu_has_exactly_the_mapped_subjects(shared_dir: Path) -> None:
    data_dir = shared_dir / "data" / "mmlu"
    assert available_subjects(data_dir, "test") == sorted(SUBJECT_CATEGORIES)
    assert len(read_csv(data_dir / "test" / "professional_law_test.csv", "professional_law")) == 1534


def test_hub_rows_load_like_the_csv_layout(monkeypatch) -> None:
    """cais/mmlu's schema (question, subject, choices, answer index) gives the same questions as the CSV files."""
    import datasets

    local = load_mmlu(FIXTURE, split="validation", subjects=["nutrition", "philosophy"])
    splits = {"validation": "validation", "dev": "dev"}
    tables = {
        hub: datasets.Dataset.from_list(
            [
                {"question": q.question, "subject": q.subject, "choices": list(q.choices), "answer": q.answer}
                for subject in SUBJECT_CATEGORIES
                if (FIXTURE / SPLITS[ours] / f"{subject}_{SPLITS[ours]}.csv").is_file()
                for q in read_csv(FIXTURE / SPLITS[ours] / f"{subject}_{SPLITS[ours]}.csv", subject)
            ]
        )
        for ours, hub in splits.items()
    }
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or datasets.DatasetDict(tables))
    hub = load_mmlu(None, split="validation", subjects=["nutrition", "philosophy"])
    assert calls == [("cais/mmlu", "all")]
    assert hub == local

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online, the hub's own reason is the news
    with pytest.raises(UsageError, match=r"cannot load cais/mmlu from the Hugging Face hub \(Couldn't reach"):
        load_mmlu(None, subjects=["nutrition"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline, ours (issue 27: no raw library line)
    with pytest.raises(UsageError, match=r"hub \(not in the local cache, and HF_HUB_OFFLINE is set\); pass --data-dir"):
        load_mmlu(None, subjects=["nutrition"])


# ------------------------------------------------------------------------------------------------- scoring


def test_scores_are_next_token_log_likelihoods_of_the_letters(tiny, fixture_data) -> None:
    model, tokenizer = tiny
    data = {"nutrition": fixture_data["nutrition"]}
    pred = score_mmlu(model, tokenizer, data, shots=5)[0]
    q = data["nutrition"].questions[0]
    prompt = build_prompt("nutrition", data["nutrition"].shots, q)
    with torch.no_grad():
        logits = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
    logprobs = torch.log_softmax(logits, dim=-1)
    letters = [tokenizer(" " + letter, add_special_tokens=False).input_ids for letter in "ABCD"]
    assert all(len(ids) == 1 for ids in letters)
    expected = [float(logprobs[ids[0]]) for ids in letters]
    assert pred.loglik == pytest.approx(expected, abs=1e-4)
    assert pred.pred == "ABCD"[max(range(4), key=lambda i: expected[i])]
    assert (pred.subject, pred.index, pred.gold, pred.shots) == ("nutrition", 0, "A", 5)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_fast_path_matches_the_reference_path(tiny, fixture_data, batch_size: int) -> None:
    model, tokenizer = tiny
    fast = score_mmlu(model, tokenizer, fixture_data, shots=5, batch_size=batch_size)
    slow = score_mmlu(model, tokenizer, fixture_data, shots=5, reference=True)
    assert [(p.subject, p.index) for p in fast] == [(p.subject, p.index) for p in slow]
    assert [p.pred for p in fast] == [p.pred for p in slow]
    for f, s in zip(fast, slow, strict=True):
        assert f.loglik == pytest.approx(s.loglik, abs=1e-4)


def test_prompts_over_the_context_drop_shots(tiny, fixture_data) -> None:
    model, tokenizer = tiny
    data = fixture_data["astronomy"]
    full = MmluScorer(model, tokenizer).prompts("astronomy", data, 5)
    limit = min(len(p.ids) for p in full) - 20  # every 5-shot prompt is too long now
    scorer = MmluScorer(model, tokenizer, batch_size=2, max_length=limit)
    prompts = scorer.prompts("astronomy", data, 5)
    assert all(len(p.ids) <= limit for p in prompts)
    assert all(3 <= p.k < 5 for p in prompts)  # a shot or two (30-40 tokens each) go
    fast = scorer.score("astronomy", data, 5)
    slow = scorer.score("astronomy", data, 5, reference=True)
    assert [p.shots for p in fast] == [p.k for p in prompts]
    assert [p.pred for p in fast] == [p.pred for p in slow]
    for f, s in zip(fast, slow, strict=True):
        assert f.loglik == pytest.approx(s.loglik, abs=1e-4)


def test_multi_token_continuations_are_scored_in_full(tiny, fixture_data, monkeypatch) -> None:
    model, tokenizer = tiny
    data = {"philosophy": fixture_data["philosophy"]}
    single = score_mmlu(model, tokenizer, data, shots=2, batch_size=3)
    # The real continuations plus 3, 2, 1, 0 extra tokens (".") force the continuation-scoring path; rows are
    # batched by length, so the letters come back in a different order than they were built.
    dot = tokenizer(".", add_special_tokens=False).input_ids
    original = MmluScorer.continuations
    monkeypatch.setattr(
        MmluScorer, "continuations", lambda self, p: [c + dot * (3 - j) for j, c in enumerate(original(self, p))]
    )
    fast = score_mmlu(model, tokenizer, data, shots=2, batch_size=3)
    slow = score_mmlu(model, tokenizer, data, shots=2, reference=True)
    for s1, f, s in zip(single, fast, slow, strict=True):
        assert f.loglik == pytest.approx(s.loglik, abs=1e-4)
        assert f.loglik[3] == pytest.approx(s1.loglik[3], abs=1e-4)  # " D" alone: the next-token score
        assert all(two < one for one, two in zip(s1.loglik[:3], f.loglik[:3], strict=True))  # extra tokens cost
    assert [p.pred for p in fast] == [p.pred for p in slow]


# ------------------------------------------------------------------------------------------------- results


def test_results_schema_and_weighted_means(tiny) -> None:
    model, tokenizer = tiny
    model.train()
    result = evaluate_mmlu(model, tokenizer, data_dir=FIXTURE, subjects=None, limit=None, batch_size=4)
    assert model.training  # left as it was given
    model.eval()
    assert {"overall", "categories", "subjects", "shots", "model", "split"} <= set(result)
    assert (result["shots"], result["split"], result["overall"]["n"]) == (5, "test", 17)
    assert list(result["categories"]) == ["STEM", "humanities", "social sciences", "other"]
    assert result["subjects"]["astronomy"] == {**result["categories"]["STEM"], "category": "STEM"}
    subjects = result["subjects"].values()
    assert sum(s["n"] for s in subjects) == 17
    pooled = sum(s["acc"] * s["n"] for s in subjects) / 17
    assert result["overall"]["acc"] == pytest.approx(pooled)
    json.dumps(result)  # serialisable as is


def test_cli_writes_json_and_predictions(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    out_json, out_preds = tmp_path / "res.json", tmp_path / "preds.jsonl"
    code, out, err = run_cli(
        ["eval", "--mmlu", "--model", str(tiny_llama_dir), "--data-dir", str(FIXTURE), "--subjects",
         "nutrition,philosophy", "--limit", "3", "--shots", "2", "--batch-size", "2",
         "--json", str(out_json), "--save-predictions", str(out_preds)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "overall" in out and "humanities" in out
    result = json.loads(out_json.read_text())
    assert (result["overall"]["n"], result["shots"], result["limit"]) == (6, 2, 3)
    rows = [json.loads(line) for line in out_preds.read_text().splitlines()]
    assert [(r["subject"], r["index"]) for r in rows] == [("nutrition", i) for i in range(3)] + [
        ("philosophy", i) for i in range(3)
    ]
    for row in rows:
        assert set(row) == {"subject", "index", "gold", "pred", "loglik", "shots"}
        assert row["pred"] == "ABCD"[max(range(4), key=lambda i: row["loglik"][i])]
        assert all(v < 0 for v in row["loglik"])
    assert sum(r["pred"] == r["gold"] for r in rows) / 6 == pytest.approx(result["overall"]["acc"])
    assert result["subjects"]["nutrition"]["n"] == 3


@pytest.mark.slow
def test_run_dir_loads_base_plus_adapter(tiny_llama_dir: Path, tmp_path: Path, tiny, fixture_data, capsys) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)  # a trained adapter is non-zero
    run_dir = tmp_path / "run"
    peft_model.save_pretrained(run_dir)
    (run_dir / "recipe.yaml").write_text(
        f"model:\n  name: {tiny_llama_dir}\n  quantization: none\ndata:\n  path: train.json\n"
    )
    model, tokenizer, description = load_eval_model(run_dir)
    assert isinstance(model, PeftModel)
    assert "LoRA adapter on" in description
    data = {"nutrition": fixture_data["nutrition"]}
    tuned = score_mmlu(model, tokenizer, data, shots=1)
    expected = score_mmlu(peft_model.eval(), tokenizer, data, shots=1)
    plain = score_mmlu(tiny[0], tiny[1], data, shots=1)
    assert [v for p in tuned for v in p.loglik] == pytest.approx([v for p in expected for v in p.loglik], abs=1e-5)
    changes = [abs(a - b) for t, p in zip(tuned, plain, strict=True) for a, b in zip(t.loglik, p.loglik, strict=True)]
    assert max(changes) > 1e-3
    with pytest.raises(UsageError, match="trained on a none base"):
        load_eval_model(run_dir, "nf4")

    # A complete evaluation of a run is kept with it.
    code, _, err = run_cli(
        ["eval", "--mmlu", "--model", str(run_dir), "--data-dir", str(FIXTURE), "--shots", "1"], capsys
    )
    assert code == 0, err
    saved = json.loads((run_dir / "eval" / "mmlu.json").read_text())
    assert (saved["overall"]["n"], saved["shots"]) == (17, 1) and "LoRA adapter on" in saved["model"]


def test_four_bit_base_loads_and_scores(tiny_llama_dir: Path, fixture_data) -> None:
    model, tokenizer, description = load_eval_model(tiny_llama_dir, "nf4")
    assert description.endswith("(nf4)")
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    preds = score_mmlu(model, tokenizer, {"nutrition": fixture_data["nutrition"]}, shots=1)
    assert len(preds) == 4 and all(math.isfinite(v) for p in preds for v in p.loglik)


# ---------------------------------------------------------------------------------------------------- errors


def _bad_data(tmp_path: Path, test_rows: str) -> Path:
    for split in ("dev", "test"):
        (tmp_path / split).mkdir(parents=True, exist_ok=True)
    (tmp_path / "dev" / "anatomy_dev.csv").write_text("Q?,a,b,c,d,A\n")
    (tmp_path / "test" / "anatomy_test.csv").write_text(test_rows)
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--data-dir", str(FIXTURE)], "error: velora eval: choose a benchmark; --mmlu"),
        (["eval", "--mmlu", "--data-dir", "/no/such/mmlu"], "error: MMLU data directory not found: /no/such/mmlu"),
        (
            ["eval", "--mmlu", "--data-dir", str(FIXTURE), "--subjects", "astronmy"],
            "error: unknown MMLU subject 'astronmy' in ",
        ),
        (["eval", "--mmlu", "--data-dir", str(FIXTURE), "--split", "train"], "error: --split 'train': expected one"),
        (["eval", "--mmlu", "--data-dir", str(FIXTURE)], "error: no finished run found under runs/"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no runs/ here
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert err.startswith(message), err
    assert len(err.strip().splitlines()) == 1
    if "astronmy" in argv:
        assert "(did you mean 'astronomy'?)" in err


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ('Q1?,a,b,c,d,A\n"Q2, with a comma\nand a newline",a,b,c,d\n', "test/anatomy_test.csv:2: expected 6 fields"),
        ("Q1?,a,b,c,d,A\nQ2?,a,b,c,d,A\n\nQ3?,a,b,c,d,E\n", "test/anatomy_test.csv:4: answer must be one of A, B"),
    ],
)
def test_malformed_csv_row_names_file_and_line(rows: str, message: str, tmp_path: Path, capsys) -> None:
    data_dir = _bad_data(tmp_path, rows)
    code, _, err = run_cli(["eval", "--mmlu", "--data-dir", str(data_dir), "--model", "unused"], capsys)
    assert code == 2
    assert err.startswith(f"error: {data_dir}/{message}"), err


def test_missing_dev_file_is_named(tmp_path: Path) -> None:
    data_dir = _bad_data(tmp_path, "Q?,a,b,c,d,B\n")
    (data_dir / "dev" / "anatomy_dev.csv").unlink()
    with pytest.raises(UsageError, match=r"dev/anatomy_dev.csv: file not found; the few-shot examples come from it"):
        load_mmlu(data_dir)
    assert load_mmlu(data_dir, shots=0)["anatomy"].questions[0].answer == 1


# ------------------------------------------------------------------------------------------------ real MMLU


@pytest.mark.slow
def test_embedded_model_on_real_mmlu(embedded_model_dir: Path, shared_dir: Path) -> None:
    model, tokenizer, _ = load_eval_model(embedded_model_dir)
    data_dir = shared_dir / "data" / "mmlu"
    subjects = ["marketing", "high_school_geography"]
    data = load_mmlu(data_dir, subjects=subjects, limit=4)
    preds = score_mmlu(model, tokenizer, data, shots=5, batch_size=4)
    assert len(preds) == 8 and all(p.shots == 5 for p in preds)
    # A real model that understands the format puts most of its next-token mass on the four letters.
    mass = [sum(math.exp(v) for v in p.loglik) for p in preds]
    assert min(mass) > 0.5, mass
    result = summarize(preds, shots=5, split="test")
    assert result["overall"]["n"] == 8
    # The accuracies are the counts of predictions that match the gold letter.
    assert result["overall"]["acc"] == sum(p.pred == p.gold for p in preds) / 8
    for subject in subjects:
        mine = [p for p in preds if p.subject == subject]
        assert result["subjects"][subject] == {
            "acc": sum(p.pred == p.gold for p in mine) / 4,
            "n": 4,
            "category": category_of(subject),
        }
