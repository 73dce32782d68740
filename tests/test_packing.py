"""Packing: examples share a sequence without seeing each other. Per-example logits, losses and gradients of a packed
batch equal the unpacked ones (fp32, rtol 1e-5) on a tiny random LLaMA, with sdpa (masked), eager and the per-example
SDPA a packed recipe trains with, and with the chunked loss; a packed recipe trains end to end."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from velora_cli.data.formats import IGNORE_INDEX
from velora_cli.data.load import make_collator
from velora_cli.data.packing import assign, pack_rows, padding_waste
from velora_cli.engine.lean.packed_attention import PACKED_SDPA, register_packed_attention

LENGTHS = [7, 12, 5, 9, 3, 11, 6]  # packed into rows of 20 tokens: 3 rows, one of them shorter (padding)


def examples(vocab: int) -> list[dict[str, list[int]]]:
    """Random token rows; the first 2 tokens of each are a masked prompt."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in LENGTHS:
        ids = torch.randint(10, vocab, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    return rows


def test_best_fit_decreasing_assignment() -> None:
    bins = assign(LENGTHS, 20)
    assert sorted(i for b in bins for i in b) == list(range(len(LENGTHS)))
    # longest first, each into the row it fills best: 12+7, 11+9, 6+5+3
    assert [[LENGTHS[i] for i in b] for b in bins] == [[12, 7], [11, 9], [6, 5, 3]]
    assert all(sum(LENGTHS[i] for i in b) <= 20 for b in bins)
    assert padding_waste([19, 20, 14], [[0, 1, 2]]) == pytest.approx(1 - 53 / 60)


def test_packed_rows_restart_positions_and_mask_first_labels() -> None:
    rows = examples(100)
    packed = pack_rows(rows, 20)
    assert sum(r["length"] for r in packed) == sum(LENGTHS)
    for row in packed:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        ends = [*starts[1:], len(row["input_ids"])]
        for s, e in zip(starts, ends, strict=True):
            assert row["position_ids"][s:e] == list(range(e - s))
            assert row["labels"][s] == IGNORE_INDEX
            original = next(r for r in rows if r["input_ids"] == row["input_ids"][s:e])
            assert row["labels"][s + 1 : e] == original["labels"][1:]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_llama_dir), tiny_llama_dir


