"""Run directories: their layout, the one staged-write helper, the typed run summary and the run listing.

Owns where every file of a finetune run lives, how any file or directory the tool writes is put in place (staged
beside its target, then renamed, so readers never see half of it), `RunSummary` (summary.json, written and read
only here: what a run cost and how good it is, one dataclass per part; the description of the run's method is
description.py's), and the data behind `velora runs`.

RUN_DIR/
  adapter_config.json, adapter_model.safetensors   the PEFT adapter (PeftModel.from_pretrained loads it)
  tokenizer files
  recipe.yaml                  the resolved recipe (model.name is the base model reference)
  velora_projections.safetensors   the VeLoRA projection vectors (velora.state.VECTORS_FILE)
  metrics.jsonl                one JSON object per logging / eval step
  summary.json                 what the run cost and how good it is
  checkpoint-N/                Trainer checkpoints (adapter + optimizer + RNG + VeLoRA vectors)
  eval/mmlu.json               MMLU results
  merged/                      the merged export (default location)
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from velora_cli.description import RunDescription
from velora_cli.errors import UsageError
from velora_cli.memstats import MemoryStats
from velora_cli.velora.state import VECTORS_FILE

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MMLU_FILE = "eval/mmlu.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MODEL_CONFIG = "config.json"  # a full/pretrain run (or its checkpoint) holds a whole model, not an adapter
TRAINER_STATE = "trainer_state.json"  # transformers' Trainer writes it last into each checkpoint


def has_weights(path: Path) -> bool:
    """An adapter (qlora/lora) or a whole model (full/pretrain) was saved here."""
    return (path / ADAPTER_CONFIG).is_file() or (path / MODEL_CONFIG).is_file()


def is_run_dir(path: Path) -> bool:
    return has_weights(path) and (path / RECIPE_FILE).is_file()


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-N directory, complete or not, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("checkpoint-*") if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (staging dirs never match the name pattern)."""
    return [p for _, p in checkpoint_dirs(run_dir) if has_weights(p)]


def checkpoint_step(path: Path) -> int | None:
    """The global step a checkpoint's trainer_state.json records; None when it is missing or half-written."""
    try:
        step = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8")).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def resumable_checkpoints(run_dir: Path, velora: bool = False) -> list[Path]:
    """Checkpoints a run can resume from, oldest first. The Trainer writes trainer_state.json last (a kill while
    writing it leaves JSON that does not parse) and the VeloraCallback adds the projection vectors after it, so a
    checkpoint killed half-way fails one of these checks."""
    return [
        path
        for path in checkpoints(run_dir)
        if checkpoint_step(path) is not None and (not velora or (path / VECTORS_FILE).is_file())
    ]


def adapter_dir(run_dir: Path, checkpoint: int | None = None) -> Path:
    """Where the adapter to load lives: the final one, or checkpoint-N. UsageError if absent."""
    if checkpoint is not None:
        path = run_dir / f"checkpoint-{checkpoint}"
        if not (path / ADAPTER_CONFIG).is_file():
            have = ", ".join(p.name for p in checkpoints(run_dir)) or "none"
            raise UsageError(f"{run_dir}: no adapter in checkpoint-{checkpoint} (checkpoints: {have})")
        return path
    if not (run_dir / ADAPTER_CONFIG).is_file():
        raise UsageError(f"{run_dir}: no adapter found ({ADAPTER_CONFIG} missing); is this a finished finetune run?")
    return run_dir


def latest_run(root: Path = Path("runs")) -> Path:
    """The most recently written run directory under `root` (for commands that default to it)."""
    runs = [p for p in root.glob("*") if p.is_dir() and is_run_dir(p)] if root.is_dir() else []
    if not runs:
        raise UsageError(f"no finished run found under {root}/; pass --model or run `velora finetune` first")
    return max(runs, key=lambda p: (p / RECIPE_FILE).stat().st_mtime)


# ------------------------------------------------------------------------------------------ staged writes


