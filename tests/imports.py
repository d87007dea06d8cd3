"""The package's import graph, read from its source (every import, lazy ones included): the layout
test checks it for circles, and the export cache keys exports on the export code's import closure."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clip_triton"


def modules() -> dict[str, tuple[Path, ast.Module]]:
    """Module name -> (its file, its parsed source)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = (path, ast.parse(path.read_text()))
    return found


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in its body (lazy and TYPE_CHECKING
    imports included: a circle through a function is still a circle)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, (path, tree) in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                while target and target not in mods and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in mods and target != name and not name.startswith(target + "."):
                    deps.add(target)
        graph[name] = deps
    return graph


def closure(module: str, graph: dict[str, set[str]] | None = None) -> set[str]:
    """``module`` and every module of the package it imports, directly or not."""
    graph = graph if graph is not None else import_graph()  # parsed once per session
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(graph.get(current, ()))
        parent = current.rsplit(".", 1)[0]  # importing a module runs its packages' __init__ too
        if "." in current and parent not in seen:
            todo.append(parent)
    return seen


def source_file(module: str) -> Path:
    """The file a module of the package is read from."""
    base = ROOT / module.replace(".", "/")
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
