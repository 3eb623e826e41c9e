"""CUDA graphs per output slot on a real GPU (issue 7; run with ``pytest -m gpu``).

* ``fused.graphs.EpochGraphs`` over a real epoch plan: every replay's batch equals
  ``fused.cpu`` on ``plan.batch(i)`` (integers bit for bit, floats within 1e-6) and the eager
  ``fused.cuda.fused_batch`` bit for bit (same device code), outputs past the batch's totals
  untouched; a second epoch and a resumed start replay the same graphs;
* ``GPURayLoader(store="gpu", cuda_graphs=True)`` gives the batches of ``cuda_graphs=False``
  bit for bit and those of the CPU host store within 1e-5, over two epochs and a resume.

Skipped without a CUDA device; the kernels' logic and ``EpochGraphs``' plumbing are tested
without one in ``tests/fused/test_epoch_kernels_cpu.py``; both draw their epoch plans from
``support.fused_kernels``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.fused import cuda as fused_cuda
from gpuloader.fused import graphs as fused_graphs
from gpuloader.loading.loader import GPURayLoader
from gpuloader.loading.setup import cuda_usable
from gpuloader.loading.sources.resident import FusedBatches
from support.fused_kernels import check_batch, epoch_caps, make_epoch
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


FILL = 0xAB


def _cupy():
    import cupy

    return cupy


def _outputs(caps: tuple[int, int, int]) -> dict:
    """One slot's CuPy outputs of capacities (rays, voxels, views), every byte FILL."""
    cp = _cupy()
    t, n, v = caps
    shapes = {
        "origins": ((t, 3), cp.float32),
        "directions": ((t, 3), cp.float32),
        "distances": ((t,), cp.float32),
        "hits": ((t,), cp.float32),
        "view_ids": ((t,), cp.int64),
        "face_ids": ((t,), cp.int64),
        "ray_to_voxel": ((t,), cp.int64),
        "voxels": ((n,), cp.float32),
        "view_positions": ((v, 3), cp.float32),
    }
    out = {}
    for k, (shape, dt) in shapes.items():
        a = cp.empty(shape, dt)
        a.view(cp.uint8).fill(FILL)
        out[k] = a
    return out


def _host(slot: dict) -> dict:
    return {k: _cupy().asnumpy(v) for k, v in slot.items()}


def _device_batch_plan(plan, i: int):
    bp = plan.batch(i)
    cp = _cupy()
    return replace(
        bp, **{f: cp.asarray(getattr(bp, f)) for f in bp.__dataclass_fields__ if f != "seed"}
    )


def _check_equals_eager(slot: dict, dstore: dict, plan, i: int) -> None:
    """The slot's prefixes equal fused_cuda.fused_batch on batch i, bit for bit."""
    cp = _cupy()
    bp = plan.batch(i)
    eager = fused_cuda.fused_batch(dstore, _device_batch_plan(plan, i))
    t, v, b, s = bp.num_rays, bp.num_views, bp.batch_size, bp.grid_side
    for k in fused_cuda.RAY_KEYS:
        assert cp.array_equal(slot[k][:t], eager[k]), k
    assert cp.array_equal(slot["voxels"][: b * s**3].reshape(b, 1, s, s, s), eager["voxels"])
    assert cp.array_equal(slot["view_positions"][:v], eager["view_positions"])


def test_epoch_graphs_replay_equal_numpy_and_eager():
    cp = _cupy()
    store, _, plan = make_epoch(np.random.default_rng(11))
    dstore = {k: cp.asarray(v) for k, v in store.items()}
    caps = epoch_caps(plan, extra=5)
    slots = [_outputs(caps) for _ in range(3)]
    g = fused_graphs.EpochGraphs(dstore, slots)
    stream = cp.cuda.Stream(non_blocking=True)
    g.load(plan, stream=stream)
    for i in range(len(plan)):
        s = g.launch(i, stream)
        assert s == i % 3
        stream.synchronize()
        check_batch(_host(slots[s]), store, plan, i, fill=FILL if i < 3 else None)
        _check_equals_eager(slots[s], dstore, plan, i)


