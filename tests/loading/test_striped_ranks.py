"""Ranks on a striped pack (issue 15, item 4): with ``shard_store=True`` rank r owns a
contiguous range of each level's pack order, reads only that byte range of each stripe, and
the ranks' ranges are disjoint and complete; together the ranks deliver every sample of the
epoch, each from its own range, with the rows a single-rank run delivers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpuloader import GPURayLoader
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.plan.sampler import RayBatchSampler
from gpuloader.plan.shard import split_ranges
from gpuloader.stores.pack import PackedRayStore, StripedLevel, pack_rays

W, SPB, SEED = 128, 3, 5


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_dataset3) -> tuple[Path, Path, Path]:
    ds, rays = tiny_dataset3
    out = tmp_path_factory.mktemp("striped_ranks") / "pack"
    pack_rays(rays, out, progress=False, workers=1, layout="striped", stripe_rays=W)
    return ds, rays, out


def _dataset(dirs, transform=None) -> HierarchicalVoxelRayDataset:
    ds, rays, out = dirs
    return HierarchicalVoxelRayDataset(
        ds, rays, split="train", transform=transform, ray_store=PackedRayStore(out), seed=SEED
    )


def _loader(ds, rank: int | None = None, world: int | None = None, rays=300) -> GPURayLoader:
    shard = world is not None
    return GPURayLoader(
        ds, rays, SPB, store="striped", backend="torch", num_workers=0, device="cpu",
        rank=rank, world_size=world, shard_store=shard, seed=SEED, progress=False,
    )  # fmt: skip


def _pack_rows(ds) -> tuple[np.ndarray, np.ndarray]:
    """(levels, rows): each dataset sample's level and row in its striped level."""
    pack = ds.ray_store
    levels = np.array([s["level"] for s in ds.samples], dtype=np.int64)
    rows = np.array([pack.locate(s)[1] for s in ds.samples], dtype=np.int64)
    return levels, rows


def test_split_ranges_cuts_each_group_in_key_order():
    """Property over random groups and keys: parts disjoint, complete, contiguous in key
    order, sizes within one of each other per group and in total."""
    gen = np.random.default_rng(0)
    for _ in range(50):
        k = int(gen.integers(1, 60))
        keys = gen.permutation(k * 3)[:k].astype(np.int64)
        levels = gen.integers(0, 3, k)
        groups = [(int(L) + 1, np.flatnonzero(levels == L)) for L in np.unique(levels)]
        ws = int(gen.integers(1, 6))
        parts = split_ranges(groups, ws, keys)
        for g, (_, idx) in enumerate(groups):
            got = [parts[r][g][1] for r in range(ws)]
            assert sorted(np.concatenate(got).tolist()) == sorted(idx.tolist())
            sizes = [len(p) for p in got]
            assert max(sizes) - min(sizes) <= 1
            ranked = idx[np.argsort(keys[idx])]  # the group in key order
            pos = 0
            for p in got:  # rank r's part is the r-th run of the key order
                assert sorted(p.tolist()) == sorted(ranked[pos : pos + len(p)].tolist())
                pos += len(p)
        totals = [sum(len(i) for _, i in parts[r]) for r in range(ws)]
        assert max(totals) - min(totals) <= 1


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_own_contiguous_ranges_and_read_only_them(dirs, world, monkeypatch):
    ds = _dataset(dirs)
    levels, rows = _pack_rows(ds)
    calls: list[tuple[int, int, int]] = []
    real = StripedLevel.read_stripe_ranges

    def read_stripe_ranges(level, s, ranges, out=None):
        calls.extend((level.level, a, n) for a, n in ranges)
        return real(level, s, ranges, out)

    monkeypatch.setattr(StripedLevel, "read_stripe_ranges", read_stripe_ranges)
    held = []
    for r in range(world):
        calls.clear()
        with _loader(ds, r, world) as ld:
            mine = ld.sampler.shard_indices()
            held.append(mine)
            reader = ld.source.reader
            assert reader.num_slots == len(mine)  # the buffer holds this rank's samples only
            reader.read(0)
            for L in np.unique(levels):
                at = np.flatnonzero(levels == L)
                order = at[np.argsort(rows[at])]  # the level's samples in pack order
                m = np.isin(order, mine)
                run = np.flatnonzero(m)
                ranges = [(f, n) for lv, f, n in calls if lv == L]
                if run.size == 0:  # a level with fewer samples than ranks
                    assert not ranges
                    continue
                assert (np.diff(run) == 1).all()  # one contiguous range
                lo, hi = rows[order[run[0]]], rows[order[run[-1]]] + 1
                assert ranges and min(f for f, _ in ranges) == lo  # within this range only
                assert max(f + n for f, n in ranges) == hi
    everyone = np.concatenate(held)
    assert len(everyone) == len(ds.samples)  # disjoint
    assert sorted(everyone.tolist()) == list(range(len(ds.samples)))  # and complete


def test_cpu_sampler_takes_the_same_ranges(dirs):
    """RayBatchSampler(shard="samples") on the striped dataset splits by the pack's order
    itself, so the CPU API's shards are the loader's."""
    ds = _dataset(dirs)
    for r in range(2):
        s = RayBatchSampler(ds, 300, SPB, seed=SEED, rank=r, world_size=2, shard="samples")
        with _loader(ds, r, 2) as ld:
            assert np.array_equal(s.shard_indices(), ld.sampler.shard_indices())
            assert s.batches(1) == ld.sampler.batches(1)


def test_ranks_deliver_every_sample_with_the_single_rank_rows(dirs):
    """Over the ranks an epoch delivers every sample (drop_last=False may repeat some to
    equal lengths), each with exactly the rays, in order, a one-rank striped run gives it
    (every row of the epoch's stripe: rays_per_batch=None)."""
    ds = _dataset(dirs)
    with _loader(ds, rays=None) as one:
        one.set_epoch(2)
        want = {}
        for b in one:
            for j, h in enumerate(b["hashes"]):
                sel = (b["ray_to_voxel"] == j).numpy()
                want[h] = b["directions"].numpy()[sel]
    got: dict[str, np.ndarray] = {}
    for r in range(2):
        with _loader(ds, r, 2, rays=None) as ld:
            ld.set_epoch(2)
            for b in ld:
                for j, h in enumerate(b["hashes"]):
                    sel = (b["ray_to_voxel"] == j).numpy()
                    got[h] = b["directions"].numpy()[sel]
                    assert np.array_equal(got[h], want[h]), h
    assert sorted(got) == sorted(want)
