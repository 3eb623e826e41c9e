"""The fused CuPy pass on a real GPU against ``fused.cpu`` (run with ``pytest -m gpu``).

Same store and plan: integers equal, floats within 1e-6. Skipped without a CUDA device; the
same kernels' logic (and the wrapper's plumbing) is also tested without one in
``tests/fused/test_fused_kernels_cpu.py``; both draw their random stores and plans from
``support.fused_kernels``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from gpuloader.fused import cpu as fused_numpy
from gpuloader.fused import cuda as fused_cuda
from gpuloader.plan.batch import BatchPlan
from support.fused_kernels import CASES, FLOAT_TOL, exclusive_cumsum, make_case, scatter
from support.gpu_helpers import cupy_device_count

pytestmark = pytest.mark.gpu
#: output dtype of every ray key (the schema's batch dtypes)
RAY_DTYPES = {k: fused_cuda.OUT_DTYPES[k] for k in fused_cuda.RAY_KEYS}

if not cupy_device_count():
    pytest.skip("no CUDA device (or no CuPy): GPU tests skipped", allow_module_level=True)

import cupy  # noqa: E402


def _device_plan(plan: BatchPlan) -> BatchPlan:
    fields = {f: cupy.asarray(getattr(plan, f)) for f in plan.__dataclass_fields__ if f != "seed"}
    return replace(plan, **fields)


def _device_store(store: dict) -> dict:
    return {k: cupy.asarray(v) for k, v in store.items()}


def _check_rays(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        assert isinstance(g, cupy.ndarray), k
        assert g.dtype == w.dtype and g.shape == w.shape, (k, g.dtype, g.shape)
        g = cupy.asnumpy(g)
        if w.dtype == np.float32:
            np.testing.assert_allclose(g, w, **FLOAT_TOL, err_msg=k)
        else:
            np.testing.assert_array_equal(g, w, err_msg=k)


def _check_all(got: dict, store: dict, plan) -> None:
    _check_rays({k: got[k] for k in RAY_DTYPES}, fused_numpy.gather_rays(store, plan))
    np.testing.assert_array_equal(
        cupy.asnumpy(got["voxels"]), fused_numpy.gather_grids(store["grids"], plan)
    )
    np.testing.assert_array_equal(
        cupy.asnumpy(got["view_positions"]),
        fused_numpy.gather_views(store["view_positions"], plan),
    )


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_each_function_host_inputs(case):
    gen = np.random.default_rng(list(CASES).index(case))
    store, plan = make_case(gen, **CASES[case])
    _check_rays(fused_cuda.gather_rays(store, plan), fused_numpy.gather_rays(store, plan))
    grids = fused_cuda.gather_grids(store["grids"], plan)
    assert grids.dtype == cupy.float32
    np.testing.assert_array_equal(
        cupy.asnumpy(grids), fused_numpy.gather_grids(store["grids"], plan)
    )
    views = fused_cuda.gather_views(store["view_positions"], plan)
    np.testing.assert_array_equal(
        cupy.asnumpy(views), fused_numpy.gather_views(store["view_positions"], plan)
    )
    for g, w in zip(
        fused_cuda.select_store_rows(plan), fused_numpy.select_store_rows(plan), strict=True
    ):
        assert g.dtype == cupy.int64
        np.testing.assert_array_equal(cupy.asnumpy(g), w)


@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("jitter", [False, True])
def test_all_48_symmetries_device_plan(noise, jitter):
    gen = np.random.default_rng(10 + 2 * noise + jitter)
    store, plan = make_case(
        gen, 48, sides=(4, 8, 16, 32), noise=noise, jitter=jitter, symmetries=np.arange(48)
    )
    got = fused_cuda.fused_batch(_device_store(store), _device_plan(plan))
    _check_all(got, store, plan)


def test_fused_batch_preallocated_out_on_a_side_stream():
    """Device store and plan, caller's buffers, a non-default stream: no host round trip."""
    gen = np.random.default_rng(20)
    store, plan = make_case(gen, 37)
    t, v, s, b = plan.num_rays, plan.num_views, plan.grid_side, plan.batch_size
    dstore = _device_store(store)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        dplan = _device_plan(plan)
        out = {k: cupy.full((t, 3) if k in ("origins", "directions") else (t,), 7, dt)
               for k, dt in RAY_DTYPES.items()}  # fmt: skip
        out["voxels"] = cupy.full((b, 1, s, s, s), 7, cupy.float32)
        out["view_positions"] = cupy.full((v, 3), 7, cupy.float32)
        given = dict(out)
        got = fused_cuda.fused_batch(dstore, dplan, out)
    stream.synchronize()
    assert got is out and all(got[k] is given[k] for k in given)
    _check_all(got, store, plan)


def test_large_subsample():
    """Samples of 2**20 + 1 and 100 000 rays, a few thousand kept each (cycle walking)."""
    gen = np.random.default_rng(30)
    store, plan = make_case(gen, 6, subsample="all", sides=(32,))
    counts = np.array([2**20 + 1, 100_000, 4097, 1, 65536, 3], np.int64)
    keep = np.array([4096, 99_999, 4097, 1, 5000, 2], np.int64)
    r = int(counts.sum()) + 1000
    store = dict(store)
    d = gen.normal(size=(r, 3))
    store["origins"] = gen.normal(size=(r, 3)).astype(np.float32)
    store["directions"] = (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)
    store["distances"] = gen.uniform(0, 5, r).astype(np.float32)
    store["hits"] = gen.integers(0, 2, r).astype(np.uint8)
    store["view_ids"] = gen.integers(0, 2**31 - 1, r).astype(np.int32)
    store["face_ids"] = gen.integers(0, 2**31 - 1, r).astype(np.int32)
    plan = replace(
        plan,
        ray_count=counts,
        keep=keep,
        out_start=exclusive_cumsum(keep),
        ray_start=scatter(gen, counts, r),
        origin_std=np.full(6, 0.1, np.float32),
        direction_std=np.full(6, 0.2, np.float32),
    )
    got = fused_cuda.gather_rays(_device_store(store), _device_plan(plan))
    _check_rays(got, fused_numpy.gather_rays(store, plan))


def test_torch_cuda_tensors_in_and_out():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    gen = np.random.default_rng(40)
    store, plan = make_case(gen, 9)
    tstore = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in store.items()}
    t, b, s = plan.num_rays, plan.batch_size, plan.grid_side
    out = {
        "origins": torch.empty((t, 3), dtype=torch.float32, device="cuda"),
        "ray_to_voxel": torch.empty(t, dtype=torch.int64, device="cuda"),
        "voxels": torch.empty((b, 1, s, s, s), dtype=torch.float32, device="cuda"),
    }
    got = fused_cuda.fused_batch(tstore, plan, out)
    torch.cuda.synchronize()
    want = fused_numpy.gather_rays(store, plan)
    np.testing.assert_allclose(out["origins"].cpu().numpy(), want["origins"], **FLOAT_TOL)
    np.testing.assert_array_equal(out["ray_to_voxel"].cpu().numpy(), want["ray_to_voxel"])
    np.testing.assert_array_equal(
        out["voxels"].cpu().numpy(), fused_numpy.gather_grids(store["grids"], plan)
    )
    np.testing.assert_allclose(cupy.asnumpy(got["directions"]), want["directions"], **FLOAT_TOL)
