"""Preference pairs for `method: dpo`: reading, checking and tokenising prompt/chosen/rejected records.

Rows take TRL's preference formats: {prompt, chosen, rejected} as plain strings (standard: the prompt, then the
completion, no template, EOS appended), or as message lists (conversational: the tokenizer's chat template), and
{chosen, rejected} conversations sharing their opening turns (implicit prompt: TRL's extract_prompt splits it off).
They come from local .json/.jsonl files, dataset directories, parquet files or hub ids (data/load.py's readers).

Rows are tokenised here with TRL's own helpers, exactly as its DPOTrainer would (the trainer takes the result as is,
finetune/preference.py), so what the pre-flight checks and `velora data preview` shows is what trains. A pair is
refused with one line naming the file, row and problem when a side is empty, both sides are the same, or the prompt
leaves no room for a completion within data.cutoff_len (or exceeds preference.max_prompt_length); data.skip_bad_rows
skips such rows instead. The recorded data.format is `messages` for conversational pairs and `prompt_completion` for
plain-text ones, so generate/chat/export prompt the result as it trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velora_cli.common.errors import DataError
from velora_cli.data.load import DataCounts, _read_dataset_rows, _read_local_rows, split_validation
from velora_cli.data.training import TrainingData

CONVERSATIONAL, STANDARD = "messages", "prompt_completion"  # the data.format recorded for each kind of pair


@dataclass(frozen=True)
class Pair:
    """One tokenised pair: the prompt ids, then each completion's ids (TRL's prompt_ids/chosen_ids/rejected_ids)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool  # a completion was cut (max_completion_length or data.cutoff_len)

    @property
    def length(self) -> int:
        """Tokens of both sequences, the number a micro-batch of pairs holds (chosen and rejected rows)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def read_pairs(path: str, split: str = "train", field: str = "data.path") -> list[tuple[str, Any]]:
    """(where, row) for every row of a local file, dataset directory, parquet file or hub id."""
    local = Path(path).expanduser()
    if local.suffix in (".json", ".jsonl"):
        if not local.is_file():
            raise DataError(f"{field}: data file not found: {path}")
        rows = _read_local_rows(local)
    else:
        from velora_cli.common.hub import is_hub_id, offline, require_hub

        if is_hub_id(path) and not offline():
            require_hub(f"{field} {path!r}")
        rows = _read_dataset_rows(path, split)
    if not rows:
        raise DataError(f"{field} {path}: no usable records")
    return rows


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _blank(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not value or all(not str(m.get("content") or "").strip() for m in value)


def check_pair(row: Any, where: str) -> dict[str, Any]:
    """A row as {prompt, chosen, rejected}, all strings or all message lists; DataError (one line) otherwise."""
    from trl.data_utils import extract_prompt

    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: a preference pair needs `chosen` and `rejected` (and `prompt`), got {keys}")
    if "prompt" not in row:
        if not (_is_messages(row["chosen"]) and _is_messages(row["rejected"])):
            raise DataError(f"{where}: no `prompt`; only conversations (message lists) carry it in their first turns")
        row = extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})
    pair = {key: row[key] for key in ("prompt", "chosen", "rejected")}
    kinds = {key: "messages" if _is_messages(v) else "text" if isinstance(v, str) else None for key, v in pair.items()}
    if None in kinds.values() or len(set(kinds.values())) > 1:
        raise DataError(f"{where}: prompt, chosen and rejected must all be strings or all message lists, got "
                        + ", ".join(f"{k} {type(pair[k]).__name__}" for k in pair))  # fmt: skip
    for side in ("chosen", "rejected"):
        if _blank(pair[side]):
            raise DataError(f"{where}: `{side}` is empty; a pair needs two completions to compare")
    if pair["chosen"] == pair["rejected"]:
        raise DataError(f"{where}: `chosen` and `rejected` are identical; the pair teaches no preference")
    if _blank(pair["prompt"]):
        raise DataError(f"{where}: `prompt` is empty")
    return pair


def tokenize_pair(pair: dict[str, Any], tokenizer, cutoff_len: int, preference, where: str) -> Pair:
    """TRL's DPO tokenisation of one pair (dpo_trainer._prepare_dataset), then the length checks and cuts."""
    from trl.data_utils import _tokenize, common_prefix_length

    prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
    if isinstance(prompt, list):
        prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
        full_chosen = _tokenize(tokenizer, prompt + chosen)["input_ids"]
        full_rejected = _tokenize(tokenizer, prompt + rejected)["input_ids"]
    else:
        eos = tokenizer.eos_token
        prompt_ids = _tokenize(tokenizer, prompt)["input_ids"]
        full_chosen = _tokenize(tokenizer, prompt + chosen + ("" if chosen.endswith(eos) else eos))["input_ids"]
        full_rejected = _tokenize(tokenizer, prompt + rejected + ("" if rejected.endswith(eos) else eos))["input_ids"]
    start = min(common_prefix_length(prompt_ids, full_chosen), common_prefix_length(prompt_ids, full_rejected))
    prompt_ids, chosen_ids, rejected_ids = prompt_ids[:start], full_chosen[start:], full_rejected[start:]
    limit = preference.max_prompt_length
    if limit is not None and len(prompt_ids) > limit:
        raise DataError(f"{where}: the prompt is {len(prompt_ids)} tokens, over preference.max_prompt_length={limit}")
    if len(prompt_ids) >= cutoff_len:
        raise DataError(f"{where}: the prompt is {len(prompt_ids)} tokens and leaves no room for a completion within "
                        f"data.cutoff_len={cutoff_len}")  # fmt: skip
    if chosen_ids == rejected_ids:
        raise DataError(f"{where}: `chosen` and `rejected` tokenise to the same ids; the pair teaches no preference")
    room = cutoff_len - len(prompt_ids)
    if preference.max_completion_length is not None:
        room = min(room, preference.max_completion_length)
    truncated = max(len(chosen_ids), len(rejected_ids)) > room
    return Pair(prompt_ids, chosen_ids[:room], rejected_ids[:room], truncated)


