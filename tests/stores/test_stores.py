"""Resident stores and the epoch plan.

* the epoch plan equals the per-sample draws (``draw_plan`` with ``SampleContext``, the
  dataset's ``select_rows``) for every sample of an epoch;
* a host-resident store (filled by DALI, by torch workers, in-process, from npz or a pack)
  gives the batches of the CPU API (DataLoader + RayBatchSampler + collate_ray_batch) bit
  for bit, and every augmented ray re-traces through its augmented grid;
* ``store="auto"`` says what it chose, and what cannot be fused is refused with a reason.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from gpuloader import PackedRayStore, pack_rays
from gpuloader.augment import rng
from gpuloader.augment import transforms as T
from gpuloader.augment.plan import to_batch_params
from gpuloader.errors import UnsupportedTransformError
from gpuloader.fused import cpu as fused_numpy
from gpuloader.loading.loader import GPURayLoader
from gpuloader.loading.sources.pack_stream import StreamBatches
from gpuloader.plan.epoch import build_epoch_plan
from gpuloader.plan.sampler import RayBatchSampler
from gpuloader.reading.fill import fill_store
from gpuloader.reading.headers import estimate_layout
from gpuloader.reading.pipeline import dali_available
from gpuloader.stores.budget import choose_store
from support import loading_helpers as _loading

RAYS, SPB = 300, 5


make_dataset = _loading.make_dataset
geometric_transform = _loading.geometric_transform
cpu_api = partial(_loading.cpu_api, rays=RAYS, spb=SPB)
assert_batches_equal = partial(_loading.assert_batches_equal, nonempty=True)


def full_transform(normalize_distances: bool = False) -> T.Compose:
    return _loading.full_transform(scale_distances=normalize_distances)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _loading.generate(tmp_path_factory, "store_data")


# -- the epoch plan ----------------------------------------------------------------------------


@pytest.mark.parametrize("sps", [None, 17])
def test_epoch_plan_equals_per_sample_draws(data_dirs, sps):
    tf = full_transform(normalize_distances=True)
    ds = make_dataset(data_dirs, tf, samples_per_subvolume=sps, seed=11)
    layout = estimate_layout(ds)
    sampler = RayBatchSampler(ds, RAYS, SPB, mixed_levels=True)
    levels = np.array([s["level"] for s in ds.samples])
    epoch = 3
    batches = sampler.batches(epoch)
    plan = build_epoch_plan(batches, layout, levels, tf.segments[0], ds.seed, epoch, sps)
    assert len(plan) == len(batches)
    slots = 0
    for i, batch in enumerate(batches):
        bp = plan.batch(i)
        assert bp.batch_size == len(batch)
        rows, owner, _ = fused_numpy.select_store_rows(bp)
        for b, (index, ep, num_rays) in enumerate(batch):
            ctx = rng.SampleContext(ds.seed, ep, index)
            side = int(layout.side[index])
            want = to_batch_params([T.draw_plan(tf.segments[0], ctx, side)], [ctx])
            for name in ("symmetry", "origin_scale", "distance_scale", "origin_std",
                         "direction_std", "jitter_threshold", "purpose_offset"):  # fmt: skip
                assert getattr(bp, name)[b] == getattr(want, name)[0], (name, index)
                assert getattr(bp, name).dtype == getattr(want, name).dtype, name
            # the rows the dataset reads for this request, in the same order
            sample = ds.read_sample(index, ep, num_rays)
            assert int(bp.keep[b]) == len(sample["distances"])
            n = int(ds.samples[index]["num_rays"])
            mine = rows[owner == b] - layout.ray_start[index]
            np.testing.assert_array_equal(
                mine, rng.select_rows(n, int(bp.keep[b]), ds.seed, ep, index)
            )
            slots += 1
    assert slots == len(ds)
    assert len(set(plan.arrays["symmetry"].tolist())) > 5


def test_vectorized_symmetry_draws_match_scalar_draws():
    words = rng.random_words(5, 2, np.arange(2000), rng.Purpose.SYMMETRY, 0)
    for t in (T.RandomRotation90(p=0.6, axes=("x", "z")), T.RandomFlip(axes=[2, 0], p=0.3)):
        np.testing.assert_array_equal(t.draw_many(words), [t.draw(w) for w in words])


# -- host store: the CPU API's batches -----------------------------------------------------------


@pytest.mark.parametrize(
    "fill",
    [
        pytest.param(
            dict(backend="dali", num_workers=2),
            marks=pytest.mark.skipif(not dali_available(), reason="no DALI"),
            id="dali-fill",
        ),
        pytest.param(dict(backend="torch", num_workers=2), id="torch-workers-fill"),
        pytest.param(dict(backend="direct", num_workers=2), id="shared-memory-fill"),
        pytest.param(dict(backend="torch", num_workers=0), id="in-process-fill"),
    ],
)
def test_host_store_equals_cpu_api(data_dirs, fill):
    ds = make_dataset(data_dirs, full_transform())
    shm = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    # "direct" is what the loader does for a host store with workers; the others on request
    store = fill_store(ds, "host", progress=False, **fill)
    with GPURayLoader(ds, RAYS, SPB, device="cpu", store=store, num_workers=0) as ld:
        assert ld.store == "host" and ld.resident is not None
        assert ld.resident.nbytes > 0
        if os.path.isdir("/dev/shm"):  # the shared file is unlinked once filled
            assert not {f for f in os.listdir("/dev/shm") if "gpuloader-store" in f} - shm
        for epoch in (0, 1):
            ld.set_epoch(epoch)
            assert_batches_equal(list(ld), cpu_api(ds, epoch))


def test_host_store_from_a_pack_threads_and_retrace(data_dirs, tmp_path):
    pack_rays(data_dirs[1], tmp_path / "pack", progress=False)
    ds = make_dataset(data_dirs, geometric_transform())
    packed = make_dataset(data_dirs, ray_store=PackedRayStore(tmp_path / "pack"))
    store = fill_store(packed, "host", num_workers=0, progress=False)
    for threads in (1, 3):
        with GPURayLoader(packed, RAYS, SPB, transform=geometric_transform(), device="cpu",
                          store=store, threads=threads, num_workers=0) as ld:  # fmt: skip
            ld.set_epoch(4)
            batches = list(ld)
        assert_batches_equal(batches, cpu_api(ds, 4))
    assert _loading.assert_rays_retrace(batches) > 200


def test_mixed_levels_and_no_transform(data_dirs):
    ds = make_dataset(data_dirs)
    with GPURayLoader(ds, 1000, 3, device="cpu", store="host", num_workers=0) as ld:
        assert_batches_equal(list(ld), cpu_api(ds, 0, rays=1000, spb=3))
    # several sizes in one batch: zero padding at the end of each axis, as collate pads
    fused = make_dataset(data_dirs, full_transform())
    store = fill_store(fused, "host", num_workers=0, progress=False)
    from gpuloader.loading.sources.resident import FusedBatches

    sampler = RayBatchSampler(fused, RAYS, SPB, mixed_levels=True)
    batches = FusedBatches(store, fused, sampler, full_transform().segments[0], torch.device("cpu"))
    got = list(batches(2))
    assert any(len(set(b["levels"].tolist())) > 1 for b in got)
    assert_batches_equal(got, cpu_api(fused, 2, mixed_levels=True))


def test_auto_choice_and_refusals(data_dirs, caplog):
    ds = make_dataset(data_dirs, full_transform())
    with GPURayLoader(ds, RAYS, SPB, device="cpu", num_workers=0) as ld:
        assert ld.store == "host" and "fits the host-RAM budget" in ld.store_reason
        assert "store='host'" in repr(ld)
    with GPURayLoader(ds, RAYS, SPB, device="cpu", num_workers=0, host_budget=10) as ld:
        assert ld.store == "stream" and "streaming" in ld.store_reason
    assert choose_store(10**6, torch.device("cpu"), host_budget=10**7)[0] == "host"
    assert choose_store(10**8, torch.device("cpu"), host_budget=10**7)[0] == "stream"

    def custom(sample):
        return sample

    mixed = T.Compose([custom, T.RandomFlip()])
    with GPURayLoader(ds, RAYS, SPB, transform=mixed, device="cpu", num_workers=0) as ld:
        assert ld.store == "stream" and "custom" in ld.store_reason
    with pytest.raises(UnsupportedTransformError, match="custom callables"):
        GPURayLoader(ds, RAYS, SPB, transform=mixed, device="cpu", num_workers=0, store="host")
    with pytest.raises(ValueError, match="CUDA"):
        GPURayLoader(ds, RAYS, SPB, device="cpu", num_workers=0, store="gpu")
    with pytest.raises(ValueError, match="store must be"):
        GPURayLoader(ds, RAYS, SPB, device="cpu", num_workers=0, store="disk")


# -- streaming whole batches from a pack ---------------------------------------------------------


@pytest.mark.parametrize(
    "backend,workers",
    [
        pytest.param(
            "dali", 2, marks=pytest.mark.skipif(not dali_available(), reason="no DALI"), id="dali"
        ),
        pytest.param("torch", 2, id="torch-workers"),
        pytest.param("torch", 0, id="in-process"),
    ],
)
def test_stream_from_pack_equals_cpu_api(data_dirs, tmp_path, backend, workers):
    pack_rays(data_dirs[1], tmp_path / "pack", progress=False)
    packed = make_dataset(data_dirs, ray_store=PackedRayStore(tmp_path / "pack"))
    with GPURayLoader(packed, RAYS, SPB, transform=full_transform(), device="cpu",
                      store="stream", backend=backend, num_workers=workers) as ld:  # fmt: skip
        assert isinstance(ld.source, StreamBatches) and "whole batches" in ld.store_reason
        ld.set_epoch(3)
        first = list(ld)
        second = list(ld)  # epoch 4, the same pipeline
        it = iter(ld)  # epoch 5, interrupted
        next(it)
        del it
        ld.set_epoch(3)
        again = list(ld)
    ds = make_dataset(data_dirs, full_transform())
    assert_batches_equal(first, cpu_api(ds, 3))
    assert_batches_equal(second, cpu_api(ds, 4))
    assert_batches_equal(again, first)
