"""Ray sampling of one grid: viewpoints, faces, culling, adaptive counts (no files)."""

from __future__ import annotations

import numpy as np

from gpuloader.generate import rays, shapes
from gpuloader.tracer import trace


def test_view_positions_convention():
    cams = rays.view_positions(4, half_extent=8.0)
    assert cams.shape == (16, 3)
    np.testing.assert_allclose(np.linalg.norm(cams, axis=1), 16.0)
    theta = np.linspace(0.1 * np.pi, 0.9 * np.pi, 4)
    # View e * divisions + a: elevation e (polar angle from +z), azimuth a (from +x to +y).
    np.testing.assert_allclose(cams[0], 16 * np.array([np.sin(theta[0]), 0, np.cos(theta[0])]))
    np.testing.assert_allclose(
        cams[1], 16 * np.array([0, np.sin(theta[0]), np.cos(theta[0])]), atol=1e-12
    )
    np.testing.assert_allclose(cams[4:8, 2], 16 * np.cos(theta[1]))


def test_faces_point_away_from_camera():
    half = np.array([4.0, 4.0, 4.0])
    # Upstream's rule: the faces whose outward normal points away from the camera direction.
    assert rays.faces_for_view(np.array([8.0, 0.0, 0.0]), half) == [0]
    assert rays.faces_for_view(np.array([8.0, 8.0, 8.0]), half) == [0, 2, 4]
    assert rays.faces_for_view(np.array([-1.0, 2.0, -3.0]), half) == [1, 2, 5]
    # the default 4 x 4 views: 3 faces each, 2 where a camera coordinate is exactly 0
    cams = rays.view_positions(4, 16.0)
    counts = [len(rays.faces_for_view(c, half)) for c in cams]
    assert set(counts) <= {2, 3} and sum(counts) == 44


def test_sample_rays_per_face_counts_and_determinism():
    a = rays.sample_rays((8, 8, 8), 3, 90, np.random.default_rng(0))
    b = rays.sample_rays((8, 8, 8), 3, 90, np.random.default_rng(0))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    pairs = a["view_ids"] * 6 + a["face_ids"]
    assert set(np.bincount(pairs)[np.unique(pairs)].tolist()) == {30}
    assert a["view_positions"].shape == (9, 3)


def test_culling_keeps_tracer_distances_exactly():
    grid = shapes.make_shape("asym", 16)
    arrays = rays.make_ray_arrays(grid, "0000", 0, 4, 300, np.random.default_rng(1))
    full = trace(grid, arrays["origins"], arrays["directions"]).astype(np.float32)
    np.testing.assert_array_equal(arrays["distances"], full)
    assert 0 < arrays["hits"].mean() < 1
    sparse = np.zeros((8, 8, 8), bool)
    sparse[1, 2, 3] = True
    arrays = rays.make_ray_arrays(sparse, "h" * 64, 2, 4, 300, np.random.default_rng(2))
    full = trace(sparse, arrays["origins"], arrays["directions"]).astype(np.float32)
    np.testing.assert_array_equal(arrays["distances"], full)


def test_samples_for_level():
    assert rays.samples_for_level(3000, 3, adaptive=False) == 3000
    assert rays.samples_for_level(3000, 3, adaptive=True) == 375
    assert rays.samples_for_level(3000, 9, adaptive=True) == rays.ADAPTIVE_MIN_SAMPLES
    assert rays.samples_for_level(12, 4, adaptive=True) == 12


def test_ray_rng_depends_on_key_level_seed():
    draw = lambda *a: rays.ray_rng(*a).integers(1 << 30)  # noqa: E731
    assert draw(0, 1, "ab" * 32) == draw(0, 1, "ab" * 32)
    assert len({draw(0, 1, "ab" * 32), draw(1, 1, "ab" * 32), draw(0, 2, "ab" * 32)}) == 3
