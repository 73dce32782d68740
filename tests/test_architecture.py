"""The package's shape: no import cycle between velora_cli modules, no module over 500 lines, and an engine
(velora_cli.velora) that imports nothing else of velora_cli."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "velora_cli"
MAX_LINES = 500


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
            # The nearest enclosing module of a dotted name (velora_cli.velora.config.X -> velora_cli.velora.config).
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
    assert "velora_cli.errors" in GRAPH["velora_cli.cli"]  # module level
    assert "velora_cli.pipeline" in GRAPH["velora_cli.cli"]  # inside a command function
    assert "velora_cli.report" in GRAPH["velora_cli.pipeline"]  # from velora_cli import report
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle() -> None:
    cycle = _cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("module", list(MODULES))
def test_no_module_over_500_lines(module: str) -> None:
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]}: {lines} lines"


def test_engine_imports_nothing_else_of_velora_cli() -> None:
    code = "import velora_cli.velora, sys; print(sorted(m for m in sys.modules if m.startswith('velora_cli')))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, cwd=PACKAGE.parent
    )
    loaded = ast.literal_eval(result.stdout.strip())
    assert [m for m in loaded if m != "velora_cli" and not m.startswith("velora_cli.velora")] == []
