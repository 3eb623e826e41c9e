"""Chunked rays (the newer upstream's ``rays_per_chunk``): counts and contents against the
files, every store (npz, pack, host-resident, streamed from a pack) and the GPU loader.

A chunk is an ordinary entry of ``dataset.samples`` (``num_rays`` its rows, ``ray_offset``
its first row), so every path that reads samples reads chunks; these tests hold each path
to the CPU API (DataLoader + RayBatchSampler + collate_ray_batch) bit for bit.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
from torch.utils.data import DataLoader

from gpuloader import PackedRayStore, pack_rays
from gpuloader.augment import transforms as T
from gpuloader.dataset.collate import collate_ray_batch
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.errors import DamagedFileError
from gpuloader.format.chunks import chunk_samples
from gpuloader.loading.loader import GPURayLoader
from gpuloader.loading.sources.pack_stream import StreamBatches
from gpuloader.plan.sampler import RayBatchSampler
from gpuloader.stores.npz import NpzRayStore
from support import loading_helpers as _loading

RAYS, SPB = 120, 4
ROW_KEYS = ("origins", "directions", "distances", "hits", "view_ids", "face_ids")


cpu_api = partial(_loading.cpu_api, rays=RAYS, spb=SPB)
assert_batches_equal = partial(_loading.assert_batches_equal, nonempty=True, list_dtypes=False)


def transform() -> T.Compose:
    return _loading.full_transform(25, scale_distances=True)


@pytest.fixture(scope="module")
def packed(tiny_dataset3, tmp_path_factory):
    out = tmp_path_factory.mktemp("chunk_pack") / "pack"
    pack_rays(tiny_dataset3[1], out, progress=False)
    return out


# -- the index of chunks -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 7, 50, 144, 10_000])
def test_chunk_counts_and_contents_against_the_files(tiny_dataset3, size):
    whole = HierarchicalVoxelRayDataset(*tiny_dataset3, split="train")
    ds = HierarchicalVoxelRayDataset(*tiny_dataset3, split="train", rays_per_chunk=size)
    files = whole.samples
    assert len(ds) == sum(math.ceil(s["num_rays"] / size) for s in files)
    assert ds.get_level_distribution() == whole.get_level_distribution()
    j = 0
    for f in files:
        with np.load(f["ray_path"]) as npz:
            arrays = {k: npz[k] for k in (*ROW_KEYS, "view_positions")}
        n = len(arrays["origins"])
        assert n == f["num_rays"]
        for c in range(math.ceil(n / size)):
            s = ds.samples[j]
            lo, hi = c * size, min(n, (c + 1) * size)
            assert (s["hash"], s["level"], s["chunk_idx"]) == (f["hash"], f["level"], c)
            assert (s["ray_offset"], s["num_rays"], s["file_num_rays"]) == (lo, hi - lo, n)
            if size in (7, 50) or c == 0:  # reading every 1-ray chunk is slow for nothing
                item = ds[j]
                assert item["chunk_idx"] == c
                assert item["hash"] == f["hash"] and item["level"] == f["level"]
                for k in ROW_KEYS:
                    np.testing.assert_array_equal(item[k].numpy(), arrays[k][lo:hi], err_msg=k)
                # one row per view, every view of the file, in every chunk
                np.testing.assert_array_equal(
                    item["view_positions"].numpy(), arrays["view_positions"]
                )
            j += 1
    assert j == len(ds)


def test_chunk_samples_alone():
    samples = [{"level": 1, "hash": "a", "num_rays": 5}, {"level": 1, "hash": "b", "num_rays": 0}]
    chunks = chunk_samples(samples, 2)
    assert [(c["ray_offset"], c["num_rays"], c["chunk_idx"]) for c in chunks] == [
        (0, 2, 0),
        (2, 2, 1),
        (4, 1, 2),
    ]  # a file without rays has no chunk, as upstream
    assert samples[0]["num_rays"] == 5  # the input is not modified
    with pytest.raises(ValueError, match="rays_per_chunk"):
        chunk_samples(samples, 0)


def test_rows_drawn_within_a_chunk_and_the_pack_reads_the_same(tiny_dataset3, packed):
    kw = dict(split="train", rays_per_chunk=40, samples_per_subvolume=9, seed=3)
    ds = HierarchicalVoxelRayDataset(*tiny_dataset3, **kw)
    pk = HierarchicalVoxelRayDataset(*tiny_dataset3, ray_store=PackedRayStore(packed), **kw)
    for i, s in enumerate(ds.samples):
        a, b = ds.read_sample(i, epoch=2), pk.read_sample(i, epoch=2)
        assert len(a["distances"]) == min(9, s["num_rays"])
        for k in (*ROW_KEYS, "view_positions"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        # the rows are rows of this chunk of the file
        full = NpzRayStore().read({**s, "ray_offset": None}, None)
        chunk = full["origins"][s["ray_offset"] : s["ray_offset"] + s["num_rays"]]
        assert all((chunk == row).all(axis=1).any() for row in a["origins"])
    # a chunk past the end of its file (the file changed) is a named error
    bad = {**ds.samples[0], "ray_offset": ds.samples[0]["file_num_rays"] - 1, "num_rays": 5}
    with pytest.raises(DamagedFileError, match="chunk rows"):
        NpzRayStore().read(bad, None)
    with pytest.raises(DamagedFileError, match="chunk rows"):
        PackedRayStore(packed).read(bad, None)


# -- every back end gives the CPU API's batches ------------------------------------------------


@pytest.mark.parametrize("size", [30, 64])
def test_host_store_on_chunks_equals_cpu_api(tiny_dataset3, size):
    ds = HierarchicalVoxelRayDataset(
        *tiny_dataset3, split="train", transform=transform(), rays_per_chunk=size, seed=9
    )
    with GPURayLoader(ds, RAYS, SPB, device="cpu", store="host", num_workers=0) as ld:
        assert ld.store == "host"
        assert int(ld.resident.layout.ray_count.sum()) == sum(s["num_rays"] for s in ds.samples)
        for epoch in (0, 1):
            ld.set_epoch(epoch)
            got = list(ld)
            assert_batches_equal(got, cpu_api(ds, epoch))
    # augmented chunks re-trace through their augmented grids (jitter off)
    geo = T.Compose([T.RandomRotation90(p=0.9), T.RandomFlip(axes=[0, 1, 2], p=0.5)])
    ds = HierarchicalVoxelRayDataset(
        *tiny_dataset3, split="train", transform=geo, rays_per_chunk=size
    )
    with GPURayLoader(ds, RAYS, SPB, device="cpu", store="host", num_workers=0) as ld:
        batches = list(ld)
    _loading.assert_rays_retrace(batches, normalized=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_from_pack_on_chunks_equals_cpu_api(tiny_dataset3, packed, workers):
    kw = dict(split="train", rays_per_chunk=45, seed=4)
    pk = HierarchicalVoxelRayDataset(*tiny_dataset3, ray_store=PackedRayStore(packed), **kw)
    with GPURayLoader(
        pk,
        RAYS,
        SPB,
        transform=transform(),
        device="cpu",
        store="stream",
        backend="torch",
        num_workers=workers,
    ) as ld:
        assert isinstance(ld.source, StreamBatches) and "whole batches" in ld.store_reason
        ld.set_epoch(2)
        got = list(ld)
    ds = HierarchicalVoxelRayDataset(*tiny_dataset3, transform=transform(), **kw)
    assert_batches_equal(got, cpu_api(ds, 2))


def test_per_sample_stream_on_chunks_equals_cpu_api(tiny_dataset3):
    """The per-sample reader over the npz files (custom callable: no fused pass)."""

    def custom(sample):
        return sample

    tf = T.Compose([custom, T.RandomFlip(axes=[0, 2], p=0.5), T.RandomRaySubsample(num_rays=20)])
    ds = HierarchicalVoxelRayDataset(
        *tiny_dataset3, split="train", transform=tf, rays_per_chunk=33, seed=1
    )
    with GPURayLoader(
        ds, RAYS, SPB, device="cpu", store="stream", backend="torch", num_workers=0
    ) as ld:
        ld.set_epoch(1)
        got = list(ld)
    assert_batches_equal(got, cpu_api(ds, 1))


def test_upstream_batch_size_sampler_on_chunks(tiny_dataset3):
    """Upstream's newer loop: chunks, ``RayBatchSampler(dataset, batch_size=8)``, every ray."""
    ds = HierarchicalVoxelRayDataset(*tiny_dataset3, split="train", rays_per_chunk=100)
    sampler = RayBatchSampler(ds, batch_size=8, shuffle=True)
    total = 0
    for batch in DataLoader(ds, batch_sampler=sampler, collate_fn=collate_ray_batch):
        assert len(batch["hashes"]) <= 8
        total += len(batch["distances"])
    assert total == sum(s["file_num_rays"] for s in ds.samples if s["chunk_idx"] == 0)


def test_resume_on_chunks(tiny_dataset3):
    """The sampler's resume state works on chunks as on files: the rest of the epoch is the
    rest an uninterrupted pass yields."""
    ds = HierarchicalVoxelRayDataset(*tiny_dataset3, split="train", rays_per_chunk=40)
    full = RayBatchSampler(ds, RAYS, SPB)
    full.set_epoch(3)
    want = list(full)
    first = RayBatchSampler(ds, RAYS, SPB)
    first.set_epoch(3)
    it = iter(first)
    head = [next(it) for _ in range(4)]
    state = first.state_dict()
    again = RayBatchSampler(ds, RAYS, SPB)
    again.load_state_dict(state)
    assert head + list(again) == want


def test_chunk_idx_is_zero_without_chunks(tiny_dataset):
    """As upstream HEAD: every sample has ``chunk_idx``, 0 when files are not cut."""
    ds = HierarchicalVoxelRayDataset(*tiny_dataset)
    assert [ds[i]["chunk_idx"] for i in range(len(ds))] == [0] * len(ds)
