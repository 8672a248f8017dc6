"""The import graph of magvit2, read with `ast` (nothing is imported):

- no import cycle among magvit2 modules. Function-level imports count too: moving an import into a function hides a
  cycle from Python, not from the reader. The one exemption is an import marked with a trailing
  `# deferred: <why>` comment, which is allowed only where it really defers a heavy dependency (torch, mlflow, ...):
  the imported module must pull in one that the importing module does not already import at module level.
  Importing a.b.c runs a/b/__init__.py first, so that counts as an import of a.b.
- no import cycle among magvit2's subpackages and top-level modules either (runtime/ -> sweep/ -> runtime/ is one
  even when no single module imports itself back): imports point one way.
- models/ and quantizers/ (the research core) import nothing from hydra, mlflow, submitit or omegaconf.
"""
from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "magvit2"  # the checkout's source, read not imported
MARKER = "# deferred:"
ALIASES = {"hydra_plugins.magvit2": "magvit2.hydra_plugin"}  # how pyproject.toml installs magvit2/hydra_plugin
HEAVY = {"torch", "torchvision", "torchmetrics", "torch_fidelity", "lpips", "accelerate", "mlflow", "submitit",
         "hydra", "hydra_plugins", "pandas", "matplotlib", "skimage", "scipy", "papermill", "nbclient", "nbconvert",
         "jupytext"}
RUNNERS = {"hydra", "hydra_plugins", "mlflow", "submitit", "omegaconf"}  # not for the research core


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str  # a magvit2 module, or a third-party top-level name when external
    line: int
    in_function: bool
    deferred: bool  # marked `# deferred: ...`
    external: bool
    implied: bool = False  # the package __init__ that importing a submodule runs first


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str) -> str:
    for alias, real in ALIASES.items():
        if name == alias or name.startswith(alias + "."):
            return real + name[len(alias):]
    return name


def _owner(name: str) -> str | None:
    """The magvit2 module `name` is, or is inside of (a name imported from it)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _comments(src: str) -> dict[int, str]:
    return {t.start[0]: t.string for t in tokenize.generate_tokens(io.StringIO(src).readline)
            if t.type == tokenize.COMMENT}


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def edges_of(name: str, src: str | None = None) -> list[Edge]:
    """The imports of module `name` (its file, or the source `src` of a plain module of that name)."""
    path = MODULES.get(name)
    src = path.read_text() if src is None else src
    tree = ast.parse(src, name)
    comments = _comments(src)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path is not None and path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or _type_checking_only(node, parents):
            continue
        p, in_function = node, False
        while p in parents:
            p = parents[p]
            in_function |= isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        deferred = any(comments.get(i, "").startswith(MARKER) for i in range(node.lineno, node.end_lineno + 1))
        if isinstance(node, ast.Import):
            targets = [_resolve(a.name) for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            base = _resolve(base)
            # `from pkg import sub` imports the submodule pkg.sub; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for t in targets:
            own = _owner(t) if t == "magvit2" or t.startswith("magvit2.") else None
            if own is not None:
                out.append(Edge(name, own, node.lineno, in_function, deferred, False))
            elif not getattr(node, "level", 0):
                out.append(Edge(name, t.partition(".")[0], node.lineno, in_function, deferred, True))
    return sorted(set(out), key=lambda e: (e.line, e.dst))


EDGES = {m: edges_of(m) for m in MODULES}


def heavy_at_import(name: str, edges: dict = EDGES, seen: set | None = None) -> set[str]:
    """The heavy third-party packages that importing `name` loads (its module-level imports, transitively)."""
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    found = set()
    for e in edges[name]:
        if e.in_function:
            continue
        found |= {e.dst} & HEAVY if e.external else heavy_at_import(e.dst, edges, seen)
    return found


def bad_deferred_marks(edges: dict = EDGES) -> list[str]:
    """Each `# deferred:` mark that defers nothing heavy: one at module level, or on an import whose module loads
    no heavy package that the importing module does not load at import time already."""
    bad = []
    for name, es in edges.items():
        for e in es:
            where = f"{name}:{e.line}"
            if not e.deferred:
                continue
            if not e.in_function:
                bad.append(f"{where}: a module-level import defers nothing")
            elif not e.external:
                if not heavy_at_import(e.dst, edges) - heavy_at_import(name, edges):
                    bad.append(f"{where}: {e.dst} loads no heavy package that {name} does not load already")
            elif e.dst not in HEAVY:
                bad.append(f"{where}: {e.dst} is not a heavy package ({', '.join(sorted(HEAVY))})")
    return bad


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module, or one that imports itself."""
    index, low, on_stack, stack, comps, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1 or v in graph[v]:
                        comps.append(sorted(comp))
    return sorted(comps)


