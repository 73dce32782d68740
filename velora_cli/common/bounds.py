"""Bounds on what velora reads from files it did not write: input paths must be regular files (or folders of
them), files read whole have a size cap, and values quoted back in error messages are cut short.

A FIFO, a device (/dev/zero behind a symlink) or a socket given as a data path would block forever or be read until
memory runs out, so paths are checked with os.stat (symlinks followed) before anything opens them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from velora_cli.common.errors import DataError

MAX_WHOLE_FILE = 2 << 30  # files read into memory at once (a .json list, a text document); .jsonl streams
MAX_QUOTED = 200  # characters of a user's value repeated in an error message


def clip_text(text: str, limit: int = MAX_QUOTED) -> str:
    """`text`, cut to `limit` characters (a recipe value or key may be megabytes long)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def clip(value: object, limit: int = MAX_QUOTED) -> str:
    """repr(value), cut to `limit` characters."""
    return clip_text(repr(value), limit)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: Path | str, what: str = "") -> None:
    """DataError unless `path`, if it exists, is a regular file or a folder whose files are all regular
    (hidden entries such as .git included: a reader may still list them). A missing path is left to the reader."""
    path = Path(path).expanduser()
    label = f"{what} {path}" if what else str(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DataError(f"{label}: cannot read ({exc.strerror})") from None
    if stat.S_ISREG(mode):
        return
    if not stat.S_ISDIR(mode):
        raise DataError(f"{label}: is {_kind(mode)}; give a regular file")
    for root, dirs, files in os.walk(path):  # does not follow symlinked folders; their files are stat'ed below
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            entry = os.path.join(root, name)
            try:
                entry_mode = os.stat(entry).st_mode
            except OSError:
                continue  # a dangling link: readers skip what does not exist
            if not (stat.S_ISREG(entry_mode) or stat.S_ISDIR(entry_mode)):
                raise DataError(f"{label}: {entry} is {_kind(entry_mode)}; a data folder holds regular files only")


def check_readable_whole(path: Path | str, what: str = "", limit: int | None = None) -> None:
    """check_regular, plus a size cap (MAX_WHOLE_FILE) for a file that is read into memory at once."""
    limit = MAX_WHOLE_FILE if limit is None else limit
    check_regular(path, what)
    path = Path(path).expanduser()
    if path.is_file() and path.stat().st_size > limit:
        label = f"{what} {path}" if what else str(path)
        raise DataError(f"{label}: {path.stat().st_size} bytes, more than the {limit}-byte limit for a file read "
                        "whole; split it or use .jsonl (read line by line)")  # fmt: skip
