"""The recipes shipped in the checkout's recipes/ folder: `velora recipes` lists them, `velora recipes copy` copies
one to edit (as torchtune's `tune ls` / `tune cp` do).

A shipped recipe reads its data beside itself (`path: data/...`); a copy elsewhere would lose those files, so the
copy points every such relative path that exists beside the original at its absolute location, comments kept.
"""

from __future__ import annotations

import re
from pathlib import Path

from velora_cli.common.errors import UsageError, did_you_mean
from velora_cli.common.fs import write_text_atomic

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# `key: value` lines whose value is a file or folder the recipe reads relative to itself
_PATH_LINE = re.compile(r"^(\s*(?:path|config|data_dir|tokenizer):\s*)([^\s#]+)(.*)$")


def shipped() -> dict[str, Path]:
    if not RECIPES.is_dir():
        raise UsageError(f"the shipped recipes are not here ({RECIPES}): velora was installed without its checkout")
    return {p.stem: p for p in sorted(RECIPES.glob("*.yaml"))}


def summary_line(path: Path, width: int = 96) -> str:
    """The recipe's header comment, first sentence, cut to `width`."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text:
            break
        header.append(text)
    sentence = re.split(r"(?<=\.)\s", " ".join(header), maxsplit=1)[0]
    return sentence if len(sentence) <= width else sentence[: width - 3].rstrip(" ,;") + "..."


def list_recipes() -> list[tuple[str, str]]:
    return [(name, summary_line(path)) for name, path in shipped().items()]


def print_recipes() -> None:
    rows = list_recipes()
    width = max(len(name) for name, _ in rows)
    for name, line in rows:
        print(f"{name:<{width}}  {line}")
    print(f"\ncopy one to edit: velora recipes copy NAME [DEST]   (from {RECIPES})")


def copy_recipe(name: str, dest: Path | None = None) -> Path:
    """Copy shipped recipe `name` to `dest` (a file, or a folder to hold NAME.yaml; default ./NAME.yaml)."""
    recipes = shipped()
    source = recipes.get(name.removesuffix(".yaml"))
    if source is None:
        raise UsageError(f"no shipped recipe {name!r}{did_you_mean(name, recipes)}; `velora recipes` lists them")
    target = dest if dest is not None else Path(f"{source.stem}.yaml")
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise UsageError(f"{target} exists; give another DEST or remove it first")
    lines = []
    for line in source.read_text().splitlines(keepends=True):
        match = _PATH_LINE.match(line.rstrip("\n"))
        if match and not Path(match[2]).is_absolute() and (source.parent / match[2]).exists():
            line = f"{match[1]}{(source.parent / match[2]).resolve()}{match[3]}\n"
        lines.append(line)
    write_text_atomic(target, "".join(lines))
    print(f"copied {source.stem} to {target}; edit it, then: velora finetune {target}")
    return target