def test_epoch_graphs_next_epoch_and_resume_reuse_the_graphs():
    cp = _cupy()
    store, _, plan = make_epoch(np.random.default_rng(12))
    _, _, plan2 = make_epoch(np.random.default_rng(12), epoch=9, sizes=(2, 5, 4, 1))
    dstore = {k: cp.asarray(v) for k, v in store.items()}
    caps = tuple(max(a, b) for a, b in zip(epoch_caps(plan), epoch_caps(plan2), strict=True))
    slots = [_outputs(caps) for _ in range(2)]
    g = fused_graphs.EpochGraphs(dstore, slots)
    stream = cp.cuda.Stream(non_blocking=True)
    g.load(plan, stream=stream)
    graphs = list(g._graphs)
    for i in range(len(plan)):  # queued back to back, no synchronization between batches
        g.launch(i, stream)
    g.load(plan2, start=1, stream=stream)  # ordered after the replays on the same stream
    assert g._graphs == graphs  # same sizes: nothing captured again
    for i in range(1, len(plan2)):
        s = g.launch(i, stream)
        stream.synchronize()
        check_batch(_host(slots[s]), store, plan2, i, fill=None)
        _check_equals_eager(slots[s], dstore, plan2, i)


def test_epoch_graphs_on_a_torch_stream_into_torch_tensors():
    """The loader's arrangement: torch ring tensors (CuPy views), a torch side stream."""
    cp = _cupy()
    store, _, plan = make_epoch(np.random.default_rng(13))
    dstore = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in store.items()}
    caps = epoch_caps(plan)
    tslots = [{k: torch.as_tensor(v, device="cuda") for k, v in _outputs(caps).items()}
              for _ in range(2)]  # fmt: skip
    g = fused_graphs.EpochGraphs(dstore, [{k: cp.asarray(v) for k, v in s.items()} for s in tslots])
    side = torch.cuda.Stream()
    ext = cp.cuda.ExternalStream(side.cuda_stream)
    g.load(plan, stream=ext)
    for i in range(len(plan)):
        s = g.launch(i, ext)
        side.synchronize()
        host = {k: v.cpu().numpy() for k, v in tslots[s].items()}
        check_batch(host, store, plan, i, fill=None)


def _cloned(ld) -> list[dict]:
    # clone: the GPU store's outputs live in a ring of reused buffers
    out = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
           for b in ld]  # fmt: skip
    torch.cuda.synchronize()
    return out


def _assert_identical(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        assert sorted(g) == sorted(w) and g["hashes"] == w["hashes"]
        for k, v in w.items():
            if k == "hashes":
                continue
            if k == "view_positions":
                assert len(g[k]) == len(v) and all(
                    torch.equal(a, b) for a, b in zip(g[k], v, strict=True)
                )
                continue
            assert g[k].dtype == v.dtype and g[k].shape == v.shape and torch.equal(g[k], v), k


def _loader(ds, graphs: bool) -> GPURayLoader:
    return GPURayLoader(ds, RAYS, SPB, transform=transform(), device="cuda", store="gpu",
                        num_workers=2, cuda_graphs=graphs)  # fmt: skip


def test_loader_graphs_equal_eager_and_cpu(dirs):
    ds = HierarchicalVoxelRayDataset(dirs[0], dirs[1])
    want_cpu = [cpu_batches(ds, e) for e in (0, 1)]
    with _loader(ds, False) as eager_ld, _loader(ds, True) as graph_ld:
        assert isinstance(graph_ld.source, FusedBatches) and graph_ld.source.cuda_graphs
        assert isinstance(eager_ld.source, FusedBatches) and not eager_ld.source.cuda_graphs
        for e in (0, 1):
            eager_ld.set_epoch(e)
            graph_ld.set_epoch(e)
            eager, graphs = _cloned(eager_ld), _cloned(graph_ld)
            _assert_identical(graphs, eager)
            assert_close(graphs, want_cpu[e])
        assert graph_ld.source._gpu is not None and graph_ld.source._gpu.graphs is not None


def test_loader_graphs_resume(dirs):
    ds = HierarchicalVoxelRayDataset(dirs[0], dirs[1])
    want = cpu_batches(ds, 0)
    with _loader(ds, True) as ld:
        ld.set_epoch(0)
        it = iter(ld)
        next(it), next(it)
        state = ld.state_dict()
    with _loader(ds, True) as ld:
        ld.load_state_dict(state)
        assert_close(_cloned(ld), want[2:])
