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
