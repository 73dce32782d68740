"""Instruction data: loading (hub id, .json, .jsonl, .parquet), prompt templates, tokenisation with prompt
masking, the train/validation split and the padding collator.

Local JSON/JSONL files are parsed here rather than through `datasets` so that a bad file is reported with its
line and row number; hub ids, dataset directories and parquet files go through `datasets`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velora_cli.errors import DataError

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


@dataclass(frozen=True)
class LoadedRecords:
    records: list[dict[str, str]]
    skipped: int  # malformed rows dropped because data.skip_bad_rows is on


def _read_local_rows(path: Path) -> list[tuple[str, Any]]:
    """(location, row) pairs from a .json list or .jsonl file; location names the line or row for errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (invalid byte at line {line}); save the file as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: invalid JSON at line {lineno}: {exc.msg}") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{instruction, input, output}} records")
    return [(f"row {i}", row) for i, row in enumerate(data)]


def _read_dataset_rows(path: str, split: str) -> list[tuple[str, Any]]:
    import datasets

    try:
        if path.endswith(".parquet"):
            dataset = datasets.Dataset.from_parquet(path)
        else:
            dataset = datasets.load_dataset(path, split=split)
    except FileNotFoundError as exc:
        raise DataError(f"data.path {path!r}: not found ({exc})") from None
    except Exception as exc:  # datasets raises many types for unreachable hubs and bad files
        raise DataError(f"data.path {path!r}: cannot load dataset: {str(exc).splitlines()[0]}") from None
    return [(f"row {i}", row) for i, row in enumerate(dataset)]


def _check_row(source: str, where: str, row: Any) -> dict[str, str]:
    if not isinstance(row, dict):
        raise DataError(f"{source}: {where}: expected an object with instruction/input/output")
    for key in ("instruction", "output"):
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            problem = "missing" if key not in row else "empty or not a string"
            raise DataError(f"{source}: {where}: field {key!r} is {problem}")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{source}: {where}: field 'input' is not a string")
    return {"instruction": row["instruction"], "input": extra, "output": row["output"]}


def load_records(
    path: str, split: str = "train", skip_bad_rows: bool = False, field: str = "data.path"
) -> LoadedRecords:
    """Read Alpaca-format records from a local file, a dataset directory or a hub id (`field` names the recipe
    field the path came from, for error messages)."""
    local = Path(path).expanduser()
    if local.suffix in (".json", ".jsonl"):
        if local.is_dir() or not local.exists():
            raise DataError(f"{field}: data file not found: {path}" + (" (a directory)" if local.is_dir() else ""))
        rows = _read_local_rows(local)
    else:
        if local.suffix == ".parquet" and not local.is_file():
            raise DataError(f"{field}: data file not found: {path}")
        from velora_cli.hub import is_hub_id, offline, require_hub

        if is_hub_id(path) and not offline():  # offline, `datasets` reads its cache (and fails fast without one)
            require_hub(f"{field} {path!r}")
        rows = _read_dataset_rows(path, split)
    records, skipped = [], 0
    for where, row in rows:
        try:
            records.append(_check_row(path, where, row))
        except DataError:
            if not skip_bad_rows:
                raise
            skipped += 1
    if not records:
        raise DataError(f"{field} {path}: no usable records" + (f" ({skipped} bad rows skipped)" if skipped else ""))
    return LoadedRecords(records, skipped)


def split_validation(records: list[dict[str, str]], val_set_size: float, seed: int) -> tuple[list, list]:
    """Hold out `val_set_size` rows (a count if >= 1, else a fraction), chosen with `seed`."""
    n_val = int(val_set_size) if val_set_size >= 1 else int(round(len(records) * val_set_size))
    if n_val <= 0:
        return records, []
    if n_val >= len(records):
        raise DataError(f"data.val_set_size={val_set_size:g} leaves no training rows (dataset has {len(records)})")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in order[:n_val]]


def user_message(record: dict[str, str]) -> str:
    return f"{record['instruction']}\n\n{record['input']}" if record.get("input") else record["instruction"]


def build_prompt(record: dict[str, str], template: str, tokenizer, system_prompt: str | None = None) -> tuple[str, str]:
    """(prompt, completion) text for one record; the completion is what the model learns to produce."""
    if template == "alpaca":
        fmt = ALPACA_WITH_INPUT if record.get("input") else ALPACA_NO_INPUT
        return fmt.format(**record), record["output"]
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("data.template='chat' but the tokenizer has no chat template; use template: alpaca")
    messages = [{"role": "user", "content": user_message(record)}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": record["output"]}], tokenize=False
    )
    if not full.startswith(prompt):  # templates that rewrite earlier turns: fall back to the plain answer
        return prompt, record["output"]
    return prompt, full[len(prompt) :]


def tokenize_record(
    record: dict[str, str],
    tokenizer,
    *,
    template: str,
    cutoff_len: int,
    train_on_inputs: bool,
    add_eos: bool,
    system_prompt: str | None = None,
) -> dict[str, list[int]]:
    """input_ids / attention_mask / labels, with the prompt's labels masked unless train_on_inputs."""
    prompt, completion = build_prompt(record, template, tokenizer, system_prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    # Chat templates already close the turn with the eos token (SmolLM2: <|im_end|>); don't add a second one.
    if add_eos and eos is not None and eos not in completion_ids:
        completion_ids = [*completion_ids, eos]
    input_ids = (prompt_ids + completion_ids)[:cutoff_len]
    labels = list(input_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    labels = labels[:cutoff_len]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_records(records: list[dict[str, str]], tokenizer, data_section) -> Any:
    """A `datasets.Dataset` of tokenised records with a `length` column for length-grouped batching.

    Rows whose labels are all masked (the prompt alone fills cutoff_len) teach nothing and are dropped.
    """
    return tokenize_counted(records, tokenizer, data_section)[0]


def tokenize_counted(records: list[dict[str, str]], tokenizer, data_section) -> tuple[Any, int]:
    """`tokenize_records`, and how many rows it dropped (their prompt alone fills cutoff_len)."""
    import datasets

    rows = []
    for record in records:
        row = tokenize_record(
            record,
            tokenizer,
            template=data_section.template,
            cutoff_len=data_section.cutoff_len,
            train_on_inputs=data_section.train_on_inputs,
            add_eos=data_section.add_eos,
            system_prompt=data_section.system_prompt,
        )
        if any(label != IGNORE_INDEX for label in row["labels"]):
            rows.append({**row, "length": len(row["input_ids"])})
    if not rows:  # from_list([]) has no columns at all, which fails far away ("Column 'length' doesn't exist")
        return None, len(records)
    return datasets.Dataset.from_list(rows), len(records) - len(rows)


def make_collator(tokenizer, on_gpu: bool):
    """Right-pads input_ids / attention_mask and pads labels with IGNORE_INDEX (multiples of 8 on GPU)."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(
        tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8 if on_gpu else None
    )