def counted_edges(edges: dict = EDGES) -> list[Edge]:
    """The imports that count, plus what each runs first: importing a.b.c runs a/b/__init__.py (unless the importer
    is inside a.b, whose __init__ is then already running)."""
    out = []
    for e in (e for es in edges.values() for e in es if not e.external and not (e.in_function and e.deferred)):
        out.append(e)
        parts = e.dst.split(".")
        for i in range(2, len(parts)):
            pkg = ".".join(parts[:i])
            if e.src != pkg and not e.src.startswith(pkg + "."):
                out.append(Edge(e.src, pkg, e.line, e.in_function, e.deferred, False, implied=True))
    return out


def package_of(name: str) -> str:
    """The unit of the layering: magvit2's subpackages (magvit2.sweep) and its top-level modules (magvit2.config)."""
    return ".".join(name.split(".")[:2])


def import_cycles(unit=lambda name: name) -> list[str]:
    """One paragraph per cycle among the units (`unit` maps a module to its unit): the units, then each import
    from one unit of the cycle to another (file:line, where it sits)."""
    counted = [e for e in counted_edges() if unit(e.src) != unit(e.dst) or e.src == e.dst]
    graph = {unit(m): set() for m in MODULES}
    for e in counted:
        graph[unit(e.src)].add(unit(e.dst))
    out = []
    for comp in strongly_connected(graph):
        lines = [" <-> ".join(comp)]
        inside = [e for e in counted if unit(e.src) in comp and unit(e.dst) in comp]
        explicit = {(e.src, e.line) for e in inside if not e.implied}
        for e in sorted(set(inside), key=lambda e: (e.src, e.line, e.dst)):
            if not e.implied or (e.src, e.line) not in explicit:
                where = "in a function" if e.in_function else "module level"
                lines.append(f"    {e.src} -> {e.dst}  ({MODULES[e.src].relative_to(ROOT.parent)}:{e.line}, {where})")
        out.append("\n".join(lines))
    return out


def test_the_graph_sees_every_kind_of_import():
    """The parser itself: relative, `from package import submodule`, function-level, the alias and the marker."""
    lfq = {e.dst for e in EDGES["magvit2.quantizers.lfq"]}
    assert "magvit2.quantizers.base" in lfq and "torch" in lfq  # `from .base import QuantizerOutput`
    init = {e.dst for e in EDGES["magvit2.quantizers"]}
    assert {"magvit2.quantizers.lfq", "magvit2.quantizers.vq", "magvit2.quantizers.subtokens"} <= init
    train = {e.dst: e for e in EDGES["magvit2.train"]}
    assert "magvit2.hydra_plugin" in train  # `import hydra_plugins.magvit2`
    assert any(e.in_function for es in EDGES.values() for e in es if not e.external)
    assert strongly_connected({"a": {"b"}, "b": {"c", "a"}, "c": {"c"}, "d": {"a"}}) == [["a", "b"], ["c"]]
    # importing a submodule runs its package's __init__ first, except from inside that package
    ran = {(e.src, e.dst) for e in counted_edges()}
    assert ("magvit2.released", "magvit2.quantizers") in ran  # from magvit2.quantizers import LFQ
    assert ("magvit2.evaluate.ar", "magvit2.metrics") in ran
    assert ("magvit2.quantizers.lfq", "magvit2.quantizers") not in ran


