"""The package's shape, checked: the import graph has no cycles, layers only import downwards, stages never
import each other, no prismdd import hides inside a function, and every config field carries its help text.

Run alone with ``python -m pytest tests/test_layout.py``; ``python3 ../shared/tools/import_graph.py`` is the
independent check the issue names."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import prismdd
from prismdd.audit import AuditConfig
from prismdd.cli import STAGES, stage
from prismdd.core.config import CommonConfig, field_help

PKG = Path(prismdd.__file__).parent
# each module's layer; a module may import its own layer's modules (core internals) or lower layers only
LAYERS = {"core": 0, "artifacts": 1, "methods": 1.5, "stages": 2, "pipeline": 3, "report": 2, "export": 2, "audit": 4, "cli": 5, "__init__": 6,
          "__main__": 6}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports_of(name: str, path: Path, *, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(imported prismdd module, line) pairs; relative imports resolved."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                root = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(root + ([base] if base else []))
            if base.startswith("prismdd"):
                found.append((base, node.lineno))
                found += [(f"{base}.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("prismdd")]
    known = modules()
    out = []
    for mod, line in found:
        while mod and mod not in known:
            mod = mod.rpartition(".")[0]
        if mod and mod != name:
            out.append((mod, line))
    return out


def layer(name: str) -> tuple[int, str]:
    parts = name.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS[top], top


def test_no_import_cycles():
    mods = modules()
    graph = {m: {d for d, _ in imports_of(m, p)} for m, p in mods.items() if not p.name == "__init__.py"}
    graph = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                pytest.fail(f"import cycle: {' -> '.join(stack[stack.index(d):] + [d])}")
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_layers_only_import_downwards():
    bad = []
    for name, path in modules().items():
        if path.name == "__init__.py" and name == "prismdd":
            continue
        mine, _ = layer(name)
        for dep, line in imports_of(name, path):
            theirs, top = layer(dep)
            if theirs > mine or (theirs == mine and top != layer(name)[1]):
                bad.append(f"{path.relative_to(PKG)}:{line} imports {dep}")
    assert not bad, "\n".join(bad)


def test_stages_import_no_other_stage():
    bad = []
    for name, path in modules().items():
        if name.startswith("prismdd.stages."):
            bad += [f"{name} imports {d}" for d, _ in imports_of(name, path) if d.startswith("prismdd.stages.")]
    assert not bad, "\n".join(bad)


def test_no_prismdd_import_inside_a_function():
    """Function-level imports are how cycles were hidden; every prismdd import sits at the top of its module."""
    bad = []
    for name, path in modules().items():
        everywhere = imports_of(name, path)
        top = set(imports_of(name, path, top_level_only=True))
        bad += [f"{path.relative_to(PKG)}:{line} imports {d}" for d, line in everywhere if (d, line) not in top]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("cls", sorted({stage(n)[0] for n in STAGES} | {CommonConfig, AuditConfig},
                                       key=lambda c: c.__name__))
def test_every_config_field_has_help(cls):
    missing = [f.name for f in dataclasses.fields(cls) if not field_help(f).strip()]
    assert not missing, f"{cls.__name__}: fields without help text: {missing}"


def test_the_shared_tool_agrees():
    """The issue's own checker, when this checkout sits beside ../shared (as on the team's machines and CI)."""
    import subprocess
    import sys

    tool = PKG.parents[2] / "shared" / "tools" / "import_graph.py"
    if not tool.exists():
        pytest.skip("../shared/tools/import_graph.py is not beside this checkout")
    proc = subprocess.run([sys.executable, str(tool)], cwd=PKG.parents[1], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
