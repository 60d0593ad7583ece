"""The layering of docs/architecture.md, checked on the source: the headless core never imports
Qt or napari, nothing imports upwards into the front ends, and no two modules import each other
through any chain (function-level imports count: they are edges too)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "napari_bci"
FRONT_END = {"widgets", "_npe2.py"}
CORE = [p for p in PKG.rglob("*.py") if p.relative_to(PKG).parts[0] not in FRONT_END]
GUI_ROOTS = {"napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["napari_bci", *parts])


def _imports(path: Path) -> list[tuple[str, int]]:
    """``(absolute module name, line)`` of every import in ``path``, relative ones resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
            # `from . import batch` imports the submodule batch
            out += [(f"{mod}.{a.name}", node.lineno) for a in node.names]
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps = set()
        for imp, _ in _imports(path):
            if imp in files and imp != mod:
                deps.add(imp)
        graph[mod] = deps
    return graph


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(PKG)))
def test_core_module_has_no_gui_imports(path):
    for name, line in _imports(path):
        assert name.split(".")[0] not in GUI_ROOTS, f"{path.relative_to(PKG)}:{line} imports {name}"


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(PKG)))
def test_core_module_does_not_import_the_front_ends(path):
    for name, line in _imports(path):
        assert not name.startswith(("napari_bci.widgets", "napari_bci._npe2")), \
            f"{path.relative_to(PKG)}:{line} imports the front end {name}"


def test_the_import_graph_has_no_cycle():
    """Package ``__init__`` modules are skipped as nodes: importing ``a.b`` runs ``a/__init__``,
    but that is not a dependency of ``a.b`` on its siblings."""
    graph = _graph()
    inits = {m for m in graph if (PKG / Path(*m.split(".")[1:]) / "__init__.py").exists()}
    graph = {m: {d for d in deps if d not in inits} for m, deps in graph.items() if m not in inits}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_graph_walk_sees_function_level_imports():
    """The cycle check is only as good as its edges: a function-level relative import is one."""
    graph = _graph()
    assert "napari_bci.generate.tiles" in graph["napari_bci.generate.batch"]
    assert "napari_bci.models.registry" in graph["napari_bci.generate._cli"]
