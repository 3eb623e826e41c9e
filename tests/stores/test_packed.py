"""The packed ray store: same arrays as the npz files, detects staleness, travels to workers."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gpuloader.augment import transforms as T
from gpuloader.augment.rng import select_rows
from gpuloader.commands import cli
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.errors import (
    DamagedFileError,
    GPULoaderError,
    IncompletePackError,
    PackError,
    SampleNotInPackError,
    StalePackError,
)
from gpuloader.generate import PRESETS, generate_dataset
from gpuloader.plan.sampler import RayRequest
from gpuloader.stores.npz import NpzRayStore
from gpuloader.stores.pack import PackedRayStore, open_ray_store, pack_rays
from gpuloader.stores.pack.manifest import MANIFEST, PACK_KEYS


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(dataset_dir, ray_dir, pack_dir) of a small demo dataset, packed once."""
    out = tmp_path_factory.mktemp("packed_data")
    cfg = dataclasses.replace(PRESETS["demo"], samples_per_view=60, workers=1)
    generate_dataset(out, cfg, progress=False)
    ds, rd = out / "dataset", out / "ray_dataset_hierarchical"
    pack = out / "pack"
    summary = pack_rays(rd, pack, progress=False, workers=2)
    assert summary["files"] == len(list(rd.rglob("*_rays.npz")))
    assert not summary["up_to_date"]
    return ds, rd, pack


