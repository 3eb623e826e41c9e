"""The fused kernels of ``kernels/fused.cu`` on the CPU, against the numpy reference.

``kernels/fused.cu`` is compiled by g++ through ``tests/support/cuda_shim/shim.h`` (with
``tests/support/cuda_shim/fused_launcher.cpp``, one shared library per session; see
``support.shim``) and called through ctypes. Four ways in:

* the argument struct: ``gpl_fused_args`` of ``kernels/fused_args.cuh`` as g++ lays it out
  (offsetof and sizeof of every field) against its numpy twin
  :data:`gpuloader.fused.cuda.FUSED_ARGS_DTYPE`;
* the device helpers of ``kernels/philox.cuh`` directly (Philox, Box-Muller, hash, Feistel)
  against :mod:`gpuloader.augment.rng`;
* the launchers directly, on random stores and plans, against two references: the
  per-sample composition of the ground-truth functions (``rng.feistel_permute``,
  ``numpy_backend.transform_rays/transform_points/transform_voxels``) and
  :mod:`gpuloader.fused.cpu`;
* the real :mod:`gpuloader.fused.cuda` wrappers, with CuPy replaced by a numpy
  stand-in (its "device" arrays are a numpy subclass, so host and device inputs are told
  apart as with CuPy) whose kernels are the shim launchers. Every pointer the kernel reads is
  checked (a live array of the header's pointee dtype, C-contiguous, writeable for outputs,
  null only where allowed), so the wrappers' argument plumbing is tested too.

Integers must match bit for bit, floats within 1e-6.
"""

from __future__ import annotations

import types
from dataclasses import replace

import numpy as np
import pytest

from gpuloader.augment import rng
from gpuloader.augment.numpy_backend import SYMMETRY_TABLE
from gpuloader.fused import cpu as fused_numpy
from gpuloader.fused import cuda as fused_cuda
from gpuloader.plan.batch import BatchPlan
from support.fused_kernels import (
    CASES,
    F32,
    FLOAT_TOL,
    I32,
    I64,
    check_rays,
    exclusive_cumsum,
    make_case,
    ref_grids,
    ref_rays,
    ref_rows,
    ref_views,
    scatter,
)
from support.shim import (
    C_TYPES,
    DevArray,
    NoReadBack,
    ShimKernel,
    dev,
    fake_cupy,
    fused_library,
    header_fields,
    install_fake_cupy,
    run_cpp,
)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """kernels/fused.cu built as a shared library by g++ through the shim."""
    return fused_library(tmp_path_factory)


# --- the argument struct -----------------------------------------------------------------------


def test_struct_layout_matches_the_header(tmp_path):
    """FUSED_ARGS_DTYPE has the header's fields in its order, of its types, at the offsets
    and with the size g++ gives them."""
    fields = header_fields()
    dt = fused_cuda.FUSED_ARGS_DTYPE
    assert [name for _, name in fields] == list(dt.names)
    for ctype, name in fields:
        want = np.dtype(np.uint64) if ctype.endswith("*") else C_TYPES[ctype]
        assert dt[name] == want, (name, ctype, dt[name])
    lines = [
        f'    std::printf("{n} %zu %zu\\n", offsetof(gpl_fused_args, {n}), '
        f"sizeof(gpl_fused_args::{n}));"
        for _, n in fields
    ]
    src = "\n".join(
        [
            "#include <cstddef>",
            "#include <cstdio>",
            '#include "fused_args.cuh"',
            "int main() {",
            '    std::printf("sizeof %zu %zu\\n", sizeof(gpl_fused_args),',
            "                alignof(gpl_fused_args));",
            *lines,
            "    return 0;",
            "}",
        ]
    )
    got = {}
    for line in run_cpp(tmp_path, src).splitlines():
        name, a, b = line.split()
        got[name] = (int(a), int(b))
    assert got.pop("sizeof") == (dt.itemsize, dt.alignment)
    assert got == {n: (dt.fields[n][1], dt[n].itemsize) for n in dt.names}


def test_fused_args_fills_pointers_and_sizes():
    a = dev(np.zeros(4, F32))
    args = fused_cuda.fused_args(origins=a, hits=None, num_rays=7, key1=np.uint32(3))
    assert args.shape == (1,) and args.dtype == fused_cuda.FUSED_ARGS_DTYPE
    assert int(args["origins"][0]) == a.ctypes.data and int(args["hits"][0]) == 0
    assert int(args["num_rays"][0]) == 7 and int(args["key1"][0]) == 3
    assert all(
        int(args[f][0]) == 0 for f in args.dtype.names if f not in ("origins", "num_rays", "key1")
    )


