"""The training data of a run, read once: rows loaded (format named or detected), split, tokenised with the cutoff
and packed, or plain text packed into blocks. The pre-flight checks what this returns and the session trains on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from velora_cli.common.errors import DataError
from velora_cli.data.load import DataCounts, load_records, split_validation, tokenize_counted


@dataclass
class TrainingData:
    train_set: Any  # datasets.Dataset of tokenised rows, packed blocks, or an iterable stream of blocks
    val_set: Any  # tokenised held-out rows (never packed), or None
    counts: DataCounts
    format: str  # as named by data.format or detected from the rows ("text": plain text in blocks)
    val_records: list[dict[str, Any]] = field(default_factory=list)  # held-out records (the held-out exact match)

    @property
    def sized(self) -> bool:
        return hasattr(self.train_set, "__len__")


def load_training_data(recipe, tokenizer) -> TrainingData:
    """Read, split and tokenise the recipe's training (and validation) data. DataError names the file and row."""
    d, seed = recipe.data, recipe.train.seed
    loaded = None if recipe.text_data else load_records(d.path, d.split, d.skip_bad_rows, fmt=d.format)
    if loaded is None or loaded.format == "text":  # plain text packed into blocks (pre-training, continued)
        from velora_cli.data.corpus import load_text_sets

        train_set, val_set, _ = load_text_sets(d, tokenizer, seed)
        examples = len(train_set) if hasattr(train_set, "__len__") else 0
        return TrainingData(train_set, val_set, DataCounts(examples=examples), "text")
    train_rows, val_rows = split_validation(loaded.records, d.val_set_size, seed)
    if d.val_path:
        val_rows = load_records(d.val_path, "validation", d.skip_bad_rows, field="data.val_path",
                                fmt=loaded.format).records  # fmt: skip
    tokenized = tokenize_counted(train_rows, tokenizer, d, pack=d.packing)
    if tokenized.dataset is None:
        raise DataError(
            f"data.path {d.path}: all {len(train_rows)} training rows are longer than data.cutoff_len="
            f"{d.cutoff_len} tokens before their first answer ends; nothing is left to train on (raise cutoff_len)"
        )
    counts = DataCounts(loaded.format, tokenized.rows - tokenized.dropped, loaded.skipped, tokenized.truncated,
                        tokenized.dropped)  # fmt: skip
    # Held-out rows stay unpacked: the same evaluation loss with packing on or off.
    val_set = tokenize_counted(val_rows, tokenizer, d).dataset if val_rows else None
    return TrainingData(tokenized.dataset, val_set, counts, loaded.format, list(val_rows))
