"""Layout damage that used to make skip give up: a missing (or unreadable first) voxel file
and a symlink loop in a folder of the ray tree are left out and named under
``on_error="skip"``, and named (not a bare OSError) under raise; pack and verify name them."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest

from gpuloader.commands import verify
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.errors import (
    DamagedFileError,
    DatasetLayoutError,
    SkippedFileWarning,
    UnreadableFileError,
)
from gpuloader.format.index import build_index, scan_ray_tree
from gpuloader.stores.pack import pack_rays
from gpuloader.stores.pack.manifest import read_manifest


def _keys(samples) -> list[tuple[int, str]]:
    return [(s["level"], s["hash"]) for s in samples]


def _skip_dataset(ds: Path, rays: Path) -> HierarchicalVoxelRayDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedFileWarning)
        return HierarchicalVoxelRayDataset(ds, rays, "train", on_error="skip", cache_size=0)


@pytest.mark.parametrize("which", ["first", "last"])
def test_missing_voxel_file(tiny_copy, which) -> None:
    ds, rays = tiny_copy
    clean = build_index(ds, rays, "train")
    level1 = [s for s in clean if s["level"] == 1]
    victim = level1[0] if which == "first" else level1[-1]
    victim["voxel_path"].unlink()

    with pytest.raises(DatasetLayoutError) as info:
        build_index(ds, rays, "train")
    assert str(info.value).startswith(f"{victim['voxel_path']}: voxel file missing")

    dataset = _skip_dataset(ds, rays)
    assert _keys(dataset.samples) == _keys(s for s in clean if s is not victim)
    assert [f for f, _ in dataset.read_log.errors] == [str(victim["voxel_path"])]


def test_damaged_voxel_file_read_for_the_level_side(tiny_copy) -> None:
    """The index reads the header of the first voxel file of a level for its side (the
    empty grid's hash): a damaged one no longer stops a skip index (the next file of the
    level gives the side; the bad file is named when it is read), and raise still names it."""
    ds, rays = tiny_copy
    clean = build_index(ds, rays, "train", include_empty=True)
    first_hash = min(s["hash"] for s in clean if s["level"] == 1)
    bad = next(s["voxel_path"] for s in clean if s["hash"] == first_hash)
    bad.write_bytes(b"not a zip\n")
    kept = build_index(ds, rays, "train", include_empty=True, errors=[])
    assert _keys(kept) == _keys(clean)
    with pytest.raises(DamagedFileError) as info:
        build_index(ds, rays, "train", include_empty=True)
    assert str(info.value).startswith(str(bad))


def _loop_folder(rays: Path, victim: dict) -> Path:
    """Replace the victim's prefix folder by a symlink to itself."""
    folder = victim["ray_path"].parent
    shutil.rmtree(folder)
    os.symlink(folder.name, folder)
    return folder


def test_symlink_loop_folder_in_the_ray_tree(tiny_copy) -> None:
    ds, rays = tiny_copy
    clean = build_index(ds, rays, "train")
    victim = next(s for s in clean if s["level"] == 1)
    folder = _loop_folder(rays, victim)

    with pytest.raises(UnreadableFileError) as info:
        build_index(ds, rays, "train")
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{folder}: folder cannot be listed (symlink loop")

    dataset = _skip_dataset(ds, rays)
    assert _keys(dataset.samples) == _keys(s for s in clean if s is not victim)
    assert [f for f, _ in dataset.read_log.errors] == [str(folder)]


def test_loops_outside_the_tree_names_are_ignored(tiny_copy) -> None:
    ds, rays = tiny_copy
    before = scan_ray_tree(rays)
    os.symlink("notes", rays / "notes")  # not a level_<L> folder: not part of the tree
    os.symlink("level_x", rays / "level_x")
    assert scan_ray_tree(rays) == before


def test_pack_names_the_loop_folder(tiny_copy, tmp_path) -> None:
    ds, rays = tiny_copy
    victim = next(s for s in build_index(ds, rays, "train") if s["level"] == 1)
    folder = _loop_folder(rays, victim)
    with pytest.raises(UnreadableFileError) as info:
        pack_rays(rays, tmp_path / "pack", progress=False, workers=1)
    assert str(info.value).startswith(f"{folder}: folder cannot be listed")
    assert not (tmp_path / "pack").exists()


def test_pack_under_skip_leaves_the_loop_folder_out(tiny_copy, tmp_path) -> None:
    """Under skip the pack is built without the folder, names it, records it in the
    manifest; a later raise run on that pack raises the recorded error."""
    ds, rays = tiny_copy
    victim = next(s for s in build_index(ds, rays, "train") if s["level"] == 1)
    folder = _loop_folder(rays, victim)
    with pytest.warns(SkippedFileWarning, match="folder cannot be listed") as caught:
        out = pack_rays(rays, tmp_path / "pack", progress=False, workers=1, on_error="skip")
    assert any(str(folder) in str(w.message) for w in caught)
    packed = {rel.split("/")[-1] for rel in read_manifest(tmp_path / "pack")["files"]}
    assert f"{victim['hash']}_rays.npz" not in packed and out["files"] == len(packed)
    with pytest.raises(UnreadableFileError, match="left out of ray pack"):
        pack_rays(rays, tmp_path / "pack", progress=False, workers=1)


def test_verify_reports_loop_folder_and_missing_voxel(tiny_copy) -> None:
    ds, rays = tiny_copy
    level1 = [s for s in build_index(ds, rays, "train") if s["level"] == 1]
    folder = _loop_folder(rays, level1[0])
    level1[1]["voxel_path"].unlink()
    report = verify.verify_dataset(ds, rays, fraction=0.0, progress=False)
    unreadable = {p.file: p.message for p in report.problems if p.kind == verify.UNREADABLE}
    assert str(folder) in unreadable and "symlink loop" in unreadable[str(folder)]
    assert str(level1[1]["voxel_path"]) in {
        p.file for p in report.problems if p.kind == verify.MISSING
    }
