"""The house's layers, read from the code (issue 14): no import circle, no import that runs up the
layers, no private name used outside its module.

Every ``.py`` under ``studio/`` and ``methods/`` is parsed with :mod:`ast` (nothing is imported or
run) and every import statement counts, those inside functions too. ``from pkg import name`` is an
import of the submodule ``pkg.name`` when that file exists, else of ``pkg`` itself (its
``__init__.py``).

Private names: a leading underscore (not a dunder) marks a name as its module's own. Another module
may not import it (``from x import _name``) nor reach it (``x._name``). A private *module*
(``render/_mesh_ext.py``) belongs to its package: modules inside that package may import it, others
may not.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_PACKAGES = ("studio", "methods")

#: The layer order, bottom to top, written once. A module may import modules of its own layer and of the
#: layers below. ``pkg.*`` matches the package ``pkg`` and everything under it, a plain name only that
#: module; the longest matching pattern wins (so ``studio.*`` catches the root modules not named).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("studio", "studio.errors", "studio.cameras", "studio.assets", "studio.seeding")),
    ("ext+io", ("studio.ext", "studio.io.*")),
    ("render", ("studio.render.*",)),
    ("world", ("studio.world.*",)),
    ("teachers", ("studio.teachers.*",)),
    ("students", ("studio.students.*",)),
    ("distill", ("studio.distill.*",)),
    ("train", ("studio.train.*",)),
    ("runs", ("studio.runs.*", "studio.*")),  # run kinds, and the root modules (demo, doctor, ...)
    ("methods", ("methods.*",)),
    ("entry", ("studio.cli", "studio.__main__", "studio.app.*", "studio.nerfstudio_plugin.*")),
]

#: Known violations, each with the owner who removes it (the goal is empty lists; a fixed one must leave).
#: (importer, imported module) of imports that run up the layers or close a circle:
KNOWN_EDGES: dict[tuple[str, str], str] = {}
#: (importer, "module._name") of private names used outside their module:
KNOWN_PRIVATE: dict[tuple[str, str], str] = {}


# ------------------------------------------------------------------------------------------ the reader
def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_sources(root: Path = ROOT) -> dict[str, tuple[str, bool]]:
    """``{module: (source, is_package)}`` of every ``.py`` under the top packages."""
    out = {}
    for top in TOP_PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            out[module_name(path, root)] = (path.read_text(encoding="utf-8"), path.name == "__init__.py")
    return out


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, (_, patterns) in enumerate(LAYERS):
        for p in patterns:
            if p.endswith(".*"):
                base = p[:-2]
                hit = module == base or module.startswith(base + ".")
            else:
                hit = module == p
            if hit and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise AssertionError(f"module {module} has no layer: add it to LAYERS in tests/test_layers.py")
    return best


class Imports:
    """The internal imports of one module: ``edges`` {target: first line}, ``private`` [(line, "module._name")]."""

    def __init__(self, name: str, source: str, is_package: bool, modules: set[str]) -> None:
        self.name, self.modules = name, modules
        self.package = name if is_package else name.rpartition(".")[0]
        self.edges: dict[str, int] = {}
        self.private: list[tuple[int, str]] = []  # (line, what), each once
        self.bound: dict[str, str] = {}  # local name -> internal module it is bound to
        tree = ast.parse(source, filename=name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if self._internal(a.name):
                        self._add(a.name, node.lineno)
                        self.bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                base = self._absolute(node)
                if base is None or not self._internal(base):
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in modules:
                        self._add(sub, node.lineno)
                        self.bound[a.asname or a.name] = sub
                    else:
                        self._add(base, node.lineno)
                        if is_private(a.name):
                            self._private(node.lineno, f"{base}.{a.name}")
        for node in ast.walk(tree):  # module._name
            if (isinstance(node, ast.Attribute) and is_private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in self.bound):
                target = self.bound[node.value.id]
                if f"{target}.{node.attr}" in modules:
                    self._check_path(f"{target}.{node.attr}", node.lineno)
                elif target != self.name:
                    self._private(node.lineno, f"{target}.{node.attr}")

    @staticmethod
    def _internal(dotted: str) -> bool:
        return dotted.split(".")[0] in TOP_PACKAGES

    def _absolute(self, node: ast.ImportFrom) -> str | None:
        if not node.level:
            return node.module
        parts = self.package.split(".")
        if node.level > 1:
            parts = parts[: len(parts) - (node.level - 1)]
        return ".".join(parts + ([node.module] if node.module else []))

    def _add(self, target: str, line: int) -> None:
        if target != self.name:
            self.edges.setdefault(target, line)
            self._check_path(target, line)

    def _check_path(self, target: str, line: int) -> None:
        """A private module on the way to ``target`` must lie in a package that holds this module."""
        parts = target.split(".")
        for i, part in enumerate(parts):
            if is_private(part):
                owner = ".".join(parts[:i])
                if not (self.name == owner or self.name.startswith(owner + ".")):
                    self._private(line, ".".join(parts[: i + 1]))
                return

    def _private(self, line: int, what: str) -> None:
        if (line, what) not in self.private:
            self.private.append((line, what))


def read_imports(sources: dict[str, tuple[str, bool]]) -> dict[str, Imports]:
    modules = set(sources)
    return {name: Imports(name, src, pkg, modules) for name, (src, pkg) in sources.items()}


# ------------------------------------------------------------------------------------------ the checks
def upward_imports(graph: dict[str, Imports]) -> list[str]:
    out = []
    for name, imp in sorted(graph.items()):
        for target, line in sorted(imp.edges.items()):
            if target in graph and layer_of(target) > layer_of(name) and (name, target) not in KNOWN_EDGES:
                out.append(f"{name}:{line} ({LAYERS[layer_of(name)][0]}) imports {target} "
                           f"({LAYERS[layer_of(target)][0]})")
    return out


def circles(graph: dict[str, Imports]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of the import graph."""
    edges = {n: sorted(t for t in imp.edges if t in graph and (n, t) not in KNOWN_EDGES) for n, imp in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan, iteratively
        work = [(v, iter(edges[v]))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(edges[w])))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        comps.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return [_one_cycle(c, edges) for c in sorted(comps)]


