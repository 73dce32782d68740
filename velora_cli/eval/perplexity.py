"""Perplexity of held-out text: `velora eval --perplexity --data FILE` and the recipe's `eval.perplexity` stage.

The text is read and packed exactly as training packs it (velora_cli.data.corpus: documents + EOS, blocks of
cutoff_len tokens, no padding), so every position of a block but the first is predicted. Perplexity is
exp(total next-token NLL / predicted tokens), summed in fp64 over every block.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from velora_cli.common.errors import DataError


@torch.no_grad()
def perplexity(model, blocks, batch_size: int = 8, limit: int | None = None) -> dict[str, Any]:
    """{"perplexity", "loss", "tokens", "blocks"} of a model on packed blocks (rows with input_ids)."""
    ids = [row["input_ids"] for row in blocks]
    ids = ids[:limit] if limit else ids
    if not ids:
        raise DataError("perplexity: no held-out blocks (is the text shorter than one block of data.cutoff_len?)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(ids), batch_size):
            batch = torch.tensor(ids[start : start + batch_size], device=device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                    reduction="sum")  # fmt: skip
            total += float(nll.double())
            count += targets.numel()
    finally:
        model.train(was_training)
    loss = total / count
    return {"perplexity": math.exp(loss), "loss": loss, "tokens": count, "blocks": len(ids)}


def file_blocks(path: str, tokenizer, block: int, text_field: str = "text"):
    """Packed blocks of a text corpus (.txt/.jsonl/.parquet/hub id), as corpus.pack makes them."""
    from velora_cli.data.corpus import iter_documents, pack

    return pack(iter_documents(path, text_field=text_field), tokenizer, block)


def run_perplexity_command(model: str | None, data: Path | None, block: int, limit: int | None, batch_size: int,
                           json_path: Path | None, trust_remote_code: bool = False) -> dict[str, Any]:  # fmt: skip
    """`velora eval --perplexity --data FILE [--model RUN_OR_MODEL]`: load, score, print one line, write JSON."""
    from rich.console import Console

    from velora_cli.common.bounds import check_regular
    from velora_cli.common.errors import UsageError
    from velora_cli.common.fs import write_json_atomic
    from velora_cli.eval.command import load_eval_model
    from velora_cli.rundir.layout import latest_run

    if data is None:
        raise UsageError("velora eval --perplexity needs --data FILE (text, .jsonl with a text field, parquet)")
    check_regular(data, "--data")  # a FIFO or a device: refused now, not after the model loaded
    reference = model if model is not None else str(latest_run())
    loaded, tokenizer, description = load_eval_model(reference, trust_remote_code=trust_remote_code)
    result = perplexity(loaded, file_blocks(str(data), tokenizer, block), batch_size=batch_size, limit=limit)
    result |= {"model": description, "data": str(data), "block": block}
    # soft_wrap: one line however narrow the terminal (rich would break it after a `: `), so it greps and pipes
    Console().print(f"perplexity {result['perplexity']:.3f} (loss {result['loss']:.4f}) over {result['tokens']} "
                    f"tokens in {result['blocks']} blocks of {block}: {description}", highlight=False,
                    soft_wrap=True)  # fmt: skip
    if json_path is not None:
        write_json_atomic(json_path, result)
    return result
