"""Remembered folder listings of the ray tree (:mod:`gpuloader.format.header_cache`): a
second index build lists no unchanged ``level_<L>/<hh>/`` folder, and every change a listing
depends on (a file removed, added, replaced by a link out of the root) is seen as a fresh
scan sees it. Also the root guard's folder checks, which list a parent once instead of one
``lstat`` per sub-folder."""

from __future__ import annotations

import os
import shutil

import pytest

from gpuloader.errors import IncompleteDatasetWarning, OutsideRootError
from gpuloader.format import header_cache, index_memo, layout
from gpuloader.format.index import build_index


@pytest.fixture()
def listed(monkeypatch, tmp_path) -> list[str]:
    """Every folder ``os.scandir`` lists in the level-tree walk; the cache in tmp_path, and
    files just copied count as settled."""
    monkeypatch.setenv("GPULOADER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(header_cache, "SETTLE_S", -1.0)
    seen: list[str] = []
    real = os.scandir

    def counting(path="."):
        if isinstance(path, (str, os.PathLike)):  # not shutil's descriptors
            seen.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(layout.os, "scandir", counting)
    return seen


def _prefix_folders(seen: list[str], rays) -> list[str]:
    """The ``level_<L>/<hh>`` folders among ``seen``."""
    root = os.fspath(rays)
    return [p for p in seen if p.startswith(root) and os.path.relpath(p, root).count(os.sep) == 1]


def _names(samples) -> list[str]:
    return sorted(str(s["ray_path"]) for s in samples)


def test_second_build_lists_no_unchanged_folder(tiny_copy, listed):
    ds, rays = tiny_copy
    first = build_index(ds, rays, "train")
    assert _prefix_folders(listed, rays)  # the first build lists them
    listed.clear()
    second = build_index(ds, rays, "train")
    assert _prefix_folders(listed, rays) == []
    assert _names(second) == _names(first)
    assert [s["num_rays"] for s in second] == [s["num_rays"] for s in first]


def test_removed_and_added_files_are_seen(tiny_copy, listed, tmp_path):
    ds, rays = tiny_copy
    first = build_index(ds, rays, "train")
    victim = first[-1]["ray_path"]
    kept = tmp_path / "kept.npz"
    shutil.move(victim, kept)  # the folder's mtime moves: listed again
    listed.clear()
    with pytest.warns(IncompleteDatasetWarning, match="1 of"):
        without = build_index(ds, rays, "train")
    assert _names(without) == [n for n in _names(first) if n != str(victim)]
    assert _prefix_folders(listed, rays) == [str(victim.parent)]
    shutil.move(kept, victim)
    assert _names(build_index(ds, rays, "train")) == _names(first)


def test_file_replaced_by_a_link_out_of_the_root_is_refused(tiny_copy, listed, tmp_path):
    ds, rays = tiny_copy
    victim = build_index(ds, rays, "train")[-1]["ray_path"]
    outside = tmp_path / "elsewhere.npz"
    shutil.copy(victim, outside)
    os.remove(victim)
    os.symlink(outside, victim)
    for _ in range(2):  # the walk ends (the link left out): a listing could be remembered
        errors: list = []
        build_index(ds, rays, "train", errors=errors)
        assert [p for p, _ in errors] == [str(victim)]
    listed.clear()
    with pytest.raises(OutsideRootError, match=str(victim)):  # a folder holding a link is
        build_index(ds, rays, "train")  # never remembered: listed, its link checked
    assert str(victim.parent) in _prefix_folders(listed, rays)


def test_folder_that_cannot_be_listed_is_not_remembered_empty(tiny_copy, listed, monkeypatch):
    ds, rays = tiny_copy
    first = build_index(ds, rays, "train")
    folder = str(first[-1]["ray_path"].parent)
    header_cache._LOADED.clear()
    index_memo._MEMO.clear()  # the failing listing below is faked: no stamp moves
    shutil.rmtree(os.environ["GPULOADER_CACHE_DIR"])  # nothing remembered yet
    real = layout.os.scandir

    def failing(path="."):
        if isinstance(path, (str, os.PathLike)) and os.fspath(path) == folder:
            raise PermissionError(13, "Permission denied", folder)
        return real(path)

    monkeypatch.setattr(layout.os, "scandir", failing)
    errors: list = []
    build_index(ds, rays, "train", errors=errors)
    assert any(folder in p for p, _ in errors)
    monkeypatch.setattr(layout.os, "scandir", real)
    assert _names(build_index(ds, rays, "train")) == _names(first)


def test_root_guard_finds_a_linked_folder_among_its_siblings(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    for name in ("a", "b", "c"):
        (root / "level" / name).mkdir(parents=True)
    (root / "level" / "d").symlink_to(outside, target_is_directory=True)
    (root / "level" / "b2").symlink_to(root / "level" / "b", target_is_directory=True)
    for order in (("a", "b", "c", "d", "b2"), ("d", "a", "b2", "c")):
        guard = layout.RootGuard(root)
        got = {n: guard.outside(root / "level" / n / "f.npz", is_link=False) for n in order}
        assert got["d"] == str(outside.resolve() / "f.npz")
        assert all(got[n] is None for n in order if n != "d")
