"""The exact tracer against an independent per-voxel chord sum."""

from __future__ import annotations

import numpy as np
import pytest

from gpuloader.tracer import trace


def chord_sum(voxels: np.ndarray, o: np.ndarray, d: np.ndarray, voxel_size: float = 1.0):
    """Reference: for every occupied voxel box, the length of the ray (t >= 0) inside it.

    Boxes are half-open ``[lo, hi)`` along an axis the ray is parallel to, which is the
    tracer's convention for rays lying in a grid plane.
    """
    D, H, W = voxels.shape
    half = np.array([W, H, D], dtype=np.float64) / 2.0
    out = np.zeros(len(o))
    zz, yy, xx = np.nonzero(voxels)
    lo = (np.stack([xx, yy, zz], axis=1) - half) * voxel_size  # (M, 3)
    hi = lo + voxel_size
    for r in range(len(o)):
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = (lo - o[r]) / d[r]
            t2 = (hi - o[r]) / d[r]
        tn = np.minimum(t1, t2)
        tf = np.maximum(t1, t2)
        par = d[r] == 0
        inside = (o[r] >= lo) & (o[r] < hi)
        tn = np.where(par, np.where(inside, -np.inf, np.inf), tn)
        tf = np.where(par, np.where(inside, np.inf, -np.inf), tf)
        enter = np.maximum(tn.max(axis=1), 0.0)
        leave = tf.min(axis=1)
        out[r] = (np.clip(leave - enter, 0.0, None)).sum() * np.linalg.norm(d[r])
    return out


def _grid(rng, side, p=0.4):
    return rng.random((side, side, side)) < p


def _unit(v):
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("side", [1, 2, 4, 8, 16])
def test_random_rays_match_chord_sum(side):
    rng = np.random.default_rng(side)
    vox = _grid(rng, side)
    o = rng.uniform(-side, side, (300, 3))
    d = _unit(rng.normal(size=(300, 3)))
    np.testing.assert_allclose(trace(vox, o, d), chord_sum(vox, o, d), atol=1e-4)


def test_axis_parallel_rays():
    rng = np.random.default_rng(1)
    vox = _grid(rng, 8)
    n = 200
    o = rng.uniform(-4, 4, (n, 3))
    axis = rng.integers(0, 3, n)
    sign = rng.choice([-1.0, 1.0], n)
    d = np.zeros((n, 3))
    d[np.arange(n), axis] = sign
    o[np.arange(n), axis] = -6.0 * sign  # start outside, run through the grid
    # half of them exactly on grid planes in the other coordinates
    o[: n // 2] = np.where(d[: n // 2] == 0, np.round(o[: n // 2]), o[: n // 2])
    np.testing.assert_allclose(trace(vox, o, d), chord_sum(vox, o, d), atol=1e-4)


def test_rays_through_edges_and_corners():
    rng = np.random.default_rng(2)
    vox = _grid(rng, 8, 0.5)
    corners = rng.integers(-4, 5, (200, 3)).astype(np.float64)  # lattice points
    d = _unit(rng.normal(size=(200, 3)))
    d[:50] = _unit(np.sign(d[:50]) + 0.0)  # exact diagonals through corners
    d[50:100, 0] = 0  # through edges (parallel to a face, crossing lattice lines)
    d[50:100] = _unit(d[50:100])
    o = corners - 10.0 * d  # the ray passes exactly through a lattice point
    np.testing.assert_allclose(trace(vox, o, d), chord_sum(vox, o, d), atol=1e-4)


def test_only_forward_part_counts_and_scale():
    vox = np.ones((4, 4, 4), bool)
    o = np.array([[0.0, 0.0, 0.0], [-10.0, 0.5, 0.5], [10.0, 0.5, 0.5]])
    d = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(trace(vox, o, d), [2.0, 4.0, 0.0])
    # voxel size scales lengths; non-unit directions still measure world length
    np.testing.assert_allclose(trace(vox, o * 2, d * 3, voxel_size=2.0), [4.0, 8.0, 0.0])


def test_two_separate_parts_are_summed():
    vox = np.zeros((1, 1, 8), bool)
    vox[0, 0, 1] = vox[0, 0, 5] = True
    out = trace(vox, np.array([[-5.0, 0.0, 0.0]]), np.array([[1.0, 0.0, 0.0]]))
    np.testing.assert_allclose(out, [2.0])


def test_empty_and_bad_input():
    assert trace(np.zeros((4, 4, 4)), np.zeros((3, 3)), np.ones((3, 3))).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="origins and directions"):
        trace(np.ones((2, 2, 2)), np.zeros((3, 2)), np.ones((3, 2)))
