"""Shared helpers of the GPU tests (``tests/gpu/``, run with ``pytest -m gpu``).

* :func:`cupy_device_count`: the CUDA devices CuPy sees (0 without CuPy or a driver; the
  loader's tests skip on ``gpuloader.loading.setup.cuda_usable`` instead);
* the loader comparison of ``test_stores_gpu`` and ``test_cuda_graphs_gpu``: the generated
  dataset (:func:`make_dirs`, with its pack), the transform, the CPU fallback's batches
  (:func:`cpu_batches`) and :func:`assert_close` of GPU batches against them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpuloader import pack_rays
from gpuloader.augment import transforms as T
from gpuloader.loading.loader import GPURayLoader
from support import loading_helpers as _loading

#: batch keys compared exactly (the rest within 1e-5)
EXACT = ("voxels", "voxel_shapes", "hits", "view_ids", "face_ids", "ray_to_voxel", "num_rays",
         "levels")  # fmt: skip
#: rays per sample and samples per batch of the loader comparisons
RAYS, SPB = 300, 5


def cupy_device_count() -> int:
    """CUDA devices CuPy sees; 0 without CuPy or a working driver."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - no working CuPy means no GPU tests
        return 0


def transform() -> T.Compose:
    return _loading.full_transform(64)


def make_dirs(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Path, Path, Path]:
    """(dataset_dir, ray_dir, pack_dir) of a small generated dataset and its pack."""
    dataset_dir, ray_dir = _loading.generate(tmp_path_factory, name, ("asym", "torus", "box"))
    out = dataset_dir.parent  # the generator writes both into the temporary directory
    pack_rays(ray_dir, out / "pack", progress=False)
    return dataset_dir, ray_dir, out / "pack"


def assert_close(gpu: list[dict], cpu: list[dict]) -> None:
    """Same hashes and keys; every GPU tensor on the GPU, of the CPU one's dtype and shape;
    :data:`EXACT` keys equal, the rest within 1e-5."""
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
    """Epoch ``epoch`` of the CPU fallback (host store, numpy fused pass, no workers)."""
    with GPURayLoader(ds, RAYS, SPB, transform=transform(), device="cpu", store="host",
                      num_workers=0) as ld:  # fmt: skip
        ld.set_epoch(epoch)
        return list(ld)
