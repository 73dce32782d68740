"""Which folders velora may write into: the ones it created, or ones that carry its marker.

A run directory gets RUN_DIR/.velora-run and an export directory .velora-export as soon as velora creates or claims
it (before any other file). Any other existing, non-empty folder (symlinks resolved: a link to a project folder is
that project folder) is refused with one line unless the user passes --force, so `--output-dir` or `export.dir`
pointing at someone's files never overwrites or deletes them. Run directories written by a velora without markers
(they hold .velora.lock, or recipe.yaml beside summary.json or metrics.jsonl) count as velora's, and so does any
folder inside a run directory (its exports).
"""

from __future__ import annotations

from pathlib import Path

from velora_cli.common.errors import UsageError

RUN_MARKER = ".velora-run"
EXPORT_MARKER = ".velora-export"
# An older velora's run directory: its lock file (every velora that wrote into a run left it), or the recipe beside
# what training wrote. A recipe.yaml alone is not enough: users keep their recipes in their own project folders.
_LEGACY_LOCK = ".velora.lock"
_LEGACY_RUN_OUTPUTS = ("summary.json", "metrics.jsonl", "trainer_state.json", "adapter_config.json")


def owned(path: Path, marker: str) -> bool:
    """`path` is a folder velora created (it carries `marker`, or is an older velora run directory)."""
    folder = Path(path).resolve()
    if (folder / marker).is_file():
        return True
    if marker == EXPORT_MARKER:  # an export inside a run directory (RUN_DIR/merged, the default) is the run's
        return owned(folder.parent, RUN_MARKER)
    if (folder / _LEGACY_LOCK).is_file():
        return True
    return (folder / "recipe.yaml").is_file() and any((folder / name).is_file() for name in _LEGACY_RUN_OUTPUTS)


def foreign(path: Path, marker: str) -> Path | None:
    """The resolved folder when `path` is an existing, non-empty folder velora does not own; else None."""
    folder = Path(path).resolve()
    if not folder.is_dir() or owned(folder, marker):
        return None
    try:
        empty = next(folder.iterdir(), None) is None
    except OSError:
        return folder  # unreadable: certainly not velora's to write into
    return None if empty else folder


def refuse_foreign(path: Path, marker: str, what: str, *, force: bool) -> None:
    """UsageError (one line, nothing written) when `path` is someone else's non-empty folder and not `force`."""
    folder = foreign(path, marker)
    if folder is None or force:
        return
    shown = f"{path} (-> {folder})" if folder != Path(path).absolute() else str(path)
    raise UsageError(f"{what} {shown}: a non-empty folder velora did not create (no {marker} in it); velora "
                     "would write over its files. Choose a new or empty folder, or pass --force")  # fmt: skip


def claim(path: Path, marker: str) -> None:
    """Create `path` if needed and mark it as velora's, before anything else is written into it."""
    folder = Path(path).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    mark = folder / marker
    if not mark.is_file():
        mark.write_text("written by velora; velora may replace the files in this folder\n", encoding="utf-8")
