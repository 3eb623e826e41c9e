"""A tiny hand-made dataset in the exact on-disk format (shared/format.md), for tests.

Five 16^3 objects built from 8^3 blocks, so level-1 sub-volumes are shared on purpose:

* block ``A`` is used by train objects and by val object ``0002`` (a train/val leak),
* block ``D`` is used by train and by test object ``0003`` (a train/test leak),
* ``G`` is val-only, ``H`` is used by val ``0004`` and test ``0003``, ``E`` (empty) is
  trivial; ``F`` (full) is an ordinary sample (upstream's pipeline lists only all-empty
  grids in ``trivial_hashes``).

The JSON files carry every key upstream's generator writes (``gpuloader verify`` checks them).

Levels 0 and 1 by default (``max_level=2`` adds the 4^3 level). Rays follow the upstream
recipe (views on a sphere, back faces sampled, rays toward the camera) and their distances
come from :func:`gpuloader.tracer.trace`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from gpuloader.format import layout
from gpuloader.generate import metadata
from gpuloader.generate.splits import build_splits
from gpuloader.tracer import trace

BASE = 16
DIVISIONS = 3
SAMPLES_PER_VIEW = 48
_FACE_NORMALS = np.array(
    [[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]], dtype=np.float64
)


def grid_hash(grid: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(grid).astype(bool).tobytes()).hexdigest()


def _blocks(side: int = BASE // 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    blocks = {"E": np.zeros((side,) * 3, bool), "F": np.ones((side,) * 3, bool)}
    for name in "ABCDGH":
        g = rng.random((side,) * 3) < 0.35
        g[0, 0, 0] = True  # never empty, never full
        g[-1, -1, -1] = False
        blocks[name] = g
    return blocks


#: object ID -> (split, the 8 blocks in octant order i, j, k over axes 0, 1, 2)
OBJECTS: dict[str, tuple[str, str]] = {
    "0000": ("train", "ABEFCEEA"),
    "0001": ("train", "BDEEFCEE"),
    "0002": ("val", "AGEEEFEE"),
    "0003": ("test", "HDEEEEEF"),
    "0004": ("val", "GHEEEEEE"),
}


def object_grid(blocks_spec: str, blocks: dict[str, np.ndarray]) -> np.ndarray:
    h = BASE // 2
    grid = np.zeros((BASE,) * 3, bool)
    n = 0
    for i in (0, h):
        for j in (0, h):
            for k in (0, h):
                grid[i : i + h, j : j + h, k : k + h] = blocks[blocks_spec[n]]
                n += 1
    return grid


def make_rays(grid: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Rays of one grid per the upstream recipe; distances from the exact tracer.

    Samples per view vary a little with ``seed`` (48, 51, 54, 57) so ray counts differ.
    """
    side = grid.shape[0]
    half = side / 2.0
    radius = 2.0 * half
    rng = np.random.default_rng(seed)
    elevations = np.linspace(0.1 * np.pi, 0.9 * np.pi, DIVISIONS)
    azimuths = np.linspace(0.0, 2.0 * np.pi, DIVISIONS, endpoint=False)
    per_face = (SAMPLES_PER_VIEW + 3 * (seed % 4)) // 3
    origins, directions, faces, views, cams = [], [], [], [], []
    view = 0
    for el in elevations:
        for az in azimuths:
            cam = radius * np.array([np.sin(el) * np.cos(az), np.sin(el) * np.sin(az), np.cos(el)])
            cams.append(cam)
            for f, normal in enumerate(_FACE_NORMALS):
                if normal @ cam >= 0:
                    continue
                axis = int(np.flatnonzero(normal)[0])
                p = rng.uniform(-half, half, size=(per_face, 3))
                p[:, axis] = normal[axis] * half
                d = cam - p
                d /= np.linalg.norm(d, axis=1, keepdims=True)
                origins.append(p)
                directions.append(d)
                faces.append(np.full(per_face, f))
                views.append(np.full(per_face, view))
            view += 1
    o = np.concatenate(origins).astype(np.float32)
    d = np.concatenate(directions).astype(np.float32)
    dist = trace(grid, o, d).astype(np.float32)
    return {
        "origins": o,
        "directions": d,
        "distances": dist,
        "hits": (dist > 0).astype(np.uint8),
        "face_ids": np.concatenate(faces).astype(np.int32),
        "view_ids": np.concatenate(views).astype(np.int32),
        "view_positions": np.asarray(cams, dtype=np.float32),
    }


