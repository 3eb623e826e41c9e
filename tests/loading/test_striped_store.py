"""``GPURayLoader(store="striped")`` over a striped pack (issue 15, item 2).

* Each epoch delivers, per sample, exactly the leading distinct rows of its epoch's stripes
  (``(e + offset) mod S``, K/W consecutive ones), in order; over S epochs every ray of every
  sample is delivered, none twice within an epoch.
* Striped batches re-trace through their augmented grids; the epoch plan (order,
  symmetries, scales, noise, jitter, views, grids) is the host store's for the same slots.
* Exact resume mid-epoch, also while the background read of the next epoch is in flight;
  a failed or hung background read raises a named error naming the stripe file; at most
  two epochs' buffers are held.
* K not a multiple of W is refused; ``store="striped"`` on a non-striped store, or with
  custom callables, is refused; ``store="auto"`` picks the striped store when the budgets
  are tiny; a stripe is one sequential read per level (or consecutive chunks).
* ``on_error="skip"``: a file the pack left out is replaced as on the host store.
"""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from gpuloader import GPURayLoader
from gpuloader.augment import transforms as T
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.errors import (
    DamagedFileError,
    PackError,
    SkippedFileWarning,
    UnsupportedTransformError,
)
from gpuloader.loading.sources.striped import StripedBatches
from gpuloader.reading.stripe_reader import distinct_rows, stripe_offset
from gpuloader.stores.npz import NpzRayStore
from gpuloader.stores.pack import PackedRayStore, StripedLevel, pack_rays
from support.damage import damage
from support.loading_helpers import assert_batches_equal, assert_rays_retrace

W = 128  # tiny samples hold 384 .. 456 rays: S = 4 stripes, every sample wraps (n < S*W)
SPB = 3


def _pack(rays: Path, out: Path, w: int = W, layout: str = "striped") -> PackedRayStore:
    kw = {"stripe_rays": w} if layout == "striped" else {}
    pack_rays(rays, out, progress=False, workers=1, layout=layout, **kw)
    return PackedRayStore(out)


@pytest.fixture(scope="module")
def striped(tmp_path_factory, tiny_dataset3) -> tuple[Path, Path, Path]:
    """(dataset dir, ray dir, striped pack dir) of the 3-level tiny dataset."""
    ds, rays = tiny_dataset3
    out = tmp_path_factory.mktemp("striped") / "pack"
    _pack(rays, out)
    return ds, rays, out


def _dataset(dirs, transform=None, pack: Path | None = None, **kw) -> HierarchicalVoxelRayDataset:
    ds, rays, out = dirs
    store = PackedRayStore(pack or out)
    return HierarchicalVoxelRayDataset(
        ds, rays, split="train", transform=transform, ray_store=store, **kw
    )


def _loader(ds, rays_per_batch=None, store="striped", **kw) -> GPURayLoader:
    kw.setdefault("subvolumes_per_batch", SPB)
    return GPURayLoader(
        ds, rays_per_batch, store=store, backend="torch", num_workers=0, device="cpu", **kw
    )


def _keys(o: np.ndarray, d: np.ndarray) -> list[bytes]:
    """One key per ray: its (origin, direction) bytes."""
    both = np.concatenate([np.asarray(o, np.float32), np.asarray(d, np.float32)], axis=1)
    return [r.tobytes() for r in np.ascontiguousarray(both)]


