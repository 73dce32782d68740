"""Device and dtype policy, in one place for training, evaluation, export and the memory model.

CUDA with bf16 support -> bf16 compute; older CUDA -> fp16; CPU -> fp32. bf16 matmuls are 15-20x slower
than fp32 on the CPUs this tool is tested on (measured 51 s vs 2.9 s per training step), so CPU always
computes in fp32 unless a recipe insists. torch is imported inside the functions that need it: the memory model
and the recipe checks use the policy by name, and importing torch takes seconds.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# a recipe's dtype name -> the torch dtype's attribute name
DTYPE_ATTRS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPE_ATTRS[name])


def default_device() -> torch.device:
    """The device this process trains and evaluates on (its local rank's GPU under torchrun)."""
    import torch

    if torch.cuda.is_available() and os.environ.get("VELORA_DEVICE", "") != "cpu":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def auto_compute_name(device_type: str, bf16_supported: bool = True) -> str:
    """What `compute_dtype: auto` means on a device type, by name."""
    if device_type == "cuda":
        return "bf16" if bf16_supported else "fp16"
    return "fp32"


def compute_dtype(requested: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """Resolve a recipe's `compute_dtype` ("auto" | "bf16" | "fp16" | "fp32") for `device`."""
    if requested != "auto":
        return torch_dtype(requested)
    import torch

    device = device or default_device()
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch_dtype(auto_compute_name(device.type, bf16))


def dtype_name(dtype: torch.dtype) -> str:
    attr = str(dtype).removeprefix("torch.")
    return next((name for name, a in DTYPE_ATTRS.items() if a == attr), attr)


def gpu_present() -> bool:
    """Whether this machine has a CUDA (or ROCm) GPU, answered without importing torch unless it is loaded
    already: the driver's device files are what torch.cuda finds too."""
    if "torch" in sys.modules:
        return sys.modules["torch"].cuda.is_available()
    nvidia = Path("/proc/driver/nvidia/gpus")
    return (nvidia.is_dir() and any(nvidia.iterdir())) or Path("/dev/kfd").exists()


def world_size() -> int:
    """Processes in this run (torchrun sets WORLD_SIZE; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0: the process that writes files and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: a container's or a job's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """torch's CPU threads set to `count` inside the block (unchanged for None), restored after."""
    import torch

    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def leave_process_group() -> None:
    """A torchrun worker leaves its process group before it exits: left to interpreter shutdown, gloo's threads can
    abort the process ("terminate called without an active exception", seen at the end of finished 2-process runs),
    which the launcher then reports as a crashed rank. torch is not imported for this where nothing did."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
