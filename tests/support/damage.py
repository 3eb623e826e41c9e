"""The damaged-file corpus: copies of the tiny dataset with one file of one train sample
damaged (:func:`damage`), each case with the named error it must raise (:data:`CASES`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from gpuloader.errors import (
    BadDirectionError,
    BadGridError,
    CorruptArchiveError,
    DamagedFileError,
    EmptyRayFileError,
    MissingKeyError,
    NonFiniteValueError,
    NotAnNpzError,
    PickledArrayError,
    UnreadableFileError,
)

ROOT = os.geteuid() == 0
#: damage -> (the file it damages, the error it must raise)
CASES: dict[str, tuple[str, type[DamagedFileError]]] = {
    "nan_distance": ("ray", NonFiniteValueError),
    "inf_distance": ("ray", NonFiniteValueError),
    "zero_direction": ("ray", BadDirectionError),
    "zero_rays": ("ray", EmptyRayFileError),
    "non_cubic_grid": ("voxel", BadGridError),
    "crc_damaged": ("ray", CorruptArchiveError),
    "voxel_not_zip": ("voxel", NotAnNpzError),
    "missing_distances": ("ray", MissingKeyError),
    "pickled_array": ("ray", PickledArrayError),
    "bare_npy_voxels": ("voxel", NotAnNpzError),
    "symlink_loop": ("ray", UnreadableFileError),
    "unreadable": ("ray", UnreadableFileError),
}
BAD_ROW = 3


def ray_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def damage(kind: str, sample: dict) -> Path:
    """Damage one file of ``sample`` in place (a copy of the data); returns the file."""
    ray, vox = Path(sample["ray_path"]), Path(sample["voxel_path"])
    if kind in ("nan_distance", "inf_distance", "zero_direction", "missing_distances"):
        a = ray_arrays(ray)
        if kind == "missing_distances":
            del a["distances"]
        elif kind == "zero_direction":
            a["directions"][BAD_ROW] = 0.0
        else:
            a["distances"][BAD_ROW] = np.nan if kind == "nan_distance" else np.inf
        np.savez_compressed(ray, **a)
        return ray
    if kind == "zero_rays":
        a = ray_arrays(ray)
        for k in ("origins", "directions", "distances", "hits", "face_ids", "view_ids"):
            a[k] = a[k][:0]
        np.savez_compressed(ray, **a)
        return ray
    if kind == "pickled_array":
        a = ray_arrays(ray)
        a["distances"] = np.array(list(a["distances"]), dtype=object)
        np.savez_compressed(ray, **a)
        return ray
    if kind == "crc_damaged":
        data = bytearray(ray.read_bytes())
        with np.load(ray) as z:  # flip bytes inside the compressed 'distances' member
            info = z.zip.getinfo("distances.npy")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
        for off in range(8, min(info.compress_size, 40)):
            data[start + off] ^= 0x5A
        ray.write_bytes(bytes(data))
        return ray
    if kind == "symlink_loop":
        ray.unlink()
        os.symlink(ray.name, ray)  # a link to itself
        return ray
    if kind == "unreadable":
        os.chmod(ray, 0)
        return ray
    if kind == "non_cubic_grid":
        g = ray_arrays(vox)["voxels"]
        np.savez_compressed(vox, voxels=g[:, :, : g.shape[2] // 2])
        return vox
    if kind == "voxel_not_zip":
        vox.write_bytes(b"this is not a zip archive\n")
        return vox
    if kind == "bare_npy_voxels":
        g = ray_arrays(vox)["voxels"]
        with open(vox, "wb") as f:
            np.save(f, g)
        return vox
    raise ValueError(kind)


def first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0]


def same_sample(a: dict, b: dict) -> bool:
    keys = set(a) - {"skipped_from", "skip_error"}
    return all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in keys
    )


# ------------------------------------------------------------------------------ raise
