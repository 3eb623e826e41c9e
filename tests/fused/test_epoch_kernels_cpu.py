"""The epoch-indexed kernels of ``kernels/fused.cu`` and ``fused_cupy.EpochGraphs`` on the CPU.

``fused_rays_epoch`` / ``fused_grids_epoch`` / ``fused_views_epoch`` take a whole
:class:`~gpuloader.plan.epoch.EpochPlan` (built by ``build_epoch_plan`` over a random
store and layout, with the full transform) and a device cursor; ``fused_next_batch`` advances
the cursor. Built by g++ through ``tests/cuda_shim/shim.h`` (as in ``test_fused_kernels_cpu``)
and checked, for consecutive batches, against :mod:`gpuloader.fused.cpu` on
``plan.batch(i)``: the batch's prefix of every output equal (integers bit for bit, floats
within 1e-6), the rest of the output untouched.

``EpochGraphs`` runs with CuPy replaced by a numpy stand-in whose streams record the kernel
launches made during a capture and whose graphs replay them (the shim kernels), so the
arena's layout, the arguments captured and the cursor's walk are tested without a GPU.
"""

from __future__ import annotations

import ctypes
import types

import numpy as np
import pytest
import test_fused_kernels_cpu as fused_cpu  # FIXME(tests): a test module importing another

from gpuloader.augment import transforms as T
from gpuloader.augment.numpy_backend import SYMMETRY_TABLE
from gpuloader.fused import cpu as fused_numpy
from gpuloader.fused import cuda as fused_cupy
from gpuloader.plan.epoch import EpochPlan, build_epoch_plan
from gpuloader.stores.layout import StoreLayout
from support.shim import build_shim_library

INT, LLONG, UINT, SIGNATURES = fused_cpu.INT, fused_cpu.LLONG, fused_cpu.UINT, fused_cpu.SIGNATURES
DevArray, Scalar, _fake_cupy = fused_cpu.DevArray, fused_cpu.Scalar, fused_cpu._fake_cupy
_p, _scatter, check_rays, make_store = (
    fused_cpu._p,
    fused_cpu._scatter,
    fused_cpu.check_rays,
    fused_cpu.make_store,
)

F32, I32, U32, U8, I64 = np.float32, np.int32, np.uint32, np.uint8, np.int64
_BATCH = [_p(I64), _p(I64), _p(I64, out=True)]  # batch_starts, batch_total, cursor

#: every kernel of fused.cu: the per-batch ones and the epoch-indexed ones
EPOCH_SIGNATURES = {
    **SIGNATURES,
    "fused_rays_epoch": [*SIGNATURES["fused_rays"][:-2], *_BATCH],
    "fused_grids_epoch": [*SIGNATURES["fused_grids"][:-2], *_BATCH],
    "fused_views_epoch": [*SIGNATURES["fused_views"][:-2], *_BATCH],
    "fused_next_batch": [_p(I64, out=True)],
}
assert (INT, LLONG) == tuple(SIGNATURES["fused_rays"][-2:])  # (num_samples, total) replaced
assert set(fused_cupy.EPOCH_KERNEL_NAMES) <= set(EPOCH_SIGNATURES)
assert set(fused_cupy.KERNEL_NAMES) == set(EPOCH_SIGNATURES)
UINT  # noqa: B018 - the scalar types the signatures use


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """kernels/fused.cu built as a shared library by g++ through the shim."""
    return build_shim_library(
        tmp_path_factory,
        "fused_launcher.cpp",
        "libfused_epoch.so",
        EPOCH_SIGNATURES,
        lambda a: a.ctype if isinstance(a, Scalar) else ctypes.c_void_p,
    )


class Kernel:
    """A shim kernel called like a ``cupy.RawKernel``; every argument's type is checked."""

    def __init__(self, dll, name: str):
        self.fn = getattr(dll, f"launch_{name}")
        self.sig = EPOCH_SIGNATURES[name]
        self.name = name

    def __call__(self, grid, block, args):
        assert len(args) == len(self.sig), f"{self.name}: {len(args)} args"
        pairs = enumerate(zip(args, self.sig, strict=True))
        conv = [s.convert(a, f"{self.name} arg {i}") for i, (a, s) in pairs]
        self.fn(int(grid[0]), int(block[0]), *conv)


# --- a real epoch plan over a random store ---------------------------------------------------


