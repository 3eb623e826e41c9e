"""Memory bombs (issue 18 item 3): every declared size is checked against the file and the
level before anything is allocated; the named error names the file; ``on_error='skip'``
skips it like any bad file.

Cases: a 130 KB level-1 voxel file holding a deflated 512^3 grid (honest deflate, about
1028:1), an npz whose ``origins`` header claims 10^12 rows, a voxel header claiming a
10,000^3 grid. Headers are written by hand (:func:`_write_npz`): nothing big is made.
"""

from __future__ import annotations

import shutil
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset, SkippedFileWarning
from gpuloader.errors import DeclaredSizeError, FileCheckError, WrongGridSideError
from gpuloader.format import npz_files
from gpuloader.format.validate import classify
from gpuloader.reading.fill import fill_store
from gpuloader.reading.headers import estimate_layout, voxel_side
from gpuloader.stores.layout import store_bytes
from gpuloader.stores.npz import NpzRayStore, read_voxel_file
from support.damage import first_line, same_sample
from support.tiny_dataset import blank_rays

MB = 1 << 20


def _write_npz(path: Path, arrays: dict[str, np.ndarray], claims: dict | None = None) -> None:
    """An npz of ``arrays`` (deflated) whose ``.npy`` headers claim the shapes ``claims``
    ({key: shape}) while holding only the arrays' own bytes."""
    claims = claims or {}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, a in arrays.items():
            a = np.ascontiguousarray(a)
            header = {
                "descr": np.lib.format.dtype_to_descr(a.dtype),
                "fortran_order": False,
                "shape": tuple(claims.get(key, a.shape)),
            }
            with zf.open(f"{key}.npy", "w") as f:
                np.lib.format.write_array_header_1_0(f, header)
                f.write(a.tobytes())


def _zero_grid_bomb(path: Path, side: int) -> None:
    """An honest npz of a (side,)*3 all-False bool grid, deflated, streamed (no big array)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("voxels.npy", "w", force_zip64=True) as f:
            header = {"descr": "|b1", "fortran_order": False, "shape": (side,) * 3}
            np.lib.format.write_array_header_1_0(f, header)
            left, chunk = side**3, bytes(4 * MB)
            while left:
                f.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))


@pytest.fixture(scope="module")
def bomb512(tmp_path_factory) -> Path:
    """A ~130 KB file holding a deflated 512^3 grid (134 MB inflated), written once."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.npz"
    _zero_grid_bomb(path, 512)
    assert path.stat().st_size < 200_000
    return path


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _damage(kind: str, victim: dict, bomb: Path) -> Path:
    vox, ray = Path(victim["voxel_path"]), Path(victim["ray_path"])
    if kind == "bomb512":
        shutil.copyfile(bomb, vox)
        return vox
    if kind == "rows1e12":
        _write_npz(ray, _arrays(ray), {"origins": (10**12, 3)})
        return ray
    assert kind == "grid1e4"
    _write_npz(vox, _arrays(vox), {"voxels": (10_000,) * 3})
    return vox


KINDS = {"bomb512": WrongGridSideError, "rows1e12": DeclaredSizeError, "grid1e4": DeclaredSizeError}


