"""Everything velora prints as a table or panel: the live training display and every report table.

Owns presentation only - it formats what other modules loaded or computed and never loads or computes itself:
the training panel (below), the finetune plan, dry run, before/after and run-summary tables, the `velora runs`
listing, the MMLU results and the memory-estimate tables.

Training display. On a terminal: a panel with step/total, epoch, loss and a sparkline of recent losses, learning
rate, grad norm, tokens/s, samples/s, ETA, memory and the activation bytes VeLoRA saves. Without a TTY (CI,
`nohup`, a pipe): one plain log line per logging step, so logs stay greppable.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from velora_cli.common.memstats import human_bytes
from velora_cli.rundir.summary import RunSummary, Scores

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 24) -> str:
    values = values[-width:]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - low) / span * (len(SPARK) - 1)))] for v in values)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def human_duration(seconds: float) -> str:
    """1811.5 -> '30 min 12 s'; 42.3 -> '42.3 s'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s"


class TrainingDisplay:
    """Renders training records; `update` is called on every logging step, `tick` on every optimizer step."""

    def __init__(self, title: str, total_steps: int, notes: dict[str, str], console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.title = title
        self.total_steps = total_steps
        self.notes = notes  # static facts: model, quantisation, VeLoRA layers and saving
        self.losses: list[float] = []
        self.last: dict[str, Any] = {}
        self.step = 0
        self.started = time.monotonic()
        self.live: Live | None = None
        self._printed_notes: dict[str, str] | None = None  # the notes as the plain log's first line gave them

    @property
    def interactive(self) -> bool:
        return self.console.is_terminal

    def start(self) -> None:
        self.started = time.monotonic()
        if self.interactive:
            # get_renderable: the panel is drawn afresh on every refresh, so the clock runs during a long step
            self.live = Live(console=self.console, refresh_per_second=4, transient=False, get_renderable=self._render)
            self.live.start()
        else:
            self._printed_notes = dict(self.notes)
            facts = ", ".join(f"{k}={v}" for k, v in self.notes.items())
            self.console.print(
                f"[train] {self.title}: {self.total_steps} steps; {facts}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )

    def stop(self) -> None:
        if self.live is not None:
            self.live.refresh()
            self.live.stop()
            self.live = None
        elif self._printed_notes is not None:  # a fact measured during training (VeLoRA's saving): its final figure
            changed = {k: v for k, v in self.notes.items() if self._printed_notes.get(k) != v}
            if changed:
                facts = ", ".join(f"{k}={v}" for k, v in changed.items())
                self.console.print(f"[train] {self.title}: {facts}", highlight=False, markup=False, soft_wrap=True)

    def tick(self, step: int) -> None:
        self.step = step
        if self.live is not None:
            self.live.refresh()

    def update(self, record: dict[str, Any]) -> None:
        # Merged, not replaced: the Trainer's closing record (runtime, no loss) must not blank lr, grad norm, speed.
        self.last = {**self.last, **{k: v for k, v in record.items() if v is not None}}
        self.step = record.get("step", self.step)
        if "loss" in record:
            self.losses.append(record["loss"])
        if self.live is not None:
            self.live.refresh()
        elif "loss" in record or "eval_loss" in record:  # not the Trainer's closing record: it repeats the last step
            self.console.print(plain_line(record, self.total_steps), highlight=False, markup=False, soft_wrap=True)

    def _eta(self) -> str:
        if self.step <= 0:
            return "-"
        elapsed = time.monotonic() - self.started
        return format_duration(elapsed / self.step * (self.total_steps - self.step))

    def _render(self) -> Panel:
        r = self.last
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", justify="right")
        table.add_column()
        pct = 100 * self.step / max(1, self.total_steps)
        table.add_row("step", f"{self.step}/{self.total_steps} ({pct:.0f}%)   epoch {r.get('epoch', 0):.2f}"
                      + ("   (step 1 running)" if self.step == 0 else ""))  # fmt: skip
        if self.losses:
            table.add_row("loss", f"{self.losses[-1]:.4f}  {sparkline(self.losses)}")
        if "eval_loss" in r:
            table.add_row("eval loss", f"{r['eval_loss']:.4f}")
        if r.get("reward_accuracy") is not None:  # DPO: chosen above rejected, and by how much (TRL's rewards)
            table.add_row("rewards", f"accuracy {r['reward_accuracy']:.0%}   margin {r.get('reward_margin') or 0:.3f}")
        if "learning_rate" in r:
            table.add_row("lr", f"{r['learning_rate']:.2e}   grad norm {r.get('grad_norm', float('nan')):.3f}")
        elapsed = time.monotonic() - self.started
        if "tokens_per_second" in r:
            speed = f"{r['tokens_per_second']:.0f} tok/s"
            if "trained_tokens_per_second" in r:  # the loss-bearing ones: no prompt, no padding
                speed += f" ({r['trained_tokens_per_second']:.0f} trained)"
            table.add_row("speed", f"{speed}   {r.get('samples_per_second', 0):.2f} samples/s")
        elif self.step > 0:  # before the first logging step: what the clock says
            table.add_row("speed", f"{elapsed / self.step:.1f} s/step")
        table.add_row("time", f"{format_duration(elapsed)} elapsed, ETA {self._eta()}")
        if "memory" in r:
            table.add_row("memory", r["memory"])
        for key, value in self.notes.items():
            table.add_row(key, value)
        return Panel(table, title=f"velora finetune: {self.title}", border_style="green")


def plain_line(record: dict[str, Any], total_steps: int) -> str:
    parts = [f"step {record.get('step', 0)}/{total_steps}"]
    for key, fmt in (
        ("epoch", "epoch {:.2f}"),
        ("loss", "loss {:.4f}"),
        ("eval_loss", "eval_loss {:.4f}"),
        ("reward_accuracy", "reward_acc {:.2f}"),
        ("reward_margin", "margin {:.3f}"),
        ("learning_rate", "lr {:.2e}"),
        ("grad_norm", "grad_norm {:.3f}"),
        ("tokens_per_second", "{:.0f} tok/s"),
        ("trained_tokens_per_second", "{:.0f} trained tok/s"),
        ("samples_per_second", "{:.2f} samples/s"),
    ):
        if key in record and record[key] is not None:
            parts.append(fmt.format(record[key]))
    if "memory" in record:
        parts.append(record["memory"])
    return "[train] " + " | ".join(parts)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, fmt: str = "{:.4f}") -> str:
    return "-" if value is None else fmt.format(value)


def print_plan(lines: list[tuple[str, str]], out: Console) -> None:
    table = Table(title="plan", show_header=False, title_justify="left")
    for key, value in lines:
        table.add_row(key, value)
    out.print(table)


def print_dry_run(name: str | None, rows: list[tuple[str, str]], out: Console, complete: bool = True) -> None:
    table = Table(title=f"dry run: {name}", show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)
    if complete:
        out.print("[green]recipe is valid; nothing was trained or written[/]")
    else:
        out.print("[yellow]recipe fields are valid; data and shapes were not checked (offline); nothing was "
                  "trained or written[/]")  # fmt: skip


def print_before_after(before: Scores, after: Scores, out: Console) -> None:
    table = Table(title="before / after training", title_justify="left")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    if before.eval_loss is not None or after.eval_loss is not None:  # no validation set: no row of dashes
        table.add_row("eval loss", _num(before.eval_loss), _num(after.eval_loss))
    if after.heldout is not None:
        n, earlier = after.heldout.n, before.heldout
        table.add_row(
            f"held-out answer loss (n={n})", _num(earlier.loss if earlier else None), _num(after.heldout.loss)
        )
        table.add_row(
            f"held-out exact match (n={n})",
            _pct(earlier.exact_match if earlier else None),
            _pct(after.heldout.exact_match),
        )
    if after.pairs is not None:  # DPO's held-out pairs
        n, earlier = after.pairs.n, before.pairs
        for label, key, show in (("pair accuracy", "pair_accuracy", _pct), ("reward accuracy", "reward_accuracy", _pct),
                                 ("reward margin", "reward_margin", _num)):  # fmt: skip
            table.add_row(f"held-out {label} (n={n})", show(getattr(earlier, key) if earlier else None),
                          show(getattr(after.pairs, key)))  # fmt: skip
    if table.row_count:
        out.print(table)


def print_summary(summary: RunSummary, out: Console) -> None:
    d = summary.description
    table = Table(title=f"run summary: {d.recipe if d else None}", show_header=False, title_justify="left")
    if d is not None:
        table.add_row("base model", d.model_text)
        table.add_row("VeLoRA", d.velora.text())
    train = summary.train
    if train is not None:
        table.add_row("steps", str(train.steps))
        table.add_row("train / eval loss", f"{_num(train.train_loss)} / {_num(train.eval_loss)}")
        table.add_row("tokens/s", _num(train.tokens_per_second, "{:.0f}"))
        peak = train.peak_memory
        kind = "CUDA peak" if peak is not None and peak.device.startswith("cuda") else "peak RSS"
        table.add_row("peak memory", f"{human_bytes(peak.peak if peak else 0)} ({kind})")
        if train.activation_bytes_per_token:
            table.add_row("activations saved for backward", f"{human_bytes(train.activation_bytes_per_token)}/token")
        if train.velora_saved_bytes_per_token:
            table.add_row("VeLoRA saving", f"{human_bytes(train.velora_saved_bytes_per_token)}/token")
        if train.after.heldout is not None:
            before = train.before.heldout.exact_match if train.before.heldout else None
            table.add_row("held-out exact match", f"{_pct(before)} -> {_pct(train.after.heldout.exact_match)}")
    if summary.mmlu is not None:
        m = summary.mmlu
        cats = ", ".join(f"{k} {_pct(v.acc)}" for k, v in m.categories.items())
        table.add_row("MMLU", f"{_pct(m.overall.acc)} (n={m.overall.n}); {cats}")
    if summary.export is not None:
        table.add_row("merged export", summary.export.path)
    for stage, info in summary.stages.items():
        table.add_row(f"{stage} time", human_duration(info.seconds))
    out.print(table)


def list_runs(root: Path, as_json: bool = False) -> None:
    """`velora runs`: every run under `root` with a summary, side by side (a table, or JSON: one object per run).
    It reads JSON files only, so nothing here (or imported above) loads torch: it answers in about a second."""
    from velora_cli.rundir.summary import summaries

    found = summaries(root)
    if as_json:
        print(json.dumps([{"run": str(path), **s.as_dict()} for path, s in found], indent=2))
    else:
        print_runs(root, found)


def print_runs(root: Path, runs: list[tuple[Path, RunSummary]]) -> None:
    """The paper's Table 3 layout: method, MMLU, memory - one row per run."""
    table = Table(title=f"runs in {root}")
    for column in ("run", "base", "method", "steps", "eval loss", "MMLU", "peak memory", "act./token", "tok/s"):
        table.add_column(column, justify="left" if column in ("run", "base", "method") else "right")
    notes = []
    for path, s in runs:
        try:
            table.add_row(*_run_row(path, s))
        except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a summary.json with wrong types
            notes.append(f"note: skipped {path / 'summary.json'}: damaged ({type(exc).__name__}: {str(exc)[:120]})")
    # Off a terminal rich would wrap at 80 columns; a listing meant for logs and pipes stays one row per run.
    Console(width=None if sys.stdout.isatty() else 220).print(table)
    for note in notes:
        print(note, file=sys.stderr)


def _run_row(path: Path, s: RunSummary) -> list[str]:
    d, train = s.description, s.train
    peak = train.peak_memory.peak if train is not None and train.peak_memory is not None else None
    act = train.activation_bytes_per_token if train is not None else None
    return [  # names and texts from the file are shown as they are, never read as rich markup
        escape(path.name),
        escape(str(d.base_text)) if d is not None else "-",
        escape(str(d.method)) if d is not None else "-",
        str(int(train.steps)) if train is not None else "-",
        _num(train.eval_loss if train is not None else None),
        _pct(s.mmlu.overall.acc if s.mmlu is not None else None),
        human_bytes(peak) if peak else "-",
        human_bytes(act) if act else "-",
        _num(train.tokens_per_second if train is not None else None, "{:.0f}"),
    ]
