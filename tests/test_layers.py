"""The package reads top-down: no module imports from a layer above its own, and no imports form a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "mrdiff"

LAYERS = [  # lowest first; a module may import its own layer and those below
    ["console", "utils", "seeding", "resolution", "grids"],
    ["nn", "diffusion", "metrics", "loggers"],
    ["data", "checkpoint", "nonfinite", "pipeline", "baselines", "noiseshift", "runlock"],
    ["exported", "module"],
    ["evaluation"],
    ["callbacks", "evidence", "bench"],
    ["rundir", "trainer", "cli", "manifest", "__main__"],
]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def imports() -> dict[str, set[str]]:
    """mrdiff module → the mrdiff modules it imports (anywhere in the file, function bodies included)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mrdiff"):
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name.startswith("mrdiff")]
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__main__"
    return LAYER[top]


def test_every_module_has_a_layer():
    assert all(isinstance(layer(m), int) for m in imports())


def test_no_module_imports_from_a_layer_above():
    upward = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
              for m, targets in imports().items() for t in targets if layer(t) > layer(m)]
    assert not upward, upward


def test_nothing_outside_callbacks_and_the_commands_imports_callbacks():
    users = {m for m, targets in imports().items() for t in targets if t.startswith("mrdiff.callbacks")}
    assert {m for m in users if not m.startswith("mrdiff.callbacks")} <= {"mrdiff.trainer", "mrdiff.cli"}


def test_the_import_graph_has_no_cycle():
    graph, state, cycles = imports(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in graph[node]:
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


@pytest.mark.parametrize("limit", [350])
def test_no_file_of_the_package_is_over_the_limit(limit):
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > limit}
    assert not long, long
