"""Safe file writes: staged (temporary path + rename) writes, leftovers of killed writes, writability and disk-space
checks, and the one-line OS error messages."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from velora_cli.common.errors import UsageError, VeloraError

MIN_FREE_BYTES = 1 << 20  # below this a run cannot even write its summary


class OutputError(VeloraError):
    """An output location cannot be written (a file in the way, read-only, full): exit 1."""


def _existing_ancestor(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_writable(path: Path, what: str, *, directory: bool) -> None:
    """OutputError unless `path` (a directory or a file to be) can be created or replaced where it is."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        raise OutputError(f"{what} {path}: exists and is {'a file' if directory else 'a directory'}")
    base = path if path.is_dir() else _existing_ancestor(path.parent)
    if not base.is_dir():
        raise OutputError(f"{what} {path}: {base} is a file, not a directory")
    try:  # os.access is no use here: root passes it on a read-only file system
        fd, probe = tempfile.mkstemp(prefix=".velora-write-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{what} {path}: cannot write in {base} ({exc.strerror})") from None
    if shutil.disk_usage(base).free < MIN_FREE_BYTES:
        raise OutputError(f"{what} {path}: no space left on the device holding {base}")


def os_error_line(exc: OSError) -> str:
    """One line for a file-system error the checks could not foresee (the disk filled up during the run)."""
    where = exc.filename or ""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason += "; free space and run the same command again"
    return f"{where}: {reason}" if where else reason


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
    follow_umask(tmp)
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
            remove(old)  # a symlink (--out pointing elsewhere) is unlinked; what it pointed to is left alone
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give a tempfile-made file (0600) or folder (0700) the mode an ordinary open()/mkdir() would: a server
    running as another user must be able to read what an export wrote, as it can read files the user copies."""
    mode = 0o777 if path.is_dir() else 0o666
    path.chmod(mode & ~umask())


def staged_dir(target: Path) -> Any:
    """`staged(target, directory=True)`: build a directory in full, then put it in place in one rename."""
    return staged(target, directory=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` so that readers see the old file or the new one, never half of it."""
    with staged(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


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
