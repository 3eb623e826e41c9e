"""The CUDA kernels' logic on the CPU (design decision 8), against the numpy back end.

``kernels/augment.cu`` is compiled by g++ through ``tests/cuda_shim/shim.h`` (one shared
library per session) and called through ctypes. Two ways in:

* the device helpers of ``kernels/philox.cuh`` directly (Philox, Box-Muller, hash, Feistel)
  against :mod:`gpuloader.augment.rng`;
* the real :mod:`gpuloader.fused.cuda_build` wrappers, with CuPy replaced by a numpy stand-in
  whose kernels are the shim launchers. The launchers' ctypes signatures check every
  pointer's dtype and every scalar's type, so the wrappers' argument plumbing is tested
  too, not only the kernels.

Integers must match bit for bit, floats within 1e-6.
"""

from __future__ import annotations

import ctypes
import types

import numpy as np
import pytest

from gpuloader.augment import numpy_backend as augment_numpy
from gpuloader.augment import rng
from gpuloader.augment.numpy_backend import BatchParams
from gpuloader.fused import cuda_build as augment_cupy
from support.shim import build_shim_library

FLOAT_TOL = {"rtol": 1e-6, "atol": 1e-6}


def _ptr(dtype, out: bool = False):
    flags = "C_CONTIGUOUS,WRITEABLE" if out else "C_CONTIGUOUS"
    return np.ctypeslib.ndpointer(dtype=dtype, flags=flags)


F32, I32, U32, U8, I64 = np.float32, np.int32, np.uint32, np.uint8, np.int64
# Scalar C types, with the numpy scalar type the wrappers must pass for each.
INT, UINT, LLONG = (
    (ctypes.c_int, np.int32),
    (ctypes.c_uint32, np.uint32),
    (ctypes.c_longlong, np.int64),
)

#: kernel name -> the launcher's arguments after (grid, block), in the kernel's order.
SIGNATURES = {
    "transform_rays": [
        _ptr(F32), _ptr(F32), _ptr(F32), _ptr(I32), _ptr(I32), _ptr(I32), _ptr(I32),
        _ptr(F32), _ptr(F32), _ptr(F32), _ptr(F32), _ptr(U32), _ptr(U32), _ptr(U32),
        UINT, UINT, _ptr(F32, True), _ptr(F32, True), _ptr(F32, True), LLONG,
    ],
    "transform_points": [
        _ptr(F32), _ptr(I32), _ptr(I32), _ptr(I32), _ptr(F32), _ptr(F32, True), LLONG,
    ],
    "transform_voxels": [
        _ptr(U8), _ptr(I32), _ptr(I32), _ptr(I32), _ptr(U32), _ptr(U32), _ptr(U32),
        _ptr(U32), UINT, UINT, _ptr(U8, True), INT, INT,
    ],
    "select_rows": [
        _ptr(I64), _ptr(I64), _ptr(I64), _ptr(U32), _ptr(I64, True), _ptr(I32, True), INT,
        LLONG,
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """The kernels built as a shared library by g++ through the shim, with typed launchers."""
    dll = build_shim_library(
        tmp_path_factory,
        "launcher.cpp",
        "libaugment.so",
        SIGNATURES,
        lambda a: a[0] if isinstance(a, tuple) else a,
    )
    dll.shim_philox.argtypes = [_ptr(U32), ctypes.c_uint32, ctypes.c_uint32, _ptr(U32, True)]
    dll.shim_philox.argtypes.append(ctypes.c_longlong)
    dll.shim_normal3.argtypes = [_ptr(U32), _ptr(F32, True), ctypes.c_longlong]
    dll.shim_hash32.argtypes = [_ptr(U32), _ptr(U32, True), ctypes.c_longlong]
    dll.shim_feistel_permute.argtypes = [
        _ptr(U32),
        ctypes.c_uint32,
        _ptr(U32),
        _ptr(U32, True),
        ctypes.c_longlong,
    ]
    dll.shim_feistel_bits.argtypes = [ctypes.c_uint32]
    dll.shim_feistel_bits.restype = ctypes.c_int
    return dll


class _ShimKernel:
    """Stands for a ``cupy.RawKernel``: ``kernel(grid, block, args)`` runs the shim launcher."""

    def __init__(self, dll, name: str, launches: list):
        self.fn = getattr(dll, f"launch_{name}")
        self.sig = SIGNATURES[name]
        self.name = name
        self.launches = launches

    def __call__(self, grid, block, args):
        assert len(args) == len(self.sig), (
            f"{self.name}: {len(args)} args, kernel has {len(self.sig)}"
        )
        conv = []
        for i, (a, s) in enumerate(zip(args, self.sig, strict=True)):
            if isinstance(s, tuple):
                assert type(a) is s[1], f"{self.name} arg {i}: {type(a)} instead of {s[1]}"
                conv.append(int(a))
            else:
                conv.append(a)
        self.launches.append((self.name, grid, block))
        self.fn(int(grid[0]), int(block[0]), *conv)


@pytest.fixture
def backend(lib, monkeypatch):
    """``augment.cupy_backend`` running on the CPU: numpy for CuPy, the shim for kernels."""
    fake = types.SimpleNamespace(
        asarray=lambda a, dtype=None: np.asarray(a, dtype=dtype),
        ascontiguousarray=np.ascontiguousarray,
        empty=np.empty,
        empty_like=np.empty_like,
        zeros=np.zeros,
        float32=np.float32,
        int32=np.int32,
        int64=np.int64,
        uint8=np.uint8,
        uint32=np.uint32,
        cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=0)),
    )
    launches: list = []
    monkeypatch.setattr(augment_cupy, "_cupy", lambda: fake)
    monkeypatch.setattr(augment_cupy, "_kernel", lambda name: _ShimKernel(lib, name, launches))
    monkeypatch.setattr(augment_cupy, "_table_cache", {})
    augment_cupy.launches = launches
    yield augment_cupy
    del augment_cupy.launches


