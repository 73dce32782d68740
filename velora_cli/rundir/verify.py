"""Whether a checkpoint can be resumed from: read its files' structure before the Trainer does.

layout.resumable_checkpoints tells a checkpoint killed half-way (trainer_state.json is written last) from a complete
one. A complete one may still be damaged afterwards: truncated by a half-finished copy, corrupted on disk, or a
pickle swapped by someone else. Resuming from it would fail with a traceback on every rerun, so the newest sound
checkpoint is chosen instead, the damaged one is moved aside (renamed, never deleted: it may be all a user has) and
one line says which was skipped and why. The checks read headers only (safetensors headers against the file size,
pickles memory-mapped and loaded with weights_only), not the tensor data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from velora_cli.common.errors import VeloraError
from velora_cli.engine.state import VECTORS_FILE
from velora_cli.rundir.layout import ADAPTER_CONFIG, checkpoint_step, resumable_checkpoints

_HEADER_CAP = 100 << 20  # safetensors' own limit on the JSON header


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (None: its header parses and its tensors end where it ends)."""
    try:
        with open(path, "rb") as handle:
            size = path.stat().st_size
            head = handle.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, _HEADER_CAP):
                return f"{path.name} is truncated or not safetensors (header of {length} bytes in {size})"
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as exc:
        return f"{path.name} cannot be read ({getattr(exc, 'strerror', None) or exc.__class__.__name__})"
    if not isinstance(header, dict):
        return f"{path.name} has no safetensors header"
    ends = [info.get("data_offsets", [0, 0])[1] for key, info in header.items()
            if key != "__metadata__" and isinstance(info, dict)]  # fmt: skip
    if not all(isinstance(e, int) for e in ends):
        return f"{path.name} has a damaged safetensors header"
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        return f"{path.name} is truncated or damaged (its header describes {expected} bytes, the file has {size})"
    return None


def pickle_problem(path: Path) -> str | None:
    """Why torch cannot load `path` safely (weights_only: a pickle that would run code is refused)."""
    import pickle

    import torch
    from transformers.trainer_pt_utils import safe_globals  # the numpy types the Trainer's RNG state holds

    try:
        with safe_globals():
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            return f"{path.name} holds objects other than tensors (refused unread: it could run code)"
        return f"{path.name} is not a readable torch file ({str(exc).splitlines()[0][:120]})"
    except (RuntimeError, OSError, ValueError, EOFError) as exc:
        return f"{path.name} cannot be read ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"
    return None


def checkpoint_problem(checkpoint: Path, velora: bool) -> str | None:
    """Why a complete checkpoint cannot be resumed from, or None."""
    if checkpoint_step(checkpoint) is None:
        return "trainer_state.json is missing or has no global_step"
    if (checkpoint / ADAPTER_CONFIG).is_file():
        try:
            json.loads((checkpoint / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return f"{ADAPTER_CONFIG} is not valid JSON"
    if velora and not (checkpoint / VECTORS_FILE).is_file():
        return f"{VECTORS_FILE} is missing"
    for path in sorted(checkpoint.glob("*.safetensors")):
        if problem := safetensors_problem(path):
            return problem
    for path in sorted([*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth")]):
        if problem := pickle_problem(path):
            return problem
    return None


def sound_checkpoints(run_dir: Path, velora: bool = False) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(complete checkpoints whose files read back, oldest first; (checkpoint, why) for the damaged ones)."""
    sound, damaged = [], []
    for path in resumable_checkpoints(run_dir, velora):
        problem = checkpoint_problem(path, velora)
        if problem is None:
            sound.append(path)
        else:
            damaged.append((path, problem))
    return sound, damaged


def set_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint out of the checkpoint-N pattern (kept, never resumed from or rotated)."""
    target, n = checkpoint.with_name(f"damaged-{checkpoint.name}"), 1
    while target.exists():
        n += 1
        target = checkpoint.with_name(f"damaged-{checkpoint.name}-{n}")
    checkpoint.rename(target)
    return target


def resume_line(resume_from: Path | None, damaged: list[tuple[Path, str]], moved: dict[Path, Path]) -> str | None:
    """One line: what was skipped and why, and where the run resumes."""
    where = f"resuming from {resume_from.name}" if resume_from else "no sound checkpoint left; starting afresh"
    if not damaged:
        return where if resume_from is not None else None
    skipped = "; ".join(
        f"skipped {path}: {why}" + (f" (moved to {moved[path].name})" if path in moved else "") for path, why in damaged
    )
    return f"{skipped}; {where}"


# The JSON files PEFT and transformers read from a run or checkpoint folder (not velora's own summaries).
_JSON_FILES = (ADAPTER_CONFIG, "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "generation_config.json", "added_tokens.json")  # fmt: skip
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class DamagedFile(VeloraError):
    """A file velora was about to load is truncated, corrupt or an unsafe pickle: exit 1, one line with its path."""


def check_weights(folder: Path) -> None:
    """DamagedFile naming the first damaged file among `folder`'s adapter/model config, safetensors and pickles,
    so that loading it (PEFT, transformers, torch) never ends in a traceback."""
    folder = Path(folder)
    for name in _JSON_FILES:
        if (folder / name).is_file():
            try:
                content = json.loads((folder / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise DamagedFile(f"{folder / name}: not valid JSON (a damaged or half-copied file)") from None
            if not isinstance(content, dict):
                raise DamagedFile(f"{folder / name}: a JSON object was expected, not {type(content).__name__}")
            if name == ADAPTER_CONFIG and not isinstance(content.get("peft_type"), str):
                raise DamagedFile(f"{folder / name}: no peft_type; not a PEFT adapter configuration")
    if (folder / ADAPTER_CONFIG).is_file() and not any((folder / f).is_file() for f in _ADAPTER_WEIGHTS):
        raise DamagedFile(f"{folder}: {ADAPTER_CONFIG} without adapter weights ({' or '.join(_ADAPTER_WEIGHTS)}); "
                          "a half-copied run?")  # fmt: skip
    for path in sorted(folder.glob("*.safetensors")):
        if problem := safetensors_problem(path):
            raise DamagedFile(f"{path}: {problem.removeprefix(path.name + ' ')}")
    # The weights PEFT or transformers would unpickle (training_args.bin is the Trainer's, never loaded here).
    for path in sorted([*folder.glob("adapter_model*.bin"), *folder.glob("pytorch_model*.bin")]):
        if problem := pickle_problem(path):
            raise DamagedFile(f"{path}: {problem.removeprefix(path.name + ' ')}")