def write_tiny_dataset(root: Path, max_level: int = 1) -> tuple[Path, Path]:
    """Write ``root/dataset`` and ``root/ray_dataset_hierarchical``; returns both paths."""
    root = Path(root)
    ds = root / "dataset"
    rays = root / "ray_dataset_hierarchical"
    blocks = _blocks()
    usage: dict[str, dict[str, str]] = {}
    unique: dict[tuple[int, str], np.ndarray] = {}
    trivial: set[str] = set()
    counts: dict[str, int] = {}
    total_per_level: dict[int, int] = {}
    object_splits = {oid: split for oid, (split, _) in OBJECTS.items()}

    for n_obj, (oid, (split, spec)) in enumerate(OBJECTS.items()):
        grid = object_grid(spec, blocks)
        odir = layout.object_dir(ds, oid)
        odir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(layout.level0_voxel_path(ds, oid), voxels=grid)
        occupied = int(grid.sum())
        layout.atomic_write_json(
            odir / "metadata.json",
            {
                "object_id": oid,
                "source_file": f"tiny:{oid}",
                "voxel_pitch": 1.0,
                "original_bbox_min": [-BASE / 2] * 3,
                "original_bbox_max": [BASE / 2] * 3,
                "original_bbox_extents": [float(BASE)] * 3,
                "num_occupied_voxels": occupied,
                "occupancy_ratio": occupied / grid.size,
                "source_hash": hashlib.sha256(f"tiny:{oid}".encode()).hexdigest(),
                "resolution": BASE,
            },
        )
        records = []
        parents = [(grid, (0, 0, 0))]
        for level in range(1, max_level + 1):
            h = BASE >> level
            children = []
            for parent, gpos in parents:
                octant = 0
                for i in (0, h):
                    for j in (0, h):
                        for k in (0, h):
                            sub = parent[i : i + h, j : j + h, k : k + h]
                            hh = grid_hash(sub)
                            records.append(
                                {
                                    "object_id": oid,
                                    "level": level,
                                    "octant_index": octant,
                                    "position_x": i,
                                    "position_y": j,
                                    "position_z": k,
                                    "global_position_x": gpos[0] + i,
                                    "global_position_y": gpos[1] + j,
                                    "global_position_z": gpos[2] + k,
                                    "hash": hh,
                                    "is_empty": not sub.any(),
                                }
                            )
                            usage.setdefault(hh, {})[oid] = split
                            unique.setdefault((level, hh), sub.copy())
                            counts[hh] = counts.get(hh, 0) + 1
                            total_per_level[level] = total_per_level.get(level, 0) + 1
                            if not sub.any():
                                trivial.add(hh)
                            children.append((sub, (gpos[0] + i, gpos[1] + j, gpos[2] + k)))
                            octant += 1
            parents = children
        layout.atomic_write_json(odir / "subdivision_map.json", records)
        _write_rays(rays, 0, oid, grid, seed=n_obj)

    for n, ((level, hh), sub) in enumerate(sorted(unique.items())):
        path = layout.subvolume_voxel_path(ds, level, hh)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, voxels=sub)
        _write_rays(rays, level, hh, sub, seed=100 + n)

    registry = metadata.registry(
        {
            hh: {
                "level": level,
                "count": counts[hh],
                "path": layout.subvolume_voxel_path(ds, level, hh).relative_to(ds).as_posix(),
                "is_empty": not sub.any(),
                "resolution": sub.shape[0],
            }
            for (level, hh), sub in sorted(unique.items())
        },
        total_per_level,
    )
    layout.atomic_write_json(ds / "registry.json", registry)
    meta = metadata.dataset_metadata(
        registry,
        base_resolution=BASE,
        min_resolution=BASE >> max_level,
        object_ids=list(OBJECTS),
        seed=0,
        created="2024-01-01T00:00:00",
    )
    layout.atomic_write_json(ds / "metadata.json", meta)
    levels_of = {hh: level for level, hh in unique}
    layout.atomic_write_json(
        ds / "splits.json",
        build_splits(object_splits, usage, levels_of, trivial, (0.4, 0.4, 0.2), seed=0),
    )
    layout.atomic_write_json(
        rays / "processing_summary.json",
        {
            "dataset_dir": "dataset",
            "output_dir": "ray_dataset_hierarchical",
            "sphere_divisions": DIVISIONS,
            "samples_per_view": SAMPLES_PER_VIEW,
            "adaptive_sampling": False,
            "min_samples": None,
            "samples_per_level": None,
            "total_subvolumes": len(OBJECTS) + len(unique),
            "processed": len(OBJECTS) + len(unique),
            "skipped_already_exists": 0,
            "skipped_empty": 0,
            "errors": 0,
            "min_level": 0,
            "max_level": None,
            "sampling_mode": "uniform",
        },
    )
    return ds, rays


def _write_rays(rays_root: Path, level: int, name: str, grid: np.ndarray, seed: int) -> None:
    path = layout.ray_path(rays_root, level, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = make_rays(grid, seed)
    np.savez_compressed(
        path,
        **arrays,
        grid_shape=np.array(grid.shape),
        voxel_size=np.float32(1.0),
        hash=np.array(name),
        level=np.int32(level),
        sampling_mode=np.array("uniform"),
    )


def blank_rays(n: int, views: int = 1) -> dict[str, np.ndarray]:
    """``n`` valid rays (origins at 0, straight up +z, no hits) over ``views`` views: the
    arrays of a ray file with the format's keys and dtypes, for tests that damage one key."""
    return {
        "origins": np.zeros((n, 3), np.float32),
        "directions": np.tile(np.float32([0, 0, 1]), (n, 1)),
        "distances": np.zeros(n, np.float32),
        "hits": np.zeros(n, np.uint8),
        "face_ids": np.zeros(n, np.int32),
        "view_ids": np.zeros(n, np.int32),
        "view_positions": np.zeros((views, 3), np.float32),
    }
