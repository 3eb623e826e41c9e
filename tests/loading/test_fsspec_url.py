"""A striped pack at a URL of another fsspec filesystem than S3 (issue 16, item 1: "any
fsspec URL"): fsspec's in-memory filesystem (``memory://``) stands for GCS and the rest. The
pack is uploaded there and the striped store reads it bit for bit as the same pack on disk,
with the range requests joined across the gaps (``gap_bytes``) or not."""

from __future__ import annotations

import uuid

import pytest

from gpuloader import GPURayLoader, HierarchicalVoxelRayDataset, PackedRayStore
from gpuloader.augment import transforms as T
from gpuloader.stores.pack import pack_rays
from support.loading_helpers import assert_batches_equal

fsspec = pytest.importorskip("fsspec", reason="the s3 extra (fsspec) is not installed")

from gpuloader.stores.remote.upload import upload_pack  # noqa: E402

W = 64


def _batches(ds_dir, rays, store) -> list[dict]:
    dataset = HierarchicalVoxelRayDataset(ds_dir, rays, "train", ray_store=store, seed=1)
    tf = T.Compose([T.RandomFlip(), T.RandomRaySubsample(num_rays=W)])
    loader = GPURayLoader(dataset, 160, 4, transform=tf, store="striped", device="cpu")
    out = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        out += list(loader)
    return out


@pytest.mark.parametrize("gap", [0, 1 << 20])
def test_memory_url_reads_as_the_pack_on_disk(tiny_dataset, tmp_path, gap) -> None:
    ds_dir, rays = tiny_dataset
    local = tmp_path / "striped"
    pack_rays(rays, local, layout="striped", stripe_rays=W, progress=False, workers=1)
    url = f"memory://gpuloader-{uuid.uuid4().hex}/striped"
    upload_pack(local, url, progress=False)
    try:
        remote = PackedRayStore(url)
        assert remote.files.remote and remote.layout == "striped"
        remote.files.gap_bytes = gap
        want, got = _batches(ds_dir, rays, PackedRayStore(local)), _batches(ds_dir, rays, remote)
        assert_batches_equal(got, want, nonempty=True)
        assert remote.files.requests > 0 and remote.files.fetched_bytes > 0
    finally:
        fsspec.filesystem("memory").rm(url.split("://", 1)[1], recursive=True)
