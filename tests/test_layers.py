"""The package's import graph, read from the source with `ast`: no circles, and no import that
goes up a layer of docs/architecture.md's table unless the page lists it as an exception.

Every import counts, at module level, inside functions and under TYPE_CHECKING alike: a reader
follows all of them. The layer table and the exceptions are parsed from the page, so the map a
newcomer reads and the rule the suite checks cannot drift apart.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PAGE = ROOT / "docs" / "architecture.md"
PACKAGE = "chargpt"


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its `__init__`)."""
    found = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    stem = node.module or ""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        stem = ".".join(base + ([node.module] if node.module else []))
    return [f"{stem}.{a.name}" for a in node.names] + [stem]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a name imported from a package counts as the
    submodule when there is one, else as the package)."""
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _targets(node, module, is_package):
                found = _resolve(target, known)
                if not found or found == module or not found.startswith(PACKAGE):
                    continue
                # a submodule importing its own package's __init__ is no dependency of substance
                if not module.startswith(found + "."):
                    graph[module].add(found)
                break
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def page_layers() -> dict[str, int]:
    """Folder -> layer number, from the page's table rows `| N | `folder/` ... |` (the root's
    own modules are the folder '')."""
    layers = {}
    for line in PAGE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if not match:
            continue
        for folder in re.findall(r"`([\w/]*)`", match.group(2)):
            layers["" if folder == "chargpt/" else folder.strip("/")] = int(match.group(1))
    return layers


def page_exceptions() -> set[tuple[str, str]]:
    """The upward imports the page allows, each a line `- `a.b` -> `c.d`: why`."""
    text = PAGE.read_text(encoding="utf-8")
    return set(re.findall(r"^- `(chargpt[\w.]*)` -> `(chargpt[\w.]*)`", text, re.M))


def folder_of(module: str) -> str:
    """The layer folder a module lives in: the first name under the package, '' for the root's
    own modules."""
    parts = module.split(".")[1:]
    if not parts:
        return ""
    return parts[0] if (SRC / PACKAGE / parts[0]).is_dir() else ""


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    allowed = page_exceptions()
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            here, there = folder_of(module), folder_of(target)
            if here != there and layers[there] >= layers[here] and (module, target) not in allowed:
                bad.append(f"{module} ({here or 'root'}, layer {layers[here]}) imports {target} "
                           f"({there or 'root'}, layer {layers[there]})")
    return bad


def test_the_package_has_no_import_circles():
    assert cycles(import_graph()) == []


def test_every_folder_has_a_layer_on_the_page():
    folders = {folder_of(m) for m in modules()}
    assert folders <= set(page_layers()), folders - set(page_layers())


def test_imports_go_down_the_layers():
    assert upward_imports(import_graph(), page_layers()) == []


def test_every_listed_exception_is_a_real_import():
    graph = import_graph()
    stale = [pair for pair in page_exceptions() if pair[1] not in graph.get(pair[0], set())]
    assert stale == []


@pytest.mark.parametrize("source,expected", [
    ("from chargpt.a import b\n", "chargpt.a.b"),
    ("def f():\n    from chargpt.a import b\n", "chargpt.a.b"),
    ("import typing\nif typing.TYPE_CHECKING:\n    import chargpt.a.b\n", "chargpt.a.b"),
])
def test_the_graph_sees_every_kind_of_import(tmp_path, monkeypatch, source, expected):
    # A circle hidden inside a function or under TYPE_CHECKING must still be found.
    pkg = tmp_path / PACKAGE
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "b.py").write_text("import chargpt.c\n")
    (pkg / "c.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    graph = import_graph()
    assert expected in graph["chargpt.c"]
    assert cycles(graph) == [["chargpt.a.b", "chargpt.c"]]


# --- sizes a reader can hold in mind ----------------------------------------------------------

MAX_PY_LINES, MAX_C_LINES, MAX_FUNCTION_LINES = 400, 500, 50
LONG_TABLES = {("cli/parser.py", "build_parser")}  # a declarative table of every subcommand


def test_every_module_and_function_is_short_enough():
    long = []
    for path in sorted((SRC / PACKAGE).rglob("*")):
        where = str(path.relative_to(SRC / PACKAGE))
        if path.suffix in (".c", ".h"):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > MAX_C_LINES:
                long.append(f"{where}: {lines} lines")
        if path.suffix != ".py":
            continue
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_PY_LINES:
            long.append(f"{where}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (where, node.name) not in LONG_TABLES:
                    long.append(f"{where}: {node.name} is {lines} lines")
    assert long == []
