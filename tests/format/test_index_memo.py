"""Indexes remembered within a process (:mod:`gpuloader.format.index_memo`): a repeated
build of an unchanged dataset scans nothing and returns what a fresh build returns; after
each change an index depends on (a ray file rewritten, removed or added back, splits.json
edited, a voxel file removed or linked out of the root, a folder of either tree moved out and
linked back, the roots spelt another way) the remembered build gives what a fresh one gives,
error and warnings included; and builds that must not be remembered are built every time."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from gpuloader.format import header_cache, index, index_memo


@pytest.fixture()
def scans(monkeypatch, tmp_path) -> list[int]:
    """How many builds scanned the ray tree; the header cache in tmp_path, every file counted
    as settled, nothing remembered from other tests."""
    monkeypatch.setenv("GPULOADER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(header_cache, "SETTLE_S", -1.0)
    monkeypatch.setattr(index_memo, "_MEMO", type(index_memo._MEMO)())
    header_cache._LOADED.clear()
    count: list[int] = []
    real = index.scan_ray_tree

    def counting(*args, **kwargs):
        count.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(index, "scan_ray_tree", counting)
    return count


def _outcome(ds, rays, **kw) -> tuple:
    """What a build gives: its samples (or its error's class and first line) and the
    classes of the warnings it issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got: object = [
                (s["level"], s["hash"], s["num_rays"], str(s["ray_path"]), str(s["voxel_path"]),
                 tuple(s["object_ids"]), s["is_empty"], s["is_trivial"])
                for s in index.build_index(ds, rays, "train", **kw)
            ]  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the outcome compared
            got = (type(exc).__name__, str(exc).splitlines()[0])
    return got, sorted({w.category.__name__ for w in caught})


def _fresh(ds, rays, **kw) -> tuple:
    """:func:`_outcome` with nothing remembered in this process."""
    index_memo._MEMO.clear()
    header_cache._LOADED.clear()
    return _outcome(ds, rays, **kw)


def _train_ray_file(ds: Path, rays: Path) -> Path:
    """The ray file of the train split's first level-1 sample (a change to it matters)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = index.build_index(ds, rays, "train")
    return next(s["ray_path"] for s in samples if s["level"] == 1)


def _rewrite_fewer_rays(ds: Path, rays: Path, tmp: Path) -> None:
    path = _train_ray_file(ds, rays)
    with np.load(path) as f:
        arrays = {k: f[k][:3] if f[k].ndim and len(f[k]) > 3 else f[k] for k in f.files}
    with open(path, "wb") as out:  # in place: the same inode
        np.savez(out, **arrays)


def _remove_ray_file(ds: Path, rays: Path, tmp: Path) -> None:
    _train_ray_file(ds, rays).unlink()


def _remove_and_add_back(ds: Path, rays: Path, tmp: Path) -> None:
    path = _train_ray_file(ds, rays)
    shutil.move(path, tmp / "held.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one file short
        index.build_index(ds, rays, "train")  # remembered without it
    shutil.move(tmp / "held.npz", path)


def _move_an_object_to_val(ds: Path, rays: Path, tmp: Path) -> None:
    doc = json.loads((ds / "splits.json").read_text())
    first = sorted(o for o, s in doc["object_splits"].items() if s == "train")[0]
    doc["object_splits"][first] = "val"
    (ds / "splits.json").write_text(json.dumps(doc))


def _voxel_of(ds: Path, rays: Path) -> Path:
    ray = _train_ray_file(ds, rays)
    return Path(index.layout.voxel_path(ds, 1, ray.name[: -len("_rays.npz")]))


def _remove_voxel_file(ds: Path, rays: Path, tmp: Path) -> None:
    _voxel_of(ds, rays).unlink()


def _link_voxel_file_outside(ds: Path, rays: Path, tmp: Path) -> None:
    vox = _voxel_of(ds, rays)
    shutil.copy(vox, tmp / "outside.npz")
    vox.unlink()
    vox.symlink_to(tmp / "outside.npz")


def _move_out_and_link(folder: Path, tmp: Path) -> None:
    """``folder`` moved out of its tree (its files keep their inodes) and linked back."""
    away = tmp / f"away_{folder.name}"
    shutil.move(folder, away)
    folder.symlink_to(away, target_is_directory=True)


def _link_voxel_folder_outside(ds: Path, rays: Path, tmp: Path) -> None:
    _move_out_and_link(_voxel_of(ds, rays).parent, tmp)


def _link_ray_folder_outside(ds: Path, rays: Path, tmp: Path) -> None:
    _move_out_and_link(_train_ray_file(ds, rays).parent, tmp)


CHANGES = {
    "ray file rewritten in place": _rewrite_fewer_rays,
    "ray file removed": _remove_ray_file,
    "ray file removed, added back": _remove_and_add_back,
    "splits.json edited": _move_an_object_to_val,
    "voxel file removed": _remove_voxel_file,
    "voxel file linked out of the root": _link_voxel_file_outside,
    "voxel folder moved out, linked": _link_voxel_folder_outside,
    "ray folder moved out, linked": _link_ray_folder_outside,
}


def test_unchanged_dataset_is_not_scanned_again(tiny_copy, scans):
    ds, rays = tiny_copy
    first = _outcome(ds, rays)
    assert len(scans) == 1
    for _ in range(3):
        assert _outcome(ds, rays) == first
    assert len(scans) == 1
    assert _fresh(ds, rays) == first and len(scans) == 2


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_is_seen_as_a_fresh_build_sees_it(tiny_copy, scans, tmp_path, change):
    ds, rays = tiny_copy
    before = _outcome(ds, rays)
    assert _outcome(ds, rays) == before and len(scans) == 1  # remembered
    CHANGES[change](ds, rays, tmp_path)
    got = _outcome(ds, rays)
    if change == "ray file removed, added back":
        assert got == before
    else:
        assert got != before  # the change matters to the index
    assert got == _fresh(ds, rays)


def test_samples_handed_out_may_be_changed(tiny_copy, scans):
    ds, rays = tiny_copy
    first = index.build_index(ds, rays, "train")
    mine = index.build_index(ds, rays, "train")
    mine[0]["object_ids"].append("mine")
    mine[0]["num_rays"] = -5
    mine.pop()
    again = index.build_index(ds, rays, "train")
    assert again == first and len(scans) == 1


def test_roots_spelt_another_way_give_their_own_paths(tiny_copy, scans, monkeypatch):
    ds, rays = tiny_copy
    index.build_index(ds, rays, "train")
    monkeypatch.chdir(ds.parent)
    got = index.build_index(Path(ds.name), Path(rays.name), "train")
    assert all(not s["ray_path"].is_absolute() for s in got)
    assert _outcome(Path(ds.name), Path(rays.name)) == _fresh(Path(ds.name), Path(rays.name))


def test_builds_with_errors_warnings_unsettled_files_or_no_cache_are_not_remembered(
    tiny_dataset, tiny_copy, scans, monkeypatch
):
    ds, rays = tiny_copy
    bad = _train_ray_file(ds, rays)
    bad.write_bytes(b"not an npz")
    for _ in range(2):
        errors: list = []
        index.build_index(ds, rays, "train", errors=errors)
        assert [p for p, _ in errors] == [str(bad)]  # recorded by every build
    assert len(scans) == 3
    bad.unlink()
    for _ in range(2):  # one file short: each build warns
        assert _outcome(ds, rays)[1] == ["IncompleteDatasetWarning"]
    assert len(scans) == 5
    clean = Path(shutil.copytree(tiny_dataset[1], ds.parent / "clean"))
    monkeypatch.setattr(header_cache, "SETTLE_S", 3600.0)  # nothing has settled
    for _ in range(2):
        _outcome(ds, clean)
    assert len(scans) == 7
    monkeypatch.setattr(header_cache, "SETTLE_S", -1.0)
    monkeypatch.setenv("GPULOADER_CACHE_DIR", "off")
    for _ in range(2):
        _outcome(ds, clean)
    assert len(scans) == 9
    monkeypatch.setenv("GPULOADER_CACHE_DIR", os.fspath(ds.parent / "cache"))
    for _ in range(2):
        assert _outcome(ds, clean)[1] == []
    assert len(scans) == 10
