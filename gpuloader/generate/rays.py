"""Rays of one grid: viewpoints on a sphere, origins on the back faces of the bounding box.

Viewpoints (``divisions ** 2`` of them, view index ``e * divisions + a``):
elevation ``theta_e = linspace(0.1 pi, 0.9 pi, divisions)[e]`` is the polar angle from +z,
azimuth ``phi_a = linspace(0, 2 pi, divisions, endpoint=False)[a]`` turns from +x toward +y,
and the camera sits at ``R (sin theta cos phi, sin theta sin phi, cos theta)`` in world
(x, y, z) with ``R = 2 * (half the largest extent of the grid)``.

For each view, a face of the grid's box (ids 0 -x, 1 +x, 2 -y, 3 +y, 4 -z, 5 +z) is used
when its outward normal points away from the camera, as upstream: ``dot(normal, cam) < 0``
in float64 (the back faces seen from the camera's direction). Such a face gets
``samples_per_view // 3`` points, uniform over the face; each ray starts at its point and runs
toward the camera (``direction = normalize(cam - point)``), so it crosses the volume. A view
uses 3 faces, or 2 where a camera coordinate is exactly 0 (with the default 4 x 4 views:
44,000 rays per file at 3000 samples per view, as upstream's "about 48,000").

Adaptive sampling: level L uses ``max(samples_per_view >> L, min_samples)`` (upstream's rule;
``min_samples`` defaults to upstream's 100), capped at ``samples_per_view`` so that a small
``samples_per_view`` is never raised.
Distances come from :func:`gpuloader.tracer.trace` on the float32 origins and
directions that are stored, so a re-trace of a file reproduces its distances; rays that
surely miss the occupied voxels' bounding box are not traced (their distance is exactly 0
either way).
"""

from __future__ import annotations

import hashlib

import numpy as np

from gpuloader.tracer import trace

#: Fewest samples per view under adaptive sampling (upstream's ``--min-samples`` default).
ADAPTIVE_MIN_SAMPLES = 100
#: Outward normals of faces 0..5 in world (x, y, z).
FACE_NORMALS = np.array(
    [[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]], dtype=np.float64
)
SAMPLING_MODE = "sphere"


def samples_for_level(
    samples_per_view: int, level: int, adaptive: bool, min_samples: int = ADAPTIVE_MIN_SAMPLES
) -> int:
    """Samples per view at ``level``: halved per level under ``adaptive``, not below
    ``min(min_samples, samples_per_view)``."""
    if not adaptive:
        return samples_per_view
    return max(samples_per_view >> level, min(min_samples, samples_per_view))


def view_positions(divisions: int, half_extent: float) -> np.ndarray:
    """(divisions ** 2, 3) float64 camera positions, world (x, y, z); see the module doc."""
    theta = np.linspace(0.1 * np.pi, 0.9 * np.pi, divisions)
    phi = np.linspace(0.0, 2.0 * np.pi, divisions, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")  # row-major: elevation outer
    radius = 2.0 * half_extent
    cams = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], axis=-1)
    return (radius * cams).reshape(-1, 3)


def faces_for_view(cam: np.ndarray, half: np.ndarray) -> list[int]:
    """Face ids whose outward normal points away from ``cam`` (``dot(normal, cam) < 0``).

    ``half`` (3,) half sizes xyz is accepted for symmetry with the sampler; the rule, like
    upstream's, depends on the camera direction only.
    """
    del half
    return [f for f in range(6) if float(FACE_NORMALS[f] @ cam) < 0.0]


