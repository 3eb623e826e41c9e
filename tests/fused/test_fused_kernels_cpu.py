"""The fused kernels of ``kernels/fused.cu`` on the CPU, against the numpy reference.

``kernels/fused.cu`` is compiled by g++ through ``tests/cuda_shim/shim.h`` (with
``tests/cuda_shim/fused_launcher.cpp``, one shared library per session) and called through
ctypes. Two ways in:

* the launchers directly, on random stores and plans, against two references: the
  per-sample composition of the ground-truth functions (``rng.feistel_permute``,
  ``numpy_backend.transform_rays/transform_points/transform_voxels``) and
  :mod:`gpuloader.fused.cpu`;
* the real :mod:`gpuloader.fused.cuda` wrappers, with CuPy replaced by a numpy
  stand-in (its "device" arrays are a numpy subclass, so host and device inputs are told
  apart as with CuPy) whose kernels are the shim launchers. Every pointer's dtype and every
  scalar's type is checked, so the wrappers' argument plumbing is tested too.

Integers must match bit for bit, floats within 1e-6.
"""

from __future__ import annotations

import ctypes
import types
from dataclasses import replace

import numpy as np
import pytest

from gpuloader.augment import numpy_backend as augment_numpy
from gpuloader.augment import rng
from gpuloader.augment.numpy_backend import SYMMETRY_TABLE, BatchParams
from gpuloader.fused import cpu as fused_numpy
from gpuloader.fused import cuda as fused_cupy
from gpuloader.plan.batch import BatchPlan
from support.shim import build_shim_library

FLOAT_TOL = {"rtol": 1e-6, "atol": 1e-6}
F32, I32, U32, U8, I64 = np.float32, np.int32, np.uint32, np.uint8, np.int64


class Ptr:
    """A pointer argument: a C-contiguous array of ``dtype`` (writeable for outputs), or, when
    ``null`` is allowed, the wrapper's null pointer ``np.uint64(0)``."""

    def __init__(self, dtype, out: bool = False, null: bool = False):
        self.dtype, self.out, self.null = np.dtype(dtype), out, null

    def convert(self, a, where: str):
        if self.null and type(a) is np.uint64 and int(a) == 0:
            return None
        assert isinstance(a, np.ndarray), f"{where}: {type(a)} is not an array"
        assert a.dtype == self.dtype, f"{where}: dtype {a.dtype} instead of {self.dtype}"
        assert a.flags.c_contiguous, f"{where}: not C-contiguous"
        assert not self.out or a.flags.writeable, f"{where}: not writeable"
        return a.ctypes.data


class Scalar:
    """A scalar argument of C type ``ctype``; the wrapper must pass numpy type ``np_type``."""

    def __init__(self, ctype, np_type):
        self.ctype, self.np_type = ctype, np_type

    def convert(self, a, where: str):
        assert type(a) is self.np_type, f"{where}: {type(a)} instead of {self.np_type}"
        return int(a)


def _p(dtype, out=False, null=False):
    return Ptr(dtype, out, null)


INT, UINT, LLONG = (
    Scalar(ctypes.c_int, np.int32),
    Scalar(ctypes.c_uint32, np.uint32),
    Scalar(ctypes.c_longlong, np.int64),
)

