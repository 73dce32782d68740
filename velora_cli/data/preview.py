"""`velora data preview RECIPE`: the training rows as the model will see them, read with the tokenizer only.

Prints the first rows decoded, token by token, with the trained tokens highlighted and the masked ones dim; the
length distribution of the training rows (tokens before the cutoff: min, median, p90 (nearest rank), max); how many
rows cutoff_len truncates or drops; and the padding a batch of train.micro_batch_size carries without and with
packing. Batches are formed as the Trainer forms them: transformers' LengthGroupedSampler with train.group_by_length
(the default), a seeded random order otherwise, so the padding figures are those of a typical epoch, not of one
particular run's order.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from rich.console import Console
from rich.text import Text

from velora_cli.common.errors import DataError, UsageError
from velora_cli.config.load import load_recipe
from velora_cli.config.preference import PREFERENCE_METHODS
from velora_cli.data.formats import IGNORE_INDEX, encode, fit_cutoff
from velora_cli.data.load import load_records, split_validation
from velora_cli.data.packing import assign, padding_waste

TRAINED_STYLE, MASKED_STYLE, REJECTED_STYLE = "bold green", "dim", "bold red"


def batches(lengths: list[int], micro_batch: int, group_by_length: bool, seed: int) -> list[list[int]]:
    """Index lists of the micro-batches of one epoch, in the Trainer's sampling order."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    generator = torch.Generator().manual_seed(seed)
    if group_by_length:
        order = list(LengthGroupedSampler(micro_batch, lengths=lengths, generator=generator))
    else:
        order = torch.randperm(len(lengths), generator=generator).tolist()
    return [order[i : i + micro_batch] for i in range(0, len(order), micro_batch)]


