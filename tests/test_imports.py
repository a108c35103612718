"""The package's import graph, read from its own source with ``ast``: no module imports itself through others (no
circle), and every import points to the same or a lower layer.

Both module-level and function-level imports count (``ast.walk`` over each file, so an import inside a function or
under ``if TYPE_CHECKING:`` is an edge too): a function-level import is how a circle hides, not how it goes away.
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg`` (its ``__init__``); the
implicit import of a parent package's ``__init__`` is not counted, so a package may re-export its own modules.
"""
from __future__ import annotations

import ast
from pathlib import Path

import backdoorbench_gic

PACKAGE = "backdoorbench_gic"

# Lowest first. A module may import modules of its own unit and of units in its own or a lower layer; a unit is a
# top-level module or subpackage of backdoorbench_gic ("" is the package's __init__, which only carries the version).
LAYERS: list[set[str]] = [
    # the ground floor: no science, no torch models
    {"", "utils", "registry", "resources", "keys", "checkpoint", "environment"},
    {"config", "data", "record_format", "results", "bnstats"},  # typed settings, datasets, file formats
    {"models", "training", "evaluation", "patching"},
    {"records"},  # BackdoorBench records (models + datasets + formats)
    {"inspection", "auxdata", "defenses", "attacks"},  # what reads a record: checks, auxiliary data, algorithms
    {"gic", "pipeline", "analysis", "testing", "probes"},  # GIC around a defense; one run end to end; reading
    # results; probing a purified model after the run
    {"matrix", "bbrun"},  # many runs; GIC inside BackdoorBench's own entry points
    {"commands", "cli", "demo"},  # the command line and the demo it (and run_defense.py) starts
]


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool, known) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if is_pkg else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        names = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in known else origin for a in node.names]
    out = []
    for name in names:
        if name == PACKAGE or name.startswith(PACKAGE + "."):
            while name not in known:  # `import pkg.mod.attr` style: the longest prefix that is a module
                name = name.rpartition(".")[0]
            out.append(name)
    return out


def import_graph(root: Path | None = None) -> dict[str, set[str]]:
    """Module -> the package modules it imports (module- and function-level)."""
    root = root or Path(backdoorbench_gic.__file__).parent
    mods = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, (path, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module].update(t for t in _targets(node, module, is_pkg, mods) if t != module)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(name: str) -> int:
    for i, units in enumerate(LAYERS):
        if name in units:
            return i
    raise AssertionError(f"unit {name!r} is in no layer of tests/test_imports.py: give it one")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = unit(module), unit(target)
            if a != b and layer_of(b) > layer_of(a):
                bad.append(f"{module} (layer {layer_of(a)}) imports {target} (layer {layer_of(b)})")
    return bad


def test_the_package_has_no_import_circle():
    found = circles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_go_down_the_layers():
    bad = upward_imports(import_graph())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_every_unit_has_a_layer():
    units = {unit(m) for m in import_graph()}
    assert units <= set().union(*LAYERS), f"units without a layer: {sorted(units - set().union(*LAYERS))}"
    assert sum(len(units_) for units_ in LAYERS) == len(set().union(*LAYERS)), "a unit is in two layers"


def test_the_graph_reader_finds_circles_and_upward_imports(tmp_path):
    """The reader on a made-up package: a function-level circle, a re-exporting __init__ (not a circle), and an
    import from the ground floor into a higher layer."""
    pkg = tmp_path / PACKAGE
    (pkg / "utils").mkdir(parents=True)
    (pkg / "defenses").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "defenses" / "__init__.py").write_text("from .base import Defense\n")
    (pkg / "defenses" / "base.py").write_text("from ..utils.cache import key\n\nclass Defense: ...\n")
    (pkg / "utils" / "__init__.py").write_text("")
    (pkg / "utils" / "cache.py").write_text("def key():\n    from ..defenses import base\n")
    (pkg / "records.py").write_text("def f():\n    from . import inspection\n")
    (pkg / "inspection.py").write_text("from .records import f\n")
    graph = import_graph(pkg)
    assert graph[f"{PACKAGE}.defenses"] == {f"{PACKAGE}.defenses.base"}
    assert graph[f"{PACKAGE}.utils.cache"] == {f"{PACKAGE}.defenses.base"}
    assert sorted(circles(graph)) == [[f"{PACKAGE}.defenses.base", f"{PACKAGE}.utils.cache"],
                                      [f"{PACKAGE}.inspection", f"{PACKAGE}.records"]]
    assert upward_imports(graph) == [f"{PACKAGE}.records (layer 3) imports {PACKAGE}.inspection (layer 4)",
                                     f"{PACKAGE}.utils.cache (layer 0) imports {PACKAGE}.defenses.base (layer 4)"]
