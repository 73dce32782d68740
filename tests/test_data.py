"""Instruction data: loading errors name the file and row; prompts are masked; splits are reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from velora_cli.common.errors import DataError
from velora_cli.data.formats import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, IGNORE_INDEX, record_pieces
from velora_cli.data.load import load_records, make_collator, split_validation, tokenize_record

ROWS = [
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue"},
]


def build_prompt(record: dict, template: str, tokenizer) -> tuple[str, str]:
    """(prompt, completion) text of a single-turn record."""
    (prompt, _), (completion, _) = record_pieces(record, tokenizer, template, None)[0]
    return prompt, completion


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir: Path):
    return AutoTokenizer.from_pretrained(embedded_model_dir)


def test_alpaca_prompt_is_the_stanford_template(tokenizer) -> None:
    prompt, completion = build_prompt(ROWS[0], "alpaca", tokenizer)
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 + 3\n\n### Response:\n"
    )
    assert completion == "5"
    assert build_prompt(ROWS[1], "alpaca", tokenizer)[0] == ALPACA_NO_INPUT.format(**ROWS[1])
    assert ALPACA_WITH_INPUT.count("{") == 2


def test_prompt_tokens_are_masked_and_eos_appended(tokenizer) -> None:
    row = tokenize_record(ROWS[0], tokenizer, template="alpaca", cutoff_len=512, train_on_inputs=False, add_eos=True)
    prompt_ids = tokenizer(build_prompt(ROWS[0], "alpaca", tokenizer)[0])["input_ids"]
    n = len(prompt_ids)
    assert row["input_ids"][:n] == prompt_ids
    assert row["labels"][:n] == [IGNORE_INDEX] * n
    assert row["labels"][n:] == row["input_ids"][n:]
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row["input_ids"][n:-1]) == "5"
    unmasked = tokenize_record(
        ROWS[0], tokenizer, template="alpaca", cutoff_len=512, train_on_inputs=True, add_eos=True
    )
    assert unmasked["labels"] == unmasked["input_ids"]
    cut = tokenize_record(ROWS[0], tokenizer, template="alpaca", cutoff_len=10, train_on_inputs=True, add_eos=True)
    assert len(cut["input_ids"]) == len(cut["labels"]) == len(cut["attention_mask"]) == 10


def test_chat_template_completion_ends_the_assistant_turn(tokenizer) -> None:
    prompt, completion = build_prompt(ROWS[0], "chat", tokenizer)
    assert prompt.endswith("<|im_start|>assistant\n") and "Add the numbers.\n\n2 + 3" in prompt
    assert completion.startswith("5<|im_end|>")
    row = tokenize_record(ROWS[0], tokenizer, template="chat", cutoff_len=512, train_on_inputs=False, add_eos=True)
    learned = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned).startswith("5<|im_end|>")
    assert learned.count(tokenizer.eos_token_id) == 1  # <|im_end|> is the eos: not appended twice


def test_collator_pads_labels_with_ignore_index(tokenizer) -> None:
    rows = [
        tokenize_record(r, tokenizer, template="alpaca", cutoff_len=512, train_on_inputs=False, add_eos=True)
        for r in ROWS
    ]
    batch = make_collator(tokenizer, on_gpu=False)(rows)
    short = min(range(2), key=lambda i: len(rows[i]["input_ids"]))
    pad = batch["input_ids"].shape[1] - len(rows[short]["input_ids"])
    assert pad > 0
    assert batch["attention_mask"][short, -pad:].sum() == 0
    assert (batch["labels"][short, -pad:] == IGNORE_INDEX).all()


def test_local_formats_load(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    import datasets

    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "a.parquet"))
    for name in ("a.json", "a.jsonl", "a.parquet"):
        assert load_records(str(tmp_path / name)).records == ROWS


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.json", '[{"instruction": "x", "output": "y"},\n {"instruction": ', "bad.json: invalid JSON at line 2"),
        ("bad.jsonl", '{"instruction": "x", "output": "y"}\n{oops}\n', "bad.jsonl: invalid JSON at line 2"),
        ("rows.json", json.dumps([ROWS[0], {"instruction": "x"}]), "rows.json: row 1: field 'output' is missing"),
        (
            "rows.jsonl",
            json.dumps(ROWS[0]) + "\n" + json.dumps({"instruction": "", "output": "y"}),
            "rows.jsonl: line 2: field 'instruction' is empty or not a string",
        ),
        ("obj.json", '{"a": 1}', "obj.json: expected a JSON list"),
    ],
)
def test_data_errors_name_file_and_row(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as info:
        load_records(str(tmp_path / name))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_skip_bad_rows(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.path: data file not found: .*missing.json"):
        load_records(str(tmp_path / "missing.json"))
    (tmp_path / "mixed.json").write_text(json.dumps([ROWS[0], {"instruction": "x"}, 7, ROWS[1]]))
    loaded = load_records(str(tmp_path / "mixed.json"), skip_bad_rows=True)
    assert loaded.records == ROWS and loaded.skipped == 2


def test_validation_split_is_reproducible() -> None:
    records = [{"instruction": f"q{i}", "input": "", "output": str(i)} for i in range(100)]
    train, val = split_validation(records, 10, seed=1)
    assert (
        len(train) == 90 and len(val) == 10 and not {r["instruction"] for r in train} & {r["instruction"] for r in val}
    )
    assert split_validation(records, 10, seed=1) == (train, val)
    assert len(split_validation(records, 0.25, seed=1)[1]) == 25
    with pytest.raises(DataError, match="leaves no training rows"):
        split_validation(records, 100, seed=1)
