"""The layout shows the data flow: no import cycles, layers import only downwards."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "datamodules", "lightning_modules", "sweeps")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Project module → the project modules it imports, at any depth of its code (imports
    inside functions count: they are cycles all the same, only deferred)."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _packages_below(package_imports: set[str]) -> set[str]:
    return {m.split(".")[0] for m in package_imports}


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_layers_import_downwards():
    """common ← datamodules ← lightning_modules ← sweeps; the probes are imported by nothing
    but the command line."""
    graph = import_graph()
    allowed = {
        "common": {"common"},
        "datamodules": {"common", "datamodules"},
        "lightning_modules": {"common", "datamodules", "lightning_modules", "sweeps"},
        "sweeps": {"common", "sweeps"},
    }
    for name, targets in graph.items():
        wrong = _packages_below(targets) - allowed[name.split(".")[0]]
        assert not wrong, f"{name} imports {sorted(t for t in targets if t.split('.')[0] in wrong)}"
    for name, targets in graph.items():
        probes = {t for t in targets if t.startswith("lightning_modules.probes")}
        if probes and not name.startswith(("lightning_modules.probes", "lightning_modules.cli")):
            raise AssertionError(f"{name} imports the probes {sorted(probes)}")
