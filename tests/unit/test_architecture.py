"""The package's shape, checked from the source (nothing is imported): no import circle, no
import that climbs a floor, and docs/ARCHITECTURE.md names every package.

The import graph is built with `ast` from every `import` / `from ... import` in every module of
`rlrt_megatron/`, function-level (lazy) imports included. An edge goes to the module imported
(`from pkg import sub` counts as `pkg.sub` when `sub` is a module, else as `pkg`); the implicit
import of a parent package's `__init__` is not an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "rlrt_megatron"

# Floors, lowest first: a module may import its own package and any package on a LOWER floor.
FLOORS = {
    "algorithms": 0,
    "data": 0,
    "reward": 0,
    "platform": 0,
    "topology": -1,  # below the ground floor: platform reads it
    "megatron": 1,
    "convert": 2,
    "rollout": 2,
    "config": 3,
    "eval": 3,
    "trainer": 4,
    "launch": 4,
    "compare": 5,
    "cli": 6,
}
GROUND = ("algorithms", "data", "reward", "platform", "topology")

# Function-level imports that close a circle on purpose, each with its reason. Keep this short.
ALLOWED_LAZY_EDGES: set[tuple[str, str]] = set()

# Function-level imports that climb a floor, each with its reason; to be removed, not added to.
ALLOWED_CLIMBS: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> dict[str, bool]:
    """{imported module: True if any import of it is at module level}."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(n) for n in tree.body}
    for n in tree.body:  # `if TYPE_CHECKING:` / try blocks at module level count as top level
        if isinstance(n, (ast.If, ast.Try)):
            top_level.update(id(c) for c in ast.walk(n))
    out: dict[str, bool] = {}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
        for t in targets:
            if t in mods and t != name:
                out[t] = out.get(t, False) or id(node) in top_level
    return out


def _graph() -> dict[str, dict[str, bool]]:
    mods = _modules()
    return {m: _imports(m, f, mods) for m, f in mods.items()}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(edges.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w) :] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        path.pop()
        state[v] = 2
        return None

    for v in sorted(edges):
        if v not in state and (cycle := visit(v)):
            return cycle
    return None


def test_the_graph_sees_function_level_imports() -> None:
    g = _graph()
    # a lazy (function-level) import, and a module-level one
    assert g["rlrt_megatron.eval.cli"]["rlrt_megatron.eval.analyze_cli"] is False
    assert g["rlrt_megatron.eval.plots"]["rlrt_megatron.eval.analyze"] is True
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circle() -> None:
    g = _graph()
    edges = {m: {t for t in ts if (m, t) not in ALLOWED_LAZY_EDGES} for m, ts in g.items()}
    cycle = _find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
    for src, dst in ALLOWED_LAZY_EDGES:
        assert g[src].get(dst) is not True, f"{src} -> {dst} must stay a function-level import"
    # ... and the exceptions alone close no circle at module level
    top = {m: {t for t, at_top in ts.items() if at_top} for m, ts in g.items()}
    assert _find_cycle(top) is None


def test_no_import_climbs_a_floor() -> None:
    g = _graph()
    packages = {_package(m) for m in g} - {"<root>"}
    assert packages == set(FLOORS), f"give each package a floor in FLOORS: {packages ^ set(FLOORS)}"
    climbs = [
        f"{m} -> {t}"
        for m, ts in g.items()
        for t in ts
        if _package(m) != _package(t)
        and "<root>" not in (_package(m), _package(t))
        and FLOORS[_package(t)] >= FLOORS[_package(m)]
        and (m, t) not in ALLOWED_CLIMBS
    ]
    assert not climbs, "imports that climb a floor (or cross one sideways):\n" + "\n".join(climbs)
    for src, dst in ALLOWED_CLIMBS:
        assert g[src].get(dst) is not True, f"{src} -> {dst} must stay a function-level import"
    high = set(FLOORS) - set(GROUND)
    for m, ts in g.items():
        if _package(m) in GROUND:
            assert not {_package(t) for t in ts} & high, (m, sorted(ts))


def test_the_architecture_doc_names_every_package() -> None:
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    subpackages = sorted(
        ".".join(p.parent.relative_to(REPO).parts) for p in PKG.rglob("__init__.py")
    )
    assert "rlrt_megatron.rollout.sglang" in subpackages
    for dotted in subpackages:
        path = "/".join(dotted.split(".")[1:]) + "/"
        assert path == "/" or path in doc, f"docs/ARCHITECTURE.md never names {path}"
    for module in PKG.glob("*.py"):  # top-level modules
        assert module.name == "__init__.py" or module.name in doc, module.name
