"""The import layers of docs/architecture.md, enforced; the doc's table is the one source of truth.

The table's rows are the layers, lowest first ("Imports go one way, from the bottom of this list to the top").
In its modules column, each backticked ``name.py`` or ``privlora/folder/`` outside parentheses is an entry (text in
parentheses describes it); a folder entry covers every module under it, and an entry outside ``privlora/``
(``benchmarks/``) is not checked here. Every module of the package must be placed by exactly one row.

What the checker reads, with ``ast`` (nothing is imported):

* every ``import privlora.x`` and ``from privlora.x import y`` in the file, wherever it stands: module level,
  inside functions (lazy imports) and under ``if TYPE_CHECKING:``; relative imports are resolved against the
  importing module's package.
* ``from privlora.x import y`` is an edge to the module ``privlora.x.y`` when ``y`` is a submodule, else to
  ``privlora.x``. An import of ``privlora.x.y`` is an edge to that module only, not to the packages Python
  initialises on the way (their ``__init__`` modules are checked as modules of their own).
* ``TYPE_CHECKING`` imports count. A module whose annotations name a higher layer's class depends on that layer
  for what its code means (mypy follows the import), and leaving them out would hide the config <-> objectives
  circle (``TrainConfig`` annotations one way, ``METHODS`` the other) behind a runtime technicality; the fix for
  an annotation-only dependency is to move the class down (``settings.TrainConfig``), not to hide the import.

It fails, naming file:line, on an import of a higher layer's module (a row further down the table), and, naming
the circle, on modules that import each other in a circle (lazy imports included; same-layer imports are
otherwise fine).
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "privlora"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# The config refactor (issue 27) moves TrainConfig into settings.py; until it lands, config.py and the objectives
# import each other. These edges, and only these, are let through; an entry that no import matches any more fails
# the test, so the list shrinks as the refactor lands and is deleted with it.
@dataclass(frozen=True)
class Layer:
    name: str
    entries: tuple[str, ...]  # "errors.py", "privlora/data/", "benchmarks/"


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted
    target: str  # imported module, dotted
    where: str  # privlora/x.py:12


class TableError(Exception):
    pass


def _outside_parentheses(text: str) -> str:
    out, depth = [], 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def read_layers(markdown: str) -> list[Layer]:
    """The rows of the table after "Imports go one way", lowest layer first."""
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if "Imports go one way" in line), None)
    if start is None:
        raise TableError('no "Imports go one way" sentence before the layer table')
    rows: list[list[str]] = []
    for line in lines[start + 1:]:
        if not line.strip() and not rows:
            continue
        if not line.lstrip().startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    if len(rows) < 3 or rows[0][:2] != ["layer", "modules"]:
        raise TableError("the layer table needs a header (| layer | modules | ...) and at least one row")
    layers = []
    for row in rows[2:]:  # header, separator
        entries = tuple(re.findall(r"`([^`]+)`", _outside_parentheses(row[1])))
        bad = [e for e in entries if not (e.endswith(".py") or e.endswith("/"))]
        if bad or not entries:
            raise TableError(f"layer {row[0]!r}: entries must be `name.py` or `folder/` outside parentheses, "
                             f"got {bad or 'none'}")
        layers.append(Layer(row[0], entries))
    return layers


def package_modules(package: Path) -> dict[str, Path]:
    """Dotted module name → file, for every .py file under ``package``."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def place(package: Path, modules: dict[str, Path], layers: list[Layer],
          planned: frozenset[str] = frozenset()) -> tuple[dict[str, int], list[str]]:
    """Each module's layer (its row's index) and the problems: unplaced or doubly placed modules, stale entries."""
    prefix = package.name + "/"
    covered: dict[str, list[int]] = {m: [] for m in modules}
    problems = []
    for rank, layer in enumerate(layers):
        for entry in layer.entries:
            if entry.endswith("/") and not entry.startswith(prefix):
                continue  # outside the package (benchmarks/)
            relative = entry.removeprefix(prefix)
            hits = [m for m, path in modules.items()
                    if (rel := path.relative_to(package).as_posix()) == relative
                    or (relative.endswith("/") and rel.startswith(relative))]
            if not hits and relative not in planned:
                problems.append(f"{ARCHITECTURE.name}: layer {layer.name!r} lists `{entry}`, which is no module of "
                                f"{prefix}")
            if hits and relative in planned:
                problems.append(f"{prefix}{relative} exists now: drop it from the planned files")
            for m in hits:
                covered[m].append(rank)
    ranks = {}
    for m, found in covered.items():
        where = modules[m].relative_to(package.parent).as_posix()
        if not found:
            problems.append(f"{where}: no row of the layer table in docs/architecture.md places it (add it to "
                            f"the row of the lowest layer whose modules it needs)")
        elif len(set(found)) > 1:
            problems.append(f"{where}: placed in several layers: {[layers[r].name for r in sorted(set(found))]}")
        else:
            ranks[m] = found[0]
    return ranks, problems


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def module_imports(package: Path, modules: dict[str, Path]) -> tuple[list[Edge], list[str]]:
    """Every import of one of the package's modules, anywhere in each file; and imports of missing modules."""
    top = package.name
    edges: list[Edge] = []
    problems: list[str] = []

    def inside(name: str) -> bool:
        return name == top or name.startswith(top + ".")

    for source, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = path.relative_to(package.parent).as_posix()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if inside(a.name)]
            else:
                base = (_resolve_relative(source, path.name == "__init__.py", node.level, node.module)
                        if node.level else node.module or "")
                if not inside(base):
                    continue
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in dict.fromkeys(targets):
                if target not in modules:
                    problems.append(f"{rel}:{node.lineno}: imports {target}, which is no module of {top}/")
                elif target != source:
                    edges.append(Edge(source, target, f"{rel}:{node.lineno}"))
    return edges, problems


