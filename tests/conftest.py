"""Shared fixtures: the tiny hand-made datasets and the damaged-file corpus.

Helpers live in ``tests/support/`` (importable as ``support``: ``pythonpath = ["tests"]`` in
pyproject.toml); no test module imports another.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from support.damage import CASES, ROOT, damage
from support.tiny_dataset import write_tiny_dataset


@pytest.fixture(scope="session", autouse=True)
def _header_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """The remembered ray-file headers go to a folder of this run, not the user's cache
    (children inherit it); a test may point GPULOADER_CACHE_DIR elsewhere with monkeypatch."""
    before = os.environ.get("GPULOADER_CACHE_DIR")
    os.environ["GPULOADER_CACHE_DIR"] = str(tmp_path_factory.mktemp("header_cache"))
    yield
    if before is None:
        os.environ.pop("GPULOADER_CACHE_DIR", None)
    else:
        os.environ["GPULOADER_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset_dir, ray_dataset_dir) of the tiny dataset, levels 0 and 1 (read-only!)."""
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"), max_level=1)


@pytest.fixture()
def tiny_copy(tiny_dataset, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the tiny dataset that a test may damage: ``tmp_path/dataset`` and
    ``tmp_path/ray_dataset_hierarchical`` (base 16: level-1 grids are 8^3)."""
    ds, rays = tiny_dataset
    return (
        Path(shutil.copytree(ds, tmp_path / "dataset")),
        Path(shutil.copytree(rays, tmp_path / "ray_dataset_hierarchical")),
    )


@pytest.fixture(scope="session")
def tiny_dataset3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Levels 0, 1 and 2 (16^3, 8^3, 4^3)."""
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny3"), max_level=2)


@pytest.fixture(params=sorted(CASES))
def case(request, tiny_dataset, tmp_path):
    """(kind, clean dirs, damaged dirs, the damaged file, the bad sample's (level, hash))."""
    kind = request.param
    if kind == "unreadable" and ROOT:
        pytest.skip("permissions do not apply to root")
    ds, rays = tiny_dataset
    cds = Path(shutil.copytree(ds, tmp_path / "dataset"))
    crays = Path(shutil.copytree(rays, tmp_path / "ray_dataset_hierarchical"))
    clean = HierarchicalVoxelRayDataset(cds, crays, "train", cache_size=0)
    victim = clean.samples[-1]  # a level-1 sample
    bad = damage(kind, victim)
    yield kind, (ds, rays), (cds, crays), bad, (victim["level"], victim["hash"])
    if bad.exists() and not bad.is_symlink():
        os.chmod(bad, 0o644)