def _leftovers(target: Path, kind: str) -> list[Path]:
    return list(target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"))


def recover_staged(target: Path) -> None:
    """Undo what a killed `staged` block left beside `target`: a half-built staging file or directory is deleted,
    and an old target moved aside just before the final rename is put back if the new one never arrived."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for path in _leftovers(target, "staging") + _leftovers(target, "tmp"):
        remove(path)
    for old in sorted(_leftovers(target, "old")):
        if not target.exists():
            os.replace(old, target)
        else:
            remove(old)


def remove(path: Path) -> None:
    """Delete a file or a directory tree, if present."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def staged(target: Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary file (or, with `directory`, an empty directory) beside `target`; when the block
    completes it is renamed to `target`, when it raises it is deleted. An existing target directory is moved
    aside first and deleted only after the rename, so a failure at any point leaves the old one in place, and
    leftovers of a process killed inside the block are cleaned up (`recover_staged`) by the next one."""
    target = Path(target)
    if target.parent.exists() and not target.parent.is_dir():
        raise UsageError(f"{target}: {target.parent} is a file, not a directory")
    if target.is_dir() != directory and target.exists():
        raise UsageError(f"{target}: exists and is {'not ' if directory else ''}a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_staged(target)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        old = None
        if directory and target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def staged_dir(target: Path) -> Any:
    """`staged(target, directory=True)`: build a directory in full, then put it in place in one rename."""
    return staged(target, directory=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` so that readers see the old file or the new one, never half of it."""
    with staged(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _split(cls: type, data: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A JSON object's keys that are fields of dataclass `cls`, and the rest (kept as written)."""
    data = data if isinstance(data, dict) else {}
    names = {f.name for f in fields(cls)} - {"extra"}
    return {k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names}


# ------------------------------------------------------------------------------------------- run summary


@dataclass
class Accuracy:
    acc: float
    n: int


@dataclass
class HeldoutScore:
    """Greedy exact match on held-out instructions (eval.heldout.exact_match's result)."""

    exact_match: float
    loss: float
    n: int
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Scores:
    """Validation loss and held-out exact match at one moment (before or after training)."""

    eval_loss: float | None = None
    heldout: HeldoutScore | None = None

    @classmethod
    def from_dict(cls, data: Any) -> Scores:
        data = data if isinstance(data, dict) else {}
        heldout = data.get("heldout")
        return cls(data.get("eval_loss"), HeldoutScore(**_split(HeldoutScore, heldout)[0]) if heldout else None)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"eval_loss": self.eval_loss}
        if self.heldout is not None:
            out["heldout"] = asdict(self.heldout)
        return out


@dataclass
class TrainSummary:
    """The train stage: train.TrainResult's figures plus the scores before and after training."""

    run_dir: str = ""
    steps: int = 0
    interrupted: bool = False
    train_loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    activation_bytes_per_token: float | None = None
    velora_saved_bytes_per_token: float = 0.0
    peak_memory: MemoryStats | None = None
    seconds: float = 0.0
    before: Scores = field(default_factory=Scores)
    after: Scores = field(default_factory=Scores)
    extra: dict[str, Any] = field(default_factory=dict)  # figures this version does not know, kept as written

    @classmethod
    def from_dict(cls, data: Any) -> TrainSummary:
        known, extra = _split(cls, data)
        peak = known.pop("peak_memory", None)
        known["run_dir"] = str(known.get("run_dir", ""))
        known["before"] = Scores.from_dict(known.get("before"))
        known["after"] = Scores.from_dict(known.get("after"))
        try:
            memory = MemoryStats(**_split(MemoryStats, peak)[0]) if peak else None
        except TypeError:  # not the fields this version writes: keep it as written
            memory, extra = None, {**extra, "peak_memory": peak}
        return cls(**known, peak_memory=memory, extra=extra)

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("before", "after", "extra")}
        if self.peak_memory is not None or "peak_memory" not in self.extra:
            out["peak_memory"] = self.peak_memory.as_dict() if self.peak_memory is not None else {}
        return {**out, **self.extra, "before": self.before.as_dict(), "after": self.after.as_dict()}


@dataclass
class ExportSummary:
    path: str
    dtype: str


@dataclass
class MmluSummary:
    overall: Accuracy
    categories: dict[str, Accuracy]
    path: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MmluSummary:
        cats = {k: Accuracy(v["acc"], v["n"]) for k, v in (data.get("categories") or {}).items()}
        return cls(Accuracy(data["overall"]["acc"], data["overall"]["n"]), cats, str(data.get("path", "")))


@dataclass
class StageRecord:
    status: str = "done"
    seconds: float = 0.0


@dataclass
class RunSummary:
    """RUN_DIR/summary.json. Each completed stage fills its part; `velora runs` and the model card read it."""

    description: RunDescription | None = None  # stored flat at the top level: recipe, base_model, quantization...
    stages: dict[str, StageRecord] = field(default_factory=dict)
    train: TrainSummary | None = None
    export: ExportSummary | None = None
    mmlu: MmluSummary | None = None  # stored as eval.mmlu
    wall_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as written

    def done(self, stage: str) -> bool:
        record = self.stages.get(stage)
        return record is not None and record.status == "done"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        description_keys = {"recipe", "base_model", "quantization", "velora", "lora", "method", "memory",
                            "gradient_checkpointing"}  # fmt: skip
        own = {"stages", "train", "export", "eval", "wall_seconds"} | description_keys
        mmlu = (data.get("eval") or {}).get("mmlu")
        export = data.get("export")
        return cls(
            description=RunDescription.from_dict(data),
            stages={k: StageRecord(**_split(StageRecord, v)[0]) for k, v in (data.get("stages") or {}).items()},
            train=TrainSummary.from_dict(data["train"]) if data.get("train") else None,
            export=ExportSummary(str(export.get("path")), str(export.get("dtype"))) if export else None,
            mmlu=MmluSummary.from_dict(mmlu) if mmlu else None,
            wall_seconds=data.get("wall_seconds"),
            extra={k: v for k, v in data.items() if k not in own},
        )

    def as_dict(self) -> dict[str, Any]:
        """The JSON layout of summary.json (parts not yet run are left out)."""
        out: dict[str, Any] = self.description.as_dict() if self.description is not None else {}
        out["stages"] = {k: asdict(v) for k, v in self.stages.items()}
        if self.train is not None:
            out["train"] = self.train.as_dict()
        if self.export is not None:
            out["export"] = asdict(self.export)
        if self.mmlu is not None:
            out["eval"] = {"mmlu": asdict(self.mmlu)}
        if self.wall_seconds is not None:
            out["wall_seconds"] = self.wall_seconds
        return {**out, **self.extra}

    @classmethod
    def load(cls, run_dir: Path) -> RunSummary | None:
        """The run's summary; None when there is none yet or it cannot be read (a damaged summary must not
        block a rerun, an export or a listing)."""
        path = Path(run_dir) / SUMMARY_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_dict(data) if isinstance(data, dict) else None
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def write(self, run_dir: Path) -> None:
        write_json_atomic(Path(run_dir) / SUMMARY_FILE, self.as_dict())


def summaries(root: Path) -> list[tuple[Path, RunSummary]]:
    """Every run under `root` that has a summary, by name: what `velora runs` lists. UsageError if none."""
    found = sorted(p for p in root.glob("*") if (p / SUMMARY_FILE).is_file()) if root.is_dir() else []
    if not found:
        raise UsageError(f"no runs with {SUMMARY_FILE} under {root}/")
    return [(path, RunSummary.load(path) or RunSummary()) for path in found]


def disk_full(exc: BaseException) -> str | None:
    """The message of a no-space-left error anywhere in `exc`'s chain (torch.save and safetensors wrap it in
    RuntimeErrors of their own), else None."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if getattr(seen, "errno", None) == errno.ENOSPC or "No space left" in text or "file write failed" in text:
            return "No space left on device"
        seen = seen.__cause__ or seen.__context__
    return None
