"""One velora process per run directory: an exclusive lock held while a command writes into (or reads) a run.

The lock is the `filelock` package's FileLock on RUN_DIR/.velora.lock: an OS-level flock, which the kernel drops
when its process dies however it dies (kill -9 included), so there is never a stale lock to clean up by hand.
The holder's pid goes into RUN_DIR/.velora.pid (a separate file: the lock file's own content is the library's
business), so a second process stops at once, without waiting, with one line naming it. Locks are re-entrant
within a process: `finetune` holds its run's lock while its export and eval stages take it again. Under
torchrun, rank 0 holds it for the whole launch (the other ranks are its helpers; if rank 0 stops, torchrun stops
them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from velora_cli.common.errors import VeloraError

LOCK_FILE = ".velora.lock"
PID_FILE = ".velora.pid"


class RunLocked(VeloraError):
    """Another velora process holds the run directory."""


_held: dict[Path, int] = {}  # resolved run dir -> nesting depth in this process


def holder(run_dir: Path) -> str:
    try:
        return (Path(run_dir) / PID_FILE).read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def run_lock(run_dir: Path, command: str = "velora") -> Iterator[None]:
    """Hold RUN_DIR's lock for the block (creating RUN_DIR); RunLocked at once if another process holds it."""
    key = Path(run_dir).resolve()
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    key.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(key / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunLocked(
            f"{run_dir}: in use by another velora process (pid {holder(key)}); wait for it to finish or stop it"
        ) from None
    _held[key] = 1
    pid_file = key / PID_FILE
    try:
        pid_file.write_text(f"{os.getpid()}\n", encoding="utf-8")
        yield
    finally:
        del _held[key]
        pid_file.unlink(missing_ok=True)
        lock.release()
