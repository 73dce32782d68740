"""Plain-text corpora for pre-training and continued pre-training (`data.format: text`).

Sources: `.txt` / `.md` / `.text` files, globs of them or a directory of them (each blank-line-separated paragraph
is one document; a directory's other files and hidden ones are not read); `.jsonl` / `.json` / `.parquet` files and
hub datasets whose rows carry `data.text_field`; a local directory of data files (optionally laid out like a hub
dataset: a README.md whose `configs:` name subsets and splits) is read by `datasets` exactly as the hub id would be.
A directory or glob holding both text files and data files is refused, naming the odd one out (documents, or a
dataset that would silently skip the text?), unless its README.md's `configs:` say which files are the data.
With `data.streaming: true` (e.g. `allenai/c4`, subset `en`) a dataset is read on the fly and never held in
memory; the first block is read before training, so a bad source fails at once. A stream shorter than the run
(train.max_steps) is read again from its start; a streamed run resumed from checkpoint-N re-reads (and re-tokenises)
the blocks of its first N steps to skip them, and ends bit-identical to an uninterrupted one.

Documents are tokenised without special tokens, each followed by EOS, concatenated and cut into blocks of exactly
`data.cutoff_len` tokens (the remainder is dropped): no padding, every token is a training target. The held-out
split is made of whole documents (`data.val_set_size`, as for instruction data, or `data.val_path`), so no
document is in both; a stream has no length, so it holds out a count of documents: its first `val_set_size`, or
that many (default 1000) of `data.val_split` (C4's `validation`) or of `data.val_path`.
"""

from __future__ import annotations

import glob
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from velora_cli.common.bounds import check_readable_whole, check_regular
from velora_cli.common.errors import DataError
from velora_cli.config.recipe import TEXT_SUFFIXES
from velora_cli.data.load import split_validation

DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".gz", ".csv", ".arrow")  # a directory holding any is a dataset
STREAM_VAL_DOCUMENTS = 1000  # held-out documents of data.val_split / data.val_path when val_set_size is 0


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def _text_of(row: Any, field: str, where: str) -> str:
    if isinstance(row, str):
        return row
    value = row.get(field) if isinstance(row, dict) else None
    if not isinstance(value, str):
        raise DataError(f"{where}: no string field {field!r} (set data.text_field)")
    return value


def _read_text(file: Path) -> str:
    check_readable_whole(file)
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc.strerror})") from None


def _dir_files(local: Path) -> list[Path]:
    """A directory's files, hidden ones (.git, .cache, .gitattributes) left out as `datasets` leaves them."""
    return sorted(p for p in local.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(local).parts))  # fmt: skip


def _card_names_configs(local: Path) -> bool:
    """Whether README.md's front matter has `configs:` (the hub layout: the card says which files are data)."""
    card = local / "README.md"
    if not card.is_file():
        return False
    head = _read_text(card).split("\n---", 1)[0]
    return head.startswith("---") and any(line.startswith("configs:") for line in head.splitlines())


def _refuse_mixed(path: str, files: list[Path], card: Path | None = None) -> None:
    """Text files beside data files make a source ambiguous (read as documents, or as a dataset that skips the
    text?): refused, naming the odd one out. A dataset's card (README.md) is not text to train on."""
    text = [f for f in files if f.suffix in TEXT_SUFFIXES and f != card]
    data = [f for f in files if f.suffix in DATA_SUFFIXES]
    if not (text and data):
        return
    stray, kind, others = (data[0], "a data file", f"{len(text)} text") if len(data) <= len(text) else (
        text[0], "a text file", f"{len(data)} data")  # fmt: skip
    raise DataError(
        f"data.path {path}: {stray} is {kind} among {others} files; a source is read either as text documents "
        f"({', '.join(TEXT_SUFFIXES)}) or as a dataset, not both: move it out or select the files with a glob"
    )


def _is_dataset_dir(local: Path) -> bool:
    """A directory of data files (read by `datasets`, as the hub id would be), not a folder of text documents."""
    if not local.is_dir():
        return False
    files = _dir_files(local)
    if not any(f.suffix in DATA_SUFFIXES for f in files):
        return False
    if not _card_names_configs(local):
        _refuse_mixed(str(local), files, card=local / "README.md")
    return True


