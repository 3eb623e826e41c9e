"""The statistics of ``gpuloader info``: one pass over a dataset's voxel and ray files.

:func:`dataset_info` gathers, per level, the voxel files' occupancy and the ray files' ray and
hit counts, then the per-split rows and the leakage (:mod:`gpuloader.commands.info.splits`).
Ray counts come from the .npy header of each ray file's 'origins' member, checked against its
zip entry (:func:`~gpuloader.format.listing.npz_member_header`: a forged count is a damaged
file); hit rates read only the 'hits' member, its declared size checked first.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gpuloader.commands.info.splits import leakage, per_split_rows, split_names
from gpuloader.errors import DamagedFileError, DatasetLayoutError
from gpuloader.format import layout
from gpuloader.format.listing import npz_member_header, read_json_checked
from gpuloader.format.npz_files import load_npz

__all__ = ["npy_member_shape", "dataset_info"]

_LEVEL_DIR = re.compile(r"^level_(\d+)$")


def _checked_splits(path: Path) -> dict[str, Any]:
    """``splits.json`` as a dict whose mapping keys are mappings, or DamagedFileError naming
    the file (not valid JSON, or JSON of another shape) and the fix."""
    doc = read_json_checked(path)
    wrong = None
    if not isinstance(doc, dict):
        wrong = f"not a JSON object (got {type(doc).__name__})"
    else:
        for key in ("object_splits", "hash_object_usage"):
            if doc.get(key) is not None and not isinstance(doc[key], dict):
                wrong = f"its {key!r} is not a JSON object (got {type(doc[key]).__name__})"
        if doc.get("trivial_hashes") is not None and not isinstance(doc["trivial_hashes"], list):
            wrong = "its 'trivial_hashes' is not a list"
    if wrong is not None:
        raise DamagedFileError(
            f"{path}: {wrong}; the file is damaged: regenerate it (`gpuloader verify` checks it)"
        )
    return doc


def npy_member_shape(zf: zipfile.ZipFile, member: str) -> tuple[int, ...]:
    """Shape of the array stored as ``member`` of an npz, from its .npy header only."""
    with zf.open(member) as fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _fortran, _dtype = np.lib.format.read_array_header_1_0(fp)
        else:  # 2.0 (and 3.0, whose header differs only in its text encoding)
            shape, _fortran, _dtype = np.lib.format.read_array_header_2_0(fp)
    return tuple(int(s) for s in shape)


def _level_files(
    root: Path, suffix: str, problems: list[tuple[str, BaseException]], what: str
) -> dict[int, list[Path]]:
    """``level -> files`` ``root/level_<L>/<hh>/<name><suffix>``; folders that cannot be
    listed and links out of ``root`` are appended to ``problems`` (``(path, error)``)."""
    out: dict[int, list[Path]] = {}
    if not root.is_dir():
        return out
    for top in root.iterdir():  # every level folder, even one whose files are all refused
        m = _LEVEL_DIR.match(top.name)
        if m and top.is_dir():
            out.setdefault(int(m.group(1)), [])
    try:
        found = layout.walk_level_tree(root, suffix, problems, what=what)
    except OSError as exc:  # the root itself cannot be listed
        problems.append((str(root), exc))
        return out
    for level, _, path in found:
        out.setdefault(level, []).append(path)
    return out


def _reason(path: str, exc: BaseException) -> str:
    """The first line of ``exc`` without the ``path: `` it starts with."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[len(path) + 2 :] if text.startswith(f"{path}: ") else text


def _missing_voxel_files(
    ds: Path, voxel_files: dict[int, list[Path]], ray_files: dict[int, list[Path]]
) -> list[tuple[str, BaseException]]:
    """``(voxel path, error)`` of each ray file whose voxel file is missing."""
    out: list[tuple[str, BaseException]] = []
    for lv, paths in ray_files.items():
        have = {_sample_name(p, lv) for p in voxel_files.get(lv, [])}
        for p in paths:
            name = _sample_name(p, lv)
            if name not in have:
                vpath = layout.voxel_path(ds, lv, name)
                out.append(
                    (str(vpath), DatasetLayoutError(f"voxel file missing (ray file {p} has none)"))
                )
    return out


def _sample_name(path: Path, level: int) -> str:
    """The sample a file belongs to: the object ID at level 0, else the sub-volume hash."""
    if path.name.endswith("_rays.npz"):
        return path.name[: -len("_rays.npz")]
    if level == 0:  # objects/object_<ID>/level_0.npz
        return path.parent.name[len("object_") :]
    return path.stem


