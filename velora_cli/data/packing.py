"""Packing (`data.packing: true`): several tokenised examples in one sequence of up to cutoff_len tokens, with
attention kept inside each example, and the collator that batches packed and padded rows alike.

A packed row is built by transformers' `DataCollatorWithFlattening`: input_ids concatenated, position_ids
restarting at 0 for each example, the first label of each example set to -100 (so no example is scored on
predicting the next one's first token; the causal shift never scores an example's own first token anyway). The
rows carry `position_ids` and no attention_mask: with attention_mask None and no KV cache (the collator passes
use_cache=False), transformers' masking_utils (find_packed_sequence_indices) reads the restarts in position_ids and
builds a block-diagonal causal mask for eager attention; on `sdpa`, the recipe's model is switched to per-example
SDPA without a mask (engine/lean/packed_attention.py, via models.build.attention_for_packing); flash-attention reads the
restarts itself (tests/test_packing.py checks that each example's logits equal its own forward pass; with a cache
they do not). A micro-batch is `micro_batch_size` packed rows, right-padded to the longest (the padding counts
positions 0, 1, ... on: one sequence of its own after the row's examples, label -100); rows are not flattened into
one, because eager attention would then build one (rows x cutoff)^2 mask and do that much attention work.

Examples are assigned to rows best-fit decreasing (longest first, each into the fullest row it still fits, as
TRL's pack_dataset "bfd"), written here because transformers has no bin packing and TRL is not a dependency
(velora_cli/data/load.py says why). The loss is normalised as unpacked: the Trainer's num_items_in_batch counts the
labels that are not -100, the same tokens as without packing.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from velora_cli.data.formats import IGNORE_INDEX


def assign(lengths: list[int], capacity: int) -> list[list[int]]:
    """Row indices per packed sequence, best-fit decreasing; every length must be <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin), sorted: the first with space >= n is the best fit
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, b = free.pop(at)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    return bins


def pack_rows(rows: list[dict[str, Any]], capacity: int) -> list[dict[str, Any]]:
    """Tokenised rows (input_ids, labels) packed into rows of at most `capacity` tokens with position_ids."""
    from transformers import DataCollatorWithFlattening

    flatten = DataCollatorWithFlattening(return_tensors="np", return_position_ids=True, separator_id=IGNORE_INDEX)
    packed = []
    for members in assign([len(r["input_ids"]) for r in rows], capacity):
        batch = flatten([{"input_ids": rows[i]["input_ids"], "labels": rows[i]["labels"]} for i in members])
        ids = batch["input_ids"][0].tolist()
        packed.append({"input_ids": ids, "labels": batch["labels"][0].tolist(),
                       "position_ids": batch["position_ids"][0].tolist(), "length": len(ids)})  # fmt: skip
    return packed


class PackedCollator:
    """Packed rows (with position_ids) right-padded into a batch without attention_mask; other rows go to `padded`."""

    def __init__(self, padded, pad_token_id: int | None):
        self.padded = padded
        self.pad = pad_token_id if pad_token_id is not None else 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "position_ids" not in features[0]:
            return self.padded(features)

        def stack(key: str, fill: int) -> torch.Tensor:
            rows = [torch.as_tensor(f[key], dtype=torch.long) for f in features]
            return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=fill)

        longest = max(len(f["input_ids"]) for f in features)
        # The padding is one sequence (positions 0, 1, ...), not one per pad token: per-example attention then
        # makes one call for it, and it still sees nothing of the examples before it.
        positions = [[*f["position_ids"], *range(longest - len(f["position_ids"]))] for f in features]

        # use_cache=False: with a KV cache (LLaMA configs default to use_cache: true, and a training forward builds
        # one then) masking_utils ignores the position_ids restarts and every example would see the ones before it.
        return {"input_ids": stack("input_ids", self.pad), "labels": stack("labels", IGNORE_INDEX),
                "position_ids": torch.tensor(positions, dtype=torch.long), "use_cache": False}  # fmt: skip


def padding_waste(lengths: list[int], batches: list[list[int]]) -> float:
    """Fraction of the tokens of right-padded batches (index lists into `lengths`) that are padding."""
    real = sum(lengths[i] for b in batches for i in b)
    total = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 1 - real / total if total else 0.0
