"""The epoch-indexed kernels of ``kernels/fused.cu`` and ``fused.graphs.EpochGraphs`` on the CPU.

``fused_rays_epoch`` / ``fused_grids_epoch`` / ``fused_views_epoch`` take a whole
:class:`~gpuloader.plan.epoch.EpochPlan` (built by ``build_epoch_plan`` over a random
store and layout, with the full transform) and a device cursor; ``fused_next_batch`` advances
the cursor. Built by g++ through ``tests/support/cuda_shim/shim.h`` (``support.shim``, as in
``test_fused_kernels_cpu``) and checked, for consecutive batches, against
:mod:`gpuloader.fused.cpu` on ``plan.batch(i)``: the batch's prefix of every output equal
(integers bit for bit, floats within 1e-6), the rest of the output untouched.

``EpochGraphs`` runs with CuPy replaced by a numpy stand-in whose streams record the kernel
launches made during a capture and whose graphs replay them (the shim kernels), so the
arena's layout, the argument struct captured and the cursor's walk are tested without a GPU.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from gpuloader.augment.numpy_backend import SYMMETRY_TABLE
from gpuloader.fused import cpu as fused_numpy
from gpuloader.fused import cuda as fused_cuda
from gpuloader.fused import graphs as fused_graphs
from gpuloader.plan.epoch import EpochPlan
from support.fused_kernels import (
    I32,
    I64,
    check_batch,
    epoch_caps,
    kernel_arrays,
    make_epoch,
    new_outputs,
)
from support.shim import (
    KERNEL_READS,
    DevArray,
    ShimKernel,
    dev,
    fake_cupy,
    fused_library,
    install_fake_cupy,
)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """kernels/fused.cu built as a shared library by g++ through the shim."""
    return fused_library(tmp_path_factory)


def test_every_kernel_has_a_checked_launcher(lib):
    assert set(fused_cuda.KERNEL_NAMES) == set(KERNEL_READS)
    assert set(fused_cuda.EPOCH_KERNEL_NAMES) < set(fused_cuda.KERNEL_NAMES)
    for name in fused_cuda.KERNEL_NAMES:
        assert getattr(lib, f"launch_{name}").argtypes is not None


# --- the kernels, called directly ------------------------------------------------------------


def run_epoch_batch(lib, store, ka: dict, key, cursor, out: dict, grid_block=(None, 256)):
    """The three epoch kernels and the cursor's increment, as one slot's graph does them: one
    argument struct (store, the epoch's arrays, the slot's outputs, the key) for all four."""
    caps = (out["origins"].shape[0], out["voxels"].size, out["view_positions"].shape[0])
    block = grid_block[1]
    fields = {k: dev(v) for k, v in {**store, **ka}.items()}
    fields.update({f"out_{k}": dev(v) for k, v in out.items()})
    table = dev(np.ascontiguousarray(SYMMETRY_TABLE, dtype=I32))
    c = dev(cursor)
    args = fused_cuda.fused_args(
        **fields, sym_table=table, cursor=c, key0=np.uint32(key[0]), key1=np.uint32(key[1])
    )

    def run(name, n):
        grid = grid_block[0] or max(1, -(-n // block))
        ShimKernel(lib, name)((grid,), (block,), (args,))

    run("fused_rays_epoch", caps[0])
    run("fused_grids_epoch", caps[1])
    run("fused_views_epoch", caps[2])
    run("fused_next_batch", 1)


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
    c = dev(cursor)
    args = (fused_cuda.fused_args(cursor=c),)
    ShimKernel(lib, "fused_next_batch")((4,), (32,), args)  # many threads, one increment
    assert cursor.tolist() == [42, 99]


def test_epoch_batch_totals():
    gen = np.random.default_rng(4)
    _, _, plan = make_epoch(gen)
    t = fused_graphs.epoch_batch_totals(plan)
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
    t = fused_graphs.epoch_batch_totals(empty)
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
        k = ShimKernel(self.lib, name)

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
    """``gpuloader.fused.cuda`` (and so ``graphs``) on numpy with recording streams; returns
    the recorder."""
    rec = Recorder(lib)
    cp = fake_cupy({"uploads": 0})
    base_empty = cp.empty
    cp.empty = lambda shape, dtype=np.float64: base_empty(shape, dtype).view(SetArray)
    cp.cuda = types.SimpleNamespace(
        Device=lambda: types.SimpleNamespace(id=0),
        Stream=lambda non_blocking=False: FakeStream(rec),
        get_current_stream=lambda: FakeStream(rec),
    )
    install_fake_cupy(monkeypatch, rec.kernel, cp)
    return rec


def _dev_store(store: dict) -> dict:
    return {k: dev(v) for k, v in store.items()}


@pytest.mark.parametrize("block,max_blocks", [(256, 65536), (7, 3)])
def test_epoch_graphs_replay_the_epoch(graphs_env, monkeypatch, block, max_blocks):
    """R = 3 slots, a resumed start, two epochs: each launch writes batch i into slot i % R
    equal to fused_numpy; graphs are captured once (R of them) while the sizes fit."""
    monkeypatch.setattr(fused_cuda, "BLOCK", block)
    monkeypatch.setattr(fused_cuda, "MAX_BLOCKS", max_blocks)
    gen = np.random.default_rng(5)
    store, layout, plan = make_epoch(gen)
    caps = epoch_caps(plan, extra=2)
    slots = [new_outputs(caps, cls=DevArray) for _ in range(3)]
    g = fused_graphs.EpochGraphs(_dev_store(store), slots)
    assert g.num_slots == 3 and g.capacity == caps
    totals = g.load(plan, start=1)
    assert graphs_env.captures == 3
    np.testing.assert_array_equal(totals["rays"], fused_graphs.epoch_batch_totals(plan)["rays"])
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
    g = fused_graphs.EpochGraphs(_dev_store(store), slots)
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
        fused_graphs.EpochGraphs(_dev_store(store), small).load(plan)
    with pytest.raises(ValueError, match="start"):
        g.load(plan, start=len(plan) + 1)


def test_epoch_graphs_store_without_ids(graphs_env):
    """A store without hits/view_ids/face_ids: those outputs are not written (null)."""
    gen = np.random.default_rng(7)
    store, _, plan = make_epoch(gen, sizes=(4, 2))
    partial = {k: v for k, v in store.items() if k not in ("hits", "view_ids", "face_ids")}
    slots = [new_outputs(epoch_caps(plan), cls=DevArray)]
    g = fused_graphs.EpochGraphs(_dev_store(partial), slots)
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
