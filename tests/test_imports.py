"""No import cycles between or inside the four folders (issue 17).

pyproject maps graphs/, engines/, exporter/ and validate/ under `mllama_export`, so a picture
drawn from the file tree misses their imports; this reads every import with `ast`, including
the ones inside functions (a lazy import still ties the two modules together).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("graphs", "engines", "exporter", "validate")
# Allowed folder edges: graphs at the bottom, validate on top of exporter and engines.
ALLOWED = {
    "graphs": set(),
    "engines": {"graphs"},
    "exporter": {"graphs", "engines"},
    "validate": {"graphs", "engines", "exporter"},
}


@dataclass(frozen=True)
class Edge:
    source: str  # "engines.artifacts"
    target: str  # "graphs.contract"
    where: str  # "engines/artifacts.py:11"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Absolute dotted names (without `mllama_export.`) an ImportFrom can refer to."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        stem = ".".join(base + ([node.module] if node.module else []))
    else:
        stem = node.module or ""
        if not stem.startswith("mllama_export."):
            return []
        stem = stem.removeprefix("mllama_export.")
    # `from pkg import name` may name a submodule: the caller keeps whichever exists.
    return [stem] + [f"{stem}.{alias.name}" for alias in node.names]


def _imports(path: Path, modules: set[str]) -> list[Edge]:
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    edges = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [
                a.name.removeprefix("mllama_export.")
                for a in node.names
                if a.name.startswith("mllama_export.")
            ]
        elif isinstance(node, ast.ImportFrom):
            candidates = _resolve(node, module, is_package)
            names = [c for c in candidates[1:] if c in modules] or candidates[:1]
        else:
            continue
        where = f"{path.relative_to(ROOT)}:{node.lineno}"
        edges += [Edge(module, n, where) for n in names if n in modules and n != module]
    return edges


def _graph() -> list[Edge]:
    files = [p for folder in FOLDERS for p in sorted((ROOT / folder).glob("*.py"))]
    modules = {_module_name(p) for p in files}
    return [edge for path in files for edge in _imports(path, modules)]


def _folder(module: str) -> str:
    return module.split(".")[0]


def _cycles(edges: list[Edge]) -> list[tuple[set[str], list[Edge]]]:
    """Each strongly connected component of more than one node, with one cycle through it."""
    succ: dict[str, list[Edge]] = {}
    for e in edges:
        succ.setdefault(e.source, []).append(e)
        succ.setdefault(e.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in succ[v]:
            if e.target not in index:
                visit(e.target)
                low[v] = min(low[v], low[e.target])
            elif e.target in on_stack:
                low[v] = min(low[v], index[e.target])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return [(c, _one_cycle(c, succ)) for c in components]


def _one_cycle(component: set[str], succ: dict[str, list[Edge]]) -> list[Edge]:
    """A shortest cycle through the component's smallest node (breadth first)."""
    start = min(component)
    came: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for e in succ[v]:
                if e.target not in component:
                    continue
                if e.target == start:
                    path = [e]
                    while path[0].source != start:
                        path.insert(0, came[path[0].source])
                    return path
                if e.target not in came:
                    came[e.target] = e
                    nxt.append(e.target)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def _describe(found: tuple[set[str], list[Edge]], edges: list[Edge]) -> str:
    component, cycle = found
    line = " -> ".join(e.source for e in cycle) + f" -> {cycle[0].source}"
    steps = [
        f"  {e.source} -> {e.target}: "
        + ", ".join(
            sorted({x.where for x in edges if (x.source, x.target) == (e.source, e.target)})
        )
        for e in cycle
    ]
    return "\n".join([line + f"  (component: {', '.join(sorted(component))})", *steps])


def _folder_edges(edges: list[Edge]) -> list[Edge]:
    return [
        Edge(_folder(e.source), _folder(e.target), e.where)
        for e in edges
        if _folder(e.source) != _folder(e.target)
    ]


def test_the_graph_sees_lazy_relative_and_absolute_imports():
    # Guards the reader itself: a parser that missed function-level imports would pass vacuously.
    wheres = {(e.source, e.target) for e in _graph()}
    assert ("graphs.weights", "graphs.checkpoint") in wheres  # relative, module level
    assert ("engines.evalset", "engines.manifest_read") in wheres  # relative, inside a function
    assert ("validate.sensitivity", "graphs.quant") in wheres  # absolute, inside a function
    assert len(wheres) > 100


def _folder_cycles(edges: list[Edge]) -> list[list[str]]:
    """Every simple cycle of the four-node folder graph, each once, from its smallest folder."""
    succ = {(e.source, e.target) for e in edges}
    found = []

    def walk(path: list[str]) -> None:
        for f in FOLDERS:
            if (path[-1], f) not in succ:
                continue
            if f == path[0]:
                found.append(path)
            elif f not in path and f > path[0]:
                walk(path + [f])

    for f in sorted(FOLDERS):
        walk([f])
    return found


def _describe_folders(cycle: list[str], edges: list[Edge]) -> str:
    pairs = list(zip(cycle, cycle[1:] + cycle[:1], strict=True))
    steps = [
        f"  {a} -> {b}: "
        + ", ".join(sorted({e.where for e in edges if (e.source, e.target) == (a, b)}))
        for a, b in pairs
    ]
    return "\n".join([" -> ".join(cycle + cycle[:1]), *steps])


def test_folders_import_each_other_as_a_dag():
    folder_edges = _folder_edges(_graph())
    cycles = _folder_cycles(folder_edges)
    assert not cycles, "import cycles between folders:\n" + "\n".join(
        _describe_folders(c, folder_edges) for c in cycles
    )
    wrong = [e for e in folder_edges if e.target not in ALLOWED[e.source]]
    assert not wrong, "imports against graphs < engines < exporter < validate:\n" + "\n".join(
        f"{e.where}: {e.source} imports {e.target}" for e in wrong
    )


def test_graphs_imports_nothing_above_it():
    above = [e for e in _graph() if _folder(e.source) == "graphs" and _folder(e.target) != "graphs"]
    assert not above, "\n".join(f"{e.where}: {e.source} imports {e.target}" for e in above)


def test_no_folder_imports_the_cli():
    # The CLI (mllama_export/: cli, commands, console) sits on top; errors.py is shared by all.
    found = []
    for path in (p for folder in FOLDERS for p in sorted((ROOT / folder).glob("*.py"))):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                # `from mllama_export import cli` names the module in the alias
                bare = node.module == "mllama_export"
                names = [f"mllama_export.{a.name}" for a in node.names] if bare else [node.module]
            else:
                continue
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno}: {n}"
                for n in names
                if n.startswith("mllama_export.") and n.split(".")[1] not in (*FOLDERS, "errors")
            ]
    assert not found, "the four folders must not import the CLI:\n" + "\n".join(found)


def _inside_folder_edges() -> list[Edge]:
    return [e for e in _graph() if _folder(e.source) == _folder(e.target)]


def test_no_cycles_inside_a_folder():
    edges = _inside_folder_edges()
    cycles = _cycles(edges)
    assert not cycles, "import cycles inside a folder:\n" + "\n".join(
        _describe(c, edges) for c in cycles
    )