@pytest.fixture()
def copy_of_rays(data: tuple[Path, Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the ray tree, packed (for tests that change files)."""
    rd = tmp_path / "rays"
    shutil.copytree(data[1], rd)
    pack = tmp_path / "pack"
    pack_rays(rd, pack, progress=False, workers=1)
    return rd, pack


def assert_same_arrays(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def assert_same_value(x: object, y: object) -> None:
    """Equal, recursively through dicts, lists and tuples; tensors equal in dtype and value."""
    assert type(x) is type(y)
    if isinstance(x, torch.Tensor):
        assert x.dtype == y.dtype and torch.equal(x, y)
    elif isinstance(x, dict):
        assert x.keys() == y.keys()
        for k in x:
            assert_same_value(x[k], y[k])
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y)
        for a, b in zip(x, y, strict=True):
            assert_same_value(a, b)
    else:
        assert x == y


def some_file(rd: Path, level: int = 1) -> Path:
    return sorted((rd / f"level_{level}").rglob("*_rays.npz"))[0]


# ------------------------------------------------------------------------------ contents


def test_read_matches_npz_for_every_sample_and_row_selection(data) -> None:
    ds_dir, rd, pack = data
    ds = HierarchicalVoxelRayDataset(ds_dir, rd, split="train", include_empty=True)
    others = [
        HierarchicalVoxelRayDataset(ds_dir, rd, split=s, include_empty=True)
        for s in ("val", "test")
    ]
    samples = {(s["level"], s["hash"]): s for d in (ds, *others) for s in d.samples}
    assert {lv for lv, _ in samples} == {0, 1, 2}
    npz, packed = NpzRayStore(), PackedRayStore(pack)
    rng = np.random.default_rng(0)
    for i, s in enumerate(samples.values()):
        n = s["num_rays"]
        selections = [
            None,
            np.sort(rng.choice(n, 17, replace=False)),
            select_rows(n, 25, 42, 3, i),  # unsorted, as the dataset draws them
            rng.integers(0, n, 9),  # repeats
            np.array([n - 1]),
            np.array([], dtype=np.int64),
            list(range(5)),
        ]
        for rows in selections:
            got = packed.read(s, rows)
            assert_same_arrays(npz.read(s, rows), got)
            assert all(a.flags.writeable and a.flags.c_contiguous for a in got.values())
        with pytest.raises(IndexError, match="out of range"):
            packed.read(s, np.array([n]))


def test_dataset_with_packed_store_gives_the_same_samples(data) -> None:
    ds_dir, rd, pack = data

    def make(store):
        tf = T.Compose(
            [T.RandomRotation90(p=0.7), T.RandomFlip(p=0.5), T.RandomRaySubsample(num_rays=30)]
        )
        return HierarchicalVoxelRayDataset(
            ds_dir, rd, split="train", transform=tf, seed=7, ray_store=store
        )

    a, b = make(None), make(open_ray_store(rd, pack))
    assert isinstance(b.ray_store, PackedRayStore)
    for i in range(len(a)):
        for idx in (i, RayRequest(i, 2, 12)):
            assert_same_value(a[idx], b[idx])


def test_gpu_loader_torch_backend_with_workers(data) -> None:
    from gpuloader.loading.loader import GPURayLoader

    ds_dir, rd, pack = data

    def batches(store, workers: int) -> list[dict]:
        ds = HierarchicalVoxelRayDataset(ds_dir, rd, split="train", seed=3, ray_store=store)
        loader = GPURayLoader(
            ds,
            rays_per_batch=200,
            subvolumes_per_batch=4,
            transform=T.Compose([T.RandomFlip(p=0.5), T.RandomRaySubsample(num_rays=40)]),
            num_workers=workers,
            device="cpu",
            backend="torch",
        )
        with loader:
            return list(loader)

    want = batches(None, 0)
    got = batches(PackedRayStore(pack), 2)
    assert len(want) == len(got) > 1
    for x, y in zip(want, got, strict=True):
        assert_same_value(x, y)


def test_pickles_without_its_memory_maps(data) -> None:
    ds_dir, rd, pack = data
    store = PackedRayStore(pack)
    s = HierarchicalVoxelRayDataset(ds_dir, rd, split="train").samples[0]
    before = store.read(s, None)
    blob = pickle.dumps(store)
    assert len(blob) < 2000
    clone = pickle.loads(blob)
    assert clone._open == {}
    assert_same_arrays(before, clone.read(s, None))


def test_unknown_sample_names_hash_and_fix(data) -> None:
    store = PackedRayStore(data[2])
    with pytest.raises(SampleNotInPackError) as err:
        store.read({"level": 1, "hash": "feedface" * 8}, None)
    assert isinstance(err.value, KeyError) and isinstance(err.value, DamagedFileError)
    assert "feedface" * 8 in str(err.value) and "gpuloader pack" in str(err.value)
    with pytest.raises(SampleNotInPackError, match="level 9 is not packed"):
        store.read({"level": 9, "hash": "ab"}, None)


def test_levels_subset(data, tmp_path: Path) -> None:
    ds_dir, rd, _ = data
    s = pack_rays(rd, tmp_path / "p12", levels=[1, 2], progress=False, workers=1)
    assert sorted(s["levels"]) == [1, 2]
    store = PackedRayStore(tmp_path / "p12")
    samples = HierarchicalVoxelRayDataset(ds_dir, rd, split="train").samples
    lv0 = next(x for x in samples if x["level"] == 0)
    lv2 = next(x for x in samples if x["level"] == 2)
    assert_same_arrays(NpzRayStore().read(lv2, None), store.read(lv2, None))
    with pytest.raises(SampleNotInPackError, match="--levels"):
        store.read(lv0, None)


def test_level_arrays(data, tmp_path: Path) -> None:
    """``level_arrays``: the level's read-only memory maps, None for a level not packed."""
    _, rd, _ = data
    pack_rays(rd, tmp_path / "p12", levels=[1, 2], progress=False, workers=1)
    store = PackedRayStore(tmp_path / "p12")
    assert store.level_arrays(0) is None and store.open_level(0) is None
    arrays = store.level_arrays(2)
    assert arrays is not None and tuple(arrays) == PACK_KEYS
    lv = store.open_level(2)
    assert lv is not None and lv.arrays is arrays
    n_rays, n_views = int(lv.offsets[:, 1].sum()), int(lv.offsets[:, 3].sum())
    assert arrays["origins"].shape == (n_rays, 3) and arrays["hits"].dtype == np.uint8
    assert arrays["view_positions"].shape == (n_views, 3)
    assert all(type(a) is np.ndarray and not a.flags.writeable for a in arrays.values())
    assert store.level_arrays(np.int64(2)) is arrays


# ------------------------------------------------------------------------------ staleness


def test_touched_file_is_stale(copy_of_rays) -> None:
    rd, pack = copy_of_rays
    f = some_file(rd)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    with pytest.raises(StalePackError) as err:
        PackedRayStore(pack)
    msg = str(err.value)
    assert f.relative_to(rd).as_posix() in msg and "1 changed" in msg
    assert f"gpuloader pack {rd} {pack} --force" in msg
    PackedRayStore(pack, check="full")  # same bytes: a full check accepts it
    PackedRayStore(pack, check="none")


def test_modified_removed_and_added_files_are_stale(copy_of_rays) -> None:
    rd, pack = copy_of_rays
    files = sorted((rd / "level_2").rglob("*_rays.npz"))
    with np.load(files[0]) as npz:
        arrays = dict(npz)
    arrays["distances"] = arrays["distances"] * 2  # changed, still valid (hits unchanged)
    np.savez_compressed(files[0], **arrays)
    files[1].unlink()
    new = files[2].parent / ("0" * 64 + "_rays.npz")
    new.parent.mkdir(exist_ok=True)
    shutil.copy(files[2], new)
    with pytest.raises(StalePackError) as err:
        PackedRayStore(pack)
    msg = str(err.value)
    for f, kind in ((files[0], "1 changed"), (files[1], "1 missing"), (new, "1 new")):
        assert f.relative_to(rd).as_posix() in msg and kind in msg
    # rebuilding makes it whole again
    with pytest.raises(PackError, match="--force"):
        pack_rays(rd, pack, progress=False, workers=1)
    pack_rays(rd, pack, progress=False, workers=1, force=True)
    PackedRayStore(pack, check="full")


def test_full_check_sees_content_behind_same_size_and_mtime(copy_of_rays) -> None:
    rd, pack = copy_of_rays
    f = some_file(rd)
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    PackedRayStore(pack, check="fast")  # cannot see it
    with pytest.raises(StalePackError, match="content differs"):
        PackedRayStore(pack, check="full")


def test_moved_source_tree(copy_of_rays, tmp_path: Path) -> None:
    rd, pack = copy_of_rays
    moved = tmp_path / "moved"
    rd.rename(moved)
    with pytest.raises(StalePackError, match="not there"):
        PackedRayStore(pack)
    PackedRayStore(pack, ray_dataset_dir=moved)
    PackedRayStore(pack, check="none")


def test_pack_rebuilt_while_in_use(copy_of_rays, data) -> None:
    rd, pack = copy_of_rays
    store = PackedRayStore(pack)
    blob = pickle.dumps(store)  # as a worker would get it, before its first read
    os.utime(some_file(rd), ns=(0, 10**18))
    pack_rays(rd, pack, progress=False, workers=1, force=True)
    s = HierarchicalVoxelRayDataset(data[0], rd, split="train").samples[0]
    with pytest.raises(StalePackError, match="rebuilt while in use"):
        pickle.loads(blob).read(s, None)


# ------------------------------------------------------------------------------ atomicity


def test_interrupted_pack_is_refused(copy_of_rays) -> None:
    rd, pack = copy_of_rays
    (pack / MANIFEST).unlink()
    for check in ("fast", "none"):
        with pytest.raises(IncompletePackError, match="no manifest"):
            PackedRayStore(pack, check=check)
    with pytest.raises(PackError, match="incomplete"):
        pack_rays(rd, pack, progress=False, workers=1)
    pack_rays(rd, pack, progress=False, workers=1, force=True)
    PackedRayStore(pack)


def test_truncated_array_is_refused(copy_of_rays) -> None:
    _, pack = copy_of_rays
    arr = pack / "level_1" / "origins.npy"
    with open(arr, "r+b") as f:
        f.truncate(arr.stat().st_size - 12)
    with pytest.raises(IncompletePackError, match="origins.npy"):
        PackedRayStore(pack, check="none")


def test_failed_pack_leaves_nothing(copy_of_rays, tmp_path: Path) -> None:
    rd, _ = copy_of_rays
    bad = some_file(rd, level=2)
    data = bad.read_bytes()
    bad.write_bytes(data[:100] + bytes(len(data) - 100))
    out = tmp_path / "new_pack"
    with pytest.raises(GPULoaderError) as err:
        pack_rays(rd, out, progress=False, workers=2)
    assert isinstance(err.value, DamagedFileError) and bad.name in str(err.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".new_pack")]


def test_up_to_date_and_refuses_foreign_folders(data, tmp_path: Path) -> None:
    _, rd, pack = data
    assert pack_rays(rd, pack, progress=False)["up_to_date"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(PackError, match="not a ray pack"):
        pack_rays(rd, other, progress=False, force=True)
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(PackError, match="into the ray tree"):
        pack_rays(rd, rd, progress=False, force=True)


def test_open_ray_store_without_pack_is_npz(data) -> None:
    assert isinstance(open_ray_store(data[1]), NpzRayStore)


def test_cli(copy_of_rays, tmp_path: Path, monkeypatch, capsys) -> None:
    rd, _ = copy_of_rays
    monkeypatch.setitem(cli.COMMANDS, "pack", ("gpuloader.commands.pack", "pack rays"))
    out = tmp_path / "cli_pack"
    assert cli.main(["pack", str(rd), str(out), "--quiet", "--workers", "1"]) == 0
    assert "packed" in capsys.readouterr().out
    assert cli.main(["pack", str(rd), str(out), "--quiet"]) == 0
    assert "up to date" in capsys.readouterr().out
    some_file(rd).unlink()
    assert cli.main(["pack", str(rd), str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main(["pack", str(rd), str(out), "--quiet", "--force", "--levels", "1"]) == 0
    assert PackedRayStore(out).levels == [1]
