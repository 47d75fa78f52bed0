r"""The package's import graph has no cycles, and its layers point one way.

Every `import` of a mergeng module counts as an edge, wherever it is written: at the top of a
module, inside a function (a lazy import that dodges a cycle at import time is still a cycle in
the design) or under `if TYPE_CHECKING:`. The graph is built from the source with `ast`, so
nothing is imported to check it.

Layers, each importing only from those below it:
    mergeng (root __init__: the merge/plan wrappers)   cli
                              \                        /
                               engine
                              /      \
                       methods        architectures
                              \      /
              errors (MergeError), version (__version__)   -- the root's neutral modules

Inside engine/, the stage packages are ordered as data flows through them (engine/__init__.py);
a module may import only from its own stage or an earlier one:
    recipe < inputs < plan < schedule < output < execute < builders < run, graph < cluster < api
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "methods", "architectures", "cli", "configs")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["mergeng", *parts])


def _source_files() -> dict[str, Path]:
    files = {_module_name(path): path for path in sorted(ROOT.glob("*.py"))}  # the root package and its modules
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            files[_module_name(path)] = path
    return files


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The mergeng modules `module` imports; `from pkg import name` names the submodule
    pkg.name when there is one, else the package pkg itself."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        # the deepest known module the dotted name is, or lies in
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "mergeng" or alias.name.startswith("mergeng."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "mergeng" or node.module.startswith("mergeng.")):
                target = node.module
            else:
                continue
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    add(f"{target}.{alias.name}")
                else:
                    add(target)
    return found


def import_graph() -> nx.DiGraph:
    files = _source_files()
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for module, path in files.items():
        for target in _imports(module, path, set(files)):
            graph.add_edge(module, target)
    return graph


def _short(name: str) -> str:
    return name.removeprefix("mergeng.") or "mergeng"


def _package(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "mergeng"


def test_graph_sees_the_package():
    graph = import_graph()
    assert ("mergeng.cli.app", "mergeng.engine.run") in graph.edges or graph.out_degree("mergeng.cli.app") > 3
    assert graph.number_of_edges() > 50


def test_no_import_cycles():
    graph = import_graph()
    cycles = sorted((sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1), key=len)
    shown = []
    for component in cycles:
        sub = graph.subgraph(component)
        for cycle in list(nx.simple_cycles(sub))[:20]:
            shown.append(" -> ".join(_short(m) for m in [*cycle, cycle[0]]))
    assert not cycles, "import cycles:\n  " + "\n  ".join(shown)


def _edges_between(graph: nx.DiGraph, source: str, target: str) -> list[str]:
    return sorted(f"{_short(a)} -> {_short(b)}" for a, b in graph.edges
                  if _package(a) == source and _package(b) == target)


# package -> the packages it may import (a package may always import its own modules)
ALLOWED = {
    "mergeng": {"engine", "version"},
    "cli": {"engine", "methods", "architectures", "errors", "version"},
    "engine": {"methods", "architectures", "errors", "version"},
    "methods": {"errors"},
    "architectures": {"errors"},
    "configs": set(),
    "errors": set(),
    "version": set(),
}


def test_every_import_points_down_the_layers():
    graph = import_graph()
    bad = sorted(f"{_short(a)} -> {_short(b)}" for a, b in graph.edges
                 if _package(a) != _package(b) and _package(b) not in ALLOWED.get(_package(a), set()))
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_methods_and_architectures_do_not_import_cli():
    graph = import_graph()
    bad = _edges_between(graph, "methods", "cli") + _edges_between(graph, "architectures", "cli")
    assert not bad, "\n".join(bad)


def test_methods_and_architectures_do_not_import_engine():
    graph = import_graph()
    bad = _edges_between(graph, "methods", "engine") + _edges_between(graph, "architectures", "engine")
    assert not bad, "\n".join(bad)


def test_method_modules_do_not_import_the_registry():
    """The registry imports every method module; a method module importing it back would be a cycle
    (and would let a method depend on which other methods exist)."""
    graph = import_graph()
    bad = sorted(_short(a) for a, _ in graph.in_edges("mergeng.methods.registry") if _package(a) == "methods")
    assert not bad, "method modules importing methods.registry: " + ", ".join(bad)


def test_only_the_api_wrappers_import_from_the_root():
    """The root __init__ imports engine.api (lazily); nothing else imports the root package."""
    graph = import_graph()
    bad = sorted(_short(a) for a, _ in graph.in_edges("mergeng"))
    assert not bad, "modules importing the root package: " + ", ".join(bad)


def test_the_pipeline_imports_no_builder_but_through_its_entry_points():
    """engine/builders/ turns other inputs (multi-stage recipes, MoE configs, ...) into plans for the
    pipeline; of the pipeline only the entry points (run, api) and the plan's views (graph) know them."""
    graph = import_graph()
    entry = {"mergeng.engine.run", "mergeng.engine.api", "mergeng.engine.graph"}
    bad = sorted(f"{_short(a)} -> {_short(b)}" for a, b in graph.edges
                 if b.startswith("mergeng.engine.builders") and a.startswith("mergeng.engine.")
                 and not a.startswith("mergeng.engine.builders") and a not in entry)
    assert not bad, "pipeline modules importing a builder:\n" + "\n".join(bad)


# engine/'s stages in pipeline order; a module may import its own stage or an earlier one
STAGES = ["recipe", "inputs", "plan", "schedule", "output", "execute", "builders", ("run", "graph"), "cluster", "api"]
STAGE_RANK = {name: rank for rank, entry in enumerate(STAGES)
              for name in (entry if isinstance(entry, tuple) else (entry,))}


def _stage(module: str) -> str | None:
    """The engine stage a module belongs to (its sub-package, or run/graph/api at the top), or None."""
    parts = module.split(".")
    if parts[:2] != ["mergeng", "engine"] or len(parts) < 3:
        return None
    return parts[2]


def test_every_engine_module_belongs_to_a_stage():
    graph = import_graph()
    stray = sorted(_short(m) for m in graph if _stage(m) is not None and _stage(m) not in STAGE_RANK)
    assert not stray, "engine modules outside the stage packages: " + ", ".join(stray)


def test_engine_imports_only_go_down_the_pipeline():
    graph = import_graph()
    bad = sorted(f"{_short(a)} ({_stage(a)}) -> {_short(b)} ({_stage(b)})" for a, b in graph.edges
                 if _stage(a) in STAGE_RANK and _stage(b) in STAGE_RANK and STAGE_RANK[_stage(b)] > STAGE_RANK[_stage(a)])
    assert not bad, "imports from a later stage into an earlier one:\n" + "\n".join(bad)


def test_stage_order_check_can_fail():
    """The stage test is not vacuous: an executor module importing the recipe is fine, the reverse is caught."""
    assert STAGE_RANK[_stage("mergeng.engine.recipe.load")] < STAGE_RANK[_stage("mergeng.engine.execute.executor")]
    assert _stage("mergeng.engine.run") == "run" and _stage("mergeng.engine") is None
    graph = import_graph()
    assert any(_stage(a) == "execute" and _stage(b) == "output" for a, b in graph.edges)


def test_one_errors_module_and_no_demo_code_in_the_engine():
    files = _source_files()
    assert [m for m in files if m.endswith(".errors")] == ["mergeng.errors"]
    assert not [m for m in files if m.startswith("mergeng.engine") and "tiny_models" in m]
