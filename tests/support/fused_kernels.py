"""Random stores and plans for the fused pass's tests, their references and checks.

Shared by the CPU tests of ``kernels/fused.cu`` (``tests/fused/test_fused_kernels_cpu.py``,
``tests/fused/test_epoch_kernels_cpu.py``) and the GPU tests (``tests/gpu/``):

* :func:`make_store` / :func:`make_case` / :data:`CASES`: a store of random samples placed at
  random rows and a :class:`~gpuloader.plan.batch.BatchPlan` over it;
* :func:`ref_rows` / :func:`ref_rays` / :func:`ref_grids` / :func:`ref_views`: the per-sample
  composition of the ground-truth functions (``rng.feistel_permute``,
  ``numpy_backend.transform_rays/transform_points/transform_voxels``);
* :func:`make_epoch` and friends: a real :class:`~gpuloader.plan.epoch.EpochPlan` over a
  random store (the full transform), slot outputs, and :func:`check_batch` against
  :mod:`gpuloader.fused.cpu`.

Integers must match bit for bit, floats within :data:`FLOAT_TOL`.
"""

from __future__ import annotations

import numpy as np

from gpuloader.augment import numpy_backend as augment_numpy
from gpuloader.augment import rng
from gpuloader.augment import transforms as T
from gpuloader.augment.numpy_backend import BatchParams
from gpuloader.fused import cpu as fused_numpy
from gpuloader.fused import cuda as fused_cuda
from gpuloader.fused.graphs import epoch_batch_totals
from gpuloader.plan.batch import BatchPlan
from gpuloader.plan.epoch import EpochPlan, build_epoch_plan
from gpuloader.stores.layout import StoreLayout

FLOAT_TOL = {"rtol": 1e-6, "atol": 1e-6}
F32, I32, U32, U8, I64 = np.float32, np.int32, np.uint32, np.uint8, np.int64


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


def scatter(gen: np.random.Generator, sizes, total: int) -> np.ndarray:
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


def exclusive_cumsum(x) -> np.ndarray:
    """(B,) int64 exclusive prefix sum (the plan's out_start / view_out_start)."""
    return np.concatenate([[0], np.cumsum(x)[:-1]]).astype(np.int64)


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
    ray_start = scatter(gen, counts, store["origins"].shape[0])
    view_start = scatter(gen, views, store["view_positions"].shape[0])
    grid_start = scatter(gen, side.astype(np.int64) ** 3, store["grids"].shape[0])
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
        out_start=exclusive_cumsum(keep),
        select_keys=keys.reshape(b, 4),
        view_start=view_start,
        view_count=views.astype(np.int64),
        view_out_start=exclusive_cumsum(views),
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
    """Same keys, dtypes and shapes; integers equal, floats within FLOAT_TOL (or equal)."""
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype, (k, g.dtype, w.dtype)
        assert g.shape == w.shape, (k, g.shape, w.shape)
        if w.dtype == np.float32 and not exact_floats:
            np.testing.assert_allclose(g, w, **FLOAT_TOL, err_msg=k)
        else:
            np.testing.assert_array_equal(g, w, err_msg=k)


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
        ray_start=scatter(gen, counts, store["origins"].shape[0]),
        ray_count=counts,
        view_start=scatter(gen, views, store["view_positions"].shape[0]),
        view_count=views,
        grid_start=scatter(gen, side**3, store["grids"].shape[0]),
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
        for f, dt in fused_cuda.PLAN_DTYPES.items()
    }
    totals = epoch_batch_totals(plan)
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
    """The epoch's largest batch (rays, voxels, views), plus ``extra`` each."""
    t = epoch_batch_totals(plan)
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