def _peak_mb(fn) -> tuple[BaseException | None, float]:
    """What ``fn()`` raised and the peak of memory traced while it ran, in MiB."""
    tracemalloc.start()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the error is what we want
        got = exc
    else:
        got = None
    finally:
        peak = tracemalloc.get_traced_memory()[1] / MB
        tracemalloc.stop()
    return got, peak


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_raise_before_allocating(tiny_copy, bomb512, kind) -> None:
    clean = HierarchicalVoxelRayDataset(*tiny_copy, "train", cache_size=0)
    victim = clean.samples[-1]
    bad = _damage(kind, victim, bomb512)
    built = []
    got, peak = _peak_mb(lambda: built.append(HierarchicalVoxelRayDataset(*tiny_copy, "train")))
    if got is not None:  # a header the index reads may already stop the index build
        assert isinstance(got, KINDS[kind]), repr(got)
        assert first_line(got).startswith(str(bad)) and peak < 50, peak
        return
    ds = built[0]
    i = len(ds) - 1
    assert ds.samples[i]["hash"] == victim["hash"]
    got, peak = _peak_mb(lambda: ds[i])
    assert isinstance(got, KINDS[kind]), repr(got)
    assert first_line(got).startswith(str(bad)) and peak < 50, peak
    assert classify(got) is not None  # a bad file: skip-able
    got, peak = _peak_mb(lambda: estimate_layout(ds))  # what sizes a resident store
    assert isinstance(got, KINDS[kind]) and str(bad) in first_line(got) and peak < 50, peak


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_skip_leaves_it_out(tiny_copy, bomb512, kind) -> None:
    clean = HierarchicalVoxelRayDataset(*tiny_copy, "train", cache_size=0, seed=3)
    victim = clean.samples[-1]
    key = (victim["level"], victim["hash"])
    want = {(s["level"], s["hash"]): clean[i] for i, s in enumerate(clean.samples)}
    clean_bytes = store_bytes(estimate_layout(clean))
    bad = _damage(kind, victim, bomb512)
    with pytest.warns(SkippedFileWarning, match=str(bad)):
        ds = HierarchicalVoxelRayDataset(*tiny_copy, "train", cache_size=0, seed=3, on_error="skip")
        got = [ds[i] for i in range(len(ds))]
    assert [f for f, _ in ds.errors] == [str(bad)]
    for s, sample in zip(ds.samples, got, strict=True):
        if (s["level"], s["hash"]) == key:  # in the index: replaced by another sample
            assert sample["skipped_from"] == len(ds) - 1 and sample["hash"] != key[1]
        else:
            assert same_sample(sample, want[(s["level"], s["hash"])])
    layout = estimate_layout(ds)  # sized without the bad sample's claims
    assert set(layout.bad) == ({len(ds) - 1} if len(ds) == len(clean) else set())
    assert store_bytes(layout) < clean_bytes


def test_header_estimate_skips_the_forged_rows(tiny_copy, bomb512) -> None:
    """Even with the index's 10^12 rays (taken from that header), the store is not sized
    by them."""
    victim = HierarchicalVoxelRayDataset(*tiny_copy, "train", cache_size=0).samples[-1]
    bad = _damage("rows1e12", victim, bomb512)
    with warnings.catch_warnings():  # the index may leave it out already (then it warns)
        warnings.simplefilter("ignore", SkippedFileWarning)
        ds = HierarchicalVoxelRayDataset(*tiny_copy, "train", cache_size=0, on_error="skip")
        layout = estimate_layout(ds)
    i = len(ds) - 1
    if ds.samples[i]["hash"] == victim["hash"]:
        assert set(layout.bad) == {i} and str(bad) in layout.bad[i][1]
    assert int(layout.ray_count.sum()) < 10**6