# --- the device helpers of philox.cuh ----------------------------------------------------------


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


# --- the launchers, called directly ----------------------------------------------------------


def _key(seed: int):
    return np.uint32(seed & 0xFFFFFFFF), np.uint32((seed >> 32) & 0xFFFFFFFF)


def _run(lib, name: str, fields: dict, n: int, grid_block=(None, 256)) -> None:
    """Kernel ``name`` over ``n`` items with the struct of ``fields`` (the real builder)."""
    block = grid_block[1]
    grid = grid_block[0] or max(1, -(-n // block))
    ShimKernel(lib, name)((grid,), (block,), (fused_cuda.fused_args(**fields),))


def _plan(plan: BatchPlan, *fields: str) -> dict:
    """Plan fields as "device" arrays of the kernels' dtypes, the table, the key and B."""
    d = {
        f: dev(np.ascontiguousarray(getattr(plan, f), dtype=fused_cuda.PLAN_DTYPES[f]))
        for f in fields
    }
    k0, k1 = _key(plan.seed)
    d.update(sym_table=dev(np.ascontiguousarray(SYMMETRY_TABLE, dtype=I32)), key0=k0, key1=k1)
    return {**d, "num_samples": plan.batch_size}


_SELECT = ("ray_start", "ray_count", "keep", "out_start", "select_keys")
_STREAM = ("epoch", "index", "purpose_offset")


def run_rays(lib, store, plan: BatchPlan, grid_block=(None, 256), garbage: bool = True):
    t = plan.num_rays
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
    fields = _plan(plan, *_SELECT, "symmetry", "origin_scale", "distance_scale", "origin_std",
                   "direction_std", *_STREAM)  # fmt: skip
    fields.update({k: dev(store[k]) for k in fused_cuda.RAY_KEYS if k in store})
    fields.update({f"out_{k}": dev(a) for k, a in out.items()})
    if t:
        _run(lib, "fused_rays", {**fields, "num_rays": t}, t, grid_block)
    return out


def run_grids(lib, store, plan: BatchPlan, grid_block=(None, 256)) -> np.ndarray:
    b, s = plan.batch_size, plan.grid_side
    out = np.full((b, 1, s, s, s), np.nan, F32)
    fields = _plan(plan, "grid_start", "side", "symmetry", "jitter_threshold", *_STREAM)
    fields.update(grids=dev(store["grids"]), out_voxels=dev(out), grid_side=s)
    if out.size:
        _run(lib, "fused_grids", fields, out.size, grid_block)
    return out


def run_views(lib, store, plan: BatchPlan, grid_block=(None, 256)) -> np.ndarray:
    t = plan.num_views
    out = np.full((t, 3), np.nan, F32)
    fields = _plan(plan, "view_start", "view_out_start", "symmetry", "origin_scale")
    fields.update(view_positions=dev(store["view_positions"]), out_view_positions=dev(out))
    if t:
        _run(lib, "fused_views", {**fields, "num_views": t}, t, grid_block)
    return out


def run_select(lib, plan: BatchPlan, grid_block=(None, 256)):
    t = plan.num_rays
    rows, owner, j = (np.full(t, -7, I64) for _ in range(3))
    fields = _plan(plan, *_SELECT)
    fields.update(out_rows=dev(rows), out_owner=dev(owner), out_j=dev(j), num_rays=t)
    if t:
        _run(lib, "fused_select_rows", fields, t, grid_block)
    return rows, owner, j


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
    plan.ray_start[:] = scatter(gen, plan.ray_count, r)
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


@pytest.mark.parametrize(
    "n,k",
    [
        ([1, 10, 100, 7, 0, 1000, 33, 5], [1, 3, 100, 7, 0, 999, 0, 0]),  # mixed, k = n too
        ([1], [0]),  # n = 1, nothing kept
        ([1], [1]),  # n = 1, all kept
        ([12345], [12344]),  # n not a power of 2, almost all
        ([2**16, 3, 2**16 + 1], [2**16, 2, 2**16]),
        ([0, 0], [0, 0]),  # nothing at all
    ],
)
@pytest.mark.parametrize("grid_block", [(None, 256), (3, 7), (1, 1)], ids=str)
def test_select_rows_sizes(lib, n, k, grid_block):
    """Row selection at Feistel domain edges (powers of 2 and one past, k = n - 1)."""
    _, plan = make_case(np.random.default_rng(50 + len(n)), len(n), subsample="all")
    n, k = np.array(n, np.int64), np.array(k, np.int64)
    plan = replace(plan, ray_count=n, keep=k, out_start=exclusive_cumsum(k))
    plan.ray_start[:] = scatter(np.random.default_rng(1), n, int(n.sum()) + 10)
    got = run_select(lib, plan, grid_block)
    for g, w, f in zip(got, ref_rows(plan), fused_numpy.select_store_rows(plan), strict=True):
        np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(g, f)


def test_rays_noise_on_some_samples_only(lib):
    """Origin noise on sample 1 only, direction noise (and renormalization) on sample 2 only."""
    gen = np.random.default_rng(21)
    store, plan = make_case(gen, 3, subsample="all", noise=False)
    plan.ray_count[:] = plan.keep[:] = [17, 100, 257]
    plan.out_start[:] = exclusive_cumsum(plan.keep)
    plan.ray_start[:] = [0, 17, 117]
    r = 374 + 5
    for key in ("origins", "directions", "distances", "hits", "view_ids", "face_ids"):
        store[key] = np.ascontiguousarray(np.resize(store[key], (r, *store[key].shape[1:])))
    d = store["directions"].astype(np.float64)
    store["directions"] = (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)
    plan.origin_std[1] = 0.2
    plan.direction_std[2] = 0.1
    got = run_rays(lib, store, plan)
    want = ref_rays(store, plan)
    check_rays(got, want)
    on = got["ray_to_voxel"] == 2
    np.testing.assert_allclose(np.linalg.norm(got["directions"][on], axis=1), 1.0, atol=1e-6)
    off = got["ray_to_voxel"] != 1  # no origin noise: a signed permutation and a product
    np.testing.assert_array_equal(got["origins"][off], want["origins"][off])


# --- the real gpuloader.fused.cuda wrappers on the CPU -----------------------------------------


@pytest.fixture
def fake(lib, monkeypatch):
    """``gpuloader.fused.cuda`` on the CPU: numpy for CuPy (``fake.cp``), the shim for kernels
    (each launch recorded in ``fake.launches``, host-to-device copies counted in
    ``fake.stats["uploads"]``)."""
    env = types.SimpleNamespace(stats={"uploads": 0}, launches=[])
    env.cp = fake_cupy(env.stats)
    install_fake_cupy(monkeypatch, lambda name: ShimKernel(lib, name, env.launches), env.cp)
    return env


@pytest.fixture
def fused(fake):
    """The module under test, running on ``fake``."""
    return fused_cuda


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
    return {k: dev(v) for k, v in store.items()}


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


def test_wrapper_host_plan_is_one_upload(fused, fake):
    gen = np.random.default_rng(810)
    store, plan = make_case(gen, 5)
    dstore = _device_store(store)
    fused.gather_rays(dstore, plan)  # symmetry table uploaded once (cached)
    fake.stats["uploads"] = 0
    fused.gather_rays(dstore, plan)
    fused.gather_grids(dstore["grids"], plan)
    fused.gather_views(dstore["view_positions"], plan)
    assert fake.stats["uploads"] == 3  # one packed copy of the plan per call
    fake.stats["uploads"] = 0
    fused.fused_batch(dstore, plan)
    assert fake.stats["uploads"] == 1


@pytest.mark.parametrize("case", ["B1", "B37-mixed", "B37-subsample"])
def test_fused_batch_device_plan_into_out(fused, launch_shape, case, fake):
    """Device store, device plan, preallocated outputs: no upload, no read-back, the
    caller's buffers are written and returned."""
    gen = np.random.default_rng(900 + list(CASES).index(case))
    store, plan = make_case(gen, **CASES[case])
    want = fused_numpy.gather_rays(store, plan)
    t, v, s, b = plan.num_rays, plan.num_views, plan.grid_side, plan.batch_size
    out = {k: fake.cp.empty(w.shape, w.dtype) for k, w in want.items()}
    out["voxels"] = fake.cp.empty((b, 1, s, s, s), np.float32)
    out["view_positions"] = fake.cp.empty((v, 3), np.float32)
    given = dict(out)
    dstore, dplan = _device_store(store), _device_plan(plan, NoReadBack)
    fused.gather_rays(dstore, _device_plan(plan))  # warm the symmetry table cache
    fake.stats["uploads"] = 0
    n_launch = len(fake.launches)
    got = fused.fused_batch(dstore, dplan, out)
    assert fake.stats["uploads"] == 0
    assert got is out and all(got[k] is given[k] for k in given)
    assert [x[0] for x in fake.launches[n_launch:]] == (
        ["fused_rays"] * (t > 0) + ["fused_grids"] * (b * s > 0) + ["fused_views"] * (v > 0)
    )
    check_rays({k: np.asarray(got[k]) for k in want}, want)
    np.testing.assert_array_equal(got["voxels"], fused_numpy.gather_grids(store["grids"], plan))
    np.testing.assert_array_equal(
        got["view_positions"], fused_numpy.gather_views(store["view_positions"], plan)
    )


def test_wrapper_grid_out_shapes(fused, fake):
    gen = np.random.default_rng(1000)
    store, plan = make_case(gen, 4, sides=(4, 8))
    want = fused_numpy.gather_grids(store["grids"], plan)
    b, s = plan.batch_size, plan.grid_side
    flat = fake.cp.empty((b, s, s, s), np.float32)
    assert fused.gather_grids(store["grids"], plan, flat) is flat
    np.testing.assert_array_equal(flat, want[:, 0])
    big = fake.cp.empty((b, 1, 16, 16, 16), np.float32)  # a larger S than the batch's
    fused.gather_grids(store["grids"], plan, big)
    np.testing.assert_array_equal(big[:, :, :s, :s, :s], want)
    assert not big[:, :, s:].any() and not big[..., s:].any()
    with pytest.raises(ValueError, match="shape"):
        fused.gather_grids(store["grids"], plan, fake.cp.empty((b, 2, s, s, s), np.float32))
    with pytest.raises(ValueError, match="device"):
        fused.gather_grids(store["grids"], plan, np.zeros((b, 1, s, s, s), np.float32))
    with pytest.raises(ValueError, match="float32"):
        fused.gather_grids(store["grids"], plan, fake.cp.empty((b, 1, s, s, s), np.int32))


def test_wrapper_partial_out_and_missing_fields(fused, fake):
    gen = np.random.default_rng(1100)
    store, plan = make_case(gen, 6)
    want = fused_numpy.gather_rays(store, plan)
    t = plan.num_rays
    out = {"origins": fake.cp.empty((t, 3), np.float32)}
    got = fused.gather_rays(store, plan, out)
    assert got is out and set(got) == set(want)
    check_rays(_as_np(got), want)
    partial = {k: v for k, v in store.items() if k not in ("view_ids", "face_ids")}
    got = fused.gather_rays(partial, plan)
    assert set(got) == set(want) - {"view_ids", "face_ids"}
    check_rays(_as_np(got), {k: want[k] for k in got})
    with pytest.raises(ValueError, match="fit the plan"):
        fused.gather_rays(store, plan, {"distances": fake.cp.empty(t + 1, np.float32)})
    mismatched = {
        "origins": fake.cp.empty((t, 3), np.float32),
        "distances": fake.cp.empty(t + 1, np.float32),
    }
    with pytest.raises(ValueError, match="shape"):
        fused.gather_rays(store, plan, mismatched)
    with pytest.raises(ValueError, match="int32"):
        fused.gather_rays({**store, "view_ids": store["view_ids"].astype(np.int64)}, plan)


def test_wrapper_edges(fused, fake):
    gen = np.random.default_rng(1200)
    store, plan = make_case(gen, 3)
    plan.keep[:] = 0
    plan.out_start[:] = 0
    plan.view_count[:] = 0
    plan.view_out_start[:] = 0
    n = len(fake.launches)
    rays = fused.gather_rays(store, plan)
    assert all(v.shape[0] == 0 for v in rays.values())
    assert fused.gather_views(store["view_positions"], plan).shape == (0, 3)
    assert [r.shape for r in fused.select_store_rows(plan)] == [(0,)] * 3
    assert len(fake.launches) == n  # nothing to launch
    bad = replace(plan, symmetry=np.array([0, 48, 1], np.int32))
    with pytest.raises(ValueError, match="symmetry"):
        fused.gather_views(store["view_positions"], bad)


def test_wrapper_launch_config(fused, fake):
    gen = np.random.default_rng(1300)
    store, plan = make_case(gen, 2, sides=(16,))
    fused.gather_grids(store["grids"], plan)
    assert fake.launches[-1] == ("fused_grids", (2 * 16**3 // 256,), (256,))
