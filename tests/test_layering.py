"""The package's layering, as docs/how_it_works.md's "Architecture" section draws it.

Every fxcache-internal import (top-level and lazy ones inside functions alike) is read
from the source with ``ast`` and checked against :data:`MAY_IMPORT`: a stage imports
only the stages below it, so the import graph has no cycle. A new import that breaks
the layering fails here, naming the file and line.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fxcache"

# the diagram moved from the README to docs/how_it_works.md (issue 20)
DIAGRAM = ROOT.parent / "docs" / "how_it_works.md"


def _layers(doc: str) -> list[list[str]]:
    """The Architecture diagram (docs/how_it_works.md), top line first: each line's stages."""
    head = doc.index("## Architecture: who may import whom")
    start = doc.index("```", head) + 3
    block = doc[start: doc.index("```", start)]
    return [[s.strip() for s in line.split("  ")[0].split("·")] for line in block.strip().splitlines()]


def _may_import(layers: list[list[str]]) -> dict[str, set[str]]:
    """stage -> the stages it may import: those on the lines below its own."""
    allowed = {}
    for i, line in enumerate(layers):
        below = {s for lower in layers[i + 1:] for s in lower}
        for stage in line:
            # only the top line may import the package's own re-exports (fxcache/__init__)
            allowed[stage] = below | ({"__init__"} if i == 0 else set())
    return allowed


# the package's __init__ and __main__ sit above everything (they re-export the API)
MAY_IMPORT: dict[str, set[str] | None] = {**_may_import(_layers(DIAGRAM.read_text())), "__init__": None,
                                          "__main__": None}


def _imports(path: pathlib.Path):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    package = parts[:-1]  # the package a relative import starts from (same for __init__)
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            if target[0] != "fxcache":
                continue
            for alias in node.names:  # `from .rewrite import contract` is fxcache.rewrite.contract
                yield node.lineno, target + [alias.name]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fxcache":
                    yield node.lineno, alias.name.split(".")


def _known_stages() -> set[str]:
    return {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
            if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())}


def _stage(parts: list[str]) -> str:
    # `from fxcache import compile` reads a name the package's __init__ re-exports
    return parts[1] if len(parts) > 1 and parts[1] in _known_stages() else "__init__"


def _edges():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent)
        own = _stage(list(rel.with_suffix("").parts))
        for line, target in _imports(path):
            stage = _stage(target)
            if stage != own:
                yield rel, line, own, stage, ".".join(target[1:3])


def test_every_stage_is_declared():
    stages = _known_stages()
    assert stages <= set(MAY_IMPORT), f"stages missing from MAY_IMPORT: {sorted(stages - set(MAY_IMPORT))}"


def test_imports_follow_the_layers():
    bad = []
    for rel, line, own, stage, dotted in _edges():
        allowed = MAY_IMPORT.get(own)
        if allowed is None or stage in allowed or dotted in allowed:
            continue
        bad.append(f"{rel}:{line}: {own} imports {dotted or stage}")
    assert not bad, "imports against the layering (docs/how_it_works.md, Architecture):\n" + "\n".join(bad)


def test_the_diagram_names_each_stage_once():
    stages = [s for line in _layers(DIAGRAM.read_text()) for s in line]
    assert len(stages) == len(set(stages)), stages
    assert {"errors", "runtime", "api", "calibrate", "rewrite"} <= set(stages)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The check is not vacuous: a runtime module importing the API is caught."""
    pkg = tmp_path / "fxcache"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "api.py").write_text("")
    (pkg / "calibrate").mkdir()
    (pkg / "calibrate" / "__init__.py").write_text("")
    (pkg / "runtime.py").write_text("def f():\n    from .api import compile\n    from .calibrate import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)  # DIAGRAM is bound already
    found = [(own, stage) for _, _, own, stage, _ in _edges()]
    assert ("runtime", "api") in found and ("runtime", "calibrate") in found
    with pytest.raises(AssertionError, match="runtime imports api"):
        test_imports_follow_the_layers()


def _module_of(parts: list[str]) -> str | None:
    """The fxcache module a target names (``fxcache.schedules.mask.Mask`` -> ``fxcache/schedules/mask``),
    or None when it is not a file of the package."""
    for n in range(len(parts), 0, -1):
        cand = ROOT.parent.joinpath(*parts[:n])
        if cand.with_suffix(".py").is_file():
            return "/".join(parts[:n])
        if (cand / "__init__.py").is_file():
            return "/".join(parts[:n]) + "/__init__"
    return None


def _module_cycles(stage: str) -> list[list[str]]:
    """Import cycles among the modules of one stage (package), lazy imports included;
    the package's ``__init__`` (which re-exports its modules) is left out."""
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / stage).rglob("*.py")):
        if path.name == "__init__.py":
            continue
        me = "/".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        graph.setdefault(me, set())
        for _, target in _imports(path):
            mod = _module_of(target)
            if mod and mod != me and mod.startswith(f"fxcache/{stage}/") and not mod.endswith("__init__"):
                graph[me].add(mod)
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


@pytest.mark.parametrize("stage", sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()))
def test_no_import_cycle_inside_a_stage(stage):
    """Inside a stage too (lazy imports included): the schedules' mask <-> registry circle
    is gone, and none comes back."""
    assert not _module_cycles(stage), _module_cycles(stage)