@pytest.fixture(params=[(256, 65536), (7, 3), (1, 1)], ids=["block256", "grid3x7", "one-thread"])
def launch_shape(request, backend, monkeypatch):
    """Launch shapes: the real one, and tiny grids that make every kernel grid-stride."""
    block, max_blocks = request.param
    monkeypatch.setattr(backend, "BLOCK", block)
    monkeypatch.setattr(backend, "MAX_BLOCKS", max_blocks)
    return request.param


# --- random batches ------------------------------------------------------------------------


def _params(gen: np.random.Generator, b: int, symmetries=None, noise=True, jitter=True):
    return BatchParams.make(
        seed=int(gen.integers(0, 2**63)) * 2 + 1,  # exercises both key words
        epoch=gen.integers(0, 2**32, b),
        index=gen.integers(0, 2**32, b),
        symmetry=gen.integers(0, 48, b) if symmetries is None else symmetries,
        origin_scale=gen.uniform(0.5, 2.0, b),
        distance_scale=gen.uniform(0.5, 2.0, b),
        origin_std=gen.choice([0.0, 0.01, 0.3], b) if noise else 0.0,
        direction_std=gen.choice([0.0, 0.05, 0.5], b) if noise else 0.0,
        jitter_threshold=gen.choice([0, 1 << 20, 1 << 23, 1 << 24], b) if jitter else 0,
        purpose_offset=gen.choice([0, rng.Purpose.SEGMENT_STRIDE, 2**32 - 2], b),
    )


def _rays(gen: np.random.Generator, n: int, b: int):
    o = (gen.normal(size=(n, 3)) * 2).astype(np.float32)
    d = gen.normal(size=(n, 3))
    d = (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)
    dist = gen.uniform(0, 5, n).astype(np.float32)
    s = gen.integers(0, b, n).astype(np.int32)
    row = gen.integers(0, 5000, n).astype(np.int32)
    return o, d, dist, s, row


# --- device helpers ------------------------------------------------------------------------


def test_philox_known_answers(lib):
    # Random123's Philox4x32-10 known-answer vectors.
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, want in cases:
        out = np.zeros((1, 4), np.uint32)
        lib.shim_philox(np.array([counter], np.uint32), key[0], key[1], out, 1)
        assert tuple(int(w) for w in out[0]) == want
        assert tuple(int(w) for w in rng.philox4x32(np.array(counter, np.uint32), key)) == want


def test_philox_matches_rng(lib):
    gen = np.random.default_rng(1)
    counters = gen.integers(0, 2**32, (5000, 4), dtype=np.uint64).astype(np.uint32)
    for key in [(0, 0), (12345, 0), (0xDEADBEEF, 0xFFFFFFFF)]:
        out = np.zeros_like(counters)
        lib.shim_philox(counters, key[0], key[1], out, len(counters))
        np.testing.assert_array_equal(out, rng.philox4x32(counters, key))


def test_normal3_matches_box_muller(lib):
    gen = np.random.default_rng(2)
    words = gen.integers(0, 2**32, (20000, 4), dtype=np.uint64).astype(np.uint32)
    words[:4, 0] = [0, 0xFF, 0xFFFFFFFF, 0x100]  # u1 at its ends: 2^-24 and 1
    out = np.zeros((len(words), 3), np.float32)
    lib.shim_normal3(words, out, len(words))
    ref = rng.normal_pairs(words)[:, :3].astype(np.float32)
    np.testing.assert_allclose(out, ref, **FLOAT_TOL)
    assert np.mean(out == ref) > 0.999  # libm may differ by an ulp before rounding, rarely


