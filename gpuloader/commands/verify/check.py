"""``verify_dataset``: every check of ``gpuloader verify`` over both roots of a dataset.

In order: the top-level JSON files and their upstream keys; the object folders with their
subdivision maps (one unit each); the voxel and ray files found under the two roots and those
the maps name, paired per sample and checked with a fraction of their rays re-traced (one unit
each); then splits.json against all of the above. Units run in this process or a pool; the
problems are sorted by kind, file and message, so the report does not depend on the workers.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from gpuloader.commands.verify.files import check_sample
from gpuloader.commands.verify.objects import check_object
from gpuloader.commands.verify.report import (
    KINDS,
    MISPLACED,
    MISSING,
    PAIRING,
    Problem,
    VerifyReport,
    examples,
    merge,
)
from gpuloader.commands.verify.tree import check_metadata_keys, check_splits, read_json
from gpuloader.commands.verify.units import run_units
from gpuloader.format import layout

__all__ = ["verify_dataset"]

_LEVEL_DIR = re.compile(r"^level_(\d+)$")


def _present(path: Path) -> bool:
    """A file, or a link that may be one (a symlink loop is checked, and named, not skipped)."""
    return path.is_file() or path.is_symlink()


def _scan(root: Path, pattern: str) -> dict[tuple[int, str], Path]:
    """``(level, name) -> path`` of files matching ``level_<L>/<hh>/<pattern>`` under root."""
    out: dict[tuple[int, str], Path] = {}
    if not root.is_dir():
        return out
    for level_dir in sorted(root.iterdir()):
        m = _LEVEL_DIR.match(level_dir.name)
        if not m or not level_dir.is_dir():
            continue
        for p in sorted(level_dir.glob(f"*/{pattern}")):
            if _present(p) and not p.name.startswith("."):
                name = p.name[: -len(pattern) + 1]
                out[(int(m.group(1)), name)] = p
    return out


def verify_dataset(
    dataset_dir: str | Path,
    ray_dir: str | Path,
    fraction: float = 0.01,
    seed: int = 0,
    progress: bool = True,
    workers: int = 1,
) -> VerifyReport:
    """Check both roots of a dataset; re-trace ``fraction`` of each ray file's rays.

    Every check runs on every file; the report lists all problems found. ``workers > 1``
    checks files in a process pool. The rays re-traced are a pure function of ``seed`` and
    the file's path under the ray root.
    """
    if not (0.0 <= fraction <= 1.0):
        raise ValueError(f"fraction must be in [0, 1]; got {fraction}")
    ds, rays_root = Path(dataset_dir), Path(ray_dir)
    report = VerifyReport(str(ds), str(rays_root), fraction=fraction, seed=seed)
    report.counts = dict.fromkeys(
        ("objects", "subdivision records", "unique sub-volumes", "voxel files", "ray files"), 0
    )
    report.counts.update(rays=0, hits=0)
    for root, what in ((ds, "dataset folder (DATASET_DIR)"), (rays_root, "ray folder (RAY_DIR)")):
        if root.exists() and not root.is_dir():
            report.problems.append(Problem(str(root), f"{what} is not a folder", MISSING))
        elif not root.is_dir():
            report.problems.append(Problem(str(root), f"{what} does not exist", MISSING))

    meta = read_json(report, ds / "metadata.json", "dataset metadata.json")
    splits = read_json(report, ds / "splits.json", "splits.json")
    summary = read_json(report, rays_root / "processing_summary.json", "processing_summary.json")
    registry = read_json(report, ds / "registry.json", "registry.json")
    check_metadata_keys(report, ds, rays_root, meta, splits, summary, registry)
    base = meta.get("base_resolution") if isinstance(meta, dict) else None
    if not isinstance(base, int) or isinstance(base, bool) or base < 1:
        base = None

    objects_root = ds / "objects"
    objects = sorted(
        p.name[len("object_") :]
        for p in (objects_root.iterdir() if objects_root.is_dir() else [])
        if p.is_dir() and p.name.startswith("object_")
    )
    report.counts["objects"] = len(objects)

    # 1. object folders and their subdivision maps
    refs: dict[tuple[int, str], tuple[bool, set[str]]] = {}
    jobs = [(str(ds), oid) for oid in objects]
    for res in run_units(check_object, jobs, [1] * len(jobs), workers, "objects", progress):
        merge(report, res)
        oid = res.payload["object_id"]
        for level, h, empty in res.payload["refs"]:
            old_empty, users = refs.get((level, h), (True, set()))
            refs[(level, h)] = (old_empty and empty, users | {oid})

    if base is None:  # infer the base resolution from the level-0 grids' most common side
        sides: Counter = Counter()
        for oid in objects[:64]:
            try:
                with np.load(layout.level0_voxel_path(ds, oid)) as f:
                    sides[f["voxels"].shape[0]] += 1
            except Exception:
                pass
        base = sides.most_common(1)[0][0] if sides else None

    # 2. voxel and ray files, paired per sample
    voxel_files = _scan(ds / "subvolumes", "*.npz")
    ray_files = _scan(rays_root, "*_rays.npz")
    for found in (voxel_files, ray_files):
        for (_level, name), p in found.items():
            if p.parent.name != name[:2]:
                report.problems.append(
                    Problem(
                        str(p),
                        f"file should be in folder {name[:2]}/, not {p.parent.name}/",
                        MISPLACED,
                    )
                )
    keys = set(refs) | {(0, o) for o in objects} | set(voxel_files) | set(ray_files)
    sample_jobs: list[dict[str, Any]] = []
    for level, name in sorted(keys):
        vpath = layout.voxel_path(ds, level, name)
        rpath = layout.ray_path(rays_root, level, name)
        v_ok, r_ok = _present(vpath), _present(rpath)
        ref = refs.get((level, name))
        if not v_ok:
            if ref is not None:
                report.problems.append(
                    Problem(
                        str(vpath),
                        f"sub-volume used by subdivision_map.json of object(s) "
                        f"{examples(sorted(ref[1]))} is missing",
                        MISSING,
                    )
                )
            if r_ok:
                report.problems.append(
                    Problem(str(rpath), f"ray file has no voxel file (expected {vpath})", PAIRING)
                )
        elif level >= 1 and ref is None:
            report.warnings.append(
                Problem(str(vpath), "sub-volume file is used by no subdivision_map record")
            )
        if not v_ok and not r_ok:
            continue
        sample_jobs.append(
            {
                "level": level,
                "name": name,
                "key": f"level_{level}/{name}",
                "voxel": str(vpath) if v_ok else None,
                "ray": str(rpath) if r_ok else None,
                "ray_expected": str(rpath),
                "side": (base >> level) if base is not None else None,
                "map_empty": ref[0] if ref is not None else None,
                "fraction": fraction,
                "seed": seed,
            }
        )
    weights = [int(j["voxel"] is not None) + int(j["ray"] is not None) for j in sample_jobs]
    trivial: dict[str, bool] = {}
    for res in run_units(check_sample, sample_jobs, weights, workers, "files", progress):
        merge(report, res)
        p = res.payload
        if p.get("level", 0) >= 1:  # a unit that crashed has no payload
            if p["trivial"] is not None:
                trivial[p["name"]] = p["trivial"]
    for (_level, h), (empty, _users) in refs.items():
        if empty and h not in trivial:
            trivial[h] = True
    report.counts["unique sub-volumes"] = len(refs)

    # 3. splits.json against everything above
    if splits is not None:
        check_splits(report, ds / "splits.json", splits, objects, refs, trivial)

    order = {k: i for i, k in enumerate(KINDS)}
    report.problems.sort(key=lambda p: (order.get(p.kind, len(order)), p.file, p.message))
    report.warnings.sort(key=lambda p: (p.file, p.message))
    return report