def _local_files(path: str) -> list[Path]:
    local = Path(path).expanduser()
    if local.is_dir():
        return [p for p in _dir_files(local) if p.suffix in TEXT_SUFFIXES]
    if any(ch in path for ch in "*?["):
        return sorted(Path(p) for p in glob.glob(str(local), recursive=True) if Path(p).is_file())
    return [local] if local.is_file() else []


def iter_documents(
    path: str, *, split: str = "train", text_field: str = "text", subset: str | None = None, streaming: bool = False
) -> Iterator[str]:
    """The documents of a corpus, in order (lazily for streaming datasets)."""
    if not any(ch in path for ch in "*?["):
        check_regular(path, "data.path")
    if _is_dataset_dir(Path(path).expanduser()):  # the hub's code path, from a local copy
        yield from _dataset_documents(path, split, text_field, subset, streaming)
        return
    files = _local_files(path)
    local = Path(path).expanduser()
    if not files and local.is_dir():
        raise DataError(f"{path}: a directory without text ({', '.join(TEXT_SUFFIXES)}) or data files")
    if not files and (local.suffix in (*TEXT_SUFFIXES, ".jsonl", ".json", ".parquet") or path.startswith((".", "/"))):
        raise DataError(f"data file not found: {path}")
    _refuse_mixed(path, files)
    if files and all(f.suffix in TEXT_SUFFIXES for f in files):
        for file in files:
            yield from _paragraphs(_read_text(file))
        return
    if files and len(files) == 1 and files[0].suffix in (".jsonl", ".json"):
        yield from _json_documents(files[0], text_field)
        return
    yield from _dataset_documents([str(f) for f in files] or path, split, text_field, subset, streaming)


def _json_documents(file: Path, field: str) -> Iterator[str]:
    if file.suffix == ".jsonl":  # line by line: a large file is never held whole
        for lineno, line in enumerate(_lines(file), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{file}: invalid JSON at line {lineno}: {exc.msg}") from None
                yield _text_of(row, field, f"{file}: line {lineno}")
        return
    try:
        rows = json.loads(_read_text(file))
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    for i, row in enumerate(rows if isinstance(rows, list) else []):
        yield _text_of(row, field, f"{file}: row {i}")


def _lines(file: Path) -> Iterator[str]:
    check_regular(file)
    with file.open(encoding="utf-8") as handle:
        try:
            yield from handle
        except UnicodeDecodeError as exc:
            raise DataError(f"{file}: not UTF-8 text ({exc.reason})") from None


def _dataset_documents(
    source: str | list[str], split: str, field: str, subset: str | None, streaming: bool
) -> Iterator[str]:
    from velora_cli.common.logs import import_datasets

    datasets = import_datasets()
    shown = ", ".join(source) if isinstance(source, list) else source
    try:
        if isinstance(source, list):  # local parquet (or mixed) files
            kind = "parquet" if all(s.endswith(".parquet") for s in source) else "json"
            dataset = datasets.load_dataset(kind, data_files=source, split="train", streaming=streaming)
        else:
            dataset = datasets.load_dataset(source, subset, split=split, streaming=streaming)
    except FileNotFoundError as exc:
        raise DataError(f"data.path {shown}: not found ({exc})") from None
    except Exception as exc:  # datasets raises many types for unreachable hubs and bad files
        raise DataError(f"data.path {shown}: cannot load dataset: {str(exc).splitlines()[0]}") from None
    rows, i = iter(dataset), 0
    while True:
        try:  # a streaming dataset parses its files only now, row by row
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # as above: pyarrow, json and fsspec errors of a corrupt or vanished file
            raise DataError(f"data.path {shown}: unreadable after {i} rows: {str(exc).splitlines()[0]}") from None
        yield _text_of(row, field, f"{shown}: row {i}")
        i += 1


# ------------------------------------------------------------------------------------------------- packing


def iter_blocks(documents: Iterable[str], tokenizer, block: int) -> Iterator[list[int]]:
    """Token blocks of exactly `block` ids: documents tokenised, each followed by EOS, concatenated, cut."""
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    for doc in documents:
        buffer.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            buffer.append(eos)
        while len(buffer) >= block:
            yield buffer[:block]
            buffer = buffer[block:]


def block_row(ids: list[int]) -> dict[str, Any]:
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids), "length": len(ids)}


