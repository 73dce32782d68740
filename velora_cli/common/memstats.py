"""A tiny memory-stats API used by the display, the summary, the benchmarks and `memory-estimate --measure`.

On CUDA it reports the caching allocator's allocated / reserved / peak bytes; on CPU the process RSS and its
peak (the closest thing to "memory this run needs" there).
"""

from __future__ import annotations

import re
import resource
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from velora_cli.common.errors import UsageError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MemoryStats:
    device: str
    allocated: int  # CUDA: live tensors; CPU: current RSS
    reserved: int  # CUDA: held by the caching allocator; CPU: current RSS
    peak: int  # CUDA: max allocated since the last reset; CPU: peak RSS of the process

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)

    def short(self) -> str:
        if self.device.startswith("cuda"):
            return f"{gib(self.allocated)} alloc / {gib(self.reserved)} rsvd / {gib(self.peak)} peak"
        return f"RSS {gib(self.allocated)} (peak {gib(self.peak)})"


def gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def human_bytes(num_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes:.0f} B"


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def memory_stats(device: torch.device | str | None = None) -> MemoryStats:
    import torch  # here, not at the top: `velora runs` reads summaries with MemoryStats and must not load torch

    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return MemoryStats(
            device=str(device),
            allocated=torch.cuda.memory_allocated(device),
            reserved=torch.cuda.memory_reserved(device),
            peak=torch.cuda.max_memory_allocated(device),
        )
    import psutil

    rss = psutil.Process().memory_info().rss
    return MemoryStats(device="cpu", allocated=rss, reserved=rss, peak=_peak_rss())


def reset_peak(device: torch.device | str | None = None) -> None:
    import torch

    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}  # fmt: skip


def parse_bytes(text: str | int, what: str, examples: str) -> int:
    """'24GiB' / '5GB' / a byte count -> bytes; GiB/MiB (and bare G/M) are binary, GB/MB decimal.

    Hand-written because huggingface_hub's parser is private and rejects the binary units velora prints.
    `what` and `examples` name the option in the one-line error.
    """
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise UsageError(f"{what} {text!r}: expected a size such as {examples}")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise UsageError(f"{what} {text!r}: must be more than 0 bytes")
    return value