def _model(path: Path, attn: str):
    register_packed_attention()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    return model.train()  # dropout is 0 in the tiny config: train mode changes nothing but the mask path's inputs


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of each sequence in a packed batch (the padding after a row's examples is one of them)."""
    out = []
    for r, row in enumerate(position_ids.tolist()):
        starts = [i for i, p in enumerate(row) if p == 0]
        out += [(r, s, e) for s, e in zip(starts, [*starts[1:], len(row)], strict=True)]
    return out


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager", PACKED_SDPA])
def test_packed_batch_equals_unpacked(tiny, attn: str) -> None:
    tokenizer, path = tiny
    rows = examples(len(tokenizer))
    collate = make_collator(tokenizer, on_gpu=False)
    packed = collate(pack_rows(rows, 20))
    # no attention_mask, no KV cache: transformers reads the restarts in position_ids
    assert set(packed) == {"input_ids", "labels", "position_ids", "use_cache"} and packed["use_cache"] is False
    unpacked = collate([{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows])
    n_items = int((unpacked["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert int((packed["labels"][:, 1:] != IGNORE_INDEX).sum()) == n_items  # the same trained tokens

    model = _model(path, attn)
    out_p = model(**packed, num_items_in_batch=n_items)
    # Each example's logits in the packed batch against the example alone.
    all_segments = _segments(packed["position_ids"])
    segments = [(r, s, e) for r, s, e in all_segments if (packed["labels"][r, s:e] != IGNORE_INDEX).any()]
    padded_rows = 2  # rows of 19, 20 and 14 tokens: the two short ones end in one pad sequence each
    assert len(segments) == len(rows) and len(all_segments) == len(rows) + padded_rows
    for r, s, e in segments:
        ids = packed["input_ids"][r, s:e]
        alone = model(input_ids=ids[None]).logits[0]
        torch.testing.assert_close(out_p.logits[r, s:e], alone, rtol=1e-5, atol=1e-5)
        i = next(i for i, row in enumerate(rows) if row["input_ids"] == ids.tolist())
        labels = torch.tensor(rows[i]["labels"])
        loss_alone = F.cross_entropy(alone[:-1], labels[1:], ignore_index=IGNORE_INDEX)
        target = packed["labels"][r, s + 1 : e]
        loss_packed = F.cross_entropy(out_p.logits[r, s : e - 1], target, ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(loss_packed, loss_alone, rtol=1e-5, atol=0)
    out_p.loss.backward()
    grads_p = _grads(model)
    model.zero_grad()
    out_u = model(**unpacked, num_items_in_batch=n_items)
    torch.testing.assert_close(out_p.loss, out_u.loss, rtol=1e-5, atol=0)  # normalised per trained token as unpacked
    out_u.loss.backward()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grads_p[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_packed_attention_is_sdpa_on_padded_batches_and_generation(tiny) -> None:
    """A model switched to per-example SDPA for packed training computes what stock SDPA computes on anything else:
    a left-padded batch with its attention_mask (the held-out rows), and cached greedy generation."""
    tokenizer, path = tiny
    stock, packed = _model(path, "sdpa").eval(), _model(path, PACKED_SDPA).eval()
    ids = torch.randint(10, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids, attention_mask=mask).logits,
                                   stock(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)  # fmt: skip
        gen = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        out_p = packed.generate(input_ids=ids, attention_mask=mask, **gen)
        assert torch.equal(out_p, stock.generate(input_ids=ids, attention_mask=mask, **gen))


def test_chunked_loss_on_packed_batches(tiny) -> None:
    """The chunked loss (memory.loss: chunked) gives the packed batch the stock path's loss and gradients unpacked."""
    from velora_cli.engine.lean import apply_lean

    tokenizer, path = tiny
    rows = examples(len(tokenizer))
    collate = make_collator(tokenizer, on_gpu=False)
    packed = collate(pack_rows(rows, 20))
    unpacked = collate([{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows])
    n_items = int((unpacked["labels"][:, 1:] != IGNORE_INDEX).sum())
    stock = _model(path, "sdpa")
    lean = copy.deepcopy(stock)
    apply_lean(lean, loss="chunked", lean_ops=True, chunk_size=8)
    loss_lean = lean(**packed, num_items_in_batch=n_items).loss
    loss_stock = stock(**unpacked, num_items_in_batch=n_items).loss
    torch.testing.assert_close(loss_lean, loss_stock, rtol=1e-5, atol=0)
    loss_lean.backward()
    loss_stock.backward()
    for name, grad in _grads(stock).items():
        torch.testing.assert_close(_grads(lean)[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_packed_recipe_trains(tiny, tmp_path: Path) -> None:
    """data.packing through the whole finetune path: the plan counts examples and sequences, training runs."""
    from velora_cli.finetune.pipeline import run_pipeline

    _, path = tiny
    convs = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                           {"role": "assistant", "content": str(2 * i)},
                           {"role": "user", "content": "And doubled?"},
                           {"role": "assistant", "content": str(4 * i)}]} for i in range(12)]  # fmt: skip
    (tmp_path / "chat.json").write_text(json.dumps(convs))
    recipe = {
        "model": {"name": str(path), "quantization": "none"}, "method": "lora", "lora": {"r": 4, "alpha": 8},
        "velora": {"layers": ["v", "d"], "num_groups": 8},
        "data": {"path": str(tmp_path / "chat.json"), "cutoff_len": 256, "packing": True, "val_set_size": 2},
        "train": {"micro_batch_size": 2, "batch_size": 2, "max_steps": 2, "save_steps": 2, "logging_steps": 1},
        "output": {"dir": str(tmp_path / "run")},
    }  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    summary = run_pipeline(tmp_path / "r.yaml", overrides=[])
    assert summary["train"]["steps"] == 2 and summary["train"]["train_loss"] > 0
    assert summary["train"]["after"]["eval_loss"] is not None
    from velora_cli.config.load import load_recipe
    from velora_cli.finetune.session import FinetuneSession

    session = FinetuneSession(load_recipe(tmp_path / "r.yaml"), tmp_path / "run")
    session.prepare()
    assert session.counts.examples == 10 and 1 < len(session.train_set) < 10
    assert "position_ids" in session.train_set.column_names and "position_ids" not in session.val_set.column_names


def test_memory_estimate_counts_packed_batches(tiny, tmp_path: Path) -> None:
    """The estimate with data.packing equals what the meter measures on a packed batch (nf4 + LoRA + VeLoRA, sdpa)."""
    from velora_cli.config.load import validate_recipe
    from velora_cli.engine.meter import ActivationMeter
    from velora_cli.memory.activations import activations
    from velora_cli.memory.arch import arch_for
    from velora_cli.memory.estimate import settings_from_recipe
    from velora_cli.models.build import build_training_model

    _, path = tiny
    recipe = validate_recipe({
        "model": {"name": str(path), "quantization": "nf4", "compute_dtype": "fp32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05}, "velora": {"layers": ["v", "d"], "num_groups": 8},
        "data": {"path": str(tmp_path / "unused.json"), "packing": True, "cutoff_len": 32},
        "train": {"micro_batch_size": 2, "batch_size": 2}, "output": {"dir": str(tmp_path / "run")},
    })  # fmt: skip
    model, _ = build_training_model(recipe, torch.device("cpu"))
    assert model.get_base_model().config._attn_implementation == PACKED_SDPA  # no (S x S) mask kept per layer
    model.train()
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(10), torch.arange(22)]).repeat(2, 1)
    measured = {}
    for packed in (False, True):
        extra = {"position_ids": positions, "use_cache": False} if packed else {}
        with ActivationMeter(model) as meter:
            model(input_ids=ids, labels=ids, **extra)
        measured[packed] = meter.total_bytes
    s = settings_from_recipe(recipe, device="cpu")
    arch = arch_for(model=str(path))
    assert s.packing and measured[True] > measured[False]
    assert activations(arch, s).meter_view == measured[True]
    assert activations(arch, dataclasses.replace(s, packing=False)).meter_view == measured[False]
