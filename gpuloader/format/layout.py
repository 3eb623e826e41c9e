"""Paths and small file helpers of the on-disk format (shared/format.md).

Two roots: the voxel side (``dataset/``) and the ray side (``ray_dataset_hierarchical/``).
Every other module asks this one where a file lives, so the layout is written down once.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from gpuloader import schema

#: Keys of a ray file that carry one row per ray.
RAY_ROW_KEYS: tuple[str, ...] = schema.RAY_FIELDS
#: Scalar provenance keys of a ray file.
RAY_SCALAR_KEYS: tuple[str, ...] = ("grid_shape", "voxel_size", "hash", "level", "sampling_mode")
#: dtype of each per-ray key, as written upstream.
RAY_DTYPES: dict[str, np.dtype] = schema.DISK_DTYPES
#: Keys of one subdivision_map.json record (one per octant at every level).
SUBDIVISION_RECORD_KEYS: tuple[str, ...] = (
    "object_id",
    "level",
    "octant_index",
    "position_x",
    "position_y",
    "position_z",
    "global_position_x",
    "global_position_y",
    "global_position_z",
    "hash",
    "is_empty",
)
#: Face ids: 0 -x, 1 +x, 2 -y, 3 +y, 4 -z, 5 +z.
FACE_NAMES: tuple[str, ...] = ("-x", "+x", "-y", "+y", "-z", "+z")


def object_name(object_id: int | str) -> str:
    """Object ID as written in folder names: ``7 -> "0007"``."""
    return f"{int(object_id):04d}" if not isinstance(object_id, str) else object_id


def object_dir(dataset_dir: Path, object_id: int | str) -> Path:
    return Path(dataset_dir) / "objects" / f"object_{object_name(object_id)}"


def level0_voxel_path(dataset_dir: Path, object_id: int | str) -> Path:
    """``dataset/objects/object_<ID>/level_0.npz``."""
    return object_dir(dataset_dir, object_id) / "level_0.npz"


def subvolume_voxel_path(dataset_dir: Path, level: int, hash_: str) -> Path:
    """``dataset/subvolumes/level_<L>/<hh>/<hash>.npz`` (L >= 1)."""
    return Path(dataset_dir) / "subvolumes" / f"level_{level}" / hash_[:2] / f"{hash_}.npz"


def voxel_path(dataset_dir: Path, level: int, hash_: str) -> Path:
    """Voxel file of a sample; at level 0 ``hash_`` is the object ID (as upstream)."""
    if level == 0:
        return level0_voxel_path(dataset_dir, hash_)
    return subvolume_voxel_path(dataset_dir, level, hash_)


def ray_path(ray_dir: Path, level: int, hash_: str) -> Path:
    """``ray_dataset_hierarchical/level_<L>/<hh>/<hash or ID>_rays.npz``."""
    return Path(ray_dir) / f"level_{level}" / hash_[:2] / f"{hash_}_rays.npz"


def parse_ray_filename(path: Path) -> tuple[int, str]:
    """``.../level_3/ab/abcd..._rays.npz -> (3, "abcd...")``."""
    path = Path(path)
    level = int(path.parent.parent.name.split("_", 1)[1])
    return level, path.name[: -len("_rays.npz")]


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@functools.cache
def _file_mode() -> int:
    """The mode ``open()`` would give a new file (mkstemp alone gives 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_savez_compressed(path: Path, **arrays: Any) -> None:
    """``numpy.savez_compressed`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
