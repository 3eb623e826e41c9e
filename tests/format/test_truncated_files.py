"""A truncated npz (issue 18, item 10): every reader of the format raises its named error and
leaves no file open (no ResourceWarning when the garbage is collected), whether the cut
removed the archive's directory or kept it (a directory pointing past the data)."""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import pytest

from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.errors import DamagedFileError, SkippedFileWarning
from gpuloader.format.listing import npz_member_header
from gpuloader.format.npz_direct import fast_load_npz
from gpuloader.format.npz_files import load_npz, member_headers
from gpuloader.stores.npz import read_voxel_file

RAY_KEYS = ("origins", "directions", "distances", "hits")


def _cut(path: Path, frac: float, keep_directory: bool) -> None:
    """Keep the first ``frac`` of the file; with ``keep_directory`` append its central
    directory again (found from its end record), so the archive opens and fails later."""
    data = path.read_bytes()
    head = data[: int(len(data) * frac)]
    if keep_directory:
        end = data.rfind(b"PK\x05\x06")
        start = int.from_bytes(data[end + 16 : end + 20], "little")  # directory offset
        head += data[start:]
    path.write_bytes(head)


def _readers(path: Path, voxel: bool) -> list:
    if voxel:
        return [lambda: load_npz(path, ("voxels",)), lambda: read_voxel_file(path)]
    return [
        lambda: load_npz(path, RAY_KEYS),
        lambda: fast_load_npz(path, RAY_KEYS),
        lambda: member_headers(path, RAY_KEYS),
        lambda: npz_member_header(path, "origins"),
    ]


@pytest.mark.parametrize("keep_directory", [False, True])
@pytest.mark.parametrize("frac", [0.05, 0.4, 0.9, 0.99])
@pytest.mark.parametrize("voxel", [False, True])
def test_every_reader_names_it_and_closes_the_file(tiny_copy, frac, keep_directory, voxel) -> None:
    ds, rays = tiny_copy
    root = ds / "subvolumes" if voxel else rays / "level_1"
    path = sorted(root.rglob("*.npz"))[0]
    _cut(path, frac, keep_directory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for read in _readers(path, voxel):
            with pytest.raises(DamagedFileError) as info:
                read()
            assert str(info.value).startswith(str(path))
            del info
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []


@pytest.mark.parametrize("keep_directory", [False, True])
def test_dataset_under_skip_closes_the_file(tiny_copy, keep_directory) -> None:
    """Through the dataset (index headers, then sample reads) under skip: the bad file is
    named and nothing is left open."""
    ds, rays = tiny_copy
    for i, path in enumerate(sorted(rays.rglob("*_rays.npz"))[:4]):
        _cut(path, 0.3 + 0.2 * i, keep_directory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = HierarchicalVoxelRayDataset(ds, rays, "train", on_error="skip", cache_size=0)
        for i in range(len(data)):
            data[i]
        del data
        gc.collect()
    kinds = [w.category for w in caught]
    assert SkippedFileWarning in kinds
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []
