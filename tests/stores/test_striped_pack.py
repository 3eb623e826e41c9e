"""The striped pack (issue 15, item 1): its stripes, its CPU API, its build and its checks.

* Over the S_L stripes of a level every row of every sample is there, by the documented rule
  (``perm((s*W + j) mod n)``; wrap for n < S_L*W, repeats for n < W), each record equal to
  its file row, each stripe's kept slots distinct.
* ``PackedRayStore(striped).read`` equals the npz files bit for bit (whole files, chunks,
  every row selection), and so do datasets over it, on the tiny datasets and a generated one.
* Id fields narrowed to the smallest dtype the level's values allow, refused otherwise;
  staleness (ray and voxel files), atomic builds, ``on_error="skip"``, the CLI.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from gpuloader.augment import transforms as T
from gpuloader.augment.rng import Purpose, feistel_keys, feistel_permute, select_rows
from gpuloader.commands.cli import main
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.errors import (
    BadGridError,
    DamagedFileError,
    IncompletePackError,
    NonFiniteValueError,
    PackError,
    PackLayoutError,
    SkippedFileWarning,
    StalePackError,
)
from gpuloader.plan.sampler import RayRequest
from gpuloader.stores.npz import NpzRayStore, read_voxel_file
from gpuloader.stores.pack import PackedRayStore, StripedLevel, pack_rays, read_manifest
from gpuloader.stores.pack.manifest import MANIFEST, STRIPED_FORMAT_VERSION
from gpuloader.stores.pack.split_order import SPLIT_GROUPS, SplitOrder
from gpuloader.stores.pack.striped import (
    id_dtype,
    level_keys,
    level_record,
    record_dtype,
    record_from_descr,
    sample_keys,
    stripe_count,
    stripe_rows,
)
from support.damage import damage
from support.damage import same_sample as _same
from support.generated import generate_small

ROW_KEYS = ("origins", "directions", "distances", "hits", "view_ids", "face_ids")
KEYS = (*ROW_KEYS, "view_positions")


def _pack(rays: Path, out: Path, w: int = 64, **kw) -> dict:
    kw.setdefault("workers", 1)
    return pack_rays(rays, out, progress=False, layout="striped", stripe_rays=w, **kw)


def _split_samples(ds_dir: Path, rays: Path) -> list[tuple[str, dict]]:
    """``(split, sample)`` of every split's index (empty samples too)."""
    out = []
    for split in ("train", "val", "test"):
        try:
            ds = HierarchicalVoxelRayDataset(ds_dir, rays, split=split, include_empty=True)
        except Exception:  # a split without samples
            continue
        out += [(split, s) for s in ds.samples]
    return out


def _split_members(ds_dir: Path, rays: Path) -> dict[tuple[int, str], set[str]]:
    """(level, hash) -> the splits whose index holds the sample."""
    got: dict[tuple[int, str], set[str]] = {}
    for split, s in _split_samples(ds_dir, rays):
        got.setdefault((s["level"], s["hash"]), set()).add(split)
    return got


def _runs(positions: list[int]) -> int:
    """Runs of consecutive integers in ascending ``positions``."""
    return sum(1 for i, p in enumerate(positions) if i == 0 or p != positions[i - 1] + 1)


def _all_samples(ds_dir: Path, rays: Path) -> list[dict]:
    """Every sample of every split (empty ones too), one per (level, hash)."""
    return list({(s["level"], s["hash"]): s for _, s in _split_samples(ds_dir, rays)}.values())


def _file(sample: dict) -> dict[str, np.ndarray]:
    return NpzRayStore().read(sample, None)