def dataset_info(
    dataset_dir: str | Path, ray_dir: str | Path, progress: bool = False
) -> dict[str, Any]:
    """Per-split and per-level numbers of a dataset, JSON-ready.

    Keys: ``dataset_dir``, ``ray_dir``, ``num_objects``, ``objects_per_split``, ``levels`` (a
    list of dicts: level, side, sub_volumes (level 0: objects), ray_files, rays, hits,
    hit_rate, occupancy = mean occupied fraction over the level's voxel files), ``totals``,
    ``leakage`` (recounted per split pair, the matrix whose diagonal counts the non-trivial
    hashes each split uses, and what splits.json claims) and ``unreadable_files``.
    Raises DatasetLayoutError when splits.json or a root folder is missing.
    """
    ds, rays_root = Path(dataset_dir), Path(ray_dir)
    for root, arg in ((ds, "DATASET_DIR"), (rays_root, "RAY_DIR")):
        if not root.is_dir():
            raise DatasetLayoutError(f"{root} is not a folder; check the {arg} argument")
    splits_path = ds / "splits.json"
    if not splits_path.is_file():
        raise DatasetLayoutError(
            f"{splits_path} is missing; re-generate the dataset or run `gpuloader verify`"
        )
    splits = _checked_splits(splits_path)
    object_splits: dict[str, str] = {
        str(k): str(v) for k, v in (splits.get("object_splits") or {}).items()
    }
    objects_root = ds / "objects"
    objects = sorted(
        p.name[len("object_") :]
        for p in (objects_root.iterdir() if objects_root.is_dir() else [])
        if p.is_dir() and p.name.startswith("object_")
    )
    names = split_names(set(object_splits.values()))
    per_split = {s: 0 for s in names}
    for oid in objects:
        s = object_splits.get(oid, "unassigned")
        per_split[s] = per_split.get(s, 0) + 1

    # the readers' own walk: a folder that cannot be listed (a symlink loop) or a link out
    # of the root is a problem listed, not silence
    problems: list[tuple[str, BaseException]] = []
    voxel_files = _level_files(ds / "subvolumes", ".npz", problems, "voxel tree")
    voxel_files[0] = [layout.level0_voxel_path(ds, o) for o in objects]
    voxel_files[0] = [p for p in voxel_files[0] if p.is_file()]
    ray_files = _level_files(rays_root, "_rays.npz", problems, "ray tree")
    problems += _missing_voxel_files(ds, voxel_files, ray_files)
    levels = sorted(set(voxel_files) | set(ray_files))
    unreadable: list[str] = []
    total = sum(len(voxel_files.get(lv, [])) + len(ray_files.get(lv, [])) for lv in levels)
    bar = tqdm(total=total, desc="info", unit="file", disable=not progress)
    rows = []
    # per (level, name): voxel occupancy, and (rays, hits) of the ray file, for the split table
    file_occupancy: dict[tuple[int, str], float] = {}
    file_rays: dict[tuple[int, str], tuple[int, int]] = {}
    for lv in levels:
        occupancy, side = [], None
        for p in voxel_files.get(lv, []):
            try:
                with np.load(p, allow_pickle=False) as f:
                    grid = f["voxels"]
                occupancy.append(float(np.count_nonzero(grid)) / max(grid.size, 1))
                file_occupancy[(lv, _sample_name(p, lv))] = occupancy[-1]
                side = side or int(grid.shape[0])
            except Exception as exc:
                unreadable.append(str(p))
                problems.append((str(p), exc))
            bar.update()
        rays = hits = 0
        for p in ray_files.get(lv, []):
            try:
                # headers checked against the entry first: a forged count (10^12 rays) is a
                # damaged file, not a figure
                n = npz_member_header(p, "origins")[0][0]
                h = int(np.count_nonzero(load_npz(p, ("hits",))["hits"]))
                rays, hits = rays + n, hits + h
                file_rays[(lv, _sample_name(p, lv))] = (n, h)
            except Exception as exc:
                unreadable.append(str(p))
                problems.append((str(p), exc))
            bar.update()
        rows.append(
            {
                "level": lv,
                "side": side,
                "sub_volumes": len(voxel_files.get(lv, [])),
                "ray_files": len(ray_files.get(lv, [])),
                "rays": rays,
                "hits": hits,
                "hit_rate": hits / rays if rays else None,
                "occupancy": float(np.mean(occupancy)) if occupancy else None,
            }
        )
    bar.close()
    rays_total = sum(r["rays"] for r in rows)
    hits_total = sum(r["hits"] for r in rows)
    return {
        "dataset_dir": str(ds),
        "ray_dir": str(rays_root),
        "num_objects": len(objects),
        "objects_per_split": per_split,
        "levels": rows,
        "totals": {
            "sub_volumes": sum(r["sub_volumes"] for r in rows),
            "ray_files": sum(r["ray_files"] for r in rows),
            "rays": rays_total,
            "hits": hits_total,
            "hit_rate": hits_total / rays_total if rays_total else None,
        },
        "per_split": per_split_rows(
            splits, object_splits, per_split, levels, file_occupancy, file_rays
        ),
        "leakage": leakage(splits, names),
        "unreadable_files": sorted(unreadable),
        "problems": [{"file": f, "error": _reason(f, e)} for f, e in problems],
    }
