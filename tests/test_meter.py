"""ActivationMeter: bytes saved for backward, counted once per storage, parameters and buffers excluded."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from velora_cli.engine.meter import UNATTRIBUTED, ActivationMeter


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 4)
        self.register_buffer("gain", torch.full((4,), 2.0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x.sin()  # saves x
        z = y * y  # saves y twice: one storage
        w = z[:, :2].exp()  # saves its output
        h = self.lin(x) * self.gain  # linear saves x (again) and its weight; mul saves the buffer
        return w, h


def test_counts_each_storage_once_and_excludes_params_and_buffers() -> None:
    model = Toy()
    x = torch.randn(8, 16, requires_grad=True)
    with ActivationMeter(model) as meter:
        w, h = model(x)
    expected = {"SinBackward0": 8 * 16 * 4, "MulBackward0": 8 * 16 * 4, "ExpBackward0": 8 * 2 * 4}
    assert meter.total_bytes == sum(expected.values())
    assert meter.per_token(8) == sum(expected.values()) / 8
    by_op = meter.by_op()
    # x is saved by both sin and the linear layer's mm; it is charged once, to whichever the walk meets first
    x_owner = next(k for k in by_op if k in ("SinBackward0", "AddmmBackward0"))
    assert by_op.pop(x_owner) == 8 * 16 * 4
    assert by_op == {"MulBackward0": 8 * 16 * 4, "ExpBackward0": 8 * 2 * 4}
    (w.sum() + h.sum()).backward()  # the breakdown was taken before backward freed the graph
    assert meter.by_op()[x_owner] == 8 * 16 * 4


def test_without_a_model_everything_is_unattributed_and_nothing_excluded() -> None:
    lin = nn.Linear(16, 4)
    x = torch.randn(3, 16, requires_grad=True)
    with ActivationMeter() as meter:
        lin(x)
    assert meter.total_bytes == 3 * 16 * 4 + 4 * 16 * 4  # input and (not excluded) weight
    assert meter.by_op() == {UNATTRIBUTED: meter.total_bytes}


def test_nothing_saved_under_no_grad() -> None:
    model = Toy()
    with torch.no_grad(), ActivationMeter(model) as meter:
        model(torch.randn(4, 16))
    assert meter.total_bytes == 0 and meter.by_op() == {}


def test_velora_saving_on_a_real_lora_model_is_exactly_d_minus_d_over_m(tiny_llama_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from velora_cli.engine import VeloraConfig, apply_velora

    ids = torch.randint(5, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    measured = []
    for compress in (False, True):
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=4, lora_dropout=0.0, target_modules=["down_proj", "v_proj"]))
        if compress:
            apply_velora(model, VeloraConfig(layers=["d"], num_groups=8))
        model.train()
        with ActivationMeter(model) as meter:
            model(input_ids=ids, labels=ids)
        measured.append(meter)
    plain, velora = measured
    tokens, depth, layers, groups = 32, 128, 2, 8  # down_proj's input depth is the MLP width; D/M = groups
    assert plain.total_bytes - velora.total_bytes == layers * tokens * (depth - groups) * 4
    assert velora.by_op()["VeloraLinearFunctionBackward"] == layers * tokens * groups * 4
