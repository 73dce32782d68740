"""Device and dtype policy, in one place for training, evaluation, export and the memory model.

CUDA with bf16 support -> bf16 compute; older CUDA -> fp16; CPU -> fp32. bf16 matmuls are 15-20x slower
than fp32 on the CPUs this tool is tested on (measured 51 s vs 2.9 s per training step), so CPU always
computes in fp32 unless a recipe insists.
"""

from __future__ import annotations

import os

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def default_device() -> torch.device:
    """The device this process trains and evaluates on (its local rank's GPU under torchrun)."""
    if torch.cuda.is_available() and os.environ.get("VELORA_DEVICE", "") != "cpu":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def compute_dtype(requested: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """Resolve a recipe's `compute_dtype` ("auto" | "bf16" | "fp16" | "fp32") for `device`."""
    if requested != "auto":
        return DTYPES[requested]
    device = device or default_device()
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def world_size() -> int:
    """Processes in this run (torchrun sets WORLD_SIZE; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0: the process that writes files and prints."""
    return int(os.environ.get("RANK", "0")) == 0
