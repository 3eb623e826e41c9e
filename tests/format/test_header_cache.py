"""What is remembered about unchanged ray files (headers between runs, value checks within a
process): a second index build reads no header of an unchanged file, a second read scans no
values, and every change to a file (or a damaged cache) is seen as a fresh read sees it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from gpuloader.errors import DamagedFileError
from gpuloader.format import header_cache
from gpuloader.format.index import build_index


@pytest.fixture()
def reads(monkeypatch, tmp_path) -> list[tuple[str, str]]:
    """Every header actually read from a file, as ``(path, key)``; the cache in tmp_path."""
    monkeypatch.setenv("GPULOADER_CACHE_DIR", str(tmp_path / "cache"))
    seen: list[tuple[str, str]] = []
    real = header_cache.npz_member_header

    def counting(path, key):
        seen.append((str(path), key))
        return real(path, key)

    monkeypatch.setattr(header_cache, "npz_member_header", counting)
    return seen


def _settled(monkeypatch) -> None:
    """Files just copied count as settled (their ctime is now; the rule is tested apart)."""
    monkeypatch.setattr(header_cache, "SETTLE_S", -1.0)


def _counts(samples) -> dict[str, int]:
    return {str(s["ray_path"]): s["num_rays"] for s in samples}


def test_second_build_reads_no_header(tiny_copy, reads, monkeypatch):
    _settled(monkeypatch)
    ds, rays = tiny_copy
    first = build_index(ds, rays, "train")
    origins_reads = [r for r in reads if r[1] == "origins"]
    assert len(origins_reads) == len(first) > 0
    reads.clear()
    second = build_index(ds, rays, "train")
    assert [r for r in reads if r[1] == "origins"] == []
    assert _counts(second) == _counts(first)
    monkeypatch.setenv("GPULOADER_CACHE_DIR", "off")
    assert _counts(build_index(ds, rays, "train")) == _counts(first)


def test_rewritten_file_is_read_again(tiny_copy, reads, monkeypatch):
    _settled(monkeypatch)
    ds, rays = tiny_copy
    victim = build_index(ds, rays, "train")[-1]
    path = victim["ray_path"]
    st = os.stat(path)
    with np.load(path) as z:
        n = len(z["origins"])
        arrays = {k: z[k][:5] if z[k].ndim and len(z[k]) == n else z[k] for k in z.files}
    np.savez_compressed(path, **arrays)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # old mtime back: ctime still moves
    reads.clear()
    again = {str(s["ray_path"]): s["num_rays"] for s in build_index(ds, rays, "train")}
    assert again[str(path)] == 5
    assert reads == [(str(path), "origins")]


def test_damaged_file_after_caching_is_refused(tiny_copy, reads, monkeypatch):
    _settled(monkeypatch)
    ds, rays = tiny_copy
    path = build_index(ds, rays, "train")[-1]["ray_path"]
    data = path.read_bytes()
    path.write_bytes(data[:40])
    with pytest.raises(DamagedFileError, match=str(path)):
        build_index(ds, rays, "train")
    errors: list = []
    kept = build_index(ds, rays, "train", errors=errors)
    assert str(path) not in _counts(kept)
    assert [p for p, _ in errors] == [str(path)]


def test_recent_files_are_not_remembered(tiny_copy, reads):
    ds, rays = tiny_copy  # just copied: ctime is now
    build_index(ds, rays, "train")
    n = len(reads)
    build_index(ds, rays, "train")
    assert len(reads) == 2 * n


def test_damaged_or_unwritable_cache_costs_only_speed(tiny_copy, reads, monkeypatch, tmp_path):
    _settled(monkeypatch)
    ds, rays = tiny_copy
    expected = _counts(build_index(ds, rays, "train"))
    (cache_file,) = (tmp_path / "cache" / "headers").iterdir()
    cache_file.write_text('{"version": 2, "files": [1, 2')  # cut short
    assert _counts(build_index(ds, rays, "train")) == expected
    root = str(rays.resolve())
    folders = {os.path.dirname(p) for p in expected}
    for bad in ([0], {"a": 1}, "x", [0, 0, 0, [1]]):  # malformed entries for every file
        files = {p: bad for p in expected}
        payload = {"version": header_cache._VERSION, "root": root, "files": files}
        cache_file.write_text(json.dumps(payload | {"folders": dict.fromkeys(folders, bad)}))
        assert _counts(build_index(ds, rays, "train")) == expected
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("GPULOADER_CACHE_DIR", str(blocker))
    assert _counts(build_index(ds, rays, "train")) == expected
    assert blocker.is_file()


def test_off_writes_nothing(tiny_copy, reads, monkeypatch, tmp_path):
    _settled(monkeypatch)
    monkeypatch.setenv("GPULOADER_CACHE_DIR", "off")
    ds, rays = tiny_copy
    build_index(ds, rays, "train")
    assert not (tmp_path / "cache").exists()


def test_default_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("GPULOADER_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert header_cache.cache_folder() == Path(tmp_path) / "gpuloader"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert header_cache.cache_folder() == Path.home() / ".cache" / "gpuloader"


def test_values_are_scanned_once_per_unchanged_file(tiny_copy, monkeypatch):
    """NpzRayStore scans a settled, unchanged file's values once; a rewritten file (NaN in
    distances, its old mtime put back) is scanned again and refused."""
    from gpuloader.errors import DamagedFileError as Damaged
    from gpuloader.stores import npz

    monkeypatch.setattr(header_cache, "SETTLE_S", -1.0)  # file_stamp: settled at once
    scans: list[str] = []
    real = npz.check_ray_values

    def counting(path, *args, **kwargs):
        scans.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(npz, "check_ray_values", counting)
    ds, rays = tiny_copy
    sample = build_index(ds, rays, "train")[-1]
    store = npz.NpzRayStore()
    first = store.read(sample, None)
    store.read(sample, np.arange(3))
    assert scans == [str(sample["ray_path"])]
    path = sample["ray_path"]
    st = os.stat(path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["distances"] = arrays["distances"].copy()
    arrays["distances"][1] = np.nan
    np.savez_compressed(path, **arrays)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(Damaged, match="distances"):
        store.read(sample, None)
    assert len(scans) == 2 and first["distances"].shape[0] == sample["num_rays"]
