"""Layering of the three packages, read from the source with ``ast`` (nothing is imported).

``cellsam_core`` (pure computation) < ``acquisition`` (microscope side: wire, sockets, sinks) < ``serving``
(Ray Serve, pipeline, CLI): no module imports a package above its own, and no package has an import cycle.
Every ``import`` statement counts: top-level, inside functions and inside ``if TYPE_CHECKING:`` blocks, so a
cycle hidden behind a lazy or type-only import still fails here.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "cellsam_core"
REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / PACKAGE
FORBIDDEN = ("acquisition", "serving", "ray", "zmq", "zarr")
#: Packages from the bottom layer up: a module may import its own package and those before it.
LAYERS = ("cellsam_core", "acquisition", "serving")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(packages: tuple[str, ...] = (PACKAGE,)) -> dict[str, Path]:
    return {_module_name(p): p for package in packages for p in sorted((REPO / package).rglob("*.py"))}


def _imported(path: Path, module: str, known: set[str]) -> set[str]:
    """Fully qualified names of every module ``module`` (at ``path``) imports anywhere in its source.

    ``from a.b import c`` names ``a.b.c`` when that is a module of the package, else ``a.b``.
    """
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base_parts = module.split(".") if is_package else module.split(".")[:-1]
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                out.add(candidate if candidate in known else base)
    return out


def _graph(packages: tuple[str, ...] = (PACKAGE,)) -> dict[str, set[str]]:
    modules = _modules(packages)
    known = set(modules)
    return {
        name: {dep for dep in _imported(path, name, known) if dep in known and dep != name}
        for name, path in modules.items()
    }


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of the directed graph, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


@dataclass(frozen=True)
class CycleCase:
    name: str
    graph: dict[str, set[str]]
    cycle: list[str] | None


CYCLE_CASES = [
    CycleCase("empty", {}, None),
    CycleCase("chain", {"a": {"b"}, "b": {"c"}, "c": set()}, None),
    CycleCase("diamond", {"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}, None),
    CycleCase("two", {"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
    CycleCase(
        "three behind a leaf", {"a": {"b", "x"}, "b": {"c"}, "c": {"a"}, "x": set()}, ["a", "b", "c", "a"]
    ),
]


@pytest.mark.parametrize("case", CYCLE_CASES, ids=lambda c: c.name)
def test_cycle_finder(case: CycleCase) -> None:
    assert _find_cycle(case.graph) == case.cycle


def test_the_module_list_is_the_package() -> None:
    modules = _modules()
    assert {"cellsam_core", "cellsam_core.inference", "cellsam_core.modeling.cellsam"} <= set(modules)
    graph = _graph()
    # Spot checks that function-local and TYPE_CHECKING imports are seen.
    assert "cellsam_core.registry" in graph["cellsam_core.select"]  # imported inside functions
    assert "cellsam_core.inference" in graph["cellsam_core"]  # imported under TYPE_CHECKING


def test_no_import_cycle_in_cellsam_core() -> None:
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle in cellsam_core: " + " -> ".join(cycle or [])


def test_configs_is_a_leaf() -> None:
    deps = _graph()["cellsam_core.configs"]
    assert deps <= {"cellsam_core.errors"}, f"cellsam_core.configs imports {sorted(deps)}"


def test_cellsam_core_never_imports_the_service_side() -> None:
    modules = _modules()
    known = set(modules)
    offending = sorted(
        f"{name} imports {dep}"
        for name, path in modules.items()
        for dep in _imported(path, name, known)
        if dep.split(".")[0] in FORBIDDEN
    )
    assert not offending, "cellsam_core must stay pure computation: " + "; ".join(offending)


def test_no_module_imports_a_layer_above_its_own() -> None:
    graph = _graph(LAYERS)
    layer = {name: LAYERS.index(name.split(".")[0]) for name in graph}
    offending = sorted(
        f"{name} imports {dep}" for name, deps in graph.items() for dep in deps if layer[dep] > layer[name]
    )
    assert not offending, "imports from a layer above: " + "; ".join(offending)


@pytest.mark.parametrize("package", LAYERS[1:])
def test_no_import_cycle(package: str) -> None:
    cycle = _find_cycle(_graph((package,)))
    assert cycle is None, f"import cycle in {package}: " + " -> ".join(cycle or [])


def test_the_seams_do_not_know_each_other() -> None:
    """The result publisher and the label sinks never import the frame source, nor it them."""
    graph = _graph(("acquisition",))
    apart = {
        "acquisition.publisher": {"acquisition.listener", "acquisition.source"},
        "acquisition.results": {"acquisition.listener", "acquisition.source"},
        "acquisition.zarr_sink": {"acquisition.listener", "acquisition.source", "acquisition.publisher"},
        "acquisition.memory_sink": {"acquisition.listener", "acquisition.source", "acquisition.publisher"},
        "acquisition.listener": {"acquisition.publisher", "acquisition.results", "acquisition.sink"},
    }
    for module, others in apart.items():
        assert not graph[module] & others, f"{module} imports {sorted(graph[module] & others)}"
