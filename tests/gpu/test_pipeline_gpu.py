"""The GPU path (DALI ``.gpu()`` outputs, the CUDA augmentation) against the CPU fallback.

Same decisions (hashes, ray_to_voxel, levels, ray counts, symmetries: the voxels, which are
0/1, match exactly), floats within 1e-5, every tensor on the GPU. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from gpuloader.augment import transforms as T
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.loading.loader import GPURayLoader
from gpuloader.loading.setup import cuda_usable
from gpuloader.reading.pipeline import dali_available
from support import loading_helpers as _loading

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_usable(), reason="needs a CUDA GPU with CuPy"),
]

EXACT = ("voxels", "voxel_shapes", "hits", "view_ids", "face_ids", "ray_to_voxel", "num_rays")


def transform() -> T.Compose:
    return _loading.full_transform(64)


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> HierarchicalVoxelRayDataset:
    return HierarchicalVoxelRayDataset(*_loading.generate(tmp_path_factory, "gpu_data"),
                                       transform=transform())  # fmt: skip


def compare(gpu_batches: list[dict], cpu_batches: list[dict]) -> None:
    assert len(gpu_batches) == len(cpu_batches) > 0
    for g, c in zip(gpu_batches, cpu_batches, strict=True):
        assert list(g) == list(c)
        assert g["hashes"] == c["hashes"]
        for k, want in c.items():
            got = g[k]
            if k == "hashes":
                continue
            pairs = zip(got, want, strict=True) if isinstance(want, list) else [(got, want)]
            for x, y in pairs:
                assert x.is_cuda and not y.is_cuda, k
                assert x.dtype == y.dtype and x.shape == y.shape, k
                if k in EXACT or not y.is_floating_point():
                    assert torch.equal(x.cpu(), y), k
                else:
                    torch.testing.assert_close(x.cpu(), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_gpu_matches_cpu(ds, backend):
    if backend == "dali" and not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    with GPURayLoader(ds, 512, 6, backend="torch", num_workers=0, device="cpu") as cpu:
        cpu.set_epoch(1)
        want = list(cpu)
    with GPURayLoader(ds, 512, 6, backend=backend, num_workers=2, device="cuda") as gpu:
        assert gpu.device.type == "cuda" and gpu.backend == backend
        gpu.set_epoch(1)
        got = list(gpu)
        torch.cuda.synchronize()
    compare(got, want)


def test_auto_picks_cuda(ds):
    with GPURayLoader(ds, 256, 4, backend="torch", num_workers=0) as ld:
        assert ld.device.type == "cuda"
        batch = next(iter(ld))
        assert all(v.is_cuda for v in batch.values() if isinstance(v, torch.Tensor))
