"""The import graph of cfgpar/ is one-way: no module reaches a module that reaches it back, the
engine and the parallel machinery know no model family, and only a family's folder and the
registry import a family's modules (issue 21's "one home per model family"); imports point from
the API down through the engine to the models, never up."""

from __future__ import annotations

import ast
from pathlib import Path

import cfgpar
from cfgpar.models.registry import FAMILIES

ROOT = Path(cfgpar.__file__).parent
FAMILY_PACKAGES = tuple(sorted({".".join(spec.pipeline.split(":")[0].split(".")[:3]) for spec in FAMILIES}))
"""Each registered family's folder, as a package: cfgpar.models.<family>."""
# Who may import a family's modules: the family itself, the registry that lists it, and the
# tiny-model builders and benchmarks that exist to exercise one family.
FAMILY_IMPORTERS = ("cfgpar.models.registry", "cfgpar.testing.", "cfgpar.bench.")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every cfgpar module `path` imports, at top level or inside functions, except under
    `if TYPE_CHECKING:` (annotations only, never executed)."""
    tree, found = ast.parse(path.read_text()), set()
    skip = {id(node) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"}
    skipped = {id(child) for node in ast.walk(tree) if id(node) in skip for child in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("cfgpar")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cfgpar"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    edges = graph()
    assert cycles(edges) == []
    # control: one edge back from the loop to the engine would close a circle, and is found
    edges["cfgpar.engine.denoise_loop"] = edges["cfgpar.engine.denoise_loop"] | {"cfgpar.engine.engine"}
    edges["cfgpar.engine.engine"] = edges["cfgpar.engine.engine"] | {"cfgpar.engine.denoise_loop"}
    assert cycles(edges)


def family_reach_ins(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{source} -> {target}" for source, targets in edges.items() for target in targets
                  if target.startswith(FAMILY_PACKAGES) and not source.startswith(FAMILY_IMPORTERS)
                  and not any(source.startswith(family) and target.startswith(family) for family in FAMILY_PACKAGES))


def test_only_a_family_and_the_registry_import_a_family():
    edges = graph()
    assert family_reach_ins(edges) == []
    # control: the server reading a family's defaults directly would be caught
    edges["cfgpar.server.app"] = edges["cfgpar.server.app"] | {"cfgpar.models.wan.rules"}
    assert family_reach_ins(edges) == ["cfgpar.server.app -> cfgpar.models.wan.rules"]


LAYERS = (
    ("cfgpar.params", "cfgpar.config", "cfgpar.guidance", "cfgpar.request", "cfgpar.video_io", "cfgpar.planning"),
    ("cfgpar.distributed",),
    ("cfgpar.models",),
    ("cfgpar.engine",),
    ("cfgpar.omni", "cfgpar.outputs"),
)
"""Lower layers first: a module imports its own layer or lower ones, never a higher one (the API,
the CLI, the server, the planner and the benchmarks sit above them all)."""


def layer_of(name: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if name.startswith(prefixes):
            return i
    return len(LAYERS)


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{source} -> {target}" for source, targets in edges.items() for target in targets
                  if layer_of(target) > layer_of(source))


def test_imports_point_down():
    edges = graph()
    assert upward(edges) == []
    # control: the rank process reaching up into the server would be caught
    edges["cfgpar.engine.rank"] = edges["cfgpar.engine.rank"] | {"cfgpar.server.app"}
    assert upward(edges) == ["cfgpar.engine.rank -> cfgpar.server.app"]
