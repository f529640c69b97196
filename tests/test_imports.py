"""The package's modules import each other in one direction: no circle, at module level or
inside functions. A module of a subpackage is named by its dotted path ("corpora.ravdess");
importing it runs its package's __init__ first, so it counts as an import of the package too
(for modules outside that package)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ser_cache"


def module_name(path: Path) -> str:
    """"audio" for ser_cache/audio.py, "corpora" for ser_cache/corpora/__init__.py,
    "corpora.ravdess" for ser_cache/corpora/ravdess.py."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.ImportFrom, name: str, is_package: bool) -> list[str]:
    """The candidate module names an import statement of module `name` may reach, relative to
    the package: its module, and its module plus each imported name."""
    if node.level == 0:
        if not (node.module or "").startswith("ser_cache."):
            return []
        base = node.module[len("ser_cache."):]
    else:
        here = name.split(".") if name else []
        here = here if is_package else here[:-1]  # the package the module is in
        up = here[: len(here) - (node.level - 1)] if node.level > 1 else here
        base = ".".join(up + ([node.module] if node.module else []))
    return [base, *(f"{base}.{a.name}" if base else a.name for a in node.names)]


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports anywhere in its source}."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    graph = {}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                found |= {m for m in imported(node, name, is_package) if m in paths}
        # importing corpora.base runs corpora/__init__.py first; a package a module is in is
        # being imported already, so it is no import of the module's own
        found |= {".".join(m.split(".")[:k]) for m in found for k in range(1, m.count(".") + 1)}
        own = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 2)}
        graph[name] = found - own - {""}
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_finder_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_subpackages_and_relative_imports():
    graph = import_graph()
    assert {"audio", "corpora", "corpora.base", "corpora.ravdess"} <= set(graph)
    assert "corpora.ravdess" in graph["corpora.registry"] and "audio" in graph["corpora.ravdess"]
    assert "corpora" in graph["cli"] and "corpora" in graph["download"]
    assert "corpora" not in graph["corpora.ravdess"]  # a module's own package is not an import of it


def test_no_module_imports_one_that_imports_it_back():
    found = circles(import_graph())
    assert found == [], f"import circles: {found}: move what both need into a module below them"
