"""The 48 cube symmetries: group structure and consistency of grid and points."""

from __future__ import annotations

import numpy as np
import pytest

from gpuloader.augment import symmetry as S
from gpuloader.tracer import trace


def test_group_structure():
    assert S.MATRICES.shape == (48, 3, 3)
    assert np.array_equal(S.MATRICES[S.IDENTITY], np.eye(3, dtype=np.int64))
    assert len({m.tobytes() for m in S.MATRICES}) == 48
    assert sum(S.is_proper(s) for s in range(48)) == 24
    for a in range(48):
        assert S.COMPOSE[a, S.INVERSE[a]] == S.IDENTITY
        for b in range(0, 48, 7):
            assert np.array_equal(S.MATRICES[S.COMPOSE[a, b]], S.MATRICES[a] @ S.MATRICES[b])


@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_rotations_are_right_handed_quarter_turns(axis):
    r = S.MATRICES[S.rotation(axis, 1)]
    e = np.eye(3, dtype=np.int64)
    a = "xyz".index(axis)
    b, c = (a + 1) % 3, (a + 2) % 3
    assert np.array_equal(r @ e[b], e[c])  # x -> y about z, y -> z about x, z -> x about y
    assert S.rotation(axis, 4) == S.IDENTITY
    assert S.compose(S.rotation(axis, 1), S.rotation(axis, 3)) == S.IDENTITY


def test_grid_and_points_agree_on_a_marked_voxel():
    side = 6
    for s in range(48):
        g = np.zeros((side, side, side), np.uint8)
        g[1, 2, 4] = 1  # z=1, y=2, x=4
        centre = np.array([[4.5, 2.5, 1.5]]) - side / 2  # world (x, y, z) of that voxel
        out = S.apply_grid(s, g)
        z, y, x = np.argwhere(out)[0]
        moved = S.apply_points(s, centre)[0] + side / 2 - 0.5
        assert np.allclose(moved, [x, y, z]), s


def test_every_symmetry_preserves_traced_distances():
    rng = np.random.default_rng(0)
    vox = rng.random((8, 8, 8)) < 0.35
    o = rng.normal(size=(300, 3)) * 6
    d = rng.normal(size=(300, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    ref = trace(vox, o, d)
    for s in range(48):
        got = trace(S.apply_grid(s, vox), S.apply_points(s, o), S.apply_points(s, d))
        np.testing.assert_allclose(got, ref, atol=1e-9, err_msg=f"symmetry {s}")


def test_bad_index():
    with pytest.raises(ValueError):
        S.perm_and_signs(48)
    with pytest.raises(ValueError):
        S.index_of(np.ones((3, 3)))
