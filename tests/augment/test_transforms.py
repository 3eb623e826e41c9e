"""Transforms: geometric consistency by re-tracing, seeding, no mutation, composition."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from gpuloader.augment import symmetry
from gpuloader.augment import transforms as T
from gpuloader.augment.rng import SampleContext
from gpuloader.errors import UnsupportedTransformError
from gpuloader.tracer import trace


def asymmetric_grid(side: int) -> np.ndarray:
    """A grid with no symmetry of the cube: an L with a stub and a lone voxel."""
    g = np.zeros((side, side, side), bool)
    h = max(side // 2, 1)
    q = max(side // 4, 1)
    g[:h, :q, :] = True  # slab along x
    g[:h, :, :q] = True  # arm along y
    g[h:, q : q + 1, q : q + 1] = True if side > 1 else g[h:, :1, :1]
    g[side - 1, side - 1, side // 2] = True
    return g


def rays_for(grid: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rays as in the format: start on a face of the box, run through the volume."""
    rng = np.random.default_rng(seed)
    side = grid.shape[0]
    start = rng.uniform(-side / 2, side / 2, (n, 3))
    face = rng.integers(0, 6, n)
    axis, sign = face // 2, np.where(face % 2, 1.0, -1.0)
    start[np.arange(n), axis] = sign * side / 2
    target = rng.uniform(-side / 2, side / 2, (n, 3))
    d = target - start
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return start.astype(np.float32), d.astype(np.float32)


def make_sample(side: int, n: int = 400, seed: int = 0, as_torch: bool = True) -> dict:
    grid = asymmetric_grid(side)
    o, d = rays_for(grid, n, seed)
    dist = trace(grid, o, d).astype(np.float32)
    vp = np.random.default_rng(seed).normal(size=(16, 3)).astype(np.float32) * side
    s = {
        "voxels": grid[None].astype(np.float32),
        "origins": o,
        "directions": d,
        "distances": dist,
        "hits": (dist > 0).astype(np.float32),
        "view_ids": np.arange(n, dtype=np.int64) % 16,
        "face_ids": np.zeros(n, dtype=np.int64),
        "view_positions": vp,
        "level": 1,
        "hash": "abc",
    }
    if as_torch:
        s = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in s.items()}
    return s


def assert_consistent(out: dict, scale: float = 1.0, dist_scale: float = 1.0, tol=1e-4):
    """Re-trace transformed rays through the transformed grid (voxel size = scale)."""
    vox = np.asarray(out["voxels"])[0]
    got = trace(vox, np.asarray(out["origins"]), np.asarray(out["directions"]), scale)
    want = np.asarray(out["distances"], dtype=np.float64) / dist_scale * scale
    np.testing.assert_allclose(got, want, atol=tol * max(scale, 1.0))


SIDES = [4, 8, 16, 32]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_rotation_each_axis_each_k(side, axis):
    s = make_sample(side)
    seen = set()
    for index in range(40):
        out = T.RandomRotation90(p=1.0, axes=(axis,))(s, SampleContext(1, 0, index))
        seen.add(np.asarray(out["voxels"]).tobytes())
        assert_consistent(out)
    assert len(seen) == 3  # k = 1, 2, 3 all drawn and all different on an asymmetric grid


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("axes", [(0,), (1,), (2,), (0, 1), (0, 1, 2)])
def test_flip_each_axis_set(side, axes):
    s = make_sample(side)
    seen = set()
    for index in range(60):
        out = T.RandomFlip(axes=axes, p=0.5)(s, SampleContext(2, 0, index))
        seen.add(np.asarray(out["voxels"]).tobytes())
        assert_consistent(out)
    assert len(seen) == 2 ** len(axes)


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_rotation_probability(p):
    s = make_sample(8)
    changed = 0
    for index in range(200):
        out = T.RandomRotation90(p=p)(s, SampleContext(3, 0, index))
        changed += not torch.equal(out["voxels"], s["voxels"])
        assert_consistent(out)
    assert abs(changed / 200 - p) < 0.1


