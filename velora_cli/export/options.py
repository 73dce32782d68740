"""`velora export`'s options, stated once: their defaults, their checks, and where an export goes by default.

The command line (cli.py), the pipeline's export stage and the Python API (`export_run(run_dir, out, **options)`)
all build an ExportOptions; `checked()` validates every option before anything is loaded or written.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from velora_cli.common.device import DTYPE_ATTRS, torch_dtype
from velora_cli.common.errors import UsageError
from velora_cli.common.fs import OutputError
from velora_cli.common.memstats import parse_bytes
from velora_cli.rundir.ownership import EXPORT_MARKER, foreign

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ExportOptions:
    """What `velora export` is asked for. Defaults here are the command's defaults."""

    out: Path | None = None  # default: default_out()
    fmt: str = "safetensors"  # safetensors | gguf
    quant: str | None = None  # gguf only: f16 (default) | bf16 | q8_0 | f32
    dtype: str = "bf16"  # safetensors weights: bf16 | fp16 | fp32
    checkpoint: int | None = None  # export checkpoint-N instead of the final adapter
    max_shard_size: str | int = "5GB"
    adapter_only: bool = False
    force: bool = False
    trust_remote_code: bool = False

    def checked(self) -> CheckedOptions:
        """Every option parsed (UsageError naming the option otherwise), before anything is loaded or written."""
        return CheckedOptions(parse_dtype(self.dtype), parse_size(self.max_shard_size),
                              check_format(self.fmt, self.quant, self.adapter_only))  # fmt: skip


@dataclass(frozen=True)
class CheckedOptions:
    dtype: torch.dtype
    shard_bytes: int
    gguf_quant: str | None  # None: safetensors


DEFAULTS = ExportOptions()

DEFAULT_DIR = "merged"

FORMATS = ("safetensors", "gguf")


def parse_size(text: str | int) -> int:
    """`5GB`, `500MB`, `2GiB` or a byte count -> bytes (checked before anything is loaded)."""
    return parse_bytes(text, "--max-shard-size", "5GB, 500MB or 2GiB")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPE_ATTRS:
        raise UsageError(f"--dtype {name!r}: expected one of {', '.join(DTYPE_ATTRS)}")
    return torch_dtype(name)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own tqdm bars would interleave with ours; silence them for the export only."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def default_out(run_dir: Path, checkpoint: int | None, adapter_only: bool, fmt: str = "safetensors") -> Path:
    name = "adapter" if adapter_only else "gguf" if fmt == "gguf" else DEFAULT_DIR
    return run_dir / (name if checkpoint is None else f"{name}-checkpoint-{checkpoint}")


def check_target(target: Path, run_dir: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise OutputError(f"--out {target}: exists and is a file")
    resolved, run = target.resolve(), run_dir.resolve()
    if resolved == run or resolved in run.parents:
        raise UsageError(f"--out {target}: would replace the run directory {run_dir} itself; choose another path")
    # velora's own earlier export (it carries the marker) is replaced; anyone else's folder only with --force.
    folder = foreign(target, EXPORT_MARKER)
    if folder is not None and not force:
        shown = f"{target} (-> {folder})" if folder != target.absolute() else str(target)
        raise UsageError(f"--out {shown}: directory exists and is not empty; pass --force to replace it")


def check_format(fmt: str, quant: str | None, adapter_only: bool) -> str | None:
    """The GGUF quantisation asked for (None for safetensors); UsageError for options that do not go together."""
    from velora_cli.export.gguf import QUANTS

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "safetensors":
        if quant is not None:
            raise UsageError("--quant applies to --format gguf; safetensors exports take --dtype")
        return None
    if adapter_only:
        raise UsageError("--adapter-only copies the PEFT adapter; it cannot be combined with --format gguf")
    if (quant or "f16") not in QUANTS:
        raise UsageError(f"--quant {quant!r}: expected one of {', '.join(QUANTS)}")
    return quant or "f16"