def assert_same_arrays(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def tiny3_packs(tiny_dataset3, tmp_path_factory) -> dict[int, Path]:
    """Striped packs of the tiny dataset (levels 0-2) for W = 24 (every n a multiple of W),
    64 (n >= W, not multiples) and 1000 (every n < W)."""
    root = tmp_path_factory.mktemp("striped")
    for w in (24, 64, 1000):
        _pack(tiny_dataset3[1], root / f"w{w}", w, workers=2)
    return {w: root / f"w{w}" for w in (24, 64, 1000)}


@pytest.fixture()
def copy3(tiny_dataset3, tmp_path) -> tuple[Path, Path]:
    """A private copy of the tiny dataset (levels 0-2), for tests that change files."""
    ds = Path(shutil.copytree(tiny_dataset3[0], tmp_path / "dataset"))
    rays = Path(shutil.copytree(tiny_dataset3[1], tmp_path / "ray_dataset_hierarchical"))
    return ds, rays


# ------------------------------------------------------------------------------ the stripes


@pytest.mark.parametrize("w", [24, 64, 1000])
def test_stripes_hold_every_row_by_the_documented_rule(tiny_dataset3, tiny3_packs, w) -> None:
    store = PackedRayStore(tiny3_packs[w])
    samples = {(s["level"], s["hash"]): s for s in _all_samples(*tiny_dataset3)}
    members = _split_members(*tiny_dataset3)
    assert {"train", "val", "test"} <= set().union(*members.values())
    manifest = read_manifest(tiny3_packs[w])
    assert manifest["format_version"] == STRIPED_FORMAT_VERSION and manifest["seed"] == 0
    assert store.layout == "striped" and store.stripe_rays == w
    for level in store.levels:
        lv = store.striped_level(level)
        assert isinstance(lv, StripedLevel) and lv.stripe_rays == w
        n_all = lv.n_rays
        assert lv.stripes == stripe_count(int(n_all.max()), w) == -(-int(n_all.max()) // w)
        assert manifest["level_info"][str(level)]["stripes"] == lv.stripes
        assert lv.record_bytes == 31 and lv.record == level_record(int(lv.view_count.max()))
        # pack order: grouped by the splits that use a sample, hash order in a group; one
        # run per split (test: two) in every stripe file
        hashes = lv.hashes.tolist()
        ranks = [SPLIT_GROUPS.get(frozenset(members.get((level, h), ())), 7) for h in hashes]
        assert sorted(zip(ranks, hashes, strict=True)) == list(zip(ranks, hashes, strict=True))
        for split, most in (("train", 1), ("val", 1), ("test", 2)):
            where = [i for i, h in enumerate(hashes) if split in members.get((level, h), ())]
            assert _runs(where) <= most, (level, split, where)
        np.testing.assert_array_equal(lv.keys, level_keys(0, level, lv.num_samples))
        whole = [lv.read_stripe(s) for s in range(lv.stripes)]  # one read per stripe
        for i, h in enumerate(lv.hashes.tolist()):
            n = int(n_all[i])
            keys = feistel_keys(0, level, i, Purpose.STRIPE)  # no bad file: plan place = i
            np.testing.assert_array_equal(lv.keys[i], keys)
            np.testing.assert_array_equal(keys, sample_keys(0, level, i))
            perm = feistel_permute(np.arange(n), n, keys)
            arrays = _file(samples[(level, h)])
            seen = np.zeros(n, dtype=np.int64)
            for s in range(lv.stripes):
                rows = lv.stripe_rows(i, s)
                places = (s * w + np.arange(w)) % n
                np.testing.assert_array_equal(rows, perm[places])
                np.testing.assert_array_equal(rows, stripe_rows(n, w, s, keys))
                recs = whole[s][i]
                np.testing.assert_array_equal(recs, lv.stripe(s)[i])
                for k in ROW_KEYS:  # each record is its file row
                    np.testing.assert_array_equal(recs[k], arrays[k][rows], err_msg=k)
                kept = rows[: lv.distinct[i]]
                assert lv.distinct[i] == min(n, w) and len(set(kept.tolist())) == kept.size
                if n < w:  # every row once, the rest of the slot repeats it cyclically
                    assert sorted(kept.tolist()) == list(range(n))
                    np.testing.assert_array_equal(rows, kept[np.arange(w) % n])
                seen += np.bincount(rows, minlength=n)
            # over the S_L stripes: the row at place p appears S*W // n + (p < S*W % n) times
            total = lv.stripes * w
            want = total // n + (np.arange(n) < total % n)
            np.testing.assert_array_equal(seen[perm], want)
            assert seen.min() >= 1
            if n == total:
                assert (seen == 1).all()
            # positions: file row r sits at place positions[r]
            pos = lv.positions[lv.ray_start[i] : lv.ray_start[i] + n].astype(np.int64)
            np.testing.assert_array_equal(perm[pos], np.arange(n))
            # grids and views of the level equal the files'
            np.testing.assert_array_equal(lv.views(i), arrays["view_positions"])
            vox = read_voxel_file(samples[(level, h)]["voxel_path"])
            np.testing.assert_array_equal(lv.grid(i), vox.astype(np.uint8))
            assert lv.side[i] == vox.shape[0]


def test_some_sample_uses_each_row_exactly_once(tiny3_packs) -> None:
    """W = 24 divides the largest file (456 rows): its 19 stripes hold each row once."""
    lv = PackedRayStore(tiny3_packs[24]).striped_level(2)
    i = int(np.argmax(lv.n_rays))
    assert lv.n_rays[i] == lv.stripes * 24
    rows = np.concatenate([lv.stripe_rows(i, s) for s in range(lv.stripes)])
    assert sorted(rows.tolist()) == list(range(int(lv.n_rays[i])))
    assert (lv.n_rays % 24 == 0).all() and (lv.n_rays < lv.stripes * 24).any()  # others wrap


def test_read_stripe_ranges_and_buffers(tiny3_packs) -> None:
    lv = PackedRayStore(tiny3_packs[64]).striped_level(2)
    k, w, r = lv.num_samples, lv.stripe_rays, lv.record_bytes
    assert lv.stripe_path(3).stat().st_size == lv.stripe_bytes == k * w * r
    whole = lv.read_stripe(3)
    assert whole.shape == (k, w) and whole.dtype == lv.record and whole.flags.writeable
    part = lv.read_stripe(3, 5, 7)
    np.testing.assert_array_equal(part, whole[5:12])
    buf = np.zeros(7 * w * r + 100, dtype=np.uint8)  # e.g. a pinned uint8 tensor's .numpy()
    got = lv.read_stripe(3, 5, 7, out=buf)
    assert np.shares_memory(got, buf) and got.shape == (7, w)
    np.testing.assert_array_equal(got, whole[5:12])
    assert lv.read_stripe(3, k, 0).shape == (0, w)
    with pytest.raises(ValueError, match="bytes"):
        lv.read_stripe(3, 0, 7, out=np.zeros(10, np.uint8))
    with pytest.raises(IndexError):
        lv.read_stripe(3, k - 1, 2)
    with pytest.raises(IndexError):
        lv.read_stripe(lv.stripes)
    with pytest.raises(IndexError):
        lv.stripe_path(-1)


# ------------------------------------------------------------------------------ the CPU API


def _assert_reads_like_npz(samples: list[dict], store: PackedRayStore) -> None:
    npz = NpzRayStore()
    rng = np.random.default_rng(0)
    for i, s in enumerate(samples):
        n = s["num_rays"]
        for rows in (
            None,
            np.sort(rng.choice(n, min(n, 17), replace=False)),
            select_rows(n, 25, 42, 3, i),
            rng.integers(0, n, 9),
            np.array([n - 1]),
            np.array([], dtype=np.int64),
            list(range(min(n, 5))),
        ):
            got = store.read(s, rows)
            assert_same_arrays(npz.read(s, rows), got)
            assert all(a.flags.writeable and a.flags.c_contiguous for a in got.values())
        with pytest.raises(IndexError, match="out of range"):
            store.read(s, np.array([n]))


@pytest.mark.parametrize("w", [24, 1000])
def test_read_equals_npz_tiny3(tiny_dataset3, tiny3_packs, w) -> None:
    _assert_reads_like_npz(_all_samples(*tiny_dataset3), PackedRayStore(tiny3_packs[w]))


def test_read_equals_npz_tiny_and_generated(tiny_dataset, tmp_path) -> None:
    _pack(tiny_dataset[1], tmp_path / "tiny", 100)
    _assert_reads_like_npz(_all_samples(*tiny_dataset), PackedRayStore(tmp_path / "tiny"))
    ds, rays = generate_small(tmp_path / "gen")
    s = _pack(rays, tmp_path / "gen_pack", 512)  # the voxel side found from the ray tree
    assert s["dataset_dir"] == str(Path(ds).resolve()) and s["stripe_rays"] == 512
    _assert_reads_like_npz(_all_samples(ds, rays), PackedRayStore(tmp_path / "gen_pack"))


def test_chunks_read_like_npz(tiny_dataset3, tiny3_packs) -> None:
    kw = dict(split="train", rays_per_chunk=40, samples_per_subvolume=9, seed=3)
    ds = HierarchicalVoxelRayDataset(*tiny_dataset3, **kw)
    pk = HierarchicalVoxelRayDataset(
        *tiny_dataset3, ray_store=PackedRayStore(tiny3_packs[64]), **kw
    )
    npz, store = NpzRayStore(), pk.ray_store
    for i, s in enumerate(ds.samples):
        a, b = ds.read_sample(i, epoch=2), pk.read_sample(i, epoch=2)
        for k in KEYS:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert_same_arrays(npz.read(s, None), store.read(s, None))
        assert_same_arrays(
            npz.read(s, [0, s["num_rays"] - 1]), store.read(s, [0, s["num_rays"] - 1])
        )
    bad = {**ds.samples[0], "ray_offset": ds.samples[0]["file_num_rays"] - 1, "num_rays": 5}
    with pytest.raises(DamagedFileError, match="chunk rows"):
        store.read(bad, None)


@pytest.mark.parametrize("which", ["tiny", "tiny3"])
def test_dataset_over_striped_pack_gives_the_same_samples(
    which, tiny_dataset, tiny_dataset3, tiny3_packs, tmp_path
) -> None:
    ds_dir, rays = tiny_dataset if which == "tiny" else tiny_dataset3
    pack = tiny3_packs[64]
    if which == "tiny":
        pack = tmp_path / "pack"
        _pack(rays, pack, 50)

    def make(store):
        tf = T.Compose(
            [T.RandomRotation90(p=0.7), T.RandomFlip(p=0.5), T.RandomRaySubsample(num_rays=30)]
        )
        return HierarchicalVoxelRayDataset(
            ds_dir, rays, split="train", transform=tf, seed=7, ray_store=store
        )

    a, b = make(None), make(PackedRayStore(pack))
    for i in range(len(a)):
        for idx in (i, RayRequest(i, 2, 12)):
            assert _same(a[idx], b[idx])


def test_layout_specific_calls_and_pickling(tiny_dataset3, tiny3_packs, tmp_path) -> None:
    store = PackedRayStore(tiny3_packs[64])
    with pytest.raises(PackLayoutError, match="striped"):
        store.level_arrays(1)
    assert store.striped_level(7) is None and "striped W=64" in repr(store)
    s = _all_samples(*tiny_dataset3)[0]
    lv, i, n, v0, v = store.locate(s)
    assert isinstance(lv, StripedLevel) and lv.hashes[i] == s["hash"] and n == s["num_rays"]
    before = store.read(s, None)
    blob = pickle.dumps(store)
    assert len(blob) < 4000
    clone = pickle.loads(blob)
    assert clone._open == {}
    assert_same_arrays(before, clone.read(s, None))
    pack_rays(tiny_dataset3[1], tmp_path / "rows", progress=False, workers=1)
    rows = PackedRayStore(tmp_path / "rows")
    assert rows.layout == "rows" and rows.stripe_rays is None
    with pytest.raises(PackLayoutError, match="rows layout"):
        rows.striped_level(1)
    manifest = read_manifest(tmp_path / "rows")
    assert "layout" not in manifest and manifest["format_version"] == 1  # as it always was


# ------------------------------------------------------------------------------ record dtypes


def test_id_dtypes_and_record() -> None:
    assert [id_dtype(b) for b in (1, 6, 256, 257, 65536, 65537)] == [
        np.dtype("u1"),
        np.dtype("u1"),
        np.dtype("u1"),
        np.dtype("<u2"),
        np.dtype("<u2"),
        np.dtype("<i4"),
    ]
    rec = level_record(16)
    assert rec.names == ("origins", "directions", "distances", "view_ids", "face_ids", "hits")
    assert rec.itemsize == 31 and not rec.isalignedstruct
    assert [rec.fields[k][1] for k in rec.names] == [0, 12, 24, 28, 29, 30]
    assert level_record(300).itemsize == 32 and level_record(70000).itemsize == 34
    for views, offsets in ((300, [28, 30, 31]), (70000, [28, 32, 33])):
        r = level_record(views)
        assert [r.fields[k][1] for k in ("view_ids", "face_ids", "hits")] == offsets
    assert level_record(300)["view_ids"] == np.dtype("<u2")
    assert record_dtype("<i4", "<i4").itemsize == 37
    back = record_from_descr(json.loads(json.dumps(level_record(300).descr)))
    assert back == level_record(300)


def _with_views(path: Path, views: int) -> None:
    """Give ray file ``path`` ``views`` view positions, some rays the last view (valid)."""
    with np.load(path) as z:
        a = {k: z[k] for k in z.files}
    extra = np.random.default_rng(1).normal(size=(views - len(a["view_positions"]), 3))
    a["view_positions"] = np.concatenate([a["view_positions"], extra.astype(np.float32)])
    a["view_ids"][:5] = views - 1
    np.savez_compressed(path, **a)


@pytest.mark.parametrize("views, dtype", [(256, "u1"), (257, "<u2"), (70000, "<i4")])
def test_narrow_ids_chosen_from_the_level(copy3, tmp_path, views, dtype) -> None:
    ds, rays = copy3
    victim = sorted((rays / "level_1").rglob("*_rays.npz"))[2]
    _with_views(victim, views)
    _pack(rays, tmp_path / "pack", 64)
    store = PackedRayStore(tmp_path / "pack")
    assert store.striped_level(1).record["view_ids"] == np.dtype(dtype)
    assert store.striped_level(2).record["view_ids"] == np.dtype("u1")  # other levels: u1
    assert store.striped_level(1).record["face_ids"] == np.dtype("u1")
    _assert_reads_like_npz(
        [s for s in _all_samples(ds, rays) if s["level"] == 1], store
    )  # every view id read back as int32, the large ones included


def test_ids_that_do_not_fit_are_refused(copy3, tmp_path, monkeypatch) -> None:
    """A record narrower than the values (a writer bug) stops the build, naming the file."""
    from gpuloader.stores.pack import striped_build

    _, rays = copy3
    victim = sorted((rays / "level_1").rglob("*_rays.npz"))[0]
    _with_views(victim, 300)
    monkeypatch.setattr(striped_build, "level_record", lambda v: record_dtype("u1", "u1"))
    with pytest.raises(PackError, match=re.escape(str(victim)) + ".*do not fit"):
        _pack(rays, tmp_path / "pack", 64)
    assert not (tmp_path / "pack").exists()


# ------------------------------------------------------------------------------ staleness


def test_staleness_of_ray_and_voxel_files(copy3, tmp_path) -> None:
    ds, rays = copy3
    pack = tmp_path / "pack"
    _pack(rays, pack, 64)
    PackedRayStore(pack, check="full")
    assert _pack(rays, pack, 64)["up_to_date"]
    vox = sorted((ds / "subvolumes" / "level_1").rglob("*.npz"))[0]
    st = vox.stat()
    os.utime(vox, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    with pytest.raises(StalePackError) as err:
        PackedRayStore(pack)
    msg = str(err.value)
    assert vox.relative_to(ds).as_posix() in msg and "voxel files" in msg
    assert "--layout striped --stripe-rays 64" in msg and f"--dataset-dir {ds}" in msg
    PackedRayStore(pack, check="full")  # same bytes
    with pytest.raises(PackError, match="--force"):
        _pack(rays, pack, 64)
    # content behind the same size and mtime: only a full check sees it
    data = bytearray(vox.read_bytes())
    data[len(data) // 2] ^= 0xFF
    vox.write_bytes(bytes(data))
    os.utime(vox, ns=(st.st_atime_ns, st.st_mtime_ns))
    PackedRayStore(pack, check="fast")  # cannot see it
    with pytest.raises(StalePackError, match="content differs"):
        PackedRayStore(pack, check="full")
    # a ray file touched
    ray = sorted((rays / "level_2").rglob("*_rays.npz"))[0]
    ray.unlink()
    with pytest.raises(StalePackError, match="1 missing"):
        PackedRayStore(pack)
    PackedRayStore(pack, check="none")


def test_moved_voxel_side(copy3, tmp_path) -> None:
    ds, rays = copy3
    pack = tmp_path / "pack"
    _pack(rays, pack, 64)
    moved = tmp_path / "moved_dataset"
    ds.rename(moved)
    with pytest.raises(StalePackError, match="voxel dataset .* is not there"):
        PackedRayStore(pack)
    PackedRayStore(pack, dataset_dir=moved)
    PackedRayStore(pack, check="none")


def test_options_must_match_and_force_replaces(copy3, tmp_path) -> None:
    ds, rays = copy3
    pack = tmp_path / "pack"
    pack_rays(rays, pack, progress=False, workers=1)  # a rows pack
    with pytest.raises(PackError, match="layout rows.*--layout striped --stripe-rays 64"):
        _pack(rays, pack, 64)
    _pack(rays, pack, 64, force=True)
    assert PackedRayStore(pack).layout == "striped"
    for kw in ({"w": 32}, {"seed": 5}):
        with pytest.raises(PackError, match="does not match"):
            _pack(rays, pack, **kw)
    s = _pack(rays, pack, 32, seed=5, force=True)
    store = PackedRayStore(pack)
    assert (store.stripe_rays, store.seed, s["seed"]) == (32, 5, 5)
    np.testing.assert_array_equal(store.striped_level(1).keys, level_keys(5, 1, 8))
    with pytest.raises(PackError, match="rows"):
        pack_rays(rays, pack, progress=False, workers=1)  # rows asked, striped there
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="stripe_rays"):
            _pack(rays, tmp_path / "x", bad)
    with pytest.raises(ValueError, match="layout"):
        pack_rays(rays, tmp_path / "x", layout="columns")
    with pytest.raises(PackError, match="not a voxel dataset"):
        _pack(rays, tmp_path / "x", dataset_dir=tmp_path)
    lonely = Path(shutil.copytree(rays, tmp_path / "alone" / "rays"))
    (lonely / "processing_summary.json").unlink(missing_ok=True)
    with pytest.raises(PackError, match="--dataset-dir"):
        _pack(lonely, tmp_path / "x")
    _pack(lonely, tmp_path / "x", dataset_dir=ds)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


# ------------------------------------------------------------------------------ atomicity


def test_interrupted_or_failed_build_leaves_no_pack(copy3, tmp_path, monkeypatch) -> None:
    from gpuloader.stores.pack import striped_build

    ds, rays = copy3
    old = tmp_path / "old"
    _pack(rays, old, 64)
    before = read_manifest(old)["pack_id"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # stopped after every stripe was written
        m.setattr(striped_build.StripedWriter, "finish_level", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _pack(rays, tmp_path / "new", 64)
        with pytest.raises(KeyboardInterrupt):
            _pack(rays, old, 32, force=True)
    assert not (tmp_path / "new").exists()
    assert read_manifest(old)["pack_id"] == before  # the pack in place is untouched
    PackedRayStore(old, check="full")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    bad = sorted((rays / "level_2").rglob("*_rays.npz"))[3]
    clean = bad.read_bytes()
    a = dict(np.load(bad))
    a["distances"][2] = np.nan
    np.savez_compressed(bad, **a)
    with pytest.raises(NonFiniteValueError, match=re.escape(str(bad))):
        _pack(rays, tmp_path / "new", 64, workers=2)
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".new")]
    # a missing voxel file always stops the build, naming it
    bad.write_bytes(clean)
    vox = sorted((ds / "subvolumes" / "level_2").rglob("*.npz"))[0]
    vox.unlink()
    with pytest.raises(Exception, match=re.escape(str(vox))) as err:
        _pack(rays, tmp_path / "new", 64, on_error="skip")
    assert isinstance(err.value, FileNotFoundError)
    assert not (tmp_path / "new").exists()


def test_damaged_stripes_and_missing_manifest(copy3, tmp_path) -> None:
    _, rays = copy3
    pack = tmp_path / "pack"
    _pack(rays, pack, 64)
    stripe = pack / "level_1" / "stripe_2.bin"
    with open(stripe, "r+b") as f:
        f.truncate(stripe.stat().st_size - 31)
    with pytest.raises(IncompletePackError, match="stripe_2.bin"):
        PackedRayStore(pack, check="none")
    (pack / MANIFEST).unlink()
    with pytest.raises(IncompletePackError, match="no manifest"):
        PackedRayStore(pack, check="none")
    with pytest.raises(PackError, match="incomplete.*--layout striped"):
        _pack(rays, pack, 64)
    _pack(rays, pack, 64, force=True)
    PackedRayStore(pack, check="full")


# ------------------------------------------------------------------------------ on_error="skip"


def test_skip_leaves_out_bad_ray_and_voxel_files(copy3, tiny3_packs, tmp_path) -> None:
    ds, rays = copy3
    samples = {(s["level"], s["hash"]): s for s in _all_samples(ds, rays)}
    lv2 = sorted(k for k in samples if k[0] == 2)
    lv1 = sorted(k for k in samples if k[0] == 1)
    ray_victim, vox_victim = samples[lv2[4]], samples[lv1[2]]
    clean_vox = Path(vox_victim["voxel_path"]).read_bytes()
    bad_ray = damage("nan_distance", ray_victim)
    bad_vox = damage("non_cubic_grid", vox_victim)
    n_max = max(samples[k]["num_rays"] for k in lv2)
    biggest = [k for k in lv2 if samples[k]["num_rays"] == n_max and k != lv2[4]]
    too_big = [damage("nan_distance", samples[k]) for k in biggest]  # level 2's S_L shrinks
    with pytest.warns(SkippedFileWarning) as warned:
        s = _pack(rays, tmp_path / "pack", 64, workers=2, on_error="skip")
    assert any(str(bad_vox) in str(w.message) for w in warned)
    left = {lv2[4], lv1[2], *biggest}
    assert {(b["level"], b["hash"]) for b in s["bad"]} == left
    manifest = read_manifest(tmp_path / "pack")
    rec = manifest["bad_files"][Path(vox_victim["ray_path"]).relative_to(rays).as_posix()]
    assert (
        rec["error"] == "BadGridError" and rec["voxel_file"] == bad_vox.relative_to(ds).as_posix()
    )
    assert str(bad_vox) in rec["message"]
    for f in (bad_ray, *too_big):
        assert (
            manifest["bad_files"][f.relative_to(rays).as_posix()]["error"] == "NonFiniteValueError"
        )
    store, clean = PackedRayStore(tmp_path / "pack"), PackedRayStore(tiny3_packs[64])
    assert set(store.bad) == left
    for level in clean.levels:
        got, want = store.striped_level(level), clean.striped_level(level)
        kept = [h for h in want.hashes.tolist() if (level, h) not in left]
        assert got.hashes.tolist() == kept
        assert got.stripes == stripe_count(int(got.n_rays.max()), 64) <= want.stripes
        for j, h in enumerate(kept):
            i = want.row[h]
            np.testing.assert_array_equal(got.keys[j], want.keys[i])  # keys of the plan place
            for st in range(got.stripes):
                np.testing.assert_array_equal(got.read_stripe(st, j, 1)[0], want.stripe(st)[i])
            np.testing.assert_array_equal(got.grid(j), want.grid(i))
            np.testing.assert_array_equal(got.views(j), want.views(i))
            assert_same_arrays(
                store.read(samples[(level, h)], None), clean.read(samples[(level, h)], None)
            )
    assert store.striped_level(2).stripes == clean.striped_level(2).stripes - 1 == 7
    for key, want_cls in ((lv2[4], NonFiniteValueError), (lv1[2], BadGridError)):
        with pytest.raises(want_cls) as err:
            store.read(samples[key], None)
        assert (
            str(err.value)
            .splitlines()[0]
            .startswith(f"{samples[key]['ray_path']}: left out of ray pack")
        )
    # a raise run refuses the pack with gaps; repairing the voxel file makes it stale
    with pytest.raises(BadGridError):
        _pack(rays, tmp_path / "pack", 64)
    bad_vox.write_bytes(clean_vox)
    with pytest.raises(StalePackError, match=re.escape(bad_vox.relative_to(ds).as_posix())):
        PackedRayStore(tmp_path / "pack")


# ------------------------------------------------------------------------------ the CLI


def test_cli_striped_end_to_end(copy3, tmp_path, capsys) -> None:
    ds, rays = copy3
    out = tmp_path / "cli"
    args = ["pack", str(rays), str(out), "--quiet", "--workers", "1", "--layout", "striped"]
    assert main([*args, "--stripe-rays", "100"]) == 0
    text = capsys.readouterr().out
    assert "stripes of 100 rays" in text and "31 bytes per ray" in text and "packed" in text
    store = PackedRayStore(out)
    assert store.layout == "striped" and store.stripe_rays == 100
    assert main([*args, "--stripe-rays", "100"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main([*args, "--stripe-rays", "50"]) == 2
    err = capsys.readouterr().err
    assert "--layout striped --stripe-rays 50" in err and "--force" in err
    assert main([*args, "--stripe-rays", "50", "--seed", "3", "--force"]) == 0
    capsys.readouterr()
    store = PackedRayStore(out)
    assert (store.stripe_rays, store.seed) == (50, 3)
    assert main([*args, "--stripe-rays", "50", "--seed", "3", "--dataset-dir", str(ds)]) == 0
    assert "up to date" in capsys.readouterr().out
    _assert_reads_like_npz(_all_samples(ds, rays)[:6], store)


@pytest.mark.parametrize("store", ["stream", "host"])
def test_loader_on_a_striped_pack_equals_npz(tiny_dataset3, tiny3_packs, store) -> None:
    """GPURayLoader over a striped pack gives the batches it gives over the npz files (the
    stream reads it per sample: the pack stream gathers from ordinary packs only)."""
    from gpuloader.loading.loader import GPURayLoader

    tf = T.Compose([T.RandomFlip(axes=[0, 1, 2], p=0.5), T.RandomRaySubsample(num_rays=40)])

    def batches(ray_store):
        ds = HierarchicalVoxelRayDataset(
            *tiny_dataset3, "train", transform=tf, ray_store=ray_store, cache_size=0
        )
        with GPURayLoader(
            ds, 160, 4, device="cpu", store=store, backend="torch", num_workers=0
        ) as ld:
            assert "whole batches from the pack" not in ld.store_reason
            return [b for _ in range(2) for b in ld]

    want = batches(None)
    got = batches(PackedRayStore(tiny3_packs[64]))
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for k, v in a.items():
            if hasattr(v, "dtype"):
                assert v.dtype == b[k].dtype and v.equal(b[k]), k


def test_read_stripe_ranges_reads_the_ranges_one_after_another(tiny3_packs) -> None:
    """Several ascending ranges in one call: the records of each range, in order, equal to
    reading each on its own; overlapping or descending ranges are refused."""
    lv = PackedRayStore(tiny3_packs[64]).striped_level(2)
    k = lv.num_samples
    ranges = [(0, 2), (3, 1), (k - 2, 2)]
    got = lv.read_stripe_ranges(1, ranges)
    want = np.concatenate([lv.read_stripe(1, a, n) for a, n in ranges])
    assert got.shape == (5, lv.stripe_rays)
    assert got.tobytes() == want.tobytes()
    with pytest.raises(IndexError):
        lv.read_stripe_ranges(1, [(3, 2), (4, 1)])


def test_split_order_groups_by_the_splits_that_use_a_sample(tmp_path) -> None:
    (tmp_path / "metadata.json").write_text("{}")
    splits = {
        "object_splits": {"A": "train", "B": "val", "C": "test"},
        "hash_object_usage": {"h1": {"B": "val"}, "h2": {"A": "train"},
                              "h4": {"A": "train", "C": "test"}, "h5": {"C": "test"}},
        "trivial_hashes": ["h3"],
    }  # fmt: skip
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    order = SplitOrder(tmp_path)
    hashes = ["h1", "h2", "h3", "h4", "h5", "h6"]  # h6: in no split, last
    assert [hashes[i] for i in order.of(1, hashes)] == ["h2", "h4", "h3", "h1", "h5", "h6"]
    assert [["A", "B", "C"][i] for i in order.of(0, ["A", "B", "C"])] == ["A", "B", "C"]
    assert [["C", "B", "A"][i] for i in order.of(0, ["C", "B", "A"])] == ["A", "B", "C"]
    missing = SplitOrder(tmp_path / "nowhere")  # no splits.json: hash order
    np.testing.assert_array_equal(missing.of(1, hashes), np.arange(len(hashes)))
