"""The package's shape: no import cycle between velora_cli modules, no module over 500 lines, and an engine
(velora_cli.engine) that imports nothing else of velora_cli."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "velora_cli"
MAX_LINES = 400
MAX_TOP_LEVEL_MODULES = 5
# Each sub-package's floor: a module imports only from its own package or from packages on lower floors.
LAYERS = {
    "engine": 0, "common": 0,
    "config": 1,
    "models": 2, "rundir": 2,
    "data": 3,
    "memory": 4, "eval": 4, "export": 4, "infer": 4,
    "finetune": 5,
}  # fmt: skip
TOP = 6  # velora_cli/*.py: the command line, and the old engine path velora_cli.velora that re-exports the engine


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(module: str, path: Path) -> set[str]:
    """velora_cli modules `module` imports anywhere in its file: at module level, inside functions, under
    TYPE_CHECKING. `from velora_cli import x` counts as importing velora_cli.x when x is a module, and
    importing a submodule counts as importing the packages above it."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            # The nearest enclosing module of a dotted name (velora_cli.engine.config.X -> velora_cli.engine.config).
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            # Importing velora_cli.a.b runs velora_cli/a/__init__.py first: the parent packages are imported too,
            # except the module's own ancestors, which Python has already begun importing before the module.
            while name and name != module and name != "velora_cli":
                if not module.startswith(name + "."):
                    found.add(name)
                name = name.rpartition(".")[0]
    return found


GRAPH = {module: _imported(module, path) for module, path in MODULES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (depth-first search for a back edge), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_graph_sees_imports_of_every_kind() -> None:
    """The checker itself: module-level, function-local and `from velora_cli import module` imports are edges."""
    assert "velora_cli.common.errors" in GRAPH["velora_cli.cli"]  # module level
    assert "velora_cli.finetune.pipeline" in GRAPH["velora_cli.cli"]  # inside a command function
    assert "velora_cli.finetune.display" in GRAPH["velora_cli.finetune.pipeline"]  # from velora_cli import report
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle() -> None:
    cycle = _cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle)


def _floor(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 2 or parts[-1] in LAYERS else TOP


def test_every_package_has_a_floor() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} - {"velora"}
    assert packages == set(LAYERS)


def test_imports_only_go_down() -> None:
    upward = [f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps
              if d.split(".")[1] != m.split(".")[1] and _floor(m) < TOP and _floor(d) >= _floor(m)]  # fmt: skip
    assert upward == []


def test_at_most_five_modules_at_the_top() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


@pytest.mark.parametrize("module", list(MODULES))
def test_no_module_over_400_lines(module: str) -> None:
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]}: {lines} lines"


def test_common_imports_nothing_above_it() -> None:
    assert {d for m, deps in GRAPH.items() if m.startswith("velora_cli.common") for d in deps
            if not d.startswith("velora_cli.common")} == set()  # fmt: skip


@pytest.mark.slow
def test_engine_imports_nothing_else_of_velora_cli() -> None:
    code = "import velora_cli.engine, sys; print(sorted(m for m in sys.modules if m.startswith('velora_cli')))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, cwd=PACKAGE.parent
    )
    loaded = ast.literal_eval(result.stdout.strip())
    assert [m for m in loaded if m != "velora_cli" and not m.startswith("velora_cli.engine")] == []
