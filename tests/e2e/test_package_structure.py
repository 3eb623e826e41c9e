"""The package's shape (issue 14): no private name imported across modules, modules of one job
(no module over ~500 lines), and a README picture that names every module.

The layers themselves (each importing only those below it) are import-linter's contract in
pyproject.toml, checked by ``lint-imports`` in CI.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "gpuloader"
#: modules allowed past the size limit, and why (none today)
LONG_MODULES: dict[str, str] = {}
MAX_LINES = 500


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def private_imports(path: Path) -> list[str]:
    """``from gpuloader.x import _name`` (or ``import gpuloader.x._y``) of another module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gpuloader"):
            if node.module == me:
                continue
            found += [
                f"{node.module}.{a.name} (line {node.lineno})"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
            found += [
                f"{node.module} (line {node.lineno})"
                for part in node.module.split(".")
                if part.startswith("_") and part != "__init__"
            ]
    return found


def test_the_scan_finds_a_private_import(tmp_path: Path) -> None:
    """The checker itself: a module importing a private name of another is caught."""
    bad = PACKAGE / "format" / "zz_probe_private.py"
    bad.write_text("from gpuloader.errors import _hidden\nfrom gpuloader.errors import Public\n")
    try:
        assert private_imports(bad) == ["gpuloader.errors._hidden (line 1)"]
    finally:
        bad.unlink()


@pytest.mark.parametrize("path", modules(), ids=lambda p: module_name(p))
def test_no_private_name_imported_across_modules(path: Path) -> None:
    assert private_imports(path) == []


@pytest.mark.parametrize("path", modules(), ids=lambda p: module_name(p))
def test_modules_have_one_job_and_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    name = module_name(path)
    if name in LONG_MODULES:
        return
    assert lines <= MAX_LINES, f"{name} has {lines} lines (limit {MAX_LINES}): split it by job"


def test_readme_picture_names_every_module() -> None:
    """Every module and package of gpuloader/ has its line in the README's package picture."""
    readme = (ROOT / "README.md").read_text()
    picture = readme.split("## The package", 1)[1].split("```", 2)[1]
    missing = []
    for path in modules():
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        shown = path.parent.name + "/" if path.name == "__init__.py" else path.name
        if not re.search(rf"(^|\s){re.escape(shown)}(\s|$)", picture, re.M):
            missing.append(str(path.relative_to(ROOT)))
    assert missing == [], f"README's package picture lacks: {missing}"


def import_cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return sorted(found)


def test_no_import_circle() -> None:
    """No two modules import each other, directly or through others (lazy imports too)."""
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (dev extra)")
    graph = grimp.build_graph("gpuloader", include_external_packages=False)
    assert import_cycles(graph) == []


def test_every_package_ships_in_the_wheel() -> None:
    """pyproject's explicit package list names every package folder (else a wheel lacks it)."""
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    folders = {module_name(p) for p in PACKAGE.rglob("__init__.py") if "__pycache__" not in p.parts}
    assert folders - listed == set()
