"""Training data: loading (hub id, .json, .jsonl, .parquet) in any of the formats velora_cli/data/formats.py reads, the
train/validation split, tokenisation with the cutoff (counting the rows it truncates or drops), packing, and the
collator.

Local JSON/JSONL files are parsed here rather than through `datasets` so that a bad file is reported with its
line and row number; hub ids, dataset directories and parquet files go through `datasets`.

TRL was evaluated for conversations, completion-only loss and packing (trl 1.16: SFTTrainer, data_utils.pack_dataset,
DataCollatorForLanguageModeling(padding_free=True), assistant_only_loss) and is not used. SFTTrainer replaces the
stock Trainer this project drives (resume bookkeeping, VeloraCallback, the step guard) and re-tokenises the data its
own way, so our row-numbered errors, turn-boundary truncation counts and the token counts the plan and memory
estimate use would no longer describe what it trains on. Its assistant_only_loss needs `{% generation %}` markers,
which SmolLM2's template lacks and TRL's table of patched training templates does not cover. Its padding-free
collator flattens a whole micro-batch into one row, which on the sdpa/eager attention this project runs makes one
(batch x cutoff)^2 mask and that much attention work. What is used instead: transformers'
`DataCollatorWithFlattening` builds each packed row (input_ids concatenated, position_ids restarting at 0, the first
label of each example -100), the stock Trainer trains on it, and the few lines that assign examples to rows
(best-fit decreasing) are in velora_cli/data/packing.py.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velora_cli.common.bounds import check_readable_whole, check_regular
from velora_cli.common.errors import DataError
from velora_cli.data.formats import FORMATS, IGNORE_INDEX, check_row, detect_format, encode, fit_cutoff


@dataclass(frozen=True)
class LoadedRecords:
    records: list[dict[str, Any]]
    skipped: int  # malformed rows dropped because data.skip_bad_rows is on
    format: str  # the rows' format, as named or detected


def _read_local_rows(path: Path) -> list[tuple[str, Any]]:
    """(location, row) pairs from a .json list or .jsonl file; location names the line or row for errors."""
    check_readable_whole(path)
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
        raise DataError(f"{path}: expected a JSON list of records")
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


def load_records(
    path: str, split: str = "train", skip_bad_rows: bool = False, field: str = "data.path", fmt: str | None = None
) -> LoadedRecords:
    """Read and check records in format `fmt` (None: detected from the first row) from a local file, a dataset
    directory or a hub id (`field` names the recipe field the path came from, for error messages). Rows that are
    plain text come back unchecked, with format "text", for the text corpus to read."""
    local = Path(path).expanduser()
    check_regular(local, field)
    if local.suffix in (".json", ".jsonl"):
        if local.is_dir() or not local.exists():
            raise DataError(f"{field}: data file not found: {path}" + (" (a directory)" if local.is_dir() else ""))
        rows = _read_local_rows(local)
    else:
        if local.suffix == ".parquet" and not local.is_file():
            raise DataError(f"{field}: data file not found: {path}")
        from velora_cli.common.hub import is_hub_id, offline, require_hub

        if is_hub_id(path) and not offline():  # offline, `datasets` reads its cache (and fails fast without one)
            require_hub(f"{field} {path!r}")
        rows = _read_dataset_rows(path, split)
    if not rows:
        raise DataError(f"{field} {path}: no usable records")
    if fmt is None:  # the first row that says a format (with skip_bad_rows, bad ones before it are skipped)
        first = next((r for _, r in rows if isinstance(r, dict)), None) if skip_bad_rows else rows[0][1]
        fmt = detect_format(first, f"{path}: {rows[0][0]}")
    if fmt == "text":
        return LoadedRecords([], 0, fmt)
    assert fmt in FORMATS
    records, skipped = [], 0
    for where, row in rows:
        try:
            records.append(check_row(row, fmt, f"{path}: {where}"))
        except DataError:
            if not skip_bad_rows:
                raise
            skipped += 1
    if not records:
        raise DataError(f"{field} {path}: no usable records" + (f" ({skipped} bad rows skipped)" if skipped else ""))
    return LoadedRecords(records, skipped, fmt)


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


def tokenize_record(record: dict[str, Any], tokenizer, *, template: str, cutoff_len: int, train_on_inputs: bool,
                    add_eos: bool, system_prompt: str | None = None) -> dict[str, list[int]] | None:  # fmt: skip
    """input_ids / attention_mask / labels of one record within cutoff_len (None: dropped, see formats.fit_cutoff)."""
    enc = encode(record, tokenizer, template=template, train_on_inputs=train_on_inputs, add_eos=add_eos,
                 system_prompt=system_prompt)  # fmt: skip
    return fit_cutoff(enc, cutoff_len, conversation="messages" in record)[0]


@dataclass
class TokenizedSet:
    """A `datasets.Dataset` of tokenised rows (with a `length` column for length-grouped batching; None when no row
    is left), and how many records the cutoff truncated and dropped."""

    dataset: Any
    rows: int  # records read
    truncated: int
    dropped: int


def tokenize_counted(records: list[dict[str, Any]], tokenizer, data_section, pack: bool = False) -> TokenizedSet:
    """Tokenise `records` per the recipe's data section; with `pack`, rows are packed into cutoff_len sequences."""
    import datasets

    d = data_section
    rows, counts = [], {"kept": 0, "truncated": 0, "dropped": 0}
    for record in records:
        enc = encode(record, tokenizer, template=d.template, train_on_inputs=d.train_on_inputs, add_eos=d.add_eos,
                     system_prompt=d.system_prompt)  # fmt: skip
        row, status = fit_cutoff(enc, d.cutoff_len, conversation="messages" in record)
        counts[status] += 1
        if row is not None:
            rows.append({**row, "length": len(row["input_ids"])})
    if pack and rows:
        from velora_cli.data.packing import pack_rows

        rows = pack_rows(rows, d.cutoff_len)
    # from_list([]) has no columns at all, which fails far away ("Column 'length' doesn't exist")
    dataset = datasets.Dataset.from_list(rows) if rows else None
    return TokenizedSet(dataset, len(records), counts["truncated"], counts["dropped"])


@dataclass
class DataCounts:
    """What loading and the cutoff did to the training rows, for the plan and the dry run."""

    format: str = "text"
    examples: int = 0  # training examples kept (packed: several per sequence)
    skipped: int = 0  # bad rows skipped (data.skip_bad_rows)
    truncated: int = 0
    dropped: int = 0

    def describe(self, data_section, sequences: int) -> str:
        d = data_section
        cut = [f"{n} {what}" for n, what in ((self.dropped, "dropped"), (self.truncated, "truncated")) if n]
        text = f" ({self.skipped} bad rows skipped)" if self.skipped else ""
        text += f" ({', '.join(cut)} by cutoff_len={d.cutoff_len})" if cut else ""
        text += f", format={self.format}" + (f", template={d.template}" if self.format == "alpaca" else "")
        return text + (f", packed into {sequences} sequences" if d.packing and self.format != "text" else "")


def make_collator(tokenizer, on_gpu: bool):
    """Padded rows: input_ids / attention_mask right-padded, labels padded with IGNORE_INDEX (multiples of 8 on GPU).
    Packed rows (they carry position_ids): see velora_cli/data/packing.py."""
    from transformers import DataCollatorForSeq2Seq

    from velora_cli.data.packing import PackedCollator

    padded = DataCollatorForSeq2Seq(
        tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8 if on_gpu else None
    )
    return PackedCollator(padded, tokenizer.pad_token_id)
