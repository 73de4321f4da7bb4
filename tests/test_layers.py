"""The package's folders are layers and imports only point down (docs/architecture.md).

Parsed from the source with ``ast`` (imports inside functions and under TYPE_CHECKING count
too), so a new module that reaches up a layer, or two modules that import each other,
fail here rather than in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distributor"

# lower numbers are lower layers; a module may import its own layer's modules or lower ones
LAYERS: dict[str, int] = {
    "distributor.config": 0,
    "distributor.shared_table": 0,
    "distributor.logs": 0,
    "distributor.cgroup": 0,
    "distributor.tls": 1,  # builds on the base (config); used by workers, the supervisor and the control plane
    "distributor.tracing": 0,  # used by ingest/ (ingest spans) and delivery/ (send spans); imports neither
    "distributor.wal": 1,
    "distributor.delivery": 1,
    "distributor.ingest": 2,
    "distributor.workers": 3,
    "distributor.supervisor": 4,
    "distributor.control": 5,
    "distributor.tools": 6,
    "distributor.cli": 7,
    "distributor.__main__": 8,
    "distributor": 7,  # the package's own __init__
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> tuple[str, int]:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return best, LAYERS[best]


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "distributor" or name.startswith("distributor.")}


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer() -> None:
    for module in graph():
        assert layer_of(module)[0], module


def test_imports_point_down_only() -> None:
    upward = []
    for module, imported in graph().items():
        group, rank = layer_of(module)
        for target in imported:
            target_group, target_rank = layer_of(target)
            if target_rank > rank or (target_rank == rank and target_group != group and rank != 1):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if target not in edges:
                continue
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, stack + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_the_analyzer_service_stands_alone() -> None:
    """The analyzer is a separate service: it must not depend on the distributor's code."""
    for path in (PACKAGE.parent / "analyzer").rglob("*.py"):
        assert not imports_of(path), path