#: kernel name -> its arguments after (grid, block), in the kernel's order.
SIGNATURES = {
    "fused_rays": [
        _p(F32), _p(F32), _p(F32), _p(U8, null=True), _p(I32, null=True), _p(I32, null=True),
        _p(I64), _p(I64), _p(I64), _p(I64), _p(U32), _p(I32), _p(I32),
        _p(F32), _p(F32), _p(F32), _p(F32), _p(U32), _p(U32), _p(U32), UINT, UINT,
        _p(F32, True), _p(F32, True), _p(F32, True), _p(F32, True, True),
        _p(I64, True, True), _p(I64, True, True), _p(I64, True, True), INT, LLONG,
    ],
    "fused_grids": [
        _p(U8), _p(I64), _p(I64), _p(I32), _p(I32), _p(U32), _p(U32), _p(U32), _p(U32),
        UINT, UINT, _p(F32, True), INT, LLONG,
    ],
    "fused_views": [
        _p(F32), _p(I64), _p(I64), _p(I32), _p(I32), _p(F32), _p(F32, True), INT, LLONG,
    ],
    "fused_select_rows": [
        _p(I64), _p(I64), _p(I64), _p(I64), _p(U32), _p(I64, True), _p(I64, True),
        _p(I64, True), INT, LLONG,
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """kernels/fused.cu built as a shared library by g++ through the shim."""
    return build_shim_library(
        tmp_path_factory,
        "fused_launcher.cpp",
        "libfused.so",
        SIGNATURES,
        lambda a: a.ctype if isinstance(a, Scalar) else ctypes.c_void_p,
    )


class ShimKernel:
    """Stands for a ``cupy.RawKernel``: ``kernel(grid, block, args)`` runs the shim launcher."""

    def __init__(self, dll, name: str, launches: list | None = None):
        self.fn = getattr(dll, f"launch_{name}")
        self.sig = SIGNATURES[name]
        self.name = name
        self.launches = launches if launches is not None else []

    def __call__(self, grid, block, args):
        assert len(args) == len(self.sig), (
            f"{self.name}: {len(args)} args, kernel has {len(self.sig)}"
        )
        pairs = enumerate(zip(args, self.sig, strict=True))
        conv = [s.convert(a, f"{self.name} arg {i}") for i, (a, s) in pairs]
        self.launches.append((self.name, tuple(grid), tuple(block)))
        self.fn(int(grid[0]), int(block[0]), *conv)


# --- random stores and plans ---------------------------------------------------------------


def make_store(gen: np.random.Generator, counts, views, sides) -> dict[str, np.ndarray]:
    """A store of len(counts) samples: ray rows, view rows and grids, each sample's block at a
    random place (shuffled order, unused rows between blocks)."""
    r, v, g = int(sum(counts)) * 2 + 7, int(sum(views)) * 2 + 3, int(sum(s**3 for s in sides))
    r, g = r, g * 2 + 11
    d = gen.normal(size=(r, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    grids = gen.integers(0, 2, g).astype(np.uint8)
    grids[gen.random(g) < 0.02] = 7  # any byte survives untouched (xor of the jitter bit)
    return {
        "origins": (gen.normal(size=(r, 3)) * 3).astype(np.float32),
        "directions": d.astype(np.float32),
        "distances": gen.uniform(0, 5, r).astype(np.float32),
        "hits": gen.integers(0, 2, r).astype(np.uint8),
        "view_ids": gen.integers(-5, 2**31 - 1, r).astype(np.int32),
        "face_ids": gen.integers(-(2**31), 2**31 - 1, r).astype(np.int32),
        "view_positions": (gen.normal(size=(v, 3)) * 4).astype(np.float32),
        "grids": grids,
    }


def _scatter(gen: np.random.Generator, sizes, total: int) -> np.ndarray:
    """Non-overlapping starts for blocks of ``sizes`` inside [0, total), in shuffled order."""
    order = gen.permutation(len(sizes))
    slack = total - int(sum(sizes))
    gaps = np.sort(gen.integers(0, slack + 1, len(sizes)))
    starts = np.zeros(len(sizes), np.int64)
    pos = 0
    for i, b in enumerate(order):
        starts[b] = pos + gaps[i]
        pos += int(sizes[b])
    return starts


def make_case(
    gen: np.random.Generator,
    b: int,
    sides=(4, 8, 16),
    subsample: str = "mixed",
    noise: bool = True,
    jitter: bool = True,
    symmetries=None,
):
    """A random store and a plan of ``b`` samples over it (numpy arrays).

    ``subsample``: "mixed" (k < n and k == n), "all" (k == n), "some" (k < n everywhere).
    """
    counts = gen.choice([0, 1, 2, 3, 17, 100, 257], b)
    if subsample == "some":
        counts = np.maximum(counts, 2)
    if subsample == "all":
        keep = counts.copy()
    else:
        keep = np.array([gen.integers(0, max(c, 1)) for c in counts], np.int64)
        if subsample == "mixed":
            keep = np.where(gen.random(b) < 0.4, counts, keep)
    views = gen.integers(0, 6, b)
    side = gen.choice(np.asarray(sides), b)
    store = make_store(gen, counts, views, side)
    ray_start = _scatter(gen, counts, store["origins"].shape[0])
    view_start = _scatter(gen, views, store["view_positions"].shape[0])
    grid_start = _scatter(gen, side.astype(np.int64) ** 3, store["grids"].shape[0])
    seed = int(gen.integers(0, 2**63)) * 2 + 1  # both key words
    epoch = gen.integers(0, 2**32, b).astype(np.uint32)
    index = gen.integers(0, 2**32, b).astype(np.uint32)
    offset = gen.choice([0, rng.Purpose.SEGMENT_STRIDE, 2**32 - 2], b).astype(np.uint32)
    keys = np.stack(
        [
            rng.feistel_keys(seed, int(epoch[i]), int(index[i]), rng.Purpose.SUBSAMPLE)
            for i in range(b)
        ]
    ).astype(np.uint32)
    sym = gen.integers(0, 48, b) if symmetries is None else np.asarray(symmetries)
    plan = BatchPlan(
        seed=seed,
        index=index,
        epoch=epoch,
        ray_start=ray_start,
        ray_count=counts.astype(np.int64),
        keep=keep.astype(np.int64),
        out_start=np.concatenate([[0], np.cumsum(keep)[:-1]]).astype(np.int64),
        select_keys=keys.reshape(b, 4),
        view_start=view_start,
        view_count=views.astype(np.int64),
        view_out_start=np.concatenate([[0], np.cumsum(views)[:-1]]).astype(np.int64),
        grid_start=grid_start,
        side=side.astype(np.int64),
        symmetry=sym.astype(np.int32),
        origin_scale=gen.uniform(0.5, 2.0, b).astype(np.float32),
        distance_scale=gen.uniform(0.5, 2.0, b).astype(np.float32),
        origin_std=(gen.choice([0.0, 0.01, 0.3], b) if noise else np.zeros(b)).astype(np.float32),
        direction_std=(gen.choice([0.0, 0.05, 0.5], b) if noise else np.zeros(b)).astype(
            np.float32
        ),
        jitter_threshold=(
            gen.choice([0, 1 << 20, 1 << 23, 1 << 24], b) if jitter else np.zeros(b)
        ).astype(np.uint32),
        purpose_offset=offset,
    )
    return store, plan


# --- the ground-truth composition ------------------------------------------------------------


def _params(plan: BatchPlan) -> BatchParams:
    return BatchParams.make(
        seed=plan.seed,
        epoch=plan.epoch,
        index=plan.index,
        symmetry=plan.symmetry,
        origin_scale=plan.origin_scale,
        distance_scale=plan.distance_scale,
        origin_std=plan.origin_std,
        direction_std=plan.direction_std,
        jitter_threshold=plan.jitter_threshold,
        purpose_offset=plan.purpose_offset,
    )


def ref_rows(plan: BatchPlan):
    """Per sample: ``rng.feistel_permute`` with the plan's keys (or file order)."""
    rows, owner, js = [], [], []
    for b in range(plan.batch_size):
        n, k = int(plan.ray_count[b]), int(plan.keep[b])
        j = np.arange(k, dtype=np.int64)
        local = j if k >= n else rng.feistel_permute(j, n, plan.select_keys[b])
        rows.append(int(plan.ray_start[b]) + local)
        owner.append(np.full(k, b, np.int64))
        js.append(j)
    cat = (lambda x: np.concatenate(x).astype(np.int64)) if rows else (lambda x: np.zeros(0, I64))
    return cat(rows), cat(owner), cat(js)


def ref_rays(store, plan: BatchPlan) -> dict[str, np.ndarray]:
    g, owner, j = ref_rows(plan)
    o, d, dist = augment_numpy.transform_rays(
        store["origins"][g],
        store["directions"][g],
        store["distances"][g],
        owner.astype(np.int32),
        j.astype(np.int32),
        _params(plan),
    )
    return {
        "origins": o,
        "directions": d,
        "distances": dist,
        "hits": store["hits"][g].astype(np.float32),
        "view_ids": store["view_ids"][g].astype(np.int64),
        "face_ids": store["face_ids"][g].astype(np.int64),
        "ray_to_voxel": owner,
    }


def ref_grids(store, plan: BatchPlan) -> np.ndarray:
    b, s = plan.batch_size, plan.grid_side
    vox = np.zeros((b, s, s, s), np.uint8)
    for i in range(b):
        n, start = int(plan.side[i]), int(plan.grid_start[i])
        vox[i, :n, :n, :n] = store["grids"][start : start + n**3].reshape(n, n, n)
    out = augment_numpy.transform_voxels(vox, plan.side, _params(plan))
    return out.astype(np.float32).reshape(b, 1, s, s, s)


def ref_views(store, plan: BatchPlan) -> np.ndarray:
    owner = np.repeat(np.arange(plan.batch_size), plan.view_count)
    k = np.arange(owner.size) - plan.view_out_start[owner]
    g = plan.view_start[owner] + k
    return augment_numpy.transform_points(
        store["view_positions"][g], owner.astype(np.int32), _params(plan)
    )


def check_rays(got: dict, want: dict, exact_floats: bool = False) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype, (k, g.dtype, w.dtype)
        assert g.shape == w.shape, (k, g.shape, w.shape)
        if w.dtype == np.float32 and not exact_floats:
            np.testing.assert_allclose(g, w, **FLOAT_TOL, err_msg=k)
        else:
            np.testing.assert_array_equal(g, w, err_msg=k)


# --- the launchers, called directly ----------------------------------------------------------


def _key(seed: int):
    return (seed & 0xFFFFFFFF), (seed >> 32) & 0xFFFFFFFF


def _run(lib, name: str, args: list, n: int, grid_block=(None, 256)) -> None:
    block = grid_block[1]
    grid = grid_block[0] or max(1, -(-n // block))
    ShimKernel(lib, name)((grid,), (block,), args)


def _c(a, dtype):
    return np.ascontiguousarray(np.asarray(a, dtype=dtype))


def run_rays(lib, store, plan: BatchPlan, grid_block=(None, 256), garbage: bool = True):
    t, b = plan.num_rays, plan.batch_size
    out = {
        "origins": np.empty((t, 3), F32),
        "directions": np.empty((t, 3), F32),
        "distances": np.empty(t, F32),
        "hits": np.empty(t, F32),
        "view_ids": np.empty(t, I64),
        "face_ids": np.empty(t, I64),
        "ray_to_voxel": np.empty(t, I64),
    }
    if garbage:  # every output element must be written
        for a in out.values():
            a.view(np.uint8)[...] = 0xAB
    k0, k1 = _key(plan.seed)
    args = [
        store["origins"], store["directions"], store["distances"], store["hits"],
        store["view_ids"], store["face_ids"], _c(plan.ray_start, I64), _c(plan.ray_count, I64),
        _c(plan.keep, I64), _c(plan.out_start, I64), _c(plan.select_keys, U32),
        _c(SYMMETRY_TABLE, I32), _c(plan.symmetry, I32), _c(plan.origin_scale, F32),
        _c(plan.distance_scale, F32), _c(plan.origin_std, F32), _c(plan.direction_std, F32),
        _c(plan.epoch, U32), _c(plan.index, U32), _c(plan.purpose_offset, U32),
        np.uint32(k0), np.uint32(k1), *out.values(), np.int32(b), np.int64(t),
    ]  # fmt: skip
    if t:
        _run(lib, "fused_rays", args, t, grid_block)
    return out


def run_grids(lib, store, plan: BatchPlan, grid_block=(None, 256)) -> np.ndarray:
    b, s = plan.batch_size, plan.grid_side
    out = np.full((b, 1, s, s, s), np.nan, F32)
    k0, k1 = _key(plan.seed)
    args = [
        store["grids"], _c(plan.grid_start, I64), _c(plan.side, I64), _c(SYMMETRY_TABLE, I32),
        _c(plan.symmetry, I32), _c(plan.jitter_threshold, U32), _c(plan.epoch, U32),
        _c(plan.index, U32), _c(plan.purpose_offset, U32), np.uint32(k0), np.uint32(k1), out,
        np.int32(b), np.int64(s),
    ]  # fmt: skip
    if out.size:
        _run(lib, "fused_grids", args, out.size, grid_block)
    return out


def run_views(lib, store, plan: BatchPlan, grid_block=(None, 256)) -> np.ndarray:
    t, b = plan.num_views, plan.batch_size
    out = np.full((t, 3), np.nan, F32)
    args = [
        store["view_positions"], _c(plan.view_start, I64), _c(plan.view_out_start, I64),
        _c(SYMMETRY_TABLE, I32), _c(plan.symmetry, I32), _c(plan.origin_scale, F32), out,
        np.int32(b), np.int64(t),
    ]  # fmt: skip
    if t:
        _run(lib, "fused_views", args, t, grid_block)
    return out


def run_select(lib, plan: BatchPlan, grid_block=(None, 256)):
    t, b = plan.num_rays, plan.batch_size
    rows, owner, j = (np.full(t, -7, I64) for _ in range(3))
    args = [
        _c(plan.ray_start, I64), _c(plan.ray_count, I64), _c(plan.keep, I64),
        _c(plan.out_start, I64), _c(plan.select_keys, U32), rows, owner, j, np.int32(b),
        np.int64(t),
    ]  # fmt: skip
    if t:
        _run(lib, "fused_select_rows", args, t, grid_block)
    return rows, owner, j


CASES = {
    "B1": dict(b=1),
    "B1-16": dict(b=1, sides=(16,)),
    "B37-mixed": dict(b=37),
    "B37-keep-all": dict(b=37, subsample="all"),
    "B37-subsample": dict(b=37, subsample="some"),
    "B37-no-noise-no-jitter": dict(b=37, noise=False, jitter=False),
    "B37-noise-only": dict(b=37, jitter=False),
    "B37-jitter-only": dict(b=37, noise=False),
    "B37-side8": dict(b=37, sides=(8,)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_rays_match_references(lib, case):
    gen = np.random.default_rng(list(CASES).index(case))
    store, plan = make_case(gen, **CASES[case])
    got = run_rays(lib, store, plan)
    want = ref_rays(store, plan)
    check_rays(got, want)
    check_rays(got, fused_numpy.gather_rays(store, plan))
    if not plan.origin_std.any() and not plan.direction_std.any():
        check_rays(got, want, exact_floats=True)  # a signed permutation and one product each
    else:  # all but a rare ulp of the float64 libm before rounding: exact
        assert np.mean(got["origins"] == want["origins"]) > 0.99
        np.testing.assert_array_equal(got["distances"], want["distances"])


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_select_rows_match_references(lib, case):
    gen = np.random.default_rng(list(CASES).index(case))
    _, plan = make_case(gen, **CASES[case])
    got = run_select(lib, plan)
    for g, w, f in zip(got, ref_rows(plan), fused_numpy.select_store_rows(plan), strict=True):
        np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(g, f)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_grids_match_references(lib, case):
    gen = np.random.default_rng(100 + list(CASES).index(case))
    store, plan = make_case(gen, **CASES[case])
    got = run_grids(lib, store, plan)
    want = ref_grids(store, plan)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, fused_numpy.gather_grids(store["grids"], plan))
    if plan.jitter_threshold.any():
        assert (got == 6).any() or (got == 1).any()


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_views_match_references(lib, case):
    gen = np.random.default_rng(200 + list(CASES).index(case))
    store, plan = make_case(gen, **CASES[case])
    got = run_views(lib, store, plan)
    want = ref_views(store, plan)
    np.testing.assert_array_equal(got, want)  # a signed permutation and one product: exact
    np.testing.assert_array_equal(got, fused_numpy.gather_views(store["view_positions"], plan))


@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("jitter", [False, True])
def test_all_48_symmetries(lib, noise, jitter):
    gen = np.random.default_rng(300 + 2 * noise + jitter)
    store, plan = make_case(gen, 48, noise=noise, jitter=jitter, symmetries=np.arange(48))
    check_rays(run_rays(lib, store, plan), ref_rays(store, plan), exact_floats=not noise)
    np.testing.assert_array_equal(run_grids(lib, store, plan), ref_grids(store, plan))
    np.testing.assert_array_equal(run_views(lib, store, plan), ref_views(store, plan))


@pytest.mark.parametrize("grid_block", [(3, 7), (1, 1), (2, 32)], ids=str)
def test_grid_stride(lib, grid_block):
    """Tiny launches: every thread loops over many items; same results."""
    gen = np.random.default_rng(400)
    store, plan = make_case(gen, 9, sides=(4, 8))
    check_rays(run_rays(lib, store, plan, grid_block), ref_rays(store, plan))
    np.testing.assert_array_equal(run_grids(lib, store, plan, grid_block), ref_grids(store, plan))
    np.testing.assert_array_equal(run_views(lib, store, plan, grid_block), ref_views(store, plan))
    for g, w in zip(run_select(lib, plan, grid_block), ref_rows(plan), strict=True):
        np.testing.assert_array_equal(g, w)


def test_empty_samples_and_edges(lib):
    """Samples with nothing kept (k = 0, n = 0), n = 1, a side-0 grid, a k = n - 1 sample."""
    gen = np.random.default_rng(500)
    store, plan = make_case(gen, 8, sides=(4,))
    plan.ray_count[:] = [0, 5, 1, 300, 2, 0, 1000, 3]
    plan.keep[:] = [0, 0, 1, 299, 2, 0, 999, 1]
    plan.out_start[:] = np.concatenate([[0], np.cumsum(plan.keep)[:-1]])
    store = dict(store)
    r = int(plan.ray_count.sum()) + 50
    for k in ("origins", "directions", "distances", "hits", "view_ids", "face_ids"):
        store[k] = np.ascontiguousarray(np.resize(store[k], (r, *store[k].shape[1:])))
    plan.ray_start[:] = _scatter(gen, plan.ray_count, r)
    plan.side[2] = 0
    plan.view_count[:] = [0, 3, 0, 0, 2, 0, 1, 0]
    plan.view_out_start[:] = np.concatenate([[0], np.cumsum(plan.view_count)[:-1]])
    got = run_rays(lib, store, plan)
    check_rays(got, ref_rays(store, plan))
    assert set(got["ray_to_voxel"].tolist()) == {2, 3, 4, 6, 7}
    np.testing.assert_array_equal(run_grids(lib, store, plan), ref_grids(store, plan))
    np.testing.assert_array_equal(run_views(lib, store, plan), ref_views(store, plan))


def test_feistel_rows_are_distinct_and_in_range(lib):
    gen = np.random.default_rng(600)
    _, plan = make_case(gen, 37, subsample="some")
    rows, owner, j = run_select(lib, plan)
    for b in range(plan.batch_size):
        r = rows[owner == b] - plan.ray_start[b]
        assert r.size == plan.keep[b] and len(set(r.tolist())) == r.size
        assert r.size == 0 or (r.min() >= 0 and r.max() < plan.ray_count[b])
        np.testing.assert_array_equal(j[owner == b], np.arange(r.size))


def test_view_ids_survive_extreme_values(lib):
    gen = np.random.default_rng(700)
    store, plan = make_case(gen, 3, subsample="all")
    store["view_ids"][:] = np.iinfo(np.int32).min
    store["face_ids"][:] = np.iinfo(np.int32).max
    got = run_rays(lib, store, plan)
    assert (got["view_ids"] == np.iinfo(np.int32).min).all()
    assert (got["face_ids"] == np.iinfo(np.int32).max).all()


# --- the real fused_cupy wrappers on the CPU -------------------------------------------------


class DevArray(np.ndarray):
    """A "device" array of the numpy stand-in for CuPy (plain numpy arrays are host arrays)."""


class NoReadBack(DevArray):
    """A device plan field that must not be read back on the host (a synchronization)."""

    def _refuse(self, *a, **k):
        raise AssertionError("a device plan field was read back on the host")

    sum = max = min = tolist = item = __int__ = __index__ = __bool__ = _refuse  # type: ignore


def _dev(a):
    return np.asarray(a).view(DevArray)


def _fake_cupy(stats: dict):
    def asarray(a, dtype=None):
        if not isinstance(a, DevArray):
            stats["uploads"] += 1
        return np.asarray(a, dtype=dtype).view(DevArray)

    def empty(shape, dtype=np.float64):
        a = np.empty(shape, dtype)
        a.view(np.uint8)[...] = 0xAB  # garbage: every element must be written
        return a.view(DevArray)

    return types.SimpleNamespace(
        ndarray=DevArray,
        asarray=asarray,
        ascontiguousarray=lambda a: np.ascontiguousarray(a).view(DevArray),
        empty=empty,
        float32=np.float32,
        int32=np.int32,
        int64=np.int64,
        uint8=np.uint8,
        uint32=np.uint32,
        from_dlpack=lambda x: pytest.fail("no DLPack in these tests"),
        cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=0)),
    )


@pytest.fixture
def fused(lib, monkeypatch):
    """``augment.fused_cupy`` running on the CPU: numpy for CuPy, the shim for kernels."""
    stats = {"uploads": 0}
    launches: list = []
    monkeypatch.setattr(fused_cupy, "_cupy", lambda: _fake_cupy(stats))
    monkeypatch.setattr(fused_cupy, "_kernel", lambda name: ShimKernel(lib, name, launches))
    monkeypatch.setattr(fused_cupy, "_table_cache", {})
    monkeypatch.setattr(fused_cupy, "_module_cache", {})
    fused_cupy.launches = launches
    fused_cupy.stats = stats
    yield fused_cupy
    del fused_cupy.launches, fused_cupy.stats


@pytest.fixture(params=[(256, 65536), (7, 3)], ids=["block256", "grid3x7"])
def launch_shape(request, fused, monkeypatch):
    block, max_blocks = request.param
    monkeypatch.setattr(fused, "BLOCK", block)
    monkeypatch.setattr(fused, "MAX_BLOCKS", max_blocks)
    return request.param


def _device_plan(plan: BatchPlan, cls=DevArray) -> BatchPlan:
    fields = {
        f: np.asarray(getattr(plan, f)).view(cls) for f in plan.__dataclass_fields__ if f != "seed"
    }
    return replace(plan, **fields)


def _device_store(store: dict) -> dict:
    return {k: _dev(v) for k, v in store.items()}


def _as_np(d: dict) -> dict:
    return {k: np.asarray(v) for k, v in d.items()}


@pytest.mark.parametrize("case", ["B1", "B37-mixed", "B37-no-noise-no-jitter"])
def test_wrapper_host_plan(fused, launch_shape, case):
    """A numpy plan and store: uploaded, then the same results as the numpy reference."""
    gen = np.random.default_rng(800 + list(CASES).index(case))
    store, plan = make_case(gen, **CASES[case])
    check_rays(_as_np(fused.gather_rays(store, plan)), fused_numpy.gather_rays(store, plan))
    grids = fused.gather_grids(store["grids"], plan)
    np.testing.assert_array_equal(grids, fused_numpy.gather_grids(store["grids"], plan))
    views = fused.gather_views(store["view_positions"], plan)
    np.testing.assert_array_equal(views, fused_numpy.gather_views(store["view_positions"], plan))
    want_rows = fused_numpy.select_store_rows(plan)
    for g, w in zip(fused.select_store_rows(plan), want_rows, strict=True):
        assert g.dtype == np.int64
        np.testing.assert_array_equal(g, w)


def test_wrapper_host_plan_is_one_upload(fused):
    gen = np.random.default_rng(810)
    store, plan = make_case(gen, 5)
    dstore = _device_store(store)
    fused.gather_rays(dstore, plan)  # symmetry table uploaded once (cached)
    fused.stats["uploads"] = 0
    fused.gather_rays(dstore, plan)
    fused.gather_grids(dstore["grids"], plan)
    fused.gather_views(dstore["view_positions"], plan)
    assert fused.stats["uploads"] == 3  # one packed copy of the plan per call
    fused.stats["uploads"] = 0
    fused.fused_batch(dstore, plan)
    assert fused.stats["uploads"] == 1


@pytest.mark.parametrize("case", ["B1", "B37-mixed", "B37-subsample"])
def test_fused_batch_device_plan_into_out(fused, launch_shape, case):
    """Device store, device plan, preallocated outputs: no upload, no read-back, the
    caller's buffers are written and returned."""
    gen = np.random.default_rng(900 + list(CASES).index(case))
    store, plan = make_case(gen, **CASES[case])
    want = fused_numpy.gather_rays(store, plan)
    t, v, s, b = plan.num_rays, plan.num_views, plan.grid_side, plan.batch_size
    out = {k: fused._cupy().empty(w.shape, w.dtype) for k, w in want.items()}
    out["voxels"] = fused._cupy().empty((b, 1, s, s, s), np.float32)
    out["view_positions"] = fused._cupy().empty((v, 3), np.float32)
    given = dict(out)
    dstore, dplan = _device_store(store), _device_plan(plan, NoReadBack)
    fused.gather_rays(dstore, _device_plan(plan))  # warm the symmetry table cache
    fused.stats["uploads"] = 0
    n_launch = len(fused.launches)
    got = fused.fused_batch(dstore, dplan, out)
    assert fused.stats["uploads"] == 0
    assert got is out and all(got[k] is given[k] for k in given)
    assert [x[0] for x in fused.launches[n_launch:]] == (
        ["fused_rays"] * (t > 0) + ["fused_grids"] * (b * s > 0) + ["fused_views"] * (v > 0)
    )
    check_rays({k: np.asarray(got[k]) for k in want}, want)
    np.testing.assert_array_equal(got["voxels"], fused_numpy.gather_grids(store["grids"], plan))
    np.testing.assert_array_equal(
        got["view_positions"], fused_numpy.gather_views(store["view_positions"], plan)
    )


def test_wrapper_grid_out_shapes(fused):
    gen = np.random.default_rng(1000)
    store, plan = make_case(gen, 4, sides=(4, 8))
    want = fused_numpy.gather_grids(store["grids"], plan)
    b, s = plan.batch_size, plan.grid_side
    flat = fused._cupy().empty((b, s, s, s), np.float32)
    assert fused.gather_grids(store["grids"], plan, flat) is flat
    np.testing.assert_array_equal(flat, want[:, 0])
    big = fused._cupy().empty((b, 1, 16, 16, 16), np.float32)  # a larger S than the batch's
    fused.gather_grids(store["grids"], plan, big)
    np.testing.assert_array_equal(big[:, :, :s, :s, :s], want)
    assert not big[:, :, s:].any() and not big[..., s:].any()
    with pytest.raises(ValueError, match="shape"):
        fused.gather_grids(store["grids"], plan, fused._cupy().empty((b, 2, s, s, s), np.float32))
    with pytest.raises(ValueError, match="device"):
        fused.gather_grids(store["grids"], plan, np.zeros((b, 1, s, s, s), np.float32))
    with pytest.raises(ValueError, match="float32"):
        fused.gather_grids(store["grids"], plan, fused._cupy().empty((b, 1, s, s, s), np.int32))


def test_wrapper_partial_out_and_missing_fields(fused):
    gen = np.random.default_rng(1100)
    store, plan = make_case(gen, 6)
    want = fused_numpy.gather_rays(store, plan)
    t = plan.num_rays
    out = {"origins": fused._cupy().empty((t, 3), np.float32)}
    got = fused.gather_rays(store, plan, out)
    assert got is out and set(got) == set(want)
    check_rays(_as_np(got), want)
    partial = {k: v for k, v in store.items() if k not in ("view_ids", "face_ids")}
    got = fused.gather_rays(partial, plan)
    assert set(got) == set(want) - {"view_ids", "face_ids"}
    check_rays(_as_np(got), {k: want[k] for k in got})
    with pytest.raises(ValueError, match="fit the plan"):
        fused.gather_rays(store, plan, {"distances": fused._cupy().empty(t + 1, np.float32)})
    mismatched = {
        "origins": fused._cupy().empty((t, 3), np.float32),
        "distances": fused._cupy().empty(t + 1, np.float32),
    }
    with pytest.raises(ValueError, match="shape"):
        fused.gather_rays(store, plan, mismatched)
    with pytest.raises(ValueError, match="int32"):
        fused.gather_rays({**store, "view_ids": store["view_ids"].astype(np.int64)}, plan)


def test_wrapper_edges(fused):
    gen = np.random.default_rng(1200)
    store, plan = make_case(gen, 3)
    plan.keep[:] = 0
    plan.out_start[:] = 0
    plan.view_count[:] = 0
    plan.view_out_start[:] = 0
    n = len(fused.launches)
    rays = fused.gather_rays(store, plan)
    assert all(v.shape[0] == 0 for v in rays.values())
    assert fused.gather_views(store["view_positions"], plan).shape == (0, 3)
    assert [r.shape for r in fused.select_store_rows(plan)] == [(0,)] * 3
    assert len(fused.launches) == n  # nothing to launch
    bad = replace(plan, symmetry=np.array([0, 48, 1], np.int32))
    with pytest.raises(ValueError, match="symmetry"):
        fused.gather_views(store["view_positions"], bad)


def test_wrapper_launch_config(fused):
    gen = np.random.default_rng(1300)
    store, plan = make_case(gen, 2, sides=(16,))
    fused.gather_grids(store["grids"], plan)
    assert fused.launches[-1] == ("fused_grids", (2 * 16**3 // 256,), (256,))