@pytest.mark.parametrize("side", SIDES)
def test_compositions_cover_all_48_and_stay_consistent(side):
    s = make_sample(side, n=200)
    t = T.Compose([T.RandomRotation90(p=0.9), T.RandomFlip(p=0.5), T.RandomRotation90(p=0.9)])
    grids = set()
    for index in range(300):
        out = t(s, SampleContext(4, 0, index))
        grids.add(np.asarray(out["voxels"]).tobytes())
        if index % 10 == 0:
            assert_consistent(out)
    assert len(grids) == 48  # the asymmetric grid has 48 distinct images


@pytest.mark.parametrize("scale_distances", [False, True])
def test_normalize_with_geometry_and_subsample(scale_distances):
    side = 16
    s = make_sample(side, n=500)
    t = T.Compose(
        [
            T.RandomFlip(p=0.5),
            T.NormalizeRayOrigins(voxel_size=1.0, scale_distances=scale_distances),
            T.RandomRotation90(p=1.0),
            T.RandomRaySubsample(num_rays=100),
        ]
    )
    for index in range(10):
        out = t(s, SampleContext(5, 2, index))
        assert out["origins"].shape == (100, 3)
        assert out["origins"].abs().max() <= 1.0 + 1e-6
        f = 2.0 / side
        assert_consistent(out, scale=f, dist_scale=f if scale_distances else 1.0)
        assert out["view_positions"].shape == (16, 3)


def test_same_context_same_result_different_index_different():
    s = make_sample(8)
    t = T.Compose([T.RandomRotation90(), T.RandomFlip(), T.AddNoise(), T.RandomRaySubsample(50)])
    a = t(s, SampleContext(7, 1, 3))
    b = t(s, SampleContext(7, 1, 3))
    c = t(s, SampleContext(7, 2, 3))
    for k in ("voxels", "origins", "directions", "distances"):
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["origins"], c["origins"])


@pytest.mark.parametrize("as_torch", [True, False])
def test_inputs_not_mutated(as_torch):
    s = make_sample(8, as_torch=as_torch)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else np.copy(v)) for k, v in s.items()}
    t = T.Compose(
        [
            T.RandomRotation90(p=1),
            T.RandomFlip(p=1),
            T.NormalizeRayOrigins(),
            T.AddNoise(0.1, 0.1),
            T.VoxelOccupancyJitter(0.2),
            T.RandomRaySubsample(10),
        ]
    )
    out = t(s, SampleContext(0, 0, 0))
    for k, v in s.items():
        if isinstance(v, (torch.Tensor, np.ndarray)):
            assert np.array_equal(np.asarray(v), np.asarray(before[k])), k
            assert type(out[k]) is type(v) and out[k].dtype == v.dtype, k


def test_noise_statistics_and_unit_directions():
    s = make_sample(8, n=4000)
    out = T.AddNoise(origin_std=0.05, direction_std=0.01)(s, SampleContext(0, 0, 0))
    do = (out["origins"] - s["origins"]).numpy()
    assert abs(do.std() - 0.05) < 0.005 and abs(do.mean()) < 0.005
    norms = np.linalg.norm(out["directions"].numpy(), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)
    assert not torch.equal(out["directions"], s["directions"])
    assert torch.equal(out["distances"], s["distances"])


def test_jitter_rate_and_labels():
    s = make_sample(32)
    out = T.VoxelOccupancyJitter(flip_prob=0.1)(s, SampleContext(0, 0, 1))
    rate = (out["voxels"] != s["voxels"]).float().mean().item()
    assert abs(rate - 0.1) < 0.01
    assert set(np.unique(out["voxels"].numpy())) <= {0.0, 1.0}
    assert torch.equal(out["distances"], s["distances"])


def test_subsample_picks_distinct_original_rows():
    s = make_sample(8, n=300)
    out = T.RandomRaySubsample(num_rays=64)(s, SampleContext(9, 0, 0))
    rows = {tuple(r) for r in s["origins"].numpy().round(6).tolist()}
    got = [tuple(r) for r in out["origins"].numpy().round(6).tolist()]
    assert len(got) == 64 and len(set(got)) == 64 and set(got) <= rows
    small = T.RandomRaySubsample(num_rays=1000)(s, SampleContext(9, 0, 0))
    assert torch.equal(small["origins"], s["origins"])  # fewer rays than asked: all, in order