_HOW = f"function-level imports count; mark one `{MARKER} <why>` only where it defers a heavy dependency"


def test_no_import_cycles_among_modules():
    cycles = import_cycles()
    assert not cycles, f"{len(cycles)} import cycle(s) among magvit2 modules ({_HOW}):\n\n" + "\n\n".join(cycles)


def test_no_import_cycles_among_packages():
    """Imports between magvit2's subpackages and top-level modules point one way (runtime/ never imports sweep/ if
    sweep/ imports runtime/), even where no single module imports itself back."""
    cycles = import_cycles(package_of)
    assert not cycles, (f"{len(cycles)} import cycle(s) among magvit2's packages and top-level modules ({_HOW}):"
                        f"\n\n" + "\n\n".join(cycles))


def test_deferred_marks_defer_something_heavy():
    """A `# deferred:` mark exempts an import from the cycle check, so each one must be true."""
    bad = bad_deferred_marks()
    assert not bad, "\n".join(bad)


def test_a_deferred_mark_is_checked_and_exempts_only_its_import():
    src = ("import json\n"
           "from magvit2 import errors  # deferred: at module level\n"
           "def f():\n"
           "    from magvit2.quantizers import vq  # deferred: torch, not needed to plan\n"
           "    from magvit2 import errors  # deferred: nothing heavy\n"
           "    import mlflow  # deferred: the store\n"
           "    import tabulate  # deferred: small\n"
           "    from magvit2.quantizers import (  # deferred: the first line carries it\n"
           "        base)\n"
           "    from magvit2.quantizers import subtokens\n")
    name = "magvit2.fake"
    es = edges_of(name, src)
    assert [(e.dst, e.in_function, e.deferred) for e in es] == [
        ("json", False, False), ("magvit2.errors", False, True), ("magvit2.quantizers.vq", True, True),
        ("magvit2.errors", True, True), ("mlflow", True, True), ("tabulate", True, True),
        ("magvit2.quantizers.base", True, True), ("magvit2.quantizers.subtokens", True, False)]
    assert heavy_at_import("magvit2.quantizers.vq") >= {"torch"}
    assert [b.split(": ")[0] for b in bad_deferred_marks({**EDGES, name: es})] == \
        ["magvit2.fake:2", "magvit2.fake:5", "magvit2.fake:7"]
    counted = {(e.src, e.dst) for e in counted_edges({**EDGES, name: es})}
    assert (name, "magvit2.quantizers.vq") not in counted and (name, "magvit2.quantizers.subtokens") in counted


def test_research_core_imports_no_runner():
    """models/ and quantizers/ import nothing from hydra, mlflow, submitit or omegaconf, nor any magvit2 module
    that does (at any level, transitively): they stay usable as a plain torch library."""

    def reach(name, seen):
        if name in seen:
            return
        seen.add(name)
        for e in EDGES[name]:
            if not e.external:
                reach(e.dst, seen)

    bad = []
    for name in MODULES:
        if not name.startswith(("magvit2.models", "magvit2.quantizers")):
            continue
        seen = set()
        reach(name, seen)
        for m in sorted(seen):
            for e in EDGES[m]:
                if e.external and e.dst in RUNNERS:
                    bad.append(f"{name}: {MODULES[m].relative_to(ROOT.parent)}:{e.line} imports {e.dst}")
    assert not bad, "\n".join(bad)


if __name__ == "__main__":  # `python tests/test_imports.py`: the cycles, one paragraph each
    print("modules:\n" + ("\n\n".join(import_cycles()) or "no import cycles"))
    print("\npackages:\n" + ("\n\n".join(import_cycles(package_of)) or "no import cycles"))
