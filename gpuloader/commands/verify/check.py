"""``verify_dataset``: every check of ``gpuloader verify`` over both roots of a dataset.

In order: the top-level JSON files and their upstream keys; the object folders with their
subdivision maps (one unit each); the voxel and ray files found under the two roots and those
the maps name, paired per sample and checked with a fraction of their rays re-traced (one unit
each); then splits.json against all of the above. Units run in this process or a pool; the
problems are sorted by kind, file and message, so the report does not depend on the workers.
"""

from __future__ import annotations

import os
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
    OUTSIDE,
    PAIRING,
    UNREADABLE,
    Problem,
    VerifyReport,
    examples,
    merge,
)
from gpuloader.commands.verify.tree import check_metadata_keys, check_splits, read_json
from gpuloader.commands.verify.units import run_units
from gpuloader.errors import OutsideRootError
from gpuloader.format import layout

__all__ = ["verify_dataset"]


def _present(path: Path) -> bool:
    """A file, or a link that may be one (a symlink loop is checked, and named, not skipped)."""
    return path.is_file() or path.is_symlink()


class _Refused:
    """Paths verify does not read: links out of a root and folders it cannot list (each
    reported once, by path)."""

    def __init__(self, report: VerifyReport, ds: Path, rays_root: Path) -> None:
        self.report = report
        self.paths: set[str] = set()
        self.guards = {
            "dataset": layout.RootGuard(ds, "dataset"),
            "rays": layout.RootGuard(rays_root, "ray tree"),
        }

    def add(self, path: str, exc: BaseException) -> None:
        """Report a refused path: OUTSIDE for a link out of its root, else UNREADABLE."""
        if path in self.paths:
            return
        self.paths.add(path)
        kind = OUTSIDE if isinstance(exc, OutsideRootError) else UNREADABLE
        detail = getattr(exc, "detail", None) or str(exc)
        if kind == OUTSIDE:
            detail += "; not read (copy the file into the dataset instead of linking it)"
        else:
            detail += "; the files under it are not checked"
        self.report.problems.append(Problem(path, detail, kind))

    def outside(self, path: Path, side: str) -> bool:
        """Whether ``path`` (of the ``"dataset"`` or ``"rays"`` side) leads out (reported)."""
        if str(path) in self.paths:
            return True
        guard = self.guards[side]
        target = guard.outside(path)
        if target is None:
            return False
        self.add(str(path), guard.error(path, target))
        return True


def _scan(root: Path, suffix: str, refused: _Refused, what: str) -> dict[tuple[int, str], Path]:
    """``(level, name) -> path`` of files ``level_<L>/<hh>/<name><suffix>`` under root
    (refused folders and links out of the root reported, not listed)."""
    out: dict[tuple[int, str], Path] = {}
    if not root.is_dir():
        return out
    errors: list[tuple[str, BaseException]] = []
    try:
        found = layout.walk_level_tree(root, suffix, errors, what=what)
    except OSError as exc:  # the root itself cannot be listed
        refused.add(str(root), exc)
        return out
    for path, exc in errors:
        refused.add(path, exc)
    for level, name, p in found:
        if _present(p):
            out[(level, name)] = p
    return out


def _object_ids(objects_root: Path, refused: _Refused) -> list[str]:
    """IDs of the ``object_<ID>/`` folders (loops and links out of the root reported)."""
    if not objects_root.is_dir():
        return []
    out = []
    with os.scandir(objects_root) as entries:
        for e in entries:
            if not e.name.startswith("object_"):
                continue
            try:
                if not e.is_dir():
                    continue
            except OSError as exc:  # a symlink loop
                refused.add(e.path, layout.folder_error(e.path, exc))
                continue
            if not refused.outside(Path(e.path), "dataset"):
                out.append(e.name[len("object_") :])
    return sorted(out)


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

    refused = _Refused(report, ds, rays_root)

    def top(path: Path, what: str, side: str = "dataset") -> Any:
        return None if refused.outside(path, side) else read_json(report, path, what)

    meta = top(ds / "metadata.json", "dataset metadata.json")
    splits = top(ds / "splits.json", "splits.json")
    summary = top(rays_root / "processing_summary.json", "processing_summary.json", "rays")
    registry = top(ds / "registry.json", "registry.json")
    check_metadata_keys(report, ds, rays_root, meta, splits, summary, registry)
    base = meta.get("base_resolution") if isinstance(meta, dict) else None
    if not isinstance(base, int) or isinstance(base, bool) or base < 1:
        base = None

    objects = _object_ids(ds / "objects", refused)
    report.counts["objects"] = len(objects)

    # 1. object folders and their subdivision maps (files linked out of the root not read)
    refs: dict[tuple[int, str], tuple[bool, set[str]]] = {}
    jobs = []
    for oid in objects:
        odir = layout.object_dir(ds, oid)
        names = ("metadata.json", "subdivision_map.json", "level_0.npz")
        out = tuple(n for n in names if refused.outside(odir / n, "dataset"))
        jobs.append((str(ds), oid, out))
    for res in run_units(check_object, jobs, [1] * len(jobs), workers, "objects", progress):
        merge(report, res)
        oid = res.payload["object_id"]
        for level, h, empty in res.payload["refs"]:
            old_empty, users = refs.get((level, h), (True, set()))
            refs[(level, h)] = (old_empty and empty, users | {oid})

    if base is None:  # infer the base resolution from the level-0 grids' most common side
        sides: Counter = Counter()
        for oid in objects[:64]:
            if str(layout.level0_voxel_path(ds, oid)) in refused.paths:
                continue
            try:
                with np.load(layout.level0_voxel_path(ds, oid)) as f:
                    sides[f["voxels"].shape[0]] += 1
            except Exception:
                pass
        base = sides.most_common(1)[0][0] if sides else None

    # 2. voxel and ray files, paired per sample
    voxel_files = _scan(ds / "subvolumes", ".npz", refused, "dataset")
    ray_files = _scan(rays_root, "_rays.npz", refused, "ray tree")
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
        v_out, r_out = refused.outside(vpath, "dataset"), refused.outside(rpath, "rays")
        v_ok, r_ok = _present(vpath) and not v_out, _present(rpath) and not r_out
        ref = refs.get((level, name))
        if v_out:  # reported as outside; its ray file is checked alone
            pass
        elif not v_ok:
            if ref is not None:
                report.problems.append(
                    Problem(
                        str(vpath),
                        f"sub-volume used by subdivision_map.json of object(s) "
                        f"{examples(sorted(ref[1]))} is missing",
                        MISSING,
                    )
                )
            if r_ok or r_out:
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
                "ray_refused": r_out,
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
