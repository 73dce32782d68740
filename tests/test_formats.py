"""Data formats: each format's labels on SmolLM2's tokenizer and chat template, conversations truncated at turn
boundaries, bad rows as one line naming file + row (exit 2, through the CLI), and `velora data preview`'s numbers."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from velora_cli.cli import main
from velora_cli.config.recipe import DataSection
from velora_cli.data.formats import IGNORE_INDEX, detect_format, encode, fit_cutoff
from velora_cli.data.load import load_records, tokenize_counted

CHAT = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is 7 + 5?"},
    {"role": "assistant", "content": "7 + 5 = 12."},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": "12 x 3 = 36."},
]
SHAREGPT = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                               "value": m["content"]} for m in CHAT]}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir: Path):
    return AutoTokenizer.from_pretrained(embedded_model_dir)


def trained_runs(enc, tokenizer) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(enc.input_ids, enc.labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(r) for r in [*runs, current] if r]


def test_formats_are_detected_from_the_rows(tmp_path: Path) -> None:
    assert detect_format({"messages": []}, "r") == "messages"
    assert detect_format({"conversations": []}, "r") == "sharegpt"
    assert detect_format({"prompt": "a", "completion": "b"}, "r") == "prompt_completion"
    assert detect_format({"instruction": "a", "output": "b"}, "r") == "alpaca"
    assert detect_format({"text": "a"}, "r") == "text"
    (tmp_path / "s.jsonl").write_text(json.dumps(SHAREGPT) + "\n")
    loaded = load_records(str(tmp_path / "s.jsonl"))
    assert loaded.format == "sharegpt" and loaded.records == [{"messages": CHAT}]


def test_conversation_labels_are_the_assistant_turns_exactly(tokenizer) -> None:
    """Decoding the labelled tokens gives each assistant content + <|im_end|>, nothing else; the ids are the
    template's own tokenisation (less the newline after the last turn, which is not trained)."""
    enc = encode({"messages": CHAT}, tokenizer, template="alpaca", train_on_inputs=False, add_eos=True)
    assert trained_runs(enc, tokenizer) == ["7 + 5 = 12.<|im_end|>", "12 x 3 = 36.<|im_end|>"]
    whole = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert whole[: len(enc.input_ids)] == enc.input_ids and tokenizer.decode(whole[len(enc.input_ids) :]) == "\n"
    assert len(enc.turn_ends) == 2 and enc.turn_ends[-1] == len(enc.input_ids)
    sharegpt = load_records_from_rows([SHAREGPT])[0]
    assert encode(sharegpt, tokenizer, template="alpaca", train_on_inputs=False, add_eos=True) == enc
    everything = encode({"messages": CHAT}, tokenizer, template="alpaca", train_on_inputs=True, add_eos=True)
    assert everything.labels == everything.input_ids == enc.input_ids


def load_records_from_rows(rows: list, tmp: Path | None = None) -> list:
    from velora_cli.data.formats import check_row

    return [check_row(r, detect_format(r, "r"), "r") for r in rows]


def test_prompt_completion_and_alpaca_chat_labels(tokenizer) -> None:
    enc = encode({"prompt": "Capital of France:", "completion": " Paris"}, tokenizer, template="alpaca",
                 train_on_inputs=False, add_eos=True)  # fmt: skip
    assert trained_runs(enc, tokenizer) == [" Paris<|im_end|>"]
    assert tokenizer.decode(enc.input_ids) == "Capital of France: Paris<|im_end|>"
    alpaca = {"instruction": "Name a colour.", "input": "", "output": "Blue"}
    enc = encode(alpaca, tokenizer, template="chat", train_on_inputs=False, add_eos=True, system_prompt="Be brief.")
    assert trained_runs(enc, tokenizer) == ["Blue<|im_end|>"]
    assert "<|im_start|>system\nBe brief.<|im_end|>" in tokenizer.decode(enc.input_ids)