def test_custom_callables_keep_their_place():
    calls = []

    def mark(sample):
        calls.append(sample["origins"].shape[0])
        return dict(sample, marked=True)

    s = make_sample(8, n=100)
    t = T.Compose([T.RandomRaySubsample(30), mark, T.RandomFlip(p=1.0)])
    out = t(s, SampleContext(0, 0, 0))
    assert calls == [30] and out["marked"] is True
    assert_consistent(out)
    assert T.ray_budget(t) == 30
    assert T.ray_budget(T.Compose([mark, T.RandomRaySubsample(30)])) is None


def test_split_for_device():
    def custom(sample):
        return sample

    cpu, known, dev = T.split_for_device(
        T.Compose([custom, T.RandomFlip(), T.RandomRaySubsample(5), T.ToDevice("cpu")])
    )
    assert cpu == [custom] and len(known) == 2 and dev == "cpu"
    with pytest.raises(UnsupportedTransformError, match="must come before"):
        T.split_for_device(T.Compose([T.RandomFlip(), custom]))


def test_bad_arguments_and_non_cubic_grid():
    with pytest.raises(ValueError):
        T.RandomRotation90(p=2)
    with pytest.raises(ValueError):
        T.RandomFlip(axes=[3])
    with pytest.raises(ValueError):
        T.RandomRaySubsample(0)
    s = make_sample(8)
    s["voxels"] = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="cubic"):
        T.RandomRotation90(p=1)(s, SampleContext(0, 0, 0))


def test_to_device_converts_numpy():
    out = T.ToDevice("cpu")(make_sample(4, as_torch=False))
    assert isinstance(out["origins"], torch.Tensor) and out["hash"] == "abc"


def test_flip_draws_all_combinations_independently():
    t = T.RandomFlip(axes=(0, 1, 2), p=0.5)
    counts = {}
    for index in range(800):
        from gpuloader.augment.rng import Purpose, random_words

        s = t.draw(random_words(1, 0, index, Purpose.SYMMETRY, 0))
        counts[s] = counts.get(s, 0) + 1
    expected = {
        symmetry.compose(*[symmetry.flip(a) for a in c])
        for r in range(4)
        for c in itertools.combinations(range(3), r)
    }
    assert set(counts) == expected and min(counts.values()) > 60


@pytest.mark.parametrize("rows", [None, 7])
def test_a_turn_alone_gives_what_the_general_pass_gives(rows, monkeypatch):
    """Every one of the 48 symmetries, alone (the short path of apply_plan) and with an
    origin scale of exactly 1 forced through the general pass: bit for bit the same rays,
    views and grid; keys it does not change are the sample's own objects."""
    from gpuloader.augment import apply as apply_mod
    from gpuloader.augment.plan import SamplePlan

    gen = np.random.default_rng(3)
    d = gen.standard_normal((20, 3)).astype(np.float32)
    sample = {
        "origins": torch.from_numpy(gen.standard_normal((20, 3)).astype(np.float32)),
        "directions": torch.from_numpy(d / np.linalg.norm(d, axis=1, keepdims=True)),
        "distances": torch.from_numpy(gen.random(20).astype(np.float32)),
        "hits": torch.ones(20),
        "view_ids": torch.arange(20),
        "view_positions": torch.from_numpy(gen.standard_normal((4, 3)).astype(np.float32)),
        "voxels": torch.from_numpy((gen.random((1, 8, 8, 8)) > 0.5).astype(np.float32)),
    }
    ctx = SampleContext(5, 1, 2)
    for s in range(symmetry.NUM_SYMMETRIES):
        short = apply_mod.apply_plan(SamplePlan(symmetry=s, num_rays=rows), sample, ctx)
        with monkeypatch.context() as m:
            m.setattr(SamplePlan, "turns_only", property(lambda plan: False))  # general pass
            full = apply_mod.apply_plan(SamplePlan(symmetry=s, num_rays=rows), sample, ctx)
        assert short.keys() == full.keys()
        for k in short:
            assert torch.equal(short[k], full[k]), (s, k)
            assert short[k].dtype == full[k].dtype, (s, k)
        if rows is None:
            assert short["distances"] is sample["distances"]
            assert short["hits"] is sample["hits"]
        want = symmetry.apply_grid(s, sample["voxels"].numpy()[0])
        assert np.array_equal(short["voxels"].numpy()[0], want)