def sample_rays(
    grid_shape: tuple[int, int, int],
    divisions: int,
    samples_per_view: int,
    rng: np.random.Generator,
    voxel_size: float = 1.0,
) -> dict[str, np.ndarray]:
    """Origins, directions, face_ids, view_ids, view_positions for a grid of ``grid_shape``.

    Args:
        grid_shape: (D, H, W) of the grid (centred on the origin).
        divisions: views per angle; ``divisions ** 2`` views.
        samples_per_view: points per view before the split over faces (``// 3`` per face).
        rng: source of the face points.

    Returns:
        origins (N, 3) f32, directions (N, 3) f32 unit, face_ids (N,) i32, view_ids (N,) i32,
        view_positions (V, 3) f32.
    """
    half = np.asarray(grid_shape[::-1], dtype=np.float64) * voxel_size / 2.0  # (x, y, z)
    cams = view_positions(divisions, float(half.max()))
    per_face = samples_per_view // 3
    origins, face_ids, view_ids = [], [], []
    for v, cam in enumerate(cams):
        for f in faces_for_view(cam, half):
            axis = f // 2
            pts = rng.uniform(-1.0, 1.0, size=(per_face, 3)) * half[None, :]
            pts[:, axis] = half[axis] if f % 2 else -half[axis]
            origins.append(pts)
            face_ids.append(np.full(per_face, f, dtype=np.int32))
            view_ids.append(np.full(per_face, v, dtype=np.int32))
    o32 = np.concatenate(origins).astype(np.float32) if origins else np.zeros((0, 3), np.float32)
    vid = np.concatenate(view_ids) if view_ids else np.zeros(0, np.int32)
    cams32 = cams.astype(np.float32)
    d = cams32[vid].astype(np.float64) - o32.astype(np.float64)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return {
        "origins": o32,
        "directions": d.astype(np.float32),
        "face_ids": np.concatenate(face_ids) if face_ids else np.zeros(0, np.int32),
        "view_ids": vid,
        "view_positions": cams32,
    }


def may_hit(voxels: np.ndarray, origins: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """(N,) bool: False only for rays that surely miss every occupied voxel (for t >= 0).

    A slab test against the bounding box of the occupied voxels, widened by 1e-3 voxel, in
    float64. Rays it rules out have distance exactly 0 (the tracer sums pieces inside
    occupied voxels only); the others go to the tracer unchanged, which treats every ray on
    its own, so culling changes no distance. It saves 30-60% of the tracing time.
    """
    occ = np.argwhere(voxels)
    if occ.size == 0:
        return np.zeros(len(origins), dtype=bool)
    half = np.asarray(voxels.shape[::-1], dtype=np.float64) / 2.0  # (x, y, z)
    lo = occ.min(axis=0)[::-1] - half - 1e-3
    hi = occ.max(axis=0)[::-1] + 1.0 - half + 1e-3
    o = np.asarray(origins, dtype=np.float64)
    d = np.asarray(directions, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (lo - o) / d, (hi - o) / d
    t_near = np.minimum(t1, t2).max(axis=1)  # NaN (0/0) propagates: such rays are traced
    t_far = np.maximum(t1, t2).min(axis=1)
    return ~((t_far < t_near) | (t_far < 0.0))


def make_ray_arrays(
    voxels: np.ndarray,
    hash_: str,
    level: int,
    divisions: int,
    samples_per_view: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Every key of a ray file (shared/format.md) for ``voxels``; distances from the tracer.

    ``hash_`` is the sub-volume hash (the object ID at level 0). Scalars are 0-d arrays:
    grid_shape (3,) int64, voxel_size f64, hash str, level int64, sampling_mode str.
    """
    rays = sample_rays(voxels.shape, divisions, samples_per_view, rng)
    o, d = rays["origins"], rays["directions"]
    dist = np.zeros(o.shape[0], dtype=np.float32)
    sel = np.flatnonzero(may_hit(voxels, o, d))
    if sel.size:
        dist[sel] = trace(voxels, o[sel], d[sel], voxel_size=1.0).astype(np.float32)
    return {
        "origins": rays["origins"],
        "directions": rays["directions"],
        "distances": dist,
        "hits": (dist > 0).astype(np.uint8),
        "face_ids": rays["face_ids"],
        "view_ids": rays["view_ids"],
        "view_positions": rays["view_positions"],
        "grid_shape": np.asarray(voxels.shape, dtype=np.int64),
        "voxel_size": np.float64(1.0),
        "hash": np.str_(hash_),
        "level": np.int64(level),
        "sampling_mode": np.str_(SAMPLING_MODE),
    }


def ray_rng(seed: int, level: int, key: str) -> np.random.Generator:
    """Per-file generator: a pure function of (seed, level, hash or object ID).

    Identical sub-volumes get identical rays whichever object or worker makes them.
    """
    word = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, level, word & 0xFFFFFFFF, word >> 32])