def test_hash32_and_feistel_bits(lib):
    x = np.random.default_rng(3).integers(0, 2**32, 10000, dtype=np.uint64).astype(np.uint32)
    out = np.zeros_like(x)
    lib.shim_hash32(x, out, len(x))
    np.testing.assert_array_equal(out, rng._hash32(x))
    for n in [1, 2, 3, 4, 5, 8, 9, 15, 16, 17, 1000, 2**20, 2**20 + 1, 2**31, 2**32 - 1]:
        assert lib.shim_feistel_bits(n) == rng.feistel_bits(n), n


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 100, 1000, 4097, 65536, 2**20 + 3])
def test_feistel_permute_matches_rng(lib, n):
    keys = rng.feistel_keys(seed=7 + n, epoch=3, index=n)
    i = np.arange(min(n, 5000), dtype=np.uint32)
    out = np.zeros_like(i)
    lib.shim_feistel_permute(i, n, keys, out, len(i))
    np.testing.assert_array_equal(out.astype(np.int64), rng.feistel_permute(i, n, keys))
    if n <= 5000:  # a permutation of [0, n)
        np.testing.assert_array_equal(np.sort(out), np.arange(n))


def test_feistel_near_2_pow_32(lib):
    n = 2**32 - 5
    keys = rng.feistel_keys(seed=1, epoch=0, index=0)
    i = np.array([0, 1, 2, 12345, n - 1], dtype=np.uint32)
    out = np.zeros_like(i)
    lib.shim_feistel_permute(i, n, keys, out, len(i))
    np.testing.assert_array_equal(out.astype(np.int64), rng.feistel_permute(i, n, keys))


def test_batch_feistel_keys():
    params = _params(np.random.default_rng(4), 6)
    keys = augment_cupy.batch_feistel_keys(params)
    assert keys.shape == (6, 4) and keys.dtype == np.uint32
    for b in range(6):
        want = rng.feistel_keys(
            params.seed,
            int(params.epoch[b]),
            int(params.index[b]),
            (rng.Purpose.SUBSAMPLE + int(params.purpose_offset[b])) & 0xFFFFFFFF,
        )
        np.testing.assert_array_equal(keys[b], want)


# --- the kernels through augment_cupy ------------------------------------------------------


def _check_rays(backend, params, o, d, dist, s, row):
    got = backend.transform_rays(o, d, dist, s, row, params)
    want = augment_numpy.transform_rays(o, d, dist, s, row, params)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float32 and g.shape == w.shape
        np.testing.assert_allclose(g, w, **FLOAT_TOL)
    return got, want


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_transform_rays(backend, launch_shape, seed):
    gen = np.random.default_rng(10 + seed)
    b, n = 7, 400
    params = _params(gen, b)
    got, want = _check_rays(backend, params, *_rays(gen, n, b))
    assert np.mean(got[0] == want[0]) > 0.99 and np.mean(got[1] == want[1]) > 0.99
    np.testing.assert_array_equal(got[2], want[2])  # a single product: exact


@pytest.mark.parametrize("noise", [False, True])
def test_transform_rays_all_48_symmetries(backend, noise):
    gen = np.random.default_rng(20)
    params = _params(gen, 48, symmetries=np.arange(48), noise=noise)
    got, want = _check_rays(backend, params, *_rays(gen, 48 * 6, 48))
    if not noise:  # a signed permutation and one product per value: exact
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


def test_transform_rays_noise_only_some_samples(backend):
    gen = np.random.default_rng(21)
    params = _params(gen, 3, noise=False)
    params.origin_std[1] = 0.2
    params.direction_std[2] = 0.1
    o, d, dist, s, row = _rays(gen, 90, 3)
    got, want = _check_rays(backend, params, o, d, dist, s, row)
    on = s == 2
    np.testing.assert_allclose(np.linalg.norm(got[1][on], axis=1), 1.0, atol=1e-6)


def test_transform_rays_edge_cases(backend):
    gen = np.random.default_rng(22)
    params = _params(gen, 2)
    _check_rays(backend, params, *_rays(gen, 1, 2))  # a single ray
    o, d, dist, s, row = _rays(gen, 0, 2)
    got = backend.transform_rays(o, d, dist, s, row, params)
    assert [g.shape for g in got] == [(0, 3), (0, 3), (0,)]
    with pytest.raises(ValueError, match="directions"):
        backend.transform_rays(o[:0], d[:0].reshape(0, 3)[:, :2], dist, s, row, params)
    bad = _params(gen, 2, symmetries=[0, 48])
    with pytest.raises(ValueError, match="symmetry"):
        backend.transform_rays(*_rays(gen, 4, 2), bad)


