"""One pass at a time per ``GPURayLoader`` (issue 18, item 9).

A new ``iter(loader)`` ends the pass in progress: the new pass is the next epoch, complete and
unmixed (the old pass's read-ahead never comes into it), and the old iterator's next ``next()``
raises ``PassEndedError`` naming why. Checked on every source that runs on a CPU: the host
store, the pack stream (torch workers, and DALI), the per-sample npz stream (torch workers,
and DALI) and the striped store (the GPU stores need a CUDA device: not checked here).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuloader import PackedRayStore, pack_rays
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.errors import PassEndedError
from gpuloader.loading.loader import GPURayLoader
from gpuloader.reading.pipeline import dali_available
from support.loading_helpers import assert_batches_equal, full_transform

SPB = 4
needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")


@pytest.fixture(scope="module")
def packs(tmp_path_factory, tiny_dataset3) -> dict[str, Path]:
    _, rays = tiny_dataset3
    out = tmp_path_factory.mktemp("one_pass")
    pack_rays(rays, out / "pack", progress=False, workers=1)
    pack_rays(rays, out / "striped", progress=False, workers=1, layout="striped", stripe_rays=128)
    return {"pack": out / "pack", "striped": out / "striped"}


CASES = [
    pytest.param("host", None, "torch", 2, id="host-store"),
    pytest.param("stream", "pack", "torch", 2, id="pack-stream-torch"),
    pytest.param("stream", None, "torch", 2, id="npz-sample-stream-torch"),
    pytest.param("striped", "striped", "torch", 0, id="striped"),
    pytest.param(
        "stream", "pack", "dali", 1, id="pack-stream-dali", marks=[needs_dali, pytest.mark.slow]
    ),
    pytest.param(
        "stream", None, "dali", 1, id="npz-sample-stream-dali", marks=[needs_dali, pytest.mark.slow]
    ),
]


def _loader(dirs, packs, store, ray_store, backend, workers) -> GPURayLoader:
    kw = {"ray_store": PackedRayStore(packs[ray_store])} if ray_store else {}
    ds = HierarchicalVoxelRayDataset(dirs[0], dirs[1], split="train", **kw)
    transform = full_transform(128, occupancy_jitter=False)
    return GPURayLoader(ds, None, SPB, transform=transform, device="cpu", store=store,
                        backend=backend, num_workers=workers, start_method="fork")  # fmt: skip


@pytest.mark.parametrize("store,ray_store,backend,workers", CASES)
def test_a_new_pass_ends_the_old_one(tiny_dataset3, packs, store, ray_store, backend, workers):
    with _loader(tiny_dataset3, packs, store, ray_store, backend, workers) as ld:
        assert ld.store == store and ld.backend == backend
        want0, want1, want2 = list(ld), list(ld), list(ld)
        assert len(want1) == len(ld) > 3

        # the peek: one batch of epoch 0, then epoch 1 whole and unmixed
        ld.set_epoch(0)
        assert_batches_equal([next(iter(ld))], want0[:1])
        assert_batches_equal(list(ld), want1)

        # an old iterator kept: the new pass ends it; its next next() names why
        it = iter(ld)
        assert_batches_equal([next(it), next(it)], want2[:2])
        state = ld.state_dict()
        assert (state["epoch"], state["batches_yielded"]) == (2, 2)
        got = [b for b in ld]  # epoch 3
        with pytest.raises(PassEndedError, match=r"a new iter\(loader\) started; one pass"):
            next(it)
        assert isinstance(PassEndedError("x"), RuntimeError)
        assert len(got) == len(ld)
        ld.set_epoch(3)
        assert_batches_equal(got, list(ld))

        # a pass never started is ended as well; a finished one just stops
        never, done = iter(ld), iter(ld)
        with pytest.raises(PassEndedError):
            next(never)
        assert len(list(done)) == len(ld)
        assert next(iter(ld)) is not None  # the next pass starts after a finished one
        with pytest.raises(StopIteration):
            next(done)

        # close() ends the pass in progress
        last = iter(ld)
        next(last)
    with pytest.raises(PassEndedError, match=r"closed"):
        next(last)