def _per_sample(batches: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """hash -> (origins, directions) of every ray a pass delivered for it, in batch order."""
    got: dict[str, list] = {}
    for b in batches:
        for j, h in enumerate(b["hashes"]):
            sel = (b["ray_to_voxel"] == j).numpy()
            got.setdefault(h, []).append((b["origins"].numpy()[sel], b["directions"].numpy()[sel]))
    cat = np.concatenate
    return {h: (cat([o for o, _ in v]), cat([d for _, d in v])) for h, v in got.items()}


def _expected_rows(lv, i: int, stripes: tuple[int, ...]) -> np.ndarray:
    """File rows of sample ``i`` the epoch keeps: the leading distinct rows of its stripes."""
    rows = np.concatenate([lv.stripe_rows(i, s) for s in stripes])
    keep = int(distinct_rows(lv.n_rays[i : i + 1], lv.stripe_rays, lv.stripes, stripes[0],
                             min(len(stripes), lv.stripes))[0])  # fmt: skip
    assert len(set(rows[:keep].tolist())) == keep  # distinct, as documented
    assert keep >= min(int(lv.n_rays[i]), lv.stripe_rays)
    return rows[:keep]


@pytest.mark.parametrize("k", [1, 2])
def test_each_epoch_keeps_its_stripes_and_s_epochs_deliver_every_ray(striped, k):
    """No augmentation: each sample's rays of epoch e are exactly the leading distinct rows of
    stripes (e + offset .. + k-1) mod S, none twice; over S epochs every ray of every sample."""
    transform = T.RandomRaySubsample(num_rays=k * W) if k > 1 else None
    ds = _dataset(striped, transform)
    files = {s["hash"]: NpzRayStore().read(s, None) for s in ds.samples}
    seen: dict[str, set[bytes]] = {h: set() for h in files}
    with _loader(ds) as ld:
        src = ld.source
        assert isinstance(src, StripedBatches) and ld.store == "striped"
        assert src.per_epoch == k
        pack = ds.ray_store
        s_max = max(pack.striped_level(L).stripes for L in src.reader.levels)
        for epoch in range(s_max):
            ld.set_epoch(epoch)
            got = _per_sample(list(ld))
            assert src.reader.buffers <= 2
            stripes = src.reader.stripes_of(epoch)
            assert sorted(got) == sorted(files)  # every sample once per epoch (no drop_last)
            for s in ds.samples:
                h = s["hash"]
                lv = pack.striped_level(int(s["level"]))
                rows = _expected_rows(lv, lv.row[h], stripes[int(s["level"])])
                f = files[h]
                want = _keys(f["origins"][rows], f["directions"][rows])
                keys = _keys(*got[h])
                assert keys == want, (h, epoch)  # these rows, in this order
                assert len(set(keys)) == len(keys)  # none twice within the epoch
                seen[h].update(keys)
    for h, f in files.items():
        assert seen[h] == set(_keys(f["origins"], f["directions"])), h


def test_stripe_of_epoch_is_offset_by_the_seed(striped):
    ds = _dataset(striped)
    with _loader(ds, seed=3) as a, _loader(ds, seed=3) as b, _loader(ds, seed=11) as c:
        sa, sc = a.source.reader, c.source.reader
        assert sa.stripes_of(5) == b.source.reader.stripes_of(5)
        for L, lv in sa.levels.items():
            assert sa.stripes_of(0)[L] == (sa.offsets[L],)
            assert sa.stripes_of(1)[L] == ((sa.offsets[L] + 1) % lv.stripes,)
        assert set(sa.levels) == set(sc.levels)
    assert len({stripe_offset(seed, 0, 4) for seed in range(16)}) > 1  # the seed moves it


@pytest.mark.parametrize("w", [1, 3, 4])
def test_distinct_rows_is_the_leading_distinct_run(w):
    """distinct_rows against a brute force over small n, S, first stripe and k."""
    for s in (1, 2, 3, 5):
        for n in range(1, s * w + 1):
            for first in range(s):
                for k in range(1, s + 1):
                    places = [((first + t) % s * w + j) % n for t in range(k) for j in range(w)]
                    run = 0
                    while run < len(places) and places[run] not in places[:run]:
                        run += 1
                    got = distinct_rows(np.array([n]), w, s, first, k)[0]
                    assert got == run, (n, w, s, first, k)


def _geometric(num_rays: int) -> T.Compose:
    return T.Compose(
        [
            T.RandomRotation90(p=0.8),
            T.RandomFlip(axes=[0, 1, 2], p=0.5),
            T.NormalizeRayOrigins(voxel_size=1.0, scale_distances=True),
            T.RandomRaySubsample(num_rays=num_rays),
        ]
    )


def test_striped_batches_retrace_through_their_augmented_grids(striped):
    ds = _dataset(striped, _geometric(2 * W))
    with _loader(ds, rays_per_batch=600) as ld:
        ld.set_epoch(3)
        batches = list(ld)
    assert assert_rays_retrace(batches) > 200


def _full(num_rays: int) -> T.Compose:
    return T.Compose(
        [
            T.RandomRotation90(p=0.7),
            T.RandomFlip(axes=[0, 1, 2], p=0.5),
            T.NormalizeRayOrigins(voxel_size=1.0),
            T.RandomRaySubsample(num_rays=num_rays),
            T.AddNoise(origin_std=0.01, direction_std=0.01),
            T.VoxelOccupancyJitter(flip_prob=0.05),
        ]
    )


PLAN_KEYS = (
    "index", "epoch", "symmetry", "origin_scale", "distance_scale", "origin_std",
    "direction_std", "jitter_threshold", "purpose_offset", "view_count", "side",
)  # fmt: skip


def test_same_epoch_plan_as_the_host_store(striped):
    """Order, symmetries, scales, noise streams, jitter, grids and views: the host store's;
    only the rows differ (the striped slot keeps its first rows: ray_count == keep)."""
    ds = _dataset(striped, _full(W))
    with _loader(ds, 500) as st, _loader(ds, 500, store="host") as host:
        for epoch in (0, 2):
            p, q = st.source.plan(epoch), host.source.plan(epoch)
            assert np.array_equal(p.batch_starts, q.batch_starts)
            for k in PLAN_KEYS:
                assert np.array_equal(p.arrays[k], q.arrays[k]), k
            assert np.array_equal(p.arrays["ray_count"], p.arrays["keep"])
            assert (p.arrays["keep"] <= q.arrays["keep"]).all()
            st.set_epoch(epoch)
            host.set_epoch(epoch)
            for a, b in zip(list(st), list(host), strict=True):
                assert a["hashes"] == b["hashes"]
                for key in ("voxels", "voxel_shapes", "levels"):
                    assert a[key].equal(b[key]), key
                for x, y in zip(a["view_positions"], b["view_positions"], strict=True):
                    assert x.equal(y)
                assert a["num_rays"].sum() == a["origins"].shape[0]


class _Gate:
    """Holds every stripe read of the background thread until released (a read in flight,
    hung in its I/O)."""

    def __init__(self, monkeypatch) -> None:
        self.open = threading.Event()
        self.started = threading.Event()
        real = StripedLevel.read_stripe_ranges
        gate = self

        def read_stripe_ranges(level, *args, **kw):
            if threading.current_thread() is not threading.main_thread():
                gate.started.set()
                gate.open.wait(30)
            return real(level, *args, **kw)

        monkeypatch.setattr(StripedLevel, "read_stripe_ranges", read_stripe_ranges)


def test_resume_mid_epoch_with_the_background_read_in_flight(striped, monkeypatch):
    ds = _dataset(striped, _full(2 * W))
    with _loader(ds, 500) as ref:
        want = [list(ref), list(ref)]  # epochs 0 and 1, uninterrupted
    n = len(want[0])
    assert n >= 3
    gate = _Gate(monkeypatch)
    with _loader(ds, 500) as ld:
        it = iter(ld)
        head = [next(it), next(it)]
        assert gate.started.wait(10)  # epoch 1's read is in flight (held at the gate)
        state = ld.state_dict()
        assert (state["epoch"], state["batches_yielded"]) == (0, 2)
        ld.load_state_dict(state)
        rest = list(ld)  # the rest of epoch 0, while the read of epoch 1 is still held
        assert_batches_equal(head + rest, want[0])
        assert ld.source.reader.buffers <= 2
        # resume into epoch 1 at batch 1, the read of epoch 1 still in flight: waited for
        threading.Timer(0.2, gate.open.set).start()
        ld.load_state_dict({**state, "epoch": 1, "batches_yielded": 1})
        assert_batches_equal(list(ld), want[1][1:])
    with _loader(ds, 500) as fresh:  # a new loader from the mid-epoch state
        fresh.load_state_dict(state)
        assert_batches_equal(list(fresh), want[0][2:])
        assert_batches_equal(list(fresh), want[1])


def test_hung_background_read_raises_a_named_error(striped, monkeypatch):
    gate = _Gate(monkeypatch)
    ds = _dataset(striped)
    with _loader(ds, worker_timeout=0.5) as ld:
        list(ld)  # epoch 0 read now; epoch 1's read starts and hangs
        with pytest.raises(PackError, match=r"stripe_\d+\.bin.*did not finish in 0.5 s"):
            list(ld)
        gate.open.set()


def test_failed_background_read_names_the_stripe_file(striped, tmp_path):
    pack = Path(shutil.copytree(striped[2], tmp_path / "pack"))
    ds = _dataset(striped, pack=pack)
    with _loader(ds) as ld:
        stripes = ld.source.reader.stripes_of(1)
        lost = {s for s in stripes[0]} - set(ld.source.reader.stripes_of(0)[0])
        s = lost.pop()
        path = pack / "level_0" / f"stripe_{s}.bin"
        saved = path.read_bytes()
        path.unlink()
        list(ld)  # epoch 0 is whole; epoch 1 is read in the background and fails
        with pytest.raises(PackError, match=rf"stripe_{s}\.bin"):
            list(ld)
        path.write_bytes(saved)  # repaired: the epoch is read again
        ld.set_epoch(1)
        got = list(ld)
    with _loader(_dataset(striped)) as ref:
        ref.set_epoch(1)
        assert_batches_equal(got, list(ref))


def test_k_not_a_multiple_of_w_is_refused(striped):
    ds = _dataset(striped, _full(W + 7))
    with pytest.raises(ValueError, match=rf"W={W}.*{W}, {2 * W}, {3 * W}"):
        _loader(ds)


def test_striped_needs_a_striped_pack(striped, tmp_path):
    ds_dir, rays, _ = striped
    plain = HierarchicalVoxelRayDataset(ds_dir, rays, split="train")
    with pytest.raises(ValueError, match="--layout striped"):
        _loader(plain)
    rows = _pack(rays, tmp_path / "rows", layout="rows")
    packed = HierarchicalVoxelRayDataset(ds_dir, rays, split="train", ray_store=rows)
    with pytest.raises(ValueError, match="gpuloader pack RAY_DIR OUT --layout striped"):
        _loader(packed)


def test_auto_picks_striped_when_the_budgets_are_tiny(striped):
    ds = _dataset(striped, _full(W))
    with _loader(ds, 500, store="auto", host_budget=1, gpu_budget=1) as ld:
        assert ld.store == "striped" and isinstance(ld.source, StripedBatches)
        assert "striped" in ld.store_reason and "fits neither" in ld.store_reason
        batches = list(ld)
    with _loader(ds, 500) as asked:
        assert_batches_equal(batches, list(asked))
    with _loader(ds, 500, store="auto") as roomy:  # the tiny split fits: resident
        assert roomy.store in ("host", "gpu")


def test_on_error_skip_replaces_a_sample_the_pack_left_out(tiny_dataset, tmp_path):
    """A file the pack left out as bad: replaced under 'skip' as on the host store (same
    slots, same replacements, the file named), refused under 'raise'."""
    ds, rays = tiny_dataset
    dds = Path(shutil.copytree(ds, tmp_path / "dataset"))
    drays = Path(shutil.copytree(rays, tmp_path / "ray_dataset_hierarchical"))
    victim = HierarchicalVoxelRayDataset(dds, drays, "train", cache_size=0).samples[-1]
    bad = damage("nan_distance", victim)
    with pytest.warns(SkippedFileWarning, match=re.escape(str(bad))):
        pack_rays(drays, tmp_path / "pack", progress=False, workers=1, on_error="skip",
                  layout="striped", stripe_rays=W)  # fmt: skip
    store = PackedRayStore(tmp_path / "pack")
    with pytest.warns(SkippedFileWarning):
        data = HierarchicalVoxelRayDataset(
            dds, drays, "train", cache_size=0, on_error="skip", ray_store=store
        )
        with _loader(data, 500) as st, _loader(data, 500, store="host") as host:
            a, b = list(st), list(host)
            assert [f for f, _ in st.errors] == [str(bad)]
    assert [x["hashes"] for x in a] == [y["hashes"] for y in b]
    assert [x.get("skipped") for x in a] == [y.get("skipped") for y in b]
    assert any(x.get("skipped") for x in a) and st.skipped == host.skipped > 0
    strict = HierarchicalVoxelRayDataset(dds, drays, "train", cache_size=0, ray_store=store)
    with pytest.raises(DamagedFileError, match=re.escape(str(bad))):
        _loader(strict, 500)


def test_one_forward_pass_per_stripe_reading_only_the_dataset_rows(striped, monkeypatch):
    """An epoch reads each stripe of each level in one forward pass: ascending ranges that
    are exactly the runs of the split's rows (another split's samples are not read); with
    small chunks, several calls continuing in order, and the same records."""
    calls: list[tuple[int, int, list[tuple[int, int]]]] = []
    real = StripedLevel.read_stripe_ranges

    def read_stripe_ranges(level, s, ranges, out=None):
        calls.append((level.level, s, list(ranges)))
        return real(level, s, ranges, out)

    monkeypatch.setattr(StripedLevel, "read_stripe_ranges", read_stripe_ranges)
    ds = _dataset(striped, _full(2 * W))
    pack = ds.ray_store
    with _loader(ds, 500) as ld:
        reader = ld.source.reader
        whole = reader.read(0)
        assert sorted((c[0], c[1]) for c in calls) == sorted(
            (L, s) for L, ss in reader.stripes_of(0).items() for s in ss
        )
        for L, _, ranges in calls:
            mine = {pack.locate(s)[1] for s in ds.samples if s["level"] == L}
            got = [a + j for a, n in ranges for j in range(n)]
            assert got == sorted(mine)  # these rows, ascending, nothing else
            assert all(a + n < b for (a, n), (b, _) in zip(ranges, ranges[1:], strict=False))
        calls.clear()
        reader.chunk_bytes = 2 * W * 34  # two samples per read
        chunked = reader.read(0)
        assert np.array_equal(whole.records, chunked.records)
        for (L, s, ranges), nxt in zip(calls, calls[1:], strict=False):
            assert sum(n for _, n in ranges) <= 2
            if (nxt[0], nxt[1]) == (L, s):
                assert nxt[2][0][0] >= ranges[-1][0] + ranges[-1][1]  # onward, in order


def test_striped_refuses_custom_callables(striped):
    ds = _dataset(striped, T.Compose([lambda s: s, T.RandomRaySubsample(num_rays=W)]))
    with pytest.raises(UnsupportedTransformError, match="store='stream'"):
        _loader(ds)
