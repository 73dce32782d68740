"""summary.json: the typed record of a run (training, export, MMLU, held-out scores) and the run listing."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from velora_cli.common.errors import UsageError
from velora_cli.common.fs import write_json_atomic
from velora_cli.common.memstats import MemoryStats
from velora_cli.config.description import RunDescription
from velora_cli.rundir.layout import SUMMARY_FILE


def _split(cls: type, data: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A JSON object's keys that are fields of dataclass `cls`, and the rest (kept as written)."""
    data = data if isinstance(data, dict) else {}
    names = {f.name for f in fields(cls)} - {"extra"}
    return {k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names}


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
class PairScore:
    """Held-out preference pairs (method dpo): pair accuracy, and DPO's implicit reward accuracy / mean margin
    against the reference (0 before training, when the model is the reference)."""

    n: int
    pair_accuracy: float  # log p(chosen) > log p(rejected) under the model
    reward_accuracy: float  # beta * (policy - reference) log-ratio of chosen above rejected's
    reward_margin: float  # mean of chosen minus rejected reward


@dataclass
class Scores:
    """Validation loss and held-out exact match (or, for DPO, held-out pairs) at one moment (before or after
    training)."""

    eval_loss: float | None = None
    heldout: HeldoutScore | None = None
    pairs: PairScore | None = None

    @classmethod
    def from_dict(cls, data: Any) -> Scores:
        data = data if isinstance(data, dict) else {}
        heldout, pairs = data.get("heldout"), data.get("pairs")
        return cls(data.get("eval_loss"), HeldoutScore(**_split(HeldoutScore, heldout)[0]) if heldout else None,
                   PairScore(**_split(PairScore, pairs)[0]) if pairs else None)  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"eval_loss": self.eval_loss}
        if self.heldout is not None:
            out["heldout"] = asdict(self.heldout)
        if self.pairs is not None:
            out["pairs"] = asdict(self.pairs)
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
            if not path.is_file() or path.stat().st_size > MAX_SUMMARY_BYTES:  # a FIFO, a device, a huge file
                return None
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_dict(data) if isinstance(data, dict) else None
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None

    def write(self, run_dir: Path) -> None:
        write_json_atomic(Path(run_dir) / SUMMARY_FILE, self.as_dict())


MAX_SUMMARY_BYTES = 16 << 20  # velora writes a few KiB


def summaries(root: Path) -> list[tuple[Path, RunSummary]]:
    """Every run under `root` that has a summary, by name: what `velora runs` lists. UsageError if none."""
    found = sorted(p for p in root.glob("*") if (p / SUMMARY_FILE).is_file()) if root.is_dir() else []
    if not found:
        raise UsageError(f"no runs with {SUMMARY_FILE} under {root}/")
    return [(path, RunSummary.load(path) or RunSummary()) for path in found]
