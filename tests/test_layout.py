"""The house: folders are their import paths, nothing imports in a circle, each layer imports only
the layers below it, and the contract reads without knowing open_clip."""

from __future__ import annotations

import ast
import tomllib

from .helpers import ROOT
from .imports import PACKAGE, import_graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_another_in_a_circle():
    assert cycles(import_graph()) == []


def test_the_cycle_check_can_fail():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_folders_are_their_import_paths():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    assert "package-dir" not in setuptools and setuptools["packages"]["find"]["include"] == ["clip_triton*"]
    for folder in ("export", "client"):  # the entry points the user asked for: docs, no code
        assert (ROOT / folder / "README.md").is_file()
        assert not list((ROOT / folder).rglob("*.py")), f"{folder}/ holds code: it belongs in clip_triton/{folder}/"
    for package in [p for p in PACKAGE.rglob("*") if p.is_dir() and list(p.glob("*.py"))]:
        assert (package / "__init__.py").is_file(), package


def test_layers_import_only_what_is_below_them():
    """contract <- client; contract <- gateway <- client; cli over everything; nothing imports the CLI,
    the gateway or export from the client, and the contract imports nothing but errors."""
    graph = import_graph()

    def within(module: str, *packages: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in packages)

    below = {
        "clip_triton.contract": {"clip_triton.errors"},
        "clip_triton.facts": {"clip_triton.errors", "clip_triton.contract"},
    }
    for module, allowed in below.items():
        assert graph[module] <= allowed | {"clip_triton"}, (module, graph[module])
    for module, deps in graph.items():
        if within(module, "clip_triton.client"):
            forbidden = [d for d in deps if within(d, "clip_triton.cli", "clip_triton.gateway", "clip_triton.export")]
            assert not forbidden, (module, forbidden)
        if not within(module, "clip_triton.cli"):
            assert not [d for d in deps if within(d, "clip_triton.cli")], module
    contract = (PACKAGE / "contract.py").read_text()
    assert "open_clip" not in {n.names[0].name for n in ast.walk(ast.parse(contract)) if isinstance(n, ast.Import)}
    assert "import open_clip" not in contract and "import torch" not in contract


def test_the_client_errors_are_its_bottom_layer():
    graph = import_graph()
    assert {d for d in graph["clip_triton.client.errors"] if d.startswith("clip_triton.client")} == set()
    assert "clip_triton.client.grpc_client" not in graph["clip_triton.client.index"]


def test_every_import_of_the_package_resolves():
    """Every `from clip_triton... import name` in the package, the benchmarks and the tests, lazy ones
    inside functions included, names something that exists: a module moved by a refactor cannot
    leave an import behind that only a benchmark's or a GPU host's code path would hit."""
    import importlib

    problems = []
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "tests").glob("*.py")]
    for path in files:
        tree = ast.parse(path.read_text())
        in_package = PACKAGE in path.parents
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1]) if in_package else ""
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level and in_package:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            elif not node.level and (node.module or "").startswith("clip_triton"):
                base = node.module
            else:
                continue
            try:
                module = importlib.import_module(base)
            except ImportError as exc:
                if exc.name and not exc.name.startswith("clip_triton"):
                    continue  # an optional dependency absent here (tensorrt), not a broken path
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {base}: {exc}")
                continue
            for alias in node.names:
                if alias.name != "*" and not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{base}.{alias.name}")
                    except ImportError:
                        problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {base} has no {alias.name}")
    assert not problems, "\n".join(problems)


def test_the_serving_install_brings_the_default_cpu_runtime():
    """`pip install clip-triton[serve]` gets OpenVINO, so `--cpu-runtime auto` serves the fp32 IR: the
    CPU stack ahead of every peer server in docs/benchmarks.md. Without it a serving host fell back to
    ONNX Runtime, whose fp32 16-image rows only tie a one-process PyTorch server. The version is the one
    the `cpu` extra asks for, and the constraints pin it."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    serve = [r for r in extras["serve"] if r.startswith("openvino")]
    assert serve and serve == [r for r in extras["cpu"] if r.startswith("openvino")]
    pins = (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
    assert any(line.startswith("openvino==") for line in pins)