def _one_cycle(comp: list[str], edges: dict[str, list[str]]) -> list[str]:
    """A shortest cycle through the first module of ``comp`` (breadth first inside the component)."""
    start, members = comp[0], set(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in edges[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, v, start]
                if w in members and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def private_uses(graph: dict[str, Imports]) -> list[str]:
    return [f"{name}:{line} uses {what}" for name, imp in sorted(graph.items()) for line, what in imp.private
            if (name, what) not in KNOWN_PRIVATE]


# ------------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def graph() -> dict[str, Imports]:
    return read_imports(read_sources())


def test_every_module_has_a_layer(graph):
    for name in graph:
        layer_of(name)


def test_no_import_circle(graph):
    found = circles(graph)
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_import_runs_up_the_layers(graph):
    found = upward_imports(graph)
    order = " -> ".join(n for n, _ in LAYERS)
    assert not found, f"imports from a lower layer to a higher one (bottom to top: {order}):\n" + "\n".join(found)


def test_no_private_name_outside_its_module(graph):
    found = private_uses(graph)
    assert not found, "private names used outside their module:\n" + "\n".join(found)


def test_known_exceptions_still_exist(graph):
    """An exception that no longer occurs must leave the lists (so they only shrink)."""
    stale = [f"{a} -> {b}" for a, b in KNOWN_EDGES if a not in graph or b not in graph[a].edges]
    stale += [f"{a} uses {b}" for a, b in KNOWN_PRIVATE
              if a not in graph or b not in {what for _, what in graph[a].private}]
    assert not stale, "remove these from KNOWN_EDGES / KNOWN_PRIVATE in tests/test_layers.py:\n" + "\n".join(stale)


def test_the_checks_catch_what_they_look_for():
    """Self-check on a synthetic house: an upward import, a circle and private names are all reported."""
    sources = {
        "studio": ("", True),
        "studio.render": ("", True),
        "studio.render._twin": ("def f(): pass\n", False),
        "studio.render.draw": ("from . import _twin\n"            # a private module inside its package: fine
                               "def g():\n"
                               "    from studio.teachers.teach import T\n", False),  # up, inside a function
        "studio.teachers": ("", True),
        "studio.teachers.teach": ("from .loop_a import A\nT = 1\n", False),
        "studio.teachers.loop_a": ("import studio.teachers.loop_b as b\nA = b.B\n", False),
        "studio.teachers.loop_b": ("from studio.teachers import loop_a\nB = 1\n", False),
        "studio.world": ("", True),
        "studio.world.scene": ("from ..render.draw import _helper\n"          # private name
                               "from ..render import _twin\n"                 # private module of another package
                               "from ..render import draw\nx = draw._secret\n", False),  # module._name
    }
    g = read_imports(sources)
    up = upward_imports(g)
    assert len(up) == 1 and up[0].startswith("studio.render.draw:3 (render) imports studio.teachers.teach"), up
    assert circles(g) == [["studio.teachers.loop_a", "studio.teachers.loop_b", "studio.teachers.loop_a"]]
    priv = private_uses(g)
    assert priv == ["studio.world.scene:1 uses studio.render.draw._helper",
                    "studio.world.scene:2 uses studio.render._twin",
                    "studio.world.scene:4 uses studio.render.draw._secret"], priv
    assert layer_of("studio.doctor") == layer_of("studio.runs.video") < layer_of("methods.vsd") < layer_of("studio.cli")
    assert layer_of("studio.assets") < layer_of("studio.io.ply") < layer_of("studio.render.volume")