def full_segment() -> list:
    tf = T.Compose(
        [
            T.RandomRotation90(p=0.7),
            T.RandomFlip(axes=[0, 1, 2], p=0.5),
            T.NormalizeRayOrigins(voxel_size=1.0, scale_distances=True),
            T.RandomRaySubsample(num_rays=40),
            T.AddNoise(origin_std=0.01, direction_std=0.01),
            T.VoxelOccupancyJitter(flip_prob=0.05),
        ]
    )
    return tf.segments[0]


def make_epoch(
    gen: np.random.Generator, k: int = 14, epoch: int = 3, sizes=(3, 5, 1, 4, 2, 5, 3)
) -> tuple[dict, StoreLayout, EpochPlan]:
    """A store of ``k`` samples (sides 4/8/16, some without rays or views), its layout, and
    the epoch plan of batches of ``sizes`` samples drawn from it (requests of every kind:
    all rays, a few, more than the sample has); epoch, purpose offsets, noise and jitter
    then redrawn per slot."""
    counts = gen.choice([0, 1, 3, 17, 60, 257], k).astype(np.int64)
    views = gen.integers(0, 5, k).astype(np.int64)
    side = gen.choice(np.array([4, 8, 16]), k).astype(np.int64)
    store = make_store(gen, counts, views, side)
    layout = StoreLayout(
        ray_start=_scatter(gen, counts, store["origins"].shape[0]),
        ray_count=counts,
        view_start=_scatter(gen, views, store["view_positions"].shape[0]),
        view_count=views,
        grid_start=_scatter(gen, side**3, store["grids"].shape[0]),
        side=side,
    )
    batches = []
    for size in sizes:
        idx = gen.choice(k, size, replace=False)
        req = gen.choice([-1, 5, 30, 1000], size)
        batches.append(
            [(int(i), epoch, None if r < 0 else int(r)) for i, r in zip(idx, req, strict=True)]
        )
    levels = gen.integers(0, 3, k)
    plan = build_epoch_plan(batches, layout, levels, full_segment(), 12345, epoch, 50)
    # per-slot values where the transform's are uniform, so a wrong slot offset shows
    n = int(plan.batch_starts[-1])
    a = plan.arrays
    a["epoch"] = gen.integers(0, 2**32, n).astype(np.uint32)
    a["purpose_offset"] = gen.choice([0, 64, 2**32 - 2], n).astype(np.uint32)
    a["jitter_threshold"] = gen.choice([0, 1 << 20, 1 << 23], n).astype(np.uint32)
    a["origin_std"] = gen.choice([0.0, 0.01, 0.3], n).astype(np.float32)
    a["direction_std"] = gen.choice([0.0, 0.05, 0.5], n).astype(np.float32)
    return store, layout, plan


def kernel_arrays(plan: EpochPlan) -> dict[str, np.ndarray]:
    """The epoch's per-slot arrays in the kernels' dtypes, and the per-batch ones."""
    out = {
        f: np.ascontiguousarray(plan.arrays[f], dtype=dt)
        for f, dt in fused_cupy._PLAN_DTYPES.items()
    }
    totals = fused_cupy.epoch_batch_totals(plan)
    out["batch_starts"] = np.ascontiguousarray(plan.batch_starts, dtype=I64)
    out.update(batch_rays=totals["rays"], batch_views=totals["views"], batch_side=totals["side"])
    return out


def new_outputs(caps: tuple[int, int, int], fill: int = 0xAB, cls=np.ndarray) -> dict:
    """One slot's outputs of capacities (rays, voxels, views), every byte ``fill``."""
    t, n, v = caps
    out = {
        "origins": np.empty((t, 3), F32),
        "directions": np.empty((t, 3), F32),
        "distances": np.empty(t, F32),
        "hits": np.empty(t, F32),
        "view_ids": np.empty(t, I64),
        "face_ids": np.empty(t, I64),
        "ray_to_voxel": np.empty(t, I64),
        "voxels": np.empty(n, F32),
        "view_positions": np.empty((v, 3), F32),
    }
    for a in out.values():
        a.view(np.uint8)[...] = fill
    return {k: a.view(cls) for k, a in out.items()}


def epoch_caps(plan: EpochPlan, extra: int = 0) -> tuple[int, int, int]:
    t = fused_cupy.epoch_batch_totals(plan)
    return tuple(int(t[k].max()) + extra for k in ("rays", "voxels", "views"))


