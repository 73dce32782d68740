"""The full/pretrain stage: every weight of a random LLaMA-60M (GaLore's shape, what `method: pretrain` builds)
trains in bf16 with AdamW, as models.full.build_full_model builds it: full vs full + VeLoRA v,d
(`apply_velora(mode="full")`) vs full + GC, all with the `memory:` defaults (chunked loss, lean ops) as in
benchmarks/pretrain.py's CPU comparison. Peak, activations, tokens/s and memory-estimate (`--method full`)."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from bench_common import NUM_GROUPS, VELORA_VD, Results, Workload, random_model
from stage_memory import Config, apply_memory, measure_rows, memory

DEFAULTS = memory(loss="chunked", lean_ops=True)
FULL_CONFIGS = [
    Config("full", memory=DEFAULTS),
    Config("full_velora_vd", velora=VELORA_VD, memory=DEFAULTS),
    Config("full_gc", memory={**DEFAULTS, "checkpointing": "all"}),
]


def build_full(shape: str, cfg: Config, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    from velora_cli.engine import VeloraConfig, apply_velora

    model = random_model(shape, device)
    model.requires_grad_(True)
    if cfg.velora:
        apply_velora(model, VeloraConfig(layers=list(cfg.velora), num_groups=NUM_GROUPS), mode="full")
    return model, apply_memory(model, cfg)


def pretrain_stage(args: argparse.Namespace, results: Results, w: Workload) -> dict[str, Any]:
    device = args.torch_device
    return measure_rows(args, results, "pretrain", [(w, FULL_CONFIGS)],
                        lambda w, cfg: lambda: build_full(w.shape, cfg, device))  # fmt: skip