def highlighted(input_ids: list[int], labels: list[int], tokenizer) -> Text:
    """The row decoded in runs of trained / masked tokens, each run in its style."""
    text = Text()
    start = 0
    for end in range(1, len(input_ids) + 1):
        if end == len(input_ids) or (labels[end] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            style = MASKED_STYLE if labels[start] == IGNORE_INDEX else TRAINED_STYLE
            text.append(tokenizer.decode(input_ids[start:end]), style=style)
            start = end
    return text


def run_preview(recipe_path: Path, overrides: list[str], n: int, out: Console | None = None) -> dict[str, float]:
    """Print the preview; return its numbers (for tests and scripts)."""
    from velora_cli.models.load import recipe_tokenizer

    out = out or Console(soft_wrap=True, highlight=False)
    recipe = load_recipe(recipe_path, overrides)
    if recipe.method in PREFERENCE_METHODS:
        return preview_pairs(recipe, n, out)
    d, t = recipe.data, recipe.train
    text_note = "data preview: plain text (data.format text) is packed into cutoff_len blocks, every token trained"
    if recipe.text_data:
        raise UsageError(text_note)
    loaded = load_records(d.path, d.split, d.skip_bad_rows, fmt=d.format)
    if loaded.format == "text":
        raise UsageError(text_note)
    records = split_validation(loaded.records, d.val_set_size, t.seed)[0]
    tokenizer = recipe_tokenizer(recipe)
    full, rows, counts = [], [], {"kept": 0, "truncated": 0, "dropped": 0}
    for record in records:
        enc = encode(record, tokenizer, template=d.template, train_on_inputs=d.train_on_inputs, add_eos=d.add_eos,
                     system_prompt=d.system_prompt)  # fmt: skip
        row, status = fit_cutoff(enc, d.cutoff_len, conversation="messages" in record)
        counts[status] += 1
        full.append(len(enc.input_ids))
        if row is not None:
            rows.append(row)
    out.print(f"[bold]{d.path}[/]: {len(records)} training rows, format {loaded.format}"
              + (f", template {d.template}" if loaded.format == "alpaca" else "")
              + (f" ({loaded.skipped} bad rows skipped)" if loaded.skipped else ""))  # fmt: skip
    for i, row in enumerate(rows[:n]):
        trained = sum(label != IGNORE_INDEX for label in row["labels"])
        out.print(f"\n[bold]row {i}[/]: {len(row['input_ids'])} tokens, {trained} trained "
                  f"([{TRAINED_STYLE}]trained[/], [{MASKED_STYLE}]masked[/])")  # fmt: skip
        out.print(highlighted(row["input_ids"], row["labels"], tokenizer))
    ordered = sorted(full)
    p90 = ordered[math.ceil(0.9 * len(ordered)) - 1]
    stats = {"rows": len(records), "min": ordered[0], "median": statistics.median(ordered), "p90": p90,
             "max": ordered[-1], "truncated": counts["truncated"], "dropped": counts["dropped"]}  # fmt: skip
    out.print(f"\ntokens per row: min {stats['min']}, median {stats['median']:g}, p90 {p90}, max {stats['max']}")
    out.print(f"cutoff_len {d.cutoff_len}: {counts['truncated']} rows truncated, {counts['dropped']} dropped")
    kept = [len(r["input_ids"]) for r in rows]
    if kept:
        unpacked = padding_waste(kept, batches(kept, t.micro_batch_size, t.group_by_length, t.seed))
        packs = [sum(kept[i] for i in members) for members in assign(kept, d.cutoff_len)]
        packed = padding_waste(packs, batches(packs, t.micro_batch_size, t.group_by_length, t.seed))
        stats |= {"padding_unpacked": unpacked, "padding_packed": packed, "sequences_packed": len(packs)}
        out.print(f"padding per batch of {t.micro_batch_size}: {100 * unpacked:.1f}% of tokens unpacked "
                  f"({len(kept)} sequences), {100 * packed:.1f}% packed ({len(packs)} sequences of <= "
                  f"{d.cutoff_len} tokens)" + ("  [packing is on]" if d.packing else ""))  # fmt: skip
    return stats


def preview_pairs(recipe, n: int, out: Console) -> dict[str, float]:
    """method dpo: the first pairs as the two sequences DPO scores, the prompt masked and each completion trained
    (chosen in green, rejected in red), and the lengths of the pairs' longer sequence."""
    from velora_cli.data.preference import load_pairs, tokenize_pair
    from velora_cli.models.load import recipe_tokenizer

    d = recipe.data
    loaded = load_pairs(d.path, d.split, d.skip_bad_rows)
    pairs = split_validation(loaded.pairs, d.val_set_size, recipe.train.seed)[0]
    tokenizer = recipe_tokenizer(recipe)
    tokenized = []
    for pair in pairs:
        try:
            tokenized.append(tokenize_pair(pair, tokenizer, d.cutoff_len, recipe.preference, pair["where"]))
        except DataError:
            if not d.skip_bad_rows:  # as training would: refused, or skipped with data.skip_bad_rows
                raise
    out.print(f"[bold]{d.path}[/]: {len(pairs)} training pairs, format {loaded.format}"
              + (f" ({loaded.skipped} bad rows skipped)" if loaded.skipped else ""))  # fmt: skip
    for i, pair in enumerate(tokenized[:n]):
        out.print(f"\n[bold]pair {i}[/]: prompt {len(pair.prompt_ids)} tokens ([{MASKED_STYLE}]masked[/]), "
                  f"chosen {len(pair.chosen_ids)} ([{TRAINED_STYLE}]trained[/]), rejected {len(pair.rejected_ids)} "
                  f"([{REJECTED_STYLE}]trained[/])")  # fmt: skip
        for side, ids, style in (("chosen", pair.chosen_ids, TRAINED_STYLE),
                                 ("rejected", pair.rejected_ids, REJECTED_STYLE)):  # fmt: skip
            text = Text(tokenizer.decode(pair.prompt_ids), style=MASKED_STYLE)
            text.append(tokenizer.decode(ids), style=style)
            out.print(Text(f"{side}: ", style="bold") + text)
    longest = sorted(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in tokenized)
    truncated = sum(p.truncated for p in tokenized)
    stats = {"rows": len(pairs), "min": longest[0], "median": statistics.median(longest),
             "p90": longest[math.ceil(0.9 * len(longest)) - 1], "max": longest[-1], "truncated": truncated,
             "dropped": 0}  # fmt: skip
    out.print(f"\ntokens per sequence (prompt + longer completion): min {stats['min']}, median {stats['median']:g}, "
              f"p90 {stats['p90']}, max {stats['max']}; {truncated} pairs cut at data.cutoff_len {d.cutoff_len}"
              + (f" / preference.max_completion_length {recipe.preference.max_completion_length}"
                 if recipe.preference.max_completion_length else ""))  # fmt: skip
    return stats
