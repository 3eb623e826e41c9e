"""Every store on a real GPU against the CPU fallback (host store, numpy fused pass).

Same decisions (hashes, levels, ray counts, rows, symmetries: voxels, hits, ids and
``ray_to_voxel`` exactly), floats within 1e-5, every tensor on the GPU:

* ``store="gpu"``: the split in device memory, the CUDA fused kernels, the output ring;
* ``store="host"`` with ``device="cuda"``: numpy batches copied to the device;
* ``store="stream"`` on a pack: whole batches read by workers, the CUDA fused pass.

Skipped without CUDA (run ``pytest -m gpu`` on a GPU machine).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpuloader import PackedRayStore, pack_rays
from gpuloader.augment import transforms as T
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.loading.loader import GPURayLoader, _cuda_usable
from support import loading_helpers as _loading

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cuda_usable(), reason="needs a CUDA GPU with CuPy"),
]

EXACT = ("voxels", "voxel_shapes", "hits", "view_ids", "face_ids", "ray_to_voxel", "num_rays",
         "levels")  # fmt: skip
RAYS, SPB = 300, 5


def transform() -> T.Compose:
    return _loading.full_transform(64)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path, Path]:
    dataset_dir, ray_dir = _loading.generate(
        tmp_path_factory, "gpu_store_data", ("asym", "torus", "box")
    )
    out = dataset_dir.parent  # the generator writes both into the temporary directory
    pack_rays(ray_dir, out / "pack", progress=False)
    return dataset_dir, ray_dir, out / "pack"


def assert_close(gpu: list[dict], cpu: list[dict]) -> None:
    assert len(gpu) == len(cpu) > 0
    for g, c in zip(gpu, cpu, strict=True):
        assert g["hashes"] == c["hashes"]
        for k, v in c.items():
            if k == "hashes":
                continue
            if k == "view_positions":
                for a, b in zip(g[k], v, strict=True):
                    assert a.is_cuda
                    torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)
                continue
            assert g[k].is_cuda and g[k].dtype == v.dtype and g[k].shape == v.shape, k
            if k in EXACT:
                assert torch.equal(g[k].cpu(), v), k
            else:
                torch.testing.assert_close(g[k].cpu(), v, rtol=1e-5, atol=1e-5, msg=k)


def cpu_batches(ds, epoch: int) -> list[dict]:
    with GPURayLoader(ds, RAYS, SPB, transform=transform(), device="cpu", store="host",
                      num_workers=0) as ld:  # fmt: skip
        ld.set_epoch(epoch)
        return list(ld)


@pytest.mark.parametrize("store", ["gpu", "host"])
def test_resident_store_on_cuda_equals_cpu(dirs, store):
    ds = HierarchicalVoxelRayDataset(dirs[0], dirs[1])
    want = [cpu_batches(ds, e) for e in (0, 1)]
    with GPURayLoader(ds, RAYS, SPB, transform=transform(), device="cuda", store=store,
                      num_workers=2) as ld:  # fmt: skip
        assert ld.store == store
        for e in (0, 1):
            ld.set_epoch(e)
            # clone: the GPU store's outputs live in a ring of reused buffers
            got = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
                   for b in ld]  # fmt: skip
            torch.cuda.synchronize()
            assert_close(got, want[e])


def test_stream_from_pack_on_cuda_equals_cpu(dirs):
    packed = HierarchicalVoxelRayDataset(dirs[0], dirs[1], ray_store=PackedRayStore(dirs[2]))
    want = cpu_batches(HierarchicalVoxelRayDataset(dirs[0], dirs[1]), 2)
    with GPURayLoader(packed, RAYS, SPB, transform=transform(), device="cuda", store="stream",
                      num_workers=2) as ld:  # fmt: skip
        ld.set_epoch(2)
        assert_close(list(ld), want)


def test_auto_picks_the_gpu_store_when_it_fits(dirs):
    ds = HierarchicalVoxelRayDataset(dirs[0], dirs[1])
    with GPURayLoader(ds, RAYS, SPB, transform=transform(), device="cuda", num_workers=0) as ld:
        assert ld.store == "gpu" and "GPU budget" in ld.store_reason