def test_transform_points(backend, launch_shape):
    gen = np.random.default_rng(30)
    params = _params(gen, 48, symmetries=np.arange(48))
    pts = (gen.normal(size=(500, 3)) * 3).astype(np.float32)
    owner = gen.integers(0, 48, 500).astype(np.int32)
    got = backend.transform_points(pts, owner, params)
    np.testing.assert_array_equal(got, augment_numpy.transform_points(pts, owner, params))
    assert backend.transform_points(pts[:0], owner[:0], params).shape == (0, 3)


def _voxels(gen, sides, S, garbage_outside=False):
    vox = np.zeros((len(sides), S, S, S), np.uint8)
    for b, n in enumerate(sides):
        vox[b, :n, :n, :n] = gen.integers(0, 2, (n, n, n))
        vox[b, :n, :n, :n][gen.random((n, n, n)) < 0.05] = 7  # any byte survives untouched
    if garbage_outside:
        inside = np.zeros(vox.shape, bool)
        for b, n in enumerate(sides):
            inside[b, :n, :n, :n] = True
        vox[~inside] = 5
    return vox


@pytest.mark.parametrize("jitter", [False, True])
def test_transform_voxels_mixed_sides(backend, launch_shape, jitter):
    gen = np.random.default_rng(40 + jitter)
    sides = np.array([9, 5, 1, 0, 8, 7, 3, 9])
    params = _params(gen, len(sides), jitter=jitter)
    vox = _voxels(gen, sides, 9)
    got = backend.transform_voxels(vox, sides, params)
    assert got.dtype == np.uint8 and got.shape == vox.shape
    np.testing.assert_array_equal(got, augment_numpy.transform_voxels(vox, sides, params))


def test_transform_voxels_all_48_symmetries(backend):
    gen = np.random.default_rng(42)
    sides = gen.integers(1, 7, 48)
    params = _params(gen, 48, symmetries=np.arange(48))
    vox = _voxels(gen, sides, 6, garbage_outside=True)
    got = backend.transform_voxels(vox, sides, params)
    np.testing.assert_array_equal(got, augment_numpy.transform_voxels(vox, sides, params))
    params.jitter_threshold[:] = 0
    got = backend.transform_voxels(vox, sides, params)
    np.testing.assert_array_equal(got, augment_numpy.transform_voxels(vox, sides, params))


def test_transform_voxels_rejects_bad_sides(backend):
    gen = np.random.default_rng(43)
    params = _params(gen, 2)
    vox = _voxels(gen, [4, 4], 4)
    with pytest.raises(ValueError, match="sides"):
        backend.transform_voxels(vox, np.array([4, 5]), params)
    with pytest.raises(ValueError, match="sides"):
        backend.transform_voxels(vox, np.array([4]), params)


@pytest.mark.parametrize(
    "n,k",
    [
        ([1, 10, 100, 7, 0, 1000, 33, 5], [1, 3, 200, 7, 5, 999, 0, -1]),  # mixed, k >= n too
        ([1], [0]),  # n = 1, nothing kept
        ([1], [1]),  # n = 1, k >= n
        ([12345], [12344]),  # n not a power of 2, almost all
        ([2**16, 3, 2**16 + 1], [70000, 2, 2**16]),
        ([0, 0], [0, 4]),  # nothing at all
    ],
)
def test_select_rows(backend, launch_shape, n, k):
    n, k = np.array(n), np.array(k)
    params = _params(np.random.default_rng(50 + len(n)), len(n))
    rows, owner = backend.select_rows_batch(n, k, params)
    want_rows, want_owner = augment_numpy.select_rows_batch(n, k, params)
    assert rows.dtype == np.int64 and owner.dtype == np.int32
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(owner, want_owner)


def test_launch_config(backend):
    """Real launch shape: 256 threads, enough blocks, capped (then grid-stride)."""
    gen = np.random.default_rng(60)
    params = _params(gen, 2)
    backend.transform_points(np.zeros((1000, 3), np.float32), np.zeros(1000, np.int32), params)
    assert backend.launches[-1] == ("transform_points", (4,), (256,))
    backend.transform_voxels(np.zeros((2, 4, 4, 4), np.uint8), np.array([4, 3]), params)
    assert backend.launches[-1] == ("transform_voxels", (1,), (256,))