def _cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One circle per strongly connected group of modules (Tarjan), as the edges that close it."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, {}).setdefault(e.target, e)
        graph.setdefault(e.target, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

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
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    circles = []
    for group in groups:  # a shortest path from the group's first module back to it, by breadth-first search
        members, start = set(group), group[0]
        came: dict[str, Edge] = {}
        frontier = [start]
        while frontier and start not in came:
            nxt = []
            for v in frontier:
                for w, e in sorted(graph[v].items()):
                    if w in members and w not in came:
                        came[w] = e
                        nxt.append(w)
            frontier = nxt
        path, v = [], start
        while True:
            path.append(came[v])
            v = came[v].source
            if v == start:
                break
        circles.append(path[::-1])
    return circles


def check(package: Path, layers: list[Layer], allowed: frozenset[tuple[str, str]] = frozenset(),
          planned: frozenset[str] = frozenset()) -> list[str]:
    """Every problem with the package's imports against the layers, one line each (empty: all well)."""
    modules = package_modules(package)
    ranks, problems = place(package, modules, layers, planned)
    edges, missing = module_imports(package, modules)
    problems += missing
    found_pairs = {(e.source, e.target) for e in edges}
    problems += [f"allow-list entry {s} -> {t} matches no import any more: remove it"
                 for s, t in sorted(allowed - found_pairs)]
    checked = [e for e in edges if (e.source, e.target) not in allowed]
    for e in checked:
        if e.source in ranks and e.target in ranks and ranks[e.target] > ranks[e.source]:
            problems.append(f"{e.where}: {e.source} (layer {layers[ranks[e.source]].name!r}) imports {e.target} "
                            f"(layer {layers[ranks[e.target]].name!r}, a row below its own in the table)")
    for circle in _cycles(checked):
        names = " -> ".join([circle[0].source] + [e.target for e in circle])
        problems.append(f"import circle: {names} (at {', '.join(e.where for e in circle)})")
    return problems


# ------------------------------------------------------------------------------------------------ the package


def test_every_privlora_import_respects_the_layers_of_docs_architecture():
    layers = read_layers(ARCHITECTURE.read_text(encoding="utf-8"))
    problems = check(PACKAGE, layers)
    assert not problems, "docs/architecture.md's layers are broken:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------------------------ the checker

TABLE = """
Imports go one way, from the bottom of this list to the top:

| layer | modules | what it knows |
| --- | --- | --- |
| low | `__init__.py`, `errors.py` (mentions `high.py` and `run()` in passing) | nothing |
| middle | `privlora/data/` (`a.py`, `b.py`) | low |
| high | `high.py`, `top.py`, `benchmarks/` | everything |

Prose after the table.
"""


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / "privlora"
    for name, text in {"__init__.py": "", "data/__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


CLEAN = {
    "errors.py": "class PrivloraError(Exception):\n    pass\n",
    "data/a.py": "from privlora.errors import PrivloraError\n",
    "data/b.py": "from . import a\nimport privlora.errors\n",
    "high.py": "thing = 1\n",
    "top.py": "from privlora.data import a, b\nfrom privlora import errors, high\n",
}


def test_the_table_reads_as_entries_outside_parentheses():
    layers = read_layers(TABLE)
    assert layers == [Layer("low", ("__init__.py", "errors.py")), Layer("middle", ("privlora/data/",)),
                      Layer("high", ("high.py", "top.py", "benchmarks/"))]
    with pytest.raises(TableError, match="entries must be"):
        read_layers(TABLE.replace("`high.py`, ", "`high.py`, `HIGH`, "))


def test_the_checker_passes_a_clean_package(tmp_path):
    assert check(_package(tmp_path, CLEAN), read_layers(TABLE)) == []


def test_the_checker_catches_a_planted_lazy_upward_import_with_its_line(tmp_path):
    package = _package(tmp_path, {**CLEAN, "errors.py": CLEAN["errors.py"] + (
        "\n\ndef late():\n    from privlora.high import thing\n    return thing\n")})
    problems = check(package, read_layers(TABLE))
    assert problems == ["privlora/errors.py:6: privlora.errors (layer 'low') imports privlora.high "
                        "(layer 'high', a row below its own in the table)"]


def test_the_checker_catches_a_planted_circle_through_type_checking_and_relative_imports(tmp_path):
    package = _package(tmp_path, {**CLEAN, "data/a.py": CLEAN["data/a.py"] + (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n")})
    problems = check(package, read_layers(TABLE))
    assert problems == ["import circle: privlora.data.a -> privlora.data.b -> privlora.data.a "
                        "(at privlora/data/a.py:4, privlora/data/b.py:1)"]
    allowed = frozenset({("privlora.data.a", "privlora.data.b")})
    assert check(package, read_layers(TABLE), allowed) == []
    assert check(_package(tmp_path / "clean", CLEAN), read_layers(TABLE), allowed) == [
        "allow-list entry privlora.data.a -> privlora.data.b matches no import any more: remove it"]


def test_the_checker_names_an_unplaced_module_and_a_stale_entry(tmp_path):
    package = _package(tmp_path, {**CLEAN, "extra.py": "import privlora.errors\n"})
    problems = check(package, read_layers(TABLE.replace("`high.py`", "`high.py`, `gone.py`")))
    assert problems == ["architecture.md: layer 'high' lists `gone.py`, which is no module of privlora/",
                        "privlora/extra.py: no row of the layer table in docs/architecture.md places it (add it to "
                        "the row of the lowest layer whose modules it needs)"]
    assert check(package, read_layers(TABLE.replace("`high.py`", "`high.py`, `extra.py`, `soon.py`")),
                 planned=frozenset({"soon.py"})) == []