@dataclass(frozen=True)
class LoadedPairs:
    pairs: list[dict[str, Any]]
    skipped: int
    format: str  # CONVERSATIONAL or STANDARD


def load_pairs(path: str, split: str, skip_bad_rows: bool, field: str = "data.path") -> LoadedPairs:
    """Checked pairs of a file or dataset, all of one kind (strings or conversations)."""
    pairs, skipped, kinds = [], 0, set()
    for where, row in read_pairs(path, split, field):
        try:
            pair = check_pair(row, f"{path}: {where}")
        except DataError:
            if not skip_bad_rows:
                raise
            skipped += 1
            continue
        kind = CONVERSATIONAL if isinstance(pair["prompt"], list) else STANDARD
        if kinds and kind not in kinds:
            raise DataError(f"{path}: {where}: mixes plain-text and conversational pairs; use one kind per file")
        kinds.add(kind)
        pairs.append(pair | {"where": f"{path}: {where}"})
    if not pairs:
        raise DataError(f"{field} {path}: no usable pairs" + (f" ({skipped} bad rows skipped)" if skipped else ""))
    return LoadedPairs(pairs, skipped, kinds.pop())


def tokenize_pairs(pairs: list[dict[str, Any]], tokenizer, recipe) -> tuple[Any, DataCounts, int]:
    """A datasets.Dataset of TRL's columns (prompt_ids, chosen_ids, rejected_ids, length), its counts, and the
    rows skipped for length (with data.skip_bad_rows; otherwise the first such row is a DataError)."""
    import datasets

    rows, truncated, skipped = [], 0, 0
    for pair in pairs:
        try:
            tokenized = tokenize_pair(pair, tokenizer, recipe.data.cutoff_len, recipe.preference, pair["where"])
        except DataError:
            if not recipe.data.skip_bad_rows:
                raise
            skipped += 1
            continue
        truncated += tokenized.truncated
        rows.append({"prompt_ids": tokenized.prompt_ids, "chosen_ids": tokenized.chosen_ids,
                     "rejected_ids": tokenized.rejected_ids, "length": tokenized.length})  # fmt: skip
    dataset = datasets.Dataset.from_list(rows) if rows else None
    return dataset, DataCounts(examples=len(rows), truncated=truncated), skipped


def load_preference_data(recipe, tokenizer) -> TrainingData:
    """The training (and held-out) pairs of a DPO recipe, tokenised; DataError names the file and row."""
    d = recipe.data
    if d.format not in (None, CONVERSATIONAL, STANDARD):
        raise DataError(f"data.format={d.format!r}: method dpo reads preference pairs (prompt/chosen/rejected); "
                        f"leave data.format unset or use {CONVERSATIONAL} / {STANDARD}")  # fmt: skip
    loaded = load_pairs(d.path, d.split, d.skip_bad_rows)
    if d.format is not None and d.format != loaded.format:
        raise DataError(f"data.path {d.path}: holds {loaded.format} pairs, but data.format={d.format!r}")
    train_pairs, val_pairs = split_validation(loaded.pairs, d.val_set_size, recipe.train.seed)
    if d.val_path:
        val_pairs = load_pairs(d.val_path, "validation", d.skip_bad_rows, field="data.val_path").pairs
    train_set, counts, too_long = tokenize_pairs(train_pairs, tokenizer, recipe)
    if train_set is None:
        raise DataError(f"data.path {d.path}: no pair fits data.cutoff_len={d.cutoff_len}; nothing to train on")
    counts = DataCounts(loaded.format, counts.examples, loaded.skipped + too_long, counts.truncated, 0)
    val_set = tokenize_pairs(val_pairs, tokenizer, recipe)[0] if val_pairs else None
    return TrainingData(train_set, val_set, counts, loaded.format, list(val_pairs))