def pack(documents: Iterable[str], tokenizer, block: int, limit: int | None = None) -> Any:
    """A `datasets.Dataset` of packed blocks (labels = input_ids; the model shifts them)."""
    from velora_cli.common.logs import import_datasets

    datasets = import_datasets()
    rows = [block_row(ids) for ids in itertools.islice(iter_blocks(documents, tokenizer, block), limit)]
    return datasets.Dataset.from_list(rows)


class StreamingBlocks:
    """Packed blocks read on the fly from a streaming source (skipping its first `skip` docs), without end: at
    the stream's end it is read again from its start, the blocks running on across the seam. The Trainer gives
    such a dataset one endless epoch, and resuming at step N skips the first N batches of that epoch: one unbroken
    stream is what makes that land where the interrupted run was (passes ending in epochs would not)."""

    def __init__(self, data_section, tokenizer, skip: int = 0):
        self.data, self.tokenizer, self.skip = data_section, tokenizer, skip

    def _one_pass(self) -> Iterator[str]:
        d = self.data
        docs = iter_documents(d.path, split=d.split, text_field=d.text_field, subset=d.subset, streaming=True)
        return itertools.islice(docs, self.skip, None)

    def _endless(self) -> Iterator[str]:
        while True:
            empty = True
            for doc in self._one_pass():
                empty = False
                yield doc
            if empty:  # nothing to repeat
                return

    def first_block(self) -> list[int] | None:
        """The first block of one pass (None: the stream holds less than a block)."""
        return next(iter_blocks(self._one_pass(), self.tokenizer, self.data.cutoff_len), None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for ids in iter_blocks(self._endless(), self.tokenizer, self.data.cutoff_len):
            yield block_row(ids)


def _as_torch_iterable(blocks: StreamingBlocks):
    import torch.utils.data

    class _Blocks(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(blocks)

    return _Blocks()


def load_text_sets(data_section, tokenizer, seed: int) -> tuple[Any, Any, int]:
    """(train set, held-out set or None, number of documents read) of packed blocks, per the recipe's data section."""
    d = data_section
    if d.streaming:
        n_val = int(d.val_set_size)  # a count: the recipe refuses a fraction of a stream
        if d.val_split or d.val_path:
            source, split = (d.val_path, "validation") if d.val_path else (d.path, d.val_split)
            docs = iter_documents(source, split=split, text_field=d.text_field, subset=d.subset, streaming=True)
            val = pack(itertools.islice(docs, n_val or STREAM_VAL_DOCUMENTS), tokenizer, d.cutoff_len)
            train = StreamingBlocks(d, tokenizer)
        else:
            docs = iter_documents(d.path, split=d.split, text_field=d.text_field, subset=d.subset, streaming=True)
            val = pack(itertools.islice(docs, n_val), tokenizer, d.cutoff_len) if n_val else None
            train = StreamingBlocks(d, tokenizer, skip=n_val)
        if train.first_block() is None:
            raise DataError(f"{d.path}: fewer than data.cutoff_len={d.cutoff_len} tokens of training text")
        _check_heldout(val, d.cutoff_len)
        return _as_torch_iterable(train), val, 0
    documents = list(iter_documents(d.path, split=d.split, text_field=d.text_field, subset=d.subset))
    if not documents:
        raise DataError(f"{d.path}: no text")
    train_docs, val_docs = split_validation(documents, d.val_set_size, seed)
    if d.val_path:
        val_docs = list(iter_documents(d.val_path, split="validation", text_field=d.text_field, subset=d.subset))
    train = pack(train_docs, tokenizer, d.cutoff_len)
    if len(train) == 0:
        raise DataError(f"{d.path}: fewer than data.cutoff_len={d.cutoff_len} tokens of training text")
    val = pack(val_docs, tokenizer, d.cutoff_len) if val_docs else None
    _check_heldout(val, d.cutoff_len)
    return train, val, len(documents)


def _check_heldout(val: Any, cutoff_len: int) -> None:
    if val is not None and len(val) == 0:
        raise DataError(f"held-out text shorter than one block of data.cutoff_len={cutoff_len} tokens")
