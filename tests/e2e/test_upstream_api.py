"""The newer upstream API beside the seed's: ``RayBatchSampler(dataset, batch_size, shuffle,
drop_last)`` and ``NormalizeDistances`` (both of its scalings, per sample and vectorized)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Sampler

from gpuloader.augment import rng
from gpuloader.augment import transforms as T
from gpuloader.augment.plan import to_batch_params
from gpuloader.dataset.collate import collate_ray_batch
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.loading.loader import GPURayLoader
from gpuloader.plan.epoch import build_epoch_plan
from gpuloader.plan.sampler import RayBatchSampler
from gpuloader.reading.headers import estimate_layout
from support.tiny_dataset import BASE

PARAMS = (
    "symmetry",
    "origin_scale",
    "distance_scale",
    "origin_std",
    "direction_std",
    "jitter_threshold",
    "purpose_offset",
)


# -- RayBatchSampler -----------------------------------------------------------------------------


def test_batch_size_is_upstreams_meaning(tiny_dataset3):
    ds = HierarchicalVoxelRayDataset(*tiny_dataset3, split="train")
    sampler = RayBatchSampler(ds, batch_size=3, shuffle=False)
    assert isinstance(sampler, Sampler)
    assert sampler.rays_per_batch is None and sampler.subvolumes_per_batch == 3
    assert sampler.batch_size == 3 and sampler.shuffle is False and sampler.drop_last is False
    seen = []
    for batch in sampler:
        assert 1 <= len(batch) <= 3 and all(r.num_rays is None for r in batch)
        seen += [r.index for r in batch]
    assert sorted(seen) == list(range(len(ds)))
    # every ray of every sub-volume
    rays = sum(
        len(b["distances"])
        for b in DataLoader(ds, batch_sampler=sampler, collate_fn=collate_ray_batch)
    )
    assert rays == sum(s["num_rays"] for s in ds.samples)


@pytest.mark.parametrize(
    "args,kwargs,want",
    [
        ((5, True, True), {}, (None, 5, True, True)),  # upstream's positional order
        ((5, False), {}, (None, 5, False, False)),
        ((5, True), {"drop_last": True}, (None, 5, True, True)),
        ((), {"batch_size": 4, "shuffle": False, "drop_last": True}, (None, 4, False, True)),
        ((300, 3, False, True), {}, (300, 3, False, True)),  # the seed's positional order
        ((None, 2), {}, (None, 2, True, False)),
        ((), {}, (4096, 8, True, False)),
    ],
)
def test_both_argument_orders(tiny_dataset3, args, kwargs, want):
    ds = HierarchicalVoxelRayDataset(*tiny_dataset3, split="train")
    s = RayBatchSampler(ds, *args, **kwargs)
    assert (s.rays_per_batch, s.subvolumes_per_batch, s.shuffle, s.drop_last) == want


def test_ambiguous_and_conflicting_sampler_arguments(tiny_dataset3):
    ds = HierarchicalVoxelRayDataset(*tiny_dataset3, split="train")
    with pytest.warns(UserWarning, match="batch_size=8"):
        s = RayBatchSampler(ds, 8)  # the seed's order: 8 rays over 8 sub-volumes
    assert (s.rays_per_batch, s.subvolumes_per_batch) == (8, 8)
    with pytest.raises(TypeError, match="either batch_size"):
        RayBatchSampler(ds, rays_per_batch=1000, batch_size=4)
    with pytest.raises(TypeError, match="either batch_size"):
        RayBatchSampler(ds, subvolumes_per_batch=2, batch_size=4)
    with pytest.raises(TypeError, match="batch_size twice"):
        RayBatchSampler(ds, 4, True, batch_size=4)
    with pytest.raises(TypeError, match="drop_last twice"):
        RayBatchSampler(ds, 4, True, False, True)


# -- NormalizeDistances --------------------------------------------------------------------------


def test_normalize_distances_values(tiny_dataset3):
    raw = HierarchicalVoxelRayDataset(*tiny_dataset3, split="train", include_empty=True)
    for mode in ("diagonal", "upstream-new"):
        ds = HierarchicalVoxelRayDataset(
            *tiny_dataset3, split="train", include_empty=True, transform=T.NormalizeDistances(mode)
        )
        levels = set()
        for i in range(len(ds)):
            a, b = raw[i], ds[i]
            side = a["voxels"].shape[-1]
            level = a["level"]
            levels.add(level)
            assert side == BASE >> level
            div = np.sqrt(3.0) * (side if mode == "diagonal" else 2.0 ** (7 - level))
            np.testing.assert_allclose(
                b["distances"].numpy(), a["distances"].numpy() / div, rtol=1e-6
            )
            if mode == "diagonal":
                assert float(b["distances"].max()) <= 1.0 + 1e-6
            for k in ("origins", "directions", "voxels"):
                assert torch.equal(a[k], b[k]), k
        assert levels == {0, 1, 2}
    with pytest.raises(ValueError, match="mode"):
        T.NormalizeDistances("unit")
    with pytest.raises(ValueError, match="level"):
        T.NormalizeDistances("upstream-new")(
            {
                "origins": np.zeros((1, 3), np.float32),
                "directions": np.ones((1, 3), np.float32),
                "distances": np.ones(1, np.float32),
                "voxels": np.zeros((1, 4, 4, 4)),
            }
        )


@pytest.mark.parametrize("mode", ["diagonal", "upstream-new"])
def test_epoch_plan_equals_per_sample_draws(tiny_dataset3, mode):
    """``draw_plans`` (the epoch plan) and ``draw_plan`` (per sample) agree for every sample."""
    tf = T.Compose(
        [
            T.RandomRotation90(p=0.7),
            T.NormalizeRayOrigins(scale_distances=True),
            T.NormalizeDistances(mode),
            T.AddNoise(origin_std=0.02),
            T.NormalizeDistances("diagonal"),
        ]
    )
    ds = HierarchicalVoxelRayDataset(*tiny_dataset3, split="train", transform=tf, seed=6)
    layout = estimate_layout(ds)
    levels = np.array([s["level"] for s in ds.samples])
    sampler = RayBatchSampler(ds, 200, 3, mixed_levels=True)
    batches = sampler.batches(1)
    plan = build_epoch_plan(batches, layout, levels, tf.segments[0], ds.seed, 1)
    scales = set()
    slots = 0
    for i, batch in enumerate(batches):
        bp = plan.batch(i)
        for b, (index, ep, _) in enumerate(batch):
            ctx = rng.SampleContext(ds.seed, ep, index)
            one = T.draw_plan(
                tf.segments[0], ctx, int(layout.side[index]), level=int(levels[index])
            )
            want = to_batch_params([one], [ctx])
            for name in PARAMS:
                assert getattr(bp, name)[b] == getattr(want, name)[0], (name, index)
                assert getattr(bp, name).dtype == getattr(want, name).dtype, name
            scales.add(float(bp.distance_scale[b]))
            slots += 1
    assert slots == len(ds) and len(scales) == 3  # one per level


@pytest.mark.parametrize("store", ["host", "stream"])
def test_gpu_loader_normalizes_as_the_cpu_api(tiny_dataset3, store):
    tf = T.Compose(
        [
            T.RandomFlip(p=0.5),
            T.NormalizeDistances("upstream-new"),
            T.RandomRaySubsample(num_rays=30),
        ]
    )
    ds = HierarchicalVoxelRayDataset(*tiny_dataset3, split="train", transform=tf)
    with GPURayLoader(ds, 100, 3, device="cpu", store=store, backend="torch", num_workers=0) as ld:
        ld.set_epoch(2)
        got = list(ld)
    sampler = RayBatchSampler(ds, 100, 3)
    sampler.set_epoch(2)
    want = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate_ray_batch))
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        for k in ("distances", "origins", "voxels", "levels"):
            assert torch.equal(g[k], w[k]), k
