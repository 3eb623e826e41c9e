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

from gpuloader import PackedRayStore
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.loading.loader import GPURayLoader
from gpuloader.loading.setup import cuda_usable
from support.gpu_helpers import (
    RAYS,
    SPB,
    assert_close,
    cpu_batches,
    make_dirs,
    transform,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_usable(), reason="needs a CUDA GPU with CuPy"),
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path, Path]:
    return make_dirs(tmp_path_factory, "gpu_store_data")


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


def _cloned(batches) -> list[dict]:
    """Batches copied out of the GPU store's ring of reused output buffers."""
    return [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
            for b in batches]  # fmt: skip


@pytest.mark.parametrize("store", ["gpu", "host"])
def test_one_pass_at_a_time_on_cuda(dirs, store):
    """Issue 18 item 9 on the GPU stores: a new ``iter(loader)`` ends the pass in progress;
    the new pass is the next epoch, whole and unmixed; the old iterator's next ``next()``
    raises PassEndedError (tests/loading/test_one_pass.py checks the CPU stores)."""
    from gpuloader.errors import PassEndedError

    ds = HierarchicalVoxelRayDataset(dirs[0], dirs[1])
    want = [cpu_batches(ds, e) for e in (0, 1)]
    with GPURayLoader(ds, RAYS, SPB, transform=transform(), device="cuda", store=store,
                      num_workers=2) as ld:  # fmt: skip
        ld.set_epoch(0)
        it = iter(ld)
        peek = _cloned([next(it)])
        torch.cuda.synchronize()
        assert_close(peek, want[0][:1])
        got = _cloned(ld)  # epoch 1, from its first batch
        torch.cuda.synchronize()
        assert_close(got, want[1])
        with pytest.raises(PassEndedError, match=r"a new iter\(loader\) started"):
            next(it)
