"""The CuPy back end on a real GPU against the numpy back end (run with ``pytest -m gpu``).

Same inputs and parameters: integers equal, floats within 1e-5. Skipped without a CUDA
device; the same kernels' logic is also tested without one in ``test_kernels_cpu.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpuloader.augment import numpy_backend as augment_numpy
from gpuloader.augment import rng
from gpuloader.augment.numpy_backend import BatchParams
from gpuloader.fused import cuda_build as augment_cupy

pytestmark = pytest.mark.gpu
FLOAT_TOL = {"rtol": 1e-5, "atol": 1e-5}


def _has_cuda_device() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


if not _has_cuda_device():
    pytest.skip("no CUDA device (or no CuPy): GPU tests skipped", allow_module_level=True)

import cupy  # noqa: E402


def _params(gen: np.random.Generator, b: int, symmetries=None) -> BatchParams:
    return BatchParams.make(
        seed=int(gen.integers(0, 2**63)) * 2 + 1,
        epoch=gen.integers(0, 2**32, b),
        index=gen.integers(0, 2**32, b),
        symmetry=gen.integers(0, 48, b) if symmetries is None else symmetries,
        origin_scale=gen.uniform(0.5, 2.0, b),
        distance_scale=gen.uniform(0.5, 2.0, b),
        origin_std=gen.choice([0.0, 0.01, 0.3], b),
        direction_std=gen.choice([0.0, 0.05, 0.5], b),
        jitter_threshold=gen.choice([0, 1 << 20, 1 << 23, 1 << 24], b),
        purpose_offset=gen.choice([0, rng.Purpose.SEGMENT_STRIDE], b),
    )


def _rays(gen: np.random.Generator, n: int, b: int):
    o = (gen.normal(size=(n, 3)) * 2).astype(np.float32)
    d = gen.normal(size=(n, 3))
    d = (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)
    dist = gen.uniform(0, 5, n).astype(np.float32)
    s = gen.integers(0, b, n).astype(np.int32)
    row = gen.integers(0, 5000, n).astype(np.int32)
    return o, d, dist, s, row


def test_transform_rays():
    gen = np.random.default_rng(0)
    params = _params(gen, 48, symmetries=np.arange(48))
    host = _rays(gen, 100_000, 48)
    got = augment_cupy.transform_rays(*(cupy.asarray(a) for a in host), params)
    want = augment_numpy.transform_rays(*host, params)
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, cupy.ndarray) and g.dtype == cupy.float32
        np.testing.assert_allclose(cupy.asnumpy(g), w, **FLOAT_TOL)
    np.testing.assert_array_equal(cupy.asnumpy(got[2]), want[2])


def test_transform_points():
    gen = np.random.default_rng(1)
    params = _params(gen, 48, symmetries=np.arange(48))
    pts = (gen.normal(size=(5000, 3)) * 3).astype(np.float32)
    owner = gen.integers(0, 48, 5000).astype(np.int32)
    got = augment_cupy.transform_points(cupy.asarray(pts), cupy.asarray(owner), params)
    np.testing.assert_array_equal(
        cupy.asnumpy(got), augment_numpy.transform_points(pts, owner, params)
    )


def test_transform_voxels_mixed_sides():
    gen = np.random.default_rng(2)
    sides = np.array([32, 17, 1, 0, 31, 8] * 8)
    params = _params(gen, len(sides), symmetries=np.arange(48))
    vox = np.zeros((len(sides), 32, 32, 32), np.uint8)
    for b, n in enumerate(sides):
        vox[b, :n, :n, :n] = gen.integers(0, 2, (n, n, n))
    got = augment_cupy.transform_voxels(cupy.asarray(vox), sides, params)
    np.testing.assert_array_equal(
        cupy.asnumpy(got), augment_numpy.transform_voxels(vox, sides, params)
    )


def test_select_rows_batch():
    gen = np.random.default_rng(3)
    n = np.array([1, 10, 100_000, 7, 0, 1000, 33, 12345, 2**20 + 1])
    k = np.array([1, 3, 512, 7, 5, 999, 0, 12344, 4096])
    params = _params(gen, len(n))
    rows, owner = augment_cupy.select_rows_batch(n, k, params)
    want_rows, want_owner = augment_numpy.select_rows_batch(n, k, params)
    assert rows.dtype == cupy.int64 and owner.dtype == cupy.int32
    np.testing.assert_array_equal(cupy.asnumpy(rows), want_rows)
    np.testing.assert_array_equal(cupy.asnumpy(owner), want_owner)


def test_torch_cuda_tensors_as_input():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    gen = np.random.default_rng(4)
    params = _params(gen, 5)
    host = _rays(gen, 2000, 5)
    tensors = [torch.from_numpy(a).cuda() for a in host]
    got = augment_cupy.transform_rays(*tensors, params)
    want = augment_numpy.transform_rays(*host, params)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(cupy.asnumpy(g), w, **FLOAT_TOL)
    back = torch.from_dlpack(got[0])  # and back to torch without a copy
    assert back.is_cuda and back.shape == (2000, 3)

    sides = np.array([8, 5, 3, 8, 1])
    vox = np.zeros((5, 8, 8, 8), np.uint8)
    for b, s in enumerate(sides):
        vox[b, :s, :s, :s] = gen.integers(0, 2, (s, s, s))
    got = augment_cupy.transform_voxels(torch.from_numpy(vox).cuda(), sides, params)
    np.testing.assert_array_equal(
        cupy.asnumpy(got), augment_numpy.transform_voxels(vox, sides, params)
    )
