"""Exact match on held-out instructions: the demo's "did training help" number, before and after training.

A greedy decoder reproduces the reference answer (and then ends the turn) exactly when, at every answer
position, the model's argmax given the reference prefix is the reference token. So exact match is scored with
one teacher-forced forward pass per batch instead of a token-by-token generation loop: the same verdict as
`generate(do_sample=False)` up to argmax ties, at a fraction of the cost (which matters on CPU, where a
bitsandbytes 4-bit model dequantises every weight on every forward).
"""

from __future__ import annotations

import torch

from velora_cli.data.formats import IGNORE_INDEX, describe
from velora_cli.data.load import make_collator, tokenize_record
from velora_cli.rundir.summary import HeldoutScore


@torch.no_grad()
def exact_match(
    model,
    tokenizer,
    records: list[dict[str, str]],
    *,
    template: str,
    cutoff_len: int = 512,
    system_prompt: str | None = None,
    batch_size: int = 16,
) -> HeldoutScore:
    """Exact match, loss (mean cross-entropy over answer tokens), n, and the first few examples (instruction,
    expected, greedy answer prefix, correct)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = make_collator(tokenizer, on_gpu=device.type == "cuda")
    correct, examples = 0, []
    loss_sum, loss_tokens = 0.0, 0
    try:
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            encoded = [
                tokenize_record(r, tokenizer, template=template, cutoff_len=cutoff_len, train_on_inputs=False,
                                add_eos=True, system_prompt=system_prompt)
                for r in batch
            ]  # fmt: skip
            # A record with no whole answer within cutoff_len scores as a miss: an empty row, nothing to match.
            rows = [r or {"input_ids": [tokenizer.eos_token_id], "attention_mask": [1], "labels": [IGNORE_INDEX]}
                    for r in encoded]  # fmt: skip
            enc = collate(rows)
            labels = enc.pop("labels").to(device)
            logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
            predicted = logits[:, :-1].argmax(-1)  # position t predicts token t + 1
            targets = labels[:, 1:]
            answer = targets != IGNORE_INDEX
            hits = ((predicted == targets) | ~answer).all(dim=1) & answer.any(dim=1)
            loss_sum += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                    ignore_index=IGNORE_INDEX, reduction="sum",
                )
            )  # fmt: skip
            loss_tokens += int(answer.sum())
            correct += int(hits.sum())
            for i, record in enumerate(batch):
                if len(examples) < 5:
                    greedy = predicted[i][answer[i]]
                    question, expected = describe(record)
                    examples.append({"instruction": question, "expected": expected,
                                     "greedy": tokenizer.decode(greedy, skip_special_tokens=True).strip(),
                                     "correct": bool(hits[i])})  # fmt: skip
    finally:
        model.train(was_training)
    return HeldoutScore(
        exact_match=correct / max(1, len(records)), loss=loss_sum / max(1, loss_tokens), n=len(records),
        examples=examples,
    )  # fmt: skip