def test_long_conversations_are_cut_at_turn_boundaries(tokenizer) -> None:
    enc = encode({"messages": CHAT}, tokenizer, template="alpaca", train_on_inputs=False, add_eos=True)
    first, last = enc.turn_ends
    row, status = fit_cutoff(enc, last - 1, conversation=True)
    assert status == "truncated" and len(row["input_ids"]) == first
    assert tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab >= 0]) == (
        "7 + 5 = 12.<|im_end|>"
    )
    assert fit_cutoff(enc, first - 1, conversation=True) == (None, "dropped")
    assert fit_cutoff(enc, last, conversation=True)[1] == "kept"
    data = DataSection(path="x", cutoff_len=last - 1)
    counted = tokenize_counted([{"messages": CHAT}, {"messages": CHAT[:3]}, {"messages": CHAT[1:3]}], tokenizer, data)
    assert (counted.rows, counted.truncated, counted.dropped, len(counted.dataset)) == (3, 1, 0, 3)
    counted = tokenize_counted([{"messages": CHAT}], tokenizer, DataSection(path="x", cutoff_len=first - 1))
    assert (counted.dropped, counted.dataset) == (1, None)


# (file content, the one line after "error: ")
BAD = [
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistent", "content": "yo"}]}],
     "{data}: row 0: messages[1].role 'assistent' is not one of system/user/assistant"),
    ([{"messages": CHAT}, {"messages": [{"role": "user", "content": "hi"}]}],
     "{data}: row 1: messages has no assistant turn to learn from"),
    ([{"messages": CHAT}, {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}],
     "{data}: row 1: messages[0].content is missing"),
    ([SHAREGPT, {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}],
     "{data}: row 1: conversations[1].from 'bot' is not one of system/human/gpt"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], "{data}: row 1: field 'completion' is missing"),
    ([{"question": "a", "answer": "b"}], "{data}: row 0: cannot tell the data format from a row with keys question, "
     "answer; set data.format to one of alpaca, prompt_completion, messages, sharegpt, text"),
]  # fmt: skip


@pytest.mark.parametrize(("rows", "message"), BAD, ids=[m.split(": ", 2)[2][:30] for _, m in BAD])
def test_bad_rows_are_one_line_exit_2(rows, message: str, tmp_path: Path, tiny_llama_dir: Path, capsys) -> None:
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    recipe = {"model": {"name": str(tiny_llama_dir)}, "data": {"path": str(data)},
              "output": {"dir": str(tmp_path / "r")}}  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit) as info:
        main(["finetune", str(tmp_path / "r.yaml"), "--dry-run"])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"error: {message.format(data=data)}\n"
    assert not (tmp_path / "r").exists()


def test_data_preview_prints_rows_lengths_cutoff_and_padding(tokenizer, tmp_path: Path, capsys) -> None:
    rows = [{"prompt": f"Q{i}: what is {i} + {i}?", "completion": f" {2 * i}"} for i in range(3)]
    rows.append({"prompt": "long " * 80, "completion": " dropped"})  # the prompt alone passes cutoff_len
    rows.append({"prompt": "Say many words.", "completion": " word" * 80})  # cut at cutoff_len
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cutoff = 48
    recipe = {"data": {"path": "pc.jsonl", "cutoff_len": cutoff}, "train": {"micro_batch_size": 8, "batch_size": 8}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    main(["data", "preview", str(tmp_path / "r.yaml"), "-n", "2"])
    out = capsys.readouterr().out
    # Lengths counted here with the tokenizer alone: prompt (+ its special tokens), completion, EOS.
    full = [len(tokenizer(r["prompt"])["input_ids"]) + len(tokenizer(r["completion"], add_special_tokens=False)
            ["input_ids"]) + 1 for r in rows]  # fmt: skip
    ordered = sorted(full)
    assert f"tokens per row: min {ordered[0]}, median {statistics.median(ordered):g}, p90 {ordered[-1]}, " \
           f"max {ordered[-1]}" in out  # fmt: skip
    assert f"cutoff_len {cutoff}: 1 rows truncated, 1 dropped" in out
    kept = full[:3] + [cutoff]  # one micro-batch of 4 rows padded to 48; packed: 48 alone, the three short together
    assert sum(full[:3]) <= cutoff
    unpacked, packed = 1 - sum(kept) / (4 * cutoff), 1 - sum(kept) / (2 * cutoff)
    assert (f"padding per batch of 8: {100 * unpacked:.1f}% of tokens unpacked (4 sequences), "
            f"{100 * packed:.1f}% packed (2 sequences of <= {cutoff} tokens)") in out  # fmt: skip
    assert "row 0" in out and "Q0: what is 0 + 0? 0<|im_end|>" in out and "row 2" not in out
