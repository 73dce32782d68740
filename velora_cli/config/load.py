"""The one place a Recipe is made: YAML in (safe, unique keys), `--set` overrides, relative paths, one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from velora_cli.common.bounds import check_regular, clip, clip_text
from velora_cli.common.errors import DataError, RecipeError, did_you_mean
from velora_cli.config.preference import PREFERENCE_METHODS
from velora_cli.config.recipe import Recipe
from velora_cli.engine.config import VeloraConfigError


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, UniqueKeyLoader.construct_mapping)


class RecipeLoader(UniqueKeyLoader):
    """UniqueKeyLoader without aliases (`*name`, `<<: *name`): a recipe has no need for them, and a few lines of
    nested aliases expand to gigabytes ("billion laughs"). Refused when composed, before anything expands."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{clip_text(str(event.anchor), 40)}) are not allowed in a recipe",
                event.start_mark,
            )  # fmt: skip
        return super().compose_node(parent, index)


MAX_RECIPE_BYTES = 1 << 20  # the shipped recipes are ~2 KiB; PyYAML parses a 50 MB file for minutes


def load_yaml(text: str) -> Any:
    """yaml.safe_load, with duplicate keys and aliases refused."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def _section_fields(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def _format_error(source: str, error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    dotted = clip_text(".".join(str(p) for p in loc))  # a key may be as long as a value
    kind = error["type"]
    if kind == "extra_forbidden":
        hint = did_you_mean(str(loc[-1]), _section_fields(loc[:-1]))
        return f"{source}: unknown field {dotted!r}{hint}"
    if kind == "missing":
        return f"{source}: missing required field {dotted!r}"
    message = error["msg"].removeprefix("Value error, ")
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, ValueError) and isinstance(cause.__cause__, VeloraConfigError):
        # The engine names its own field ("num_groups=0: ..."); put it under this section's path.
        return f"{source}: {dotted}.{cause.__cause__}"
    if "input" in error and kind not in ("model_type",) and not isinstance(error["input"], dict):
        where = f"{dotted}={clip(error['input'])}" if dotted else "recipe"
        return f"{source}: {where}: {message}"
    return f"{source}: {dotted or 'recipe'}: {message}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.learning_rate=2e-4` -> (["train", "learning_rate"], 2e-4); the value is read as YAML."""
    if "=" not in text:
        raise RecipeError(f"--set {clip(text)}: expected KEY=VALUE, e.g. --set train.learning_rate=2e-4")
    key, _, raw = text.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise RecipeError(f"--set {clip(text)}: empty key")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {clip(text)}: value is not valid YAML ({exc.problem})") from None
    return path, value


def _set(data: dict[str, Any], path: list[str], value: Any, text: str | None = None) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {clip(text or '.'.join(path))}: {clip(part)} is not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        _set(data, path, value, text)
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None, settings: dict[str, Any] | None = None) -> Recipe:
    """Read, override and validate a recipe file: the one place a Recipe is made from one (frozen from here on).

    `overrides`: `--set KEY=VALUE` texts; `settings`: values the command line sets by its own flags (`output.dir`,
    `train.max_steps`), taken as given. Relative paths are resolved beside the recipe (`_resolve_relative`).
    Raises RecipeError with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}" if not path.exists() else f"{path}: not a file")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {size} bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes (1 MiB)")
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    for key, value in (settings or {}).items():
        _set(data, key.split("."), value)
    data.setdefault("name", path.stem)
    _resolve_relative(data, path.resolve().parent)
    recipe = validate_recipe(data, source=str(path), overrides=overrides)
    _check_local_paths(data, str(path))
    return recipe


def validate_recipe(data: dict[str, Any], source: str = "recipe", overrides: list[str] | None = None) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        dotted = ".".join(str(p) for p in error["loc"])
        # A field set on the command line: say so, or the user looks for the mistake in the file.
        keys = [(o, o.partition("=")[0].strip()) for o in reversed(overrides or [])]
        setter = next((o for o, k in keys if dotted == k or dotted.startswith(k + ".")), None)
        where = f"{source} (--set {setter})" if setter and dotted else source
        raise RecipeError(_format_error(where, error)) from None


def dump_recipe(recipe: Recipe) -> str:
    # A full/pretrain recipe has no lora section (validation refuses one), so its default is left out; likewise
    # the preference section, which only preference methods accept.
    exclude = {"lora"} if recipe.full else set()
    if recipe.method not in PREFERENCE_METHODS:
        exclude.add("preference")
    data = recipe.model_dump(mode="json", exclude=exclude or None)
    if recipe.model.adapter is None:  # recipes that start a fresh adapter read as they did before the field
        del data["model"]["adapter"]
    return yaml.safe_dump(data, sort_keys=False)


# Fields that name local files or folders: read beside the recipe file when they exist there.
PATH_FIELDS = (("data", "path"), ("data", "val_path"), ("model", "config"), ("model", "adapter"),
               ("eval", "perplexity", "path"), ("eval", "heldout", "path"), ("eval", "mmlu", "data_dir"))  # fmt: skip


def _resolve_relative(data: dict[str, Any], base: Path) -> None:
    """Relative paths are read beside the recipe file when they exist there (else as given: CWD or hub)."""
    for *sections, key in PATH_FIELDS:
        node = data
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute() and (base / value).exists():
            node[key] = str((base / value).resolve())


def _check_local_paths(data: dict[str, Any], source: str) -> None:
    """Local files a recipe names must be regular files or folders of them: a FIFO or a device blocks or never
    ends. Checked when the recipe is read, before any command opens one (a missing path is the readers' to name)."""
    for *sections, key in PATH_FIELDS:
        node = data
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not any(ch in value for ch in "*?["):
            try:
                check_regular(value)
            except DataError as exc:
                raise DataError(f"{source}: {'.'.join((*sections, key))}: {exc}") from None