def check_batch(out: dict, store: dict, plan: EpochPlan, i: int, fill: int | None = 0xAB):
    """Slot ``out`` holds batch ``i`` (fused_numpy on ``plan.batch(i)``) in its prefixes;
    with ``fill``, every byte past them is still ``fill``."""
    bp = plan.batch(i)
    want = fused_numpy.gather_rays(store, bp)
    t, v, b, s = bp.num_rays, bp.num_views, bp.batch_size, bp.grid_side
    check_rays({k: np.asarray(out[k][:t]) for k in want}, want)
    vox = np.asarray(out["voxels"][: b * s**3]).reshape(b, 1, s, s, s)
    np.testing.assert_array_equal(vox, fused_numpy.gather_grids(store["grids"], bp))
    np.testing.assert_array_equal(
        np.asarray(out["view_positions"][:v]),
        fused_numpy.gather_views(store["view_positions"], bp),
    )
    if fill is not None:
        rest = [out[k][t:] for k in want] + [out["voxels"][b * s**3 :], out["view_positions"][v:]]
        for a in rest:
            assert (np.asarray(a).view(np.uint8) == fill).all()


# --- the kernels, called directly ------------------------------------------------------------


def run_epoch_batch(lib, store, ka: dict, key, cursor, out: dict, grid_block=(None, 256)):
    """The three epoch kernels and the cursor's increment, as one slot's graph does them."""
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    caps = (out["origins"].shape[0], out["voxels"].size, out["view_positions"].shape[0])
    block = grid_block[1]

    def run(name, n, args):
        grid = grid_block[0] or max(1, -(-n // block))
        Kernel(lib, name)((grid,), (block,), args)

    table = np.ascontiguousarray(SYMMETRY_TABLE, dtype=I32)
    batch = (ka["batch_starts"],)
    run("fused_rays_epoch", caps[0], [
        store["origins"], store["directions"], store["distances"], store["hits"],
        store["view_ids"], store["face_ids"], ka["ray_start"], ka["ray_count"], ka["keep"],
        ka["out_start"], ka["select_keys"], table, ka["symmetry"], ka["origin_scale"],
        ka["distance_scale"], ka["origin_std"], ka["direction_std"], ka["epoch"], ka["index"],
        ka["purpose_offset"], k0, k1, *(out[k] for k in fused_cupy.RAY_KEYS), *batch,
        ka["batch_rays"], cursor,
    ])  # fmt: skip
    run("fused_grids_epoch", caps[1], [
        store["grids"], ka["grid_start"], ka["side"], table, ka["symmetry"],
        ka["jitter_threshold"], ka["epoch"], ka["index"], ka["purpose_offset"], k0, k1,
        out["voxels"], *batch, ka["batch_side"], cursor,
    ])  # fmt: skip
    run("fused_views_epoch", caps[2], [
        store["view_positions"], ka["view_start"], ka["view_out_start"], table, ka["symmetry"],
        ka["origin_scale"], out["view_positions"], *batch, ka["batch_views"], cursor,
    ])  # fmt: skip
    run("fused_next_batch", 1, [cursor])


def _seed_key(seed: int) -> tuple[int, int]:
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


@pytest.mark.parametrize("grid_block", [(None, 256), (3, 7), (1, 1)], ids=str)
def test_epoch_kernels_walk_the_epoch(lib, grid_block):
    """One cursor, consecutive batches into slots of the epoch's largest batch: each batch
    equals fused_numpy on plan.batch(i), the rest of the slot untouched, the cursor + 1."""
    gen = np.random.default_rng(1)
    store, _, plan = make_epoch(gen)
    assert len(plan) == 7 and plan.arrays["keep"].sum() > 0
    ka = kernel_arrays(plan)
    cursor = np.array([0, len(plan)], I64)
    caps = epoch_caps(plan, extra=3)
    for i in range(len(plan)):
        out = new_outputs(caps)
        run_epoch_batch(lib, store, ka, _seed_key(plan.seed), cursor, out, grid_block)
        assert cursor.tolist() == [i + 1, len(plan)]
        check_batch(out, store, plan, i)


def test_epoch_kernels_equal_the_per_batch_kernels(lib):
    """Reused slots (the previous batch's data past the totals) and a resumed cursor: the
    prefixes equal fused_numpy, whatever the slot held."""
    gen = np.random.default_rng(2)
    store, _, plan = make_epoch(gen, sizes=(5, 5, 2, 5, 1, 4))
    ka = kernel_arrays(plan)
    caps = epoch_caps(plan)
    slots = [new_outputs(caps) for _ in range(2)]
    cursor = np.array([2, len(plan)], I64)  # a resumed epoch: batch 2 first
    for i in range(2, len(plan)):
        run_epoch_batch(lib, store, ka, _seed_key(plan.seed), cursor, slots[i % 2])
        check_batch(slots[i % 2], store, plan, i, fill=None)
    assert cursor[0] == len(plan)


def test_epoch_kernels_outside_the_epoch_do_nothing(lib):
    gen = np.random.default_rng(3)
    store, _, plan = make_epoch(gen, sizes=(2, 3))
    ka = kernel_arrays(plan)
    caps = epoch_caps(plan)
    for c in (len(plan), len(plan) + 4, -1):
        out = new_outputs(caps)
        cursor = np.array([c, len(plan)], I64)
        run_epoch_batch(lib, store, ka, _seed_key(plan.seed), cursor, out)
        assert cursor[0] == c + 1  # the increment runs regardless
        for a in out.values():
            assert (a.view(np.uint8) == 0xAB).all()


def test_next_batch_increments_once(lib):
    cursor = np.array([41, 99], I64)
    Kernel(lib, "fused_next_batch")((4,), (32,), [cursor])  # many threads, one increment
    assert cursor.tolist() == [42, 99]


def test_epoch_batch_totals():
    gen = np.random.default_rng(4)
    _, _, plan = make_epoch(gen)
    t = fused_cupy.epoch_batch_totals(plan)
    for i in range(len(plan)):
        bp = plan.batch(i)
        assert t["rays"][i] == bp.num_rays and t["views"][i] == bp.num_views
        assert t["side"][i] == bp.grid_side and t["size"][i] == bp.batch_size
        assert t["voxels"][i] == bp.batch_size * bp.grid_side**3
    empty = EpochPlan(
        plan.seed,
        plan.epoch,
        np.array([0, 2, 2, 3, 3], I64),
        {k: v[:3] for k, v in plan.arrays.items()},
        plan.levels[:3],
    )
    t = fused_cupy.epoch_batch_totals(empty)
    assert t["size"].tolist() == [2, 0, 1, 0] and t["side"][1] == t["side"][3] == 0
    assert t["rays"][1] == 0 and t["side"][2] == plan.arrays["side"][2]


# --- EpochGraphs with a numpy stand-in for CuPy ----------------------------------------------


class SetArray(DevArray):
    """A "device" array with ``ndarray.set`` (a host-to-device copy of the whole array)."""

    def set(self, a, stream=None):
        assert a.shape == self.shape and a.dtype == self.dtype
        self[...] = a


class Recorder:
    """Kernel launches go to ``capturing`` (a list) while a capture is open, else run."""

    def __init__(self, lib):
        self.lib = lib
        self.capturing: list | None = None
        self.captures = 0

    def kernel(self, name: str):
        k = Kernel(self.lib, name)

        def call(grid, block, args):
            if self.capturing is None:
                pytest.fail(f"{name} launched outside a capture")
            self.capturing.append((k, tuple(grid), tuple(block), tuple(args)))

        return call


class FakeGraph:
    def __init__(self, nodes: list):
        self.nodes = nodes
        self.launches = 0

    def launch(self, stream=None):
        self.launches += 1
        for k, grid, block, args in self.nodes:
            k(grid, block, args)


class FakeStream:
    def __init__(self, rec: Recorder):
        self.rec = rec

    def begin_capture(self):
        assert self.rec.capturing is None
        self.rec.capturing = []

    def end_capture(self):
        nodes, self.rec.capturing = self.rec.capturing, None
        self.rec.captures += 1
        return FakeGraph(nodes)

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def graphs_env(lib, monkeypatch):
    """``fused_cupy`` on numpy with recording streams; returns the recorder."""
    rec = Recorder(lib)
    cp = _fake_cupy({"uploads": 0})
    base_empty = cp.empty
    cp.empty = lambda shape, dtype=np.float64: base_empty(shape, dtype).view(SetArray)
    cp.cuda = types.SimpleNamespace(
        Device=lambda: types.SimpleNamespace(id=0),
        Stream=lambda non_blocking=False: FakeStream(rec),
        get_current_stream=lambda: FakeStream(rec),
    )
    monkeypatch.setattr(fused_cupy, "_cupy", lambda: cp)
    monkeypatch.setattr(fused_cupy, "_kernel", rec.kernel)
    monkeypatch.setattr(fused_cupy, "_table_cache", {})
    monkeypatch.setattr(fused_cupy, "_module_cache", {})
    return rec


def _dev_store(store: dict) -> dict:
    return {k: np.asarray(v).view(DevArray) for k, v in store.items()}


@pytest.mark.parametrize("block,max_blocks", [(256, 65536), (7, 3)])
def test_epoch_graphs_replay_the_epoch(graphs_env, monkeypatch, block, max_blocks):
    """R = 3 slots, a resumed start, two epochs: each launch writes batch i into slot i % R
    equal to fused_numpy; graphs are captured once (R of them) while the sizes fit."""
    monkeypatch.setattr(fused_cupy, "BLOCK", block)
    monkeypatch.setattr(fused_cupy, "MAX_BLOCKS", max_blocks)
    gen = np.random.default_rng(5)
    store, layout, plan = make_epoch(gen)
    caps = epoch_caps(plan, extra=2)
    slots = [new_outputs(caps, cls=DevArray) for _ in range(3)]
    g = fused_cupy.EpochGraphs(_dev_store(store), slots)
    assert g.num_slots == 3 and g.capacity == caps
    totals = g.load(plan, start=1)
    assert graphs_env.captures == 3
    np.testing.assert_array_equal(totals["rays"], fused_cupy.epoch_batch_totals(plan)["rays"])
    for i in range(1, len(plan)):
        s = g.launch(i)
        assert s == i % 3
        check_batch(slots[s], store, plan, i, fill=0xAB if i <= 3 else None)
    with pytest.raises(ValueError, match="out of order"):
        g.launch(len(plan))
    # the next epoch (a new plan, same sizes or smaller): same graphs, uploaded arena
    _, _, plan2 = make_epoch(np.random.default_rng(5), epoch=4, sizes=(3, 5, 1, 2))
    assert int(plan2.batch_starts[-1]) <= int(plan.batch_starts[-1])
    assert all(n <= c for n, c in zip(epoch_caps(plan2), caps, strict=True))
    g.load(plan2)  # same store: make_epoch draws it before the batches
    assert graphs_env.captures == 3
    for i in range(len(plan2)):
        check_batch(slots[g.launch(i)], store, plan2, i, fill=None)


def test_epoch_graphs_grow_and_refuse(graphs_env):
    gen = np.random.default_rng(6)
    store, layout, plan = make_epoch(gen, sizes=(2, 3))
    _, _, longer = make_epoch(np.random.default_rng(6), sizes=(2, 3, 2, 3, 3, 1))
    caps = tuple(max(a, b) for a, b in zip(epoch_caps(plan), epoch_caps(longer), strict=True))
    slots = [new_outputs(caps, cls=DevArray) for _ in range(2)]
    g = fused_cupy.EpochGraphs(_dev_store(store), slots)
    with pytest.raises(RuntimeError, match="before load"):
        g.launch(0)
    g.load(plan)
    assert graphs_env.captures == 2
    g.launch(0)
    with pytest.raises(ValueError, match="out of order"):
        g.launch(0)
    g.load(longer)  # more slots and batches: a larger arena, captured again
    assert graphs_env.captures == 4
    for i in range(len(longer)):
        check_batch(slots[g.launch(i)], store, longer, i, fill=None)
    g.load(plan)  # smaller again: no capture
    assert graphs_env.captures == 4
    small = [new_outputs((1, 1, 1), cls=DevArray)]
    with pytest.raises(ValueError, match="static sizes"):
        fused_cupy.EpochGraphs(_dev_store(store), small).load(plan)
    with pytest.raises(ValueError, match="start"):
        g.load(plan, start=len(plan) + 1)


def test_epoch_graphs_store_without_ids(graphs_env):
    """A store without hits/view_ids/face_ids: those outputs are not written (null)."""
    gen = np.random.default_rng(7)
    store, _, plan = make_epoch(gen, sizes=(4, 2))
    partial = {k: v for k, v in store.items() if k not in ("hits", "view_ids", "face_ids")}
    slots = [new_outputs(epoch_caps(plan), cls=DevArray)]
    g = fused_cupy.EpochGraphs(_dev_store(partial), slots)
    g.load(plan)
    for i in range(len(plan)):
        g.launch(i)
        bp = plan.batch(i)
        want = fused_numpy.gather_rays(store, bp)
        t = bp.num_rays
        for k in ("origins", "directions", "distances", "ray_to_voxel"):
            np.testing.assert_allclose(slots[0][k][:t], want[k], rtol=1e-6, atol=1e-6)
        for k in ("hits", "view_ids", "face_ids"):
            assert (slots[0][k].view(np.uint8) == 0xAB).all()
