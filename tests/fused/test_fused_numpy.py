"""The fused numpy batch pass equals the per-sample functions it replaces.

Reference: for each sample, ``rng.select_rows`` (the dataset's row choice), then
``numpy_backend.transform_rays`` / ``transform_points`` / ``transform_voxels`` with
``ray_row = j`` (what the CPU API and the per-sample GPU loader do).
"""

from __future__ import annotations

import numpy as np
import pytest

from gpuloader.augment import numpy_backend as NB
from gpuloader.augment import rng
from gpuloader.fused import cpu as F


def make_store(sides, counts, views, seed=0):
    g = np.random.default_rng(seed)
    total = int(sum(counts))
    d = g.normal(size=(total, 3)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    store = {
        "origins": g.normal(size=(total, 3)).astype(np.float32) * 10,
        "directions": d.astype(np.float32),
        "distances": g.random(total).astype(np.float32) * 5,
        "hits": g.integers(0, 2, total).astype(np.uint8),
        "view_ids": g.integers(0, 50, total).astype(np.int32),
        "face_ids": g.integers(0, 6, total).astype(np.int32),
        "view_positions": g.normal(size=(int(sum(views)), 3)).astype(np.float32),
        "grids": np.concatenate([g.integers(0, 2, s**3).astype(np.uint8) for s in sides]),
    }
    return store


def make_plan(store_sides, store_counts, store_views, picks, keep, params, seed=7, epoch=3):
    ray_start = np.concatenate([[0], np.cumsum(store_counts)[:-1]]).astype(np.int64)
    view_start = np.concatenate([[0], np.cumsum(store_views)[:-1]]).astype(np.int64)
    grid_start = np.concatenate([[0], np.cumsum(np.array(store_sides) ** 3)[:-1]]).astype(np.int64)
    picks = np.asarray(picks)
    b = picks.size
    counts = np.asarray(store_counts, np.int64)[picks]
    keep = np.minimum(np.asarray(keep, np.int64), counts)
    vcount = np.asarray(store_views, np.int64)[picks]
    index = (picks * 13 + 5).astype(np.uint32)
    keys = np.stack(
        [rng.feistel_keys(seed, epoch, int(i), rng.Purpose.SUBSAMPLE) for i in index]
    ).astype(np.uint32)
    return F.BatchPlan(
        seed=seed,
        index=index,
        epoch=np.full(b, epoch, np.uint32),
        ray_start=ray_start[picks],
        ray_count=counts,
        keep=keep,
        out_start=np.concatenate([[0], np.cumsum(keep)[:-1]]).astype(np.int64),
        select_keys=keys,
        view_start=view_start[picks],
        view_count=vcount,
        view_out_start=np.concatenate([[0], np.cumsum(vcount)[:-1]]).astype(np.int64),
        grid_start=grid_start[picks],
        side=np.asarray(store_sides, np.int64)[picks],
        symmetry=np.asarray(params["symmetry"], np.int32),
        origin_scale=np.asarray(params["origin_scale"], np.float32),
        distance_scale=np.asarray(params["distance_scale"], np.float32),
        origin_std=np.asarray(params["origin_std"], np.float32),
        direction_std=np.asarray(params["direction_std"], np.float32),
        jitter_threshold=np.asarray(params["jitter_threshold"], np.uint32),
        purpose_offset=np.zeros(b, np.uint32),
    )


def reference(store, plan):
    """Per-sample: select_rows, then the numpy back end's functions."""
    params = NB.BatchParams.make(
        seed=plan.seed,
        epoch=plan.epoch,
        index=plan.index,
        symmetry=plan.symmetry,
        origin_scale=plan.origin_scale,
        distance_scale=plan.distance_scale,
        origin_std=plan.origin_std,
        direction_std=plan.direction_std,
        jitter_threshold=plan.jitter_threshold,
    )
    rays = {k: [] for k in ("origins", "directions", "distances", "hits", "ray_to_voxel")}
    rows_all = []
    for b in range(plan.batch_size):
        n, k = int(plan.ray_count[b]), int(plan.keep[b])
        rows = rng.select_rows(n, k, plan.seed, int(plan.epoch[b]), int(plan.index[b]))
        g = plan.ray_start[b] + rows
        rows_all.append(g)
        one = NB.BatchParams.make(
            seed=plan.seed,
            epoch=params.epoch[b : b + 1],
            index=params.index[b : b + 1],
            symmetry=params.symmetry[b : b + 1],
            origin_scale=params.origin_scale[b : b + 1],
            distance_scale=params.distance_scale[b : b + 1],
            origin_std=params.origin_std[b : b + 1],
            direction_std=params.direction_std[b : b + 1],
        )
        o, d, dist = NB.transform_rays(
            store["origins"][g],
            store["directions"][g],
            store["distances"][g],
            np.zeros(g.size, np.int32),
            np.arange(g.size, dtype=np.int32),
            one,
        )
        rays["origins"].append(o)
        rays["directions"].append(d)
        rays["distances"].append(dist)
        rays["hits"].append(store["hits"][g].astype(np.float32))
        rays["ray_to_voxel"].append(np.full(g.size, b))
    out = {k: np.concatenate(v) for k, v in rays.items()}
    g = np.concatenate(rows_all)
    out["view_ids"] = store["view_ids"][g].astype(np.int64)
    out["face_ids"] = store["face_ids"][g].astype(np.int64)
    vp_rows = np.concatenate(
        [np.arange(s, s + c) for s, c in zip(plan.view_start, plan.view_count, strict=True)]
    )
    vp_owner = np.repeat(np.arange(plan.batch_size), plan.view_count)
    out["view_positions"] = NB.transform_points(store["view_positions"][vp_rows], vp_owner, params)
    s_max = plan.grid_side
    grids = np.zeros((plan.batch_size, s_max, s_max, s_max), np.uint8)
    for b in range(plan.batch_size):
        s = int(plan.side[b])
        grids[b, :s, :s, :s] = store["grids"][
            plan.grid_start[b] : plan.grid_start[b] + s**3
        ].reshape(s, s, s)
    out["voxels"] = NB.transform_voxels(grids, plan.side, params)[:, None].astype(np.float32)
    return out


@pytest.fixture(params=["numba", "numpy"])
def loops(request, monkeypatch):
    """Run a test with the numba loops (when numba is installed) and with plain numpy."""
    if request.param == "numba" and not F.fused_numba.AVAILABLE:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(F, "USE_NUMBA", request.param == "numba")
    return request.param


def as_records(store):
    """The same store with its rays as one RAY_RECORD array (the host store's layout)."""
    records = np.empty(store["origins"].shape[0], dtype=F.RAY_RECORD)
    for k in F.RAY_FIELDS:
        records[k] = store[k]
    return {"records": records, **{k: v for k, v in store.items() if k not in F.RAY_FIELDS}}


CASES = {
    "subsample_symmetry": dict(noise=False, jitter=False, keep=40),
    "all_rows": dict(noise=False, jitter=False, keep=10_000),
    "noise_jitter": dict(noise=True, jitter=True, keep=33),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("layout", ["arrays", "records"])
def test_fused_equals_per_sample(case, mixed, layout, loops):
    cfg = CASES[case]
    g = np.random.default_rng(hash((case, mixed)) % 2**32)
    sides = [8, 8, 4, 16, 8, 4, 8, 8, 16, 4] if mixed else [8] * 10
    counts = [int(x) for x in g.integers(1, 300, len(sides))]
    counts[2] = 1
    views = [int(x) for x in g.integers(1, 9, len(sides))]
    store = make_store(sides, counts, views)
    picks = g.permutation(len(sides))[:7]
    b = picks.size
    params = {
        "symmetry": g.integers(0, 48, b),
        "origin_scale": g.uniform(0.1, 2, b),
        "distance_scale": g.uniform(0.1, 2, b),
        "origin_std": (g.uniform(0, 0.1, b) if cfg["noise"] else np.zeros(b)),
        "direction_std": (g.uniform(0, 0.1, b) if cfg["noise"] else np.zeros(b)),
        "jitter_threshold": (g.integers(0, 1 << 23, b) if cfg["jitter"] else np.zeros(b, np.int64)),
    }
    plan = make_plan(sides, counts, views, picks, [cfg["keep"]] * b, params)
    want = reference(store, plan)
    got = F.gather_rays(as_records(store) if layout == "records" else store, plan)
    for k in ("hits", "view_ids", "face_ids", "ray_to_voxel"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        assert got[k].dtype == (np.float32 if k == "hits" else np.int64)
    for k in ("origins", "directions", "distances"):  # same float32 operations: bit for bit
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    np.testing.assert_array_equal(
        F.gather_views(store["view_positions"], plan), want["view_positions"]
    )
    np.testing.assert_array_equal(F.gather_grids(store["grids"], plan), want["voxels"])


def test_feistel_many_equals_scalar_walks(loops):
    g = np.random.default_rng(1)
    n = g.integers(1, 100_000, 500)
    j = (g.random(500) * n).astype(np.int64)
    keys = g.integers(0, 2**32, (500, 4), dtype=np.uint64).astype(np.uint32)
    if loops == "numba":
        got = np.empty(500, np.int64)
        F.fused_numba.feistel_rows(j.astype(np.int64), n.astype(np.int64), keys, got)
    else:
        got = F.feistel_permute_many(j, n, keys)
    want = [int(rng.feistel_permute(np.array([j[i]]), int(n[i]), keys[i])[0]) for i in range(500)]
    np.testing.assert_array_equal(got, want)
    assert np.all(got < n)


def test_preallocated_outputs_are_filled_in_place():
    sides, counts, views = [4, 4], [50, 60], [2, 3]
    store = make_store(sides, counts, views)
    zeros = np.zeros(2)
    params = dict(
        symmetry=[5, 17],
        origin_scale=[1, 1],
        distance_scale=[1, 1],
        origin_std=zeros,
        direction_std=zeros,
        jitter_threshold=[0, 0],
    )
    plan = make_plan(sides, counts, views, [1, 0], [20, 20], params)
    out = {
        k: np.full(s, -1, dt)
        for k, (s, dt) in {
            "origins": ((40, 3), np.float32),
            "directions": ((40, 3), np.float32),
            "distances": (40, np.float32),
            "hits": (40, np.float32),
            "view_ids": (40, np.int64),
            "face_ids": (40, np.int64),
            "ray_to_voxel": (40, np.int64),
        }.items()
    }
    got = F.gather_rays(store, plan, out=out)
    assert got is out
    np.testing.assert_array_equal(out["ray_to_voxel"], np.repeat([0, 1], 20))
    np.testing.assert_array_equal(out["origins"], F.gather_rays(store, plan)["origins"])
    vox = np.full((2, 1, 4, 4, 4), 7, np.float32)
    F.gather_grids(store["grids"], plan, out=vox)
    assert set(np.unique(vox)) <= {0.0, 1.0}


def test_record_store_equals_field_arrays(loops):
    """A store whose rays are one RAY_RECORD array gives the same batch as separate arrays."""
    sides, counts, views = [8, 4, 8], [90, 70, 120], [3, 2, 4]
    store = make_store(sides, counts, views)
    rec_store = as_records(store)
    b = 3
    params = dict(symmetry=[3, 30, 47], origin_scale=[0.5, 1, 2], distance_scale=[1, 1, 1],
                  origin_std=[0.1, 0, 0.2], direction_std=[0, 0.1, 0.1],
                  jitter_threshold=np.zeros(b))  # fmt: skip
    plan = make_plan(sides, counts, views, [2, 0, 1], [50, 70, 33], params)
    want = F.gather_rays(store, plan)
    got = F.gather_rays(rec_store, plan)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        assert got[k].dtype == want[k].dtype and got[k].flags.c_contiguous, k
