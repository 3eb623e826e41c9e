"""RayBatchSampler: exact ray counts (water-filling), one level per batch, pure order."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gpuloader.dataset.collate import collate_ray_batch
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.plan.sampler import RayBatchSampler, RayRequest, allocate_rays


def fake_dataset(num_rays, levels, seed=7):
    samples = [{"level": lv, "num_rays": n} for n, lv in zip(num_rays, levels, strict=True)]
    return SimpleNamespace(samples=samples, seed=seed)


# -- allocate_rays --------------------------------------------------------------------------


def test_allocate_even_with_remainder_first():
    assert allocate_rays([100, 100, 100], 10) == [4, 3, 3]
    assert allocate_rays([100] * 4, 8) == [2, 2, 2, 2]


def test_allocate_water_filling():
    assert allocate_rays([1, 100, 100], 30) == [1, 15, 14]
    assert allocate_rays([5, 2, 100, 7], 40) == [5, 2, 26, 7]
    assert allocate_rays([0, 10, 10], 7) == [0, 4, 3]


def test_allocate_not_enough_rays():
    assert allocate_rays([3, 4, 5], 100) == [3, 4, 5]
    assert allocate_rays([], 10) == []
    assert allocate_rays([3, 4], 0) == [0, 0]


@pytest.mark.parametrize("seed", range(20))
def test_allocate_random(seed):
    r = np.random.default_rng(seed)
    caps = r.integers(0, 50, size=r.integers(1, 12)).tolist()
    total = int(r.integers(0, 400))
    alloc = allocate_rays(caps, total)
    assert sum(alloc) == min(total, sum(caps))
    assert all(0 <= a <= c for a, c in zip(alloc, caps, strict=True))
    # water-filling: anyone short of its cap gets at least as much as anyone else, minus 1
    short = [a for a, c in zip(alloc, caps, strict=True) if a < c]
    if short:
        assert max(alloc) - min(short) <= 1


# -- the sampler on a fake index --------------------------------------------------------------


@pytest.mark.parametrize(
    "rays_per_batch,spb,drop_last",
    [(4096, 8, False), (1000, 3, False), (64, 5, True), (7, 4, False), (1, 1, False)],
)
def test_exact_ray_counts_and_single_level(rays_per_batch, spb, drop_last):
    r = np.random.default_rng(0)
    n = 37
    levels = r.integers(0, 3, size=n).tolist()
    num_rays = r.integers(200, 2000, size=n).tolist()
    ds = fake_dataset(num_rays, levels)
    sampler = RayBatchSampler(ds, rays_per_batch, spb, drop_last=drop_last)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    seen = []
    for b in batches:
        assert all(isinstance(q, RayRequest) for q in b)
        assert len({levels[q.index] for q in b}) == 1
        caps = sum(num_rays[q.index] for q in b)
        assert sum(q.num_rays for q in b) == min(rays_per_batch, caps)
        assert all(q.num_rays <= num_rays[q.index] for q in b)
        if drop_last:
            assert len(b) == spb
        seen += [q.index for q in b]
    assert len(seen) == len(set(seen))
    if not drop_last:
        assert sorted(seen) == list(range(n))


def test_water_filling_in_batches():
    # tiny sub-volumes next to big ones: the big ones make up the shortfall
    ds = fake_dataset([10, 1000, 5, 1000], [1, 1, 1, 1])
    (batch,) = list(RayBatchSampler(ds, 1000, 4, shuffle=False))
    assert [q.num_rays for q in batch] == [10, 493, 5, 492]


def test_dataset_limits_are_capacities():
    ds = fake_dataset([500] * 4, [2] * 4)
    ds.available_rays = lambda i: 100  # e.g. samples_per_subvolume=100
    (batch,) = list(RayBatchSampler(ds, 1000, 4))
    assert [q.num_rays for q in batch] == [100] * 4


def test_rays_per_batch_none_reads_all():
    ds = fake_dataset([5, 6], [0, 0])
    (batch,) = list(RayBatchSampler(ds, None, 2))
    assert [q.num_rays for q in batch] == [None, None]


def test_order_is_pure_function_of_seed_and_epoch():
    ds = fake_dataset([100] * 50, [0, 1] * 25)
    a = RayBatchSampler(ds, 256, 4)
    b = RayBatchSampler(ds, 256, 4)
    assert list(a) == list(b)  # epoch 0 both
    assert list(a) == list(b)  # epoch 1 both (auto-advance)
    assert a.batches(0) != a.batches(1)
    a.set_epoch(5)
    assert list(a) == b.batches(5)
    assert all(q.epoch == 5 for batch in b.batches(5) for q in batch)
    c = RayBatchSampler(ds, 256, 4, seed=123)
    assert c.batches(0) != a.batches(0)
    assert RayBatchSampler(ds, 256, 4).seed == 7  # the dataset's seed


def test_no_shuffle_is_index_order():
    ds = fake_dataset([100] * 6, [1, 0, 1, 0, 1, 0])
    batches = list(RayBatchSampler(ds, 30, 2, shuffle=False))
    assert [[q.index for q in b] for b in batches] == [[1, 3], [5], [0, 2], [4]]


def test_mixed_levels():
    ds = fake_dataset([100] * 40, [0, 1, 2, 3] * 10)
    sampler = RayBatchSampler(ds, 256, 8, mixed_levels=True)
    assert len(sampler) == 5
    batches = list(sampler)
    assert any(len({ds.samples[q.index]["level"] for q in b}) > 1 for b in batches)
    assert sorted(q.index for b in batches for q in b) == list(range(40))


def test_len_per_level():
    ds = fake_dataset([100] * 10, [0] * 3 + [1] * 7)
    assert len(RayBatchSampler(ds, 10, 4)) == 1 + 2
    assert len(RayBatchSampler(ds, 10, 4, drop_last=True)) == 0 + 1


def test_bad_arguments():
    ds = fake_dataset([1], [0])
    with pytest.raises(ValueError):
        RayBatchSampler(ds, 10, 0)
    with pytest.raises(ValueError):
        RayBatchSampler(ds, -1, 2)


# -- with the real dataset and a DataLoader -------------------------------------------------


@pytest.mark.parametrize(
    "rays_per_batch,spb,sps",
    [(1000, 3, None), (100, 4, None), (300, 4, 50), (4096, 8, None), (61, 5, None)],
)
def test_loader_batches_have_exact_ray_counts(tiny_dataset3, rays_per_batch, spb, sps):
    ds, rays = tiny_dataset3
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train", samples_per_subvolume=sps)
    sampler = RayBatchSampler(dataset, rays_per_batch, spb)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_ray_batch)
    where = {s["hash"]: i for i, s in enumerate(dataset.samples)}
    n_batches = 0
    for batch in loader:
        n_batches += 1
        caps = sum(dataset.available_rays(where[h]) for h in batch["hashes"])
        assert batch["origins"].shape[0] == min(rays_per_batch, caps)
        assert batch["ray_to_voxel"].shape[0] == batch["origins"].shape[0]
        assert len(set(batch["levels"].tolist())) == 1
        assert batch["voxels"].shape[0] == len(batch["hashes"]) <= spb
    assert n_batches == len(sampler)


def _collect(loader):
    return [
        {k: v for k, v in b.items() if isinstance(v, torch.Tensor)} | {"hashes": b["hashes"]}
        for b in loader
    ]


def test_reproducible_across_workers(tiny_dataset):
    ds, rays = tiny_dataset

    def run(workers):
        dataset = HierarchicalVoxelRayDataset(ds, rays, "train", seed=3)
        sampler = RayBatchSampler(dataset, 200, 3)
        loader = DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate_ray_batch, num_workers=workers
        )
        out = [_collect(loader) for _ in range(2)]  # two epochs
        assert sampler.epoch == 2  # one epoch per pass, though DataLoader calls iter() twice
        return out

    a, b = run(0), run(2)
    assert len(a[0]) == len(b[0]) > 1
    for ea, eb in zip(a, b, strict=True):
        for ba, bb in zip(ea, eb, strict=True):
            assert ba["hashes"] == bb["hashes"]
            for k in ba:
                if k != "hashes":
                    assert torch.equal(ba[k], bb[k]), k
    # and the two epochs differ
    assert [x["hashes"] for x in a[0]] != [x["hashes"] for x in a[1]] or not all(
        torch.equal(x["origins"], y["origins"]) for x, y in zip(a[0], a[1], strict=True)
    )
