"""The house's rules, read from the code's own imports (every import, lazy
ones inside functions included): rooms import only downwards, no two modules
import each other directly or through a loop, and no source file grows past
what a reader takes in at once."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("a2e", "batching", "runtime", "engine", "server", "a2e_client", "training", "benchmarks")
TOP_MODULES = ("app", "api_server")
# What each room may import of the project (besides itself): the floors, ground up.
ALLOWED = {
    "a2e": set(),
    "batching": {"a2e"},
    "runtime": {"a2e"},
    "engine": {"a2e", "batching", "runtime"},
    "server": {"a2e", "batching", "runtime", "engine"},
    "a2e_client": set(),
}
MAX_LINES = 450


def _sources() -> dict[str, Path]:
    """Module name -> file, for every project source file (tests excluded)."""
    out = {name: ROOT / f"{name}.py" for name in TOP_MODULES}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (the longest known prefix of each)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            parts = target.split(".")
            for k in range(len(parts), 0, -1):
                candidate = ".".join(parts[:k])
                if candidate in known:
                    if candidate != name:
                        found.add(candidate)
                    break
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    graph = {name: _imports(name, path, known) for name, path in sources.items()}
    # A package's __init__ is not an import of its own modules' importers: drop edges module -> its own package.
    return {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in graph.items()}


def _room(module: str) -> str:
    return module.split(".")[0]


def test_rooms_import_only_downwards():
    wrong = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        if _room(module) in ALLOWED
        for target in targets
        if _room(target) != _room(module) and _room(target) not in ALLOWED[_room(module)]
    ]
    assert not wrong, "imports that run against the floors:\n" + "\n".join(sorted(wrong))


def _loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that reach each other through imports."""
    # Tarjan's strongly connected components: any component of two or more modules is a loop.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                loops.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return loops


def test_no_import_cycles():
    loops = _loops(_graph())
    assert not loops, f"modules that import each other: {loops}"


def test_the_checks_read_real_imports():
    """The checks above would pass on an empty graph: show that they see
    imports, relative and lazy ones included, and that a loop is found."""
    assert _loops({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = _graph()
    assert "engine.protocol" in graph["engine.client"]
    assert "engine.streams" in graph["engine.handback"]
    assert "runtime.settings" in graph["engine.service"]
    # the in-process engine is composed by app.py, not imported by the front doors
    assert "engine.service" in graph["app"]
    assert not any(t == "engine.service" for m, ts in graph.items() if _room(m) == "server" for t in ts)


def test_no_source_file_is_too_long():
    long = {str(p.relative_to(ROOT)): n for p in _sources().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