def test_fill_store_skips_the_bomb_in_bounded_memory(tiny_copy, bomb512) -> None:
    """The case that drove the host store to 23 GB."""
    victim = HierarchicalVoxelRayDataset(*tiny_copy, "train", cache_size=0).samples[-1]
    bad = _damage("bomb512", victim, bomb512)
    ds = HierarchicalVoxelRayDataset(*tiny_copy, "train", cache_size=0, on_error="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedFileWarning)
        store = []
        got, peak = _peak_mb(lambda: store.append(fill_store(ds, "host", 0, progress=False)))
    assert got is None and peak < 50, (got, peak)
    assert set(store[0].bad) == {len(ds) - 1} and str(bad) in store[0].bad[len(ds) - 1][1]


def test_readers_outside_the_dataset(tmp_path, bomb512) -> None:
    """Without a level (a file outside the layout) the deflate bound still holds: an honest
    bomb inflates (its ratio is deflate's), a forged header is refused from its size."""
    forged = tmp_path / "forged.npz"
    _write_npz(forged, {"voxels": np.zeros((8,) * 3, bool)}, {"voxels": (10_000,) * 3})
    got, peak = _peak_mb(lambda: read_voxel_file(forged))
    assert isinstance(got, DeclaredSizeError) and peak < 50
    assert first_line(got).startswith(f"{forged}: 'voxels': header declares shape (10000,")
    with pytest.raises(DeclaredSizeError):
        voxel_side(forged)
    with pytest.raises(WrongGridSideError):  # the side is refused from the header alone
        read_voxel_file(bomb512, expected_side=8)
    assert voxel_side(bomb512) == 512  # a real 512^3 grid: no level to refuse it against
    rays = tmp_path / "rays.npz"
    n = 5
    arrays = blank_rays(n)
    _write_npz(rays, arrays, {"distances": (10**12,)})
    sample = {"ray_path": rays, "num_rays": n, "level": 1, "hash": "x"}
    got, peak = _peak_mb(lambda: NpzRayStore().read(sample, None))
    assert isinstance(got, DeclaredSizeError) and got.key == "distances" and peak < 50
    heads = npz_files.member_headers(rays, ("origins",))  # the undamaged member is fine
    assert heads["origins"] == ((n, 3), np.dtype(np.float32))


def test_check_member_size_bounds() -> None:
    info = zipfile.ZipInfo("a.npy")
    info.compress_type, info.compress_size, info.file_size = zipfile.ZIP_DEFLATED, 1000, 10**13
    dt = np.dtype(np.float32)
    npz_files.check_member_size("f.npz", "a", info, (250_000,), dt)  # 1 MB from 1 KB: fine
    with pytest.raises(DeclaredSizeError) as err:  # the zip's own size may lie too
        npz_files.check_member_size("f.npz", "a", info, (10**9,), dt)
    assert isinstance(err.value, FileCheckError) and err.value.path == "f.npz"
    with pytest.raises(DeclaredSizeError):  # no more compressed bytes than the file has
        npz_files.check_member_size("f.npz", "a", info, (250_000,), dt, file_size=10)
    info.compress_type = zipfile.ZIP_STORED
    with pytest.raises(DeclaredSizeError):  # stored: 1:1
        npz_files.check_member_size("f.npz", "a", info, (250_000,), dt)
    assert npz_files.declared_bytes((10**12, 3), dt) == 12 * 10**12  # no overflow


@pytest.mark.parametrize("pack_layout", ["rows", "striped"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_pack_refuses_or_skips_the_bomb(tiny_copy, bomb512, tmp_path, kind, pack_layout) -> None:
    """gpuloader pack on a dataset holding one bomb: under raise its named error (naming the
    file) in bounded memory; under skip one warning naming it, the pack built without it."""
    from gpuloader import PackedRayStore
    from gpuloader.stores.pack import pack_rays

    ds_dir, rays = tiny_copy
    victim = HierarchicalVoxelRayDataset(*tiny_copy, "train", cache_size=0).samples[-1]
    bad = _damage(kind, victim, bomb512)
    kw = {"progress": False, "workers": 1}
    if pack_layout == "striped":
        kw.update(layout="striped", stripe_rays=8, dataset_dir=ds_dir)
    if kind != "rows1e12" and pack_layout == "rows":  # the rows pack reads no grid
        pack_rays(rays, tmp_path / "rows", **kw)
        assert PackedRayStore(tmp_path / "rows").bad == {}
        return
    got, peak = _peak_mb(lambda: pack_rays(rays, tmp_path / "raise", **kw))
    assert isinstance(got, KINDS[kind]), repr(got)
    assert first_line(got).startswith(str(bad)) and peak < 50, peak
    with pytest.warns(SkippedFileWarning, match=str(bad)) as warned:
        pack_rays(rays, tmp_path / "skip", on_error="skip", **kw)
    assert sum(str(bad) in str(w.message) for w in warned) == 1
    store = PackedRayStore(tmp_path / "skip")
    assert (victim["level"], victim["hash"]) in set(store.bad)
