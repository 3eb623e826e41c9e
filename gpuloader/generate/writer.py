"""Write the two roots of the format (shared/format.md) for a GeneratorConfig.

Order of work: check the output folder (resume or refuse), build every object grid, cut the
octrees, write the voxel side (object folders, unique sub-volumes, splits.json, registry.json,
metadata.json), then trace ray files in parallel over files, then write
processing_summary.json. The JSON files carry upstream's keys
(:mod:`gpuloader.generate.metadata`). A split left without objects is reported with an
:class:`EmptySplitWarning` and in the summary's ``empty_splits``.

Resume: ``OUT/generation_config.json`` holds the config identity. A run into a folder whose
identity matches keeps every .npz file that exists and passes its check (all writes go
through a temporary file and a rename, so a file is never half-written by this writer; what
else can happen to it is caught by :mod:`gpuloader.generate.resume`: a voxel file must hold
the grid, a ray file its recorded SHA-256 or else every reader's check), rewrites the ones
that fail (the summary's ``rewritten``) and rewrites the small JSON files. A different
identity, or a dataset without that file, is refused unless ``overwrite``; so is an OUT that
is itself a dataset root or a ray root (the generator would nest a dataset inside it).
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from gpuloader.errors import EmptySplitWarning, GenerationError
from gpuloader.format import layout
from gpuloader.generate import metadata, octree, rays, resume, shapes, splits
from gpuloader.generate.output import (  # noqa: F401 - part of this module's names
    DATASET_DIR,
    FORMAT_VERSION,
    MANIFEST,
    NPZ_COMPRESSLEVEL,
    RAY_DIR,
    manifest_matches,
    npz_bytes,
    prepare_output,
    refuse_a_root,
    save_npz,
)

if TYPE_CHECKING:
    from gpuloader.generate.config import GeneratorConfig


@dataclass
class SourceObject:
    """One level-0 object: ID, (S, S, S) bool grid and its metadata.json content."""

    object_id: str
    grid: np.ndarray
    meta: dict[str, Any]


# ---------------------------------------------------------------- objects


def build_objects(config: GeneratorConfig, progress: bool) -> list[SourceObject]:
    """Shape objects (cycled through ``config.shapes``) then one object per mesh."""
    from gpuloader.generate.meshes import voxelize_file

    n = config.resolution
    objs: list[SourceObject] = []
    count = config.num_shape_objects()
    for i in tqdm(range(count), desc="shapes", disable=not progress, leave=False):
        name = config.shapes[i % len(config.shapes)]
        variant = i >= len(config.shapes)
        rng = np.random.default_rng([config.seed, i])
        use_rng = rng if (variant or name in shapes.RANDOM_SHAPES) else None
        grid = shapes.make_shape(name, n, use_rng)
        occ = int(grid.sum())
        source = f"shape:{name}"
        meta = {
            "source_file": source,
            "voxel_pitch": 2.0 / n,  # shapes live in [-1, 1]^3
            **metadata.shape_bbox(grid),
            "num_occupied_voxels": occ,
            "occupancy_ratio": occ / grid.size,
            "source_hash": metadata.source_hash(source, grid),
            "shape": name,
            "variant": variant,
        }
        objs.append(SourceObject(layout.object_name(i), grid, meta))
    for j, path in enumerate(config.meshes):
        grid, vmeta = voxelize_file(path, n)
        source = str(Path(path).resolve())
        meta = {
            "source_file": source,
            **vmeta,
            "source_hash": metadata.source_hash(source),
            "shape": None,
        }
        objs.append(SourceObject(layout.object_name(count + j), grid, meta))
    for o in objs:
        if not o.grid.any():
            raise GenerationError(
                f"object {o.object_id} ({o.meta['source_file']}) is empty at resolution "
                f"{n}; use a higher --resolution"
            )
    return objs


# ---------------------------------------------------------------- ray jobs


#: What :func:`_ray_job` did with a file: found good, wrote it, or rewrote a bad one.
KEPT, WRITTEN, REWRITTEN = "kept", "written", "rewritten"


def _ray_job(job: tuple) -> tuple[int, str, int, int, str, resume.Record, str | None]:
    """Write one ray file, or keep an existing one that passes its check (else rewrite it).

    Returns (level, key, rays, hits, KEPT/WRITTEN/REWRITTEN, its record, why it was rewritten).
    """
    level, key, voxels, path, seed, divisions, spv, record = job
    path = Path(path)
    why = None
    if path.exists() or path.is_symlink():
        kept, why = resume.check_ray_file(path, level, key, record)
        if kept is not None:
            return level, key, kept[1], kept[2], KEPT, kept, None
    arrays = rays.make_ray_arrays(
        voxels, key, level, divisions, spv, rays.ray_rng(seed, level, key)
    )
    data = npz_bytes(**arrays)
    if path.is_symlink():
        path.unlink()  # replace the link, not its target
    layout.atomic_write_bytes(path, data)
    n, hits = int(arrays["hits"].size), int(arrays["hits"].sum())
    status = WRITTEN if why is None else REWRITTEN
    return level, key, n, hits, status, (resume.sha256_bytes(data), n, hits), why


def _ignore_sigint() -> None:
    """Pool initializer: Ctrl-C is the parent's to handle (it terminates the pool), so a
    worker prints no ``Process ForkPoolWorker-N`` traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_jobs(jobs: list[tuple], workers: int, progress: bool, results: list[tuple]) -> None:
    """Run every job, appending each result to ``results`` as it comes (an interrupted run
    leaves the finished ones there)."""
    bar = dict(total=len(jobs), desc="ray files", unit="file", disable=not progress)
    if workers <= 1 or len(jobs) <= 1:
        for j in tqdm(jobs, **bar):
            results.append(_ray_job(j))
        return
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    ctx = mp.get_context(method)
    with ctx.Pool(min(workers, len(jobs)), initializer=_ignore_sigint) as pool:
        chunk = max(1, min(16, len(jobs) // (workers * 8)))
        for r in tqdm(pool.imap_unordered(_ray_job, jobs, chunksize=chunk), **bar):
            results.append(r)


# ---------------------------------------------------------------- main

#: The face rule :func:`gpuloader.generate.rays.faces_for_view` applies, in words.
FACE_RULE = (
    "a face of the grid's box is used for a view when dot(outward normal, camera position) < 0 "
    "(its normal points away from the camera; the grid is centred on the origin), as "
    "upstream's dot(normal, -camera / |camera|) > 0; each used face gets "
    "samples_per_view // 3 uniform points, and each ray runs from its point toward the camera"
)


def _previous_created_at(path: Path) -> str | None:
    """``created_at`` of an earlier run's dataset/metadata.json, if readable."""
    try:
        doc = layout.read_json(path)
    except (OSError, ValueError):
        return None
    value = doc.get("created_at") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


def write_dataset(out: Path, config: GeneratorConfig, progress: bool = True) -> dict[str, Any]:
    """Write both roots under ``out``; see the module doc. Returns a summary dict."""
    start = time.perf_counter()
    identity = config.identity()
    refuse_a_root(out)
    objs = build_objects(config, progress)  # bad meshes fail before the folder is touched
    resumed = prepare_output(out, identity, config.overwrite)
    ds, rd = out / DATASET_DIR, out / RAY_DIR
    n_levels = octree.num_levels(config.resolution, config.min_resolution)

    # Octrees and the registry of unique sub-volumes (levels >= 1, first-seen order).
    unique: dict[tuple[int, str], np.ndarray] = {}
    entries: dict[str, dict[str, Any]] = {}
    usage: dict[str, set[str]] = defaultdict(set)
    hash_level: dict[str, int] = {}
    total_per_level: dict[int, int] = defaultdict(int)
    written = skipped = 0
    rewritten: list[dict[str, str]] = []

    def save_new(path: Path, voxels: np.ndarray) -> None:
        """Write a voxel file, or keep the existing one when it holds ``voxels``."""
        nonlocal written, skipped
        data = npz_bytes(voxels=voxels)
        if path.exists() or path.is_symlink():
            why = resume.check_voxel_file(path, voxels, data)
            if why is None:
                skipped += 1
                return
            rewritten.append({"file": str(path), "reason": why})
            if path.is_symlink():
                path.unlink()
        layout.atomic_write_bytes(path, data)
        written += 1

    for obj in tqdm(objs, desc="objects", disable=not progress):
        sub = octree.subdivide(obj.grid, obj.object_id, config.min_resolution)
        for rec in sub.records:
            h = rec["hash"]
            usage[h].add(obj.object_id)
            hash_level[h] = rec["level"]
            total_per_level[rec["level"]] += 1
            if h in entries:
                entries[h]["count"] += 1
            else:
                path = layout.subvolume_voxel_path(ds, rec["level"], h)
                entries[h] = {
                    "level": rec["level"],
                    "count": 1,
                    "path": path.relative_to(ds).as_posix(),
                    "is_empty": rec["is_empty"],
                    "resolution": config.resolution >> rec["level"],
                }
        for key, grid in sub.grids.items():
            if key not in unique:
                unique[key] = grid
                save_new(layout.subvolume_voxel_path(ds, key[0], key[1]), voxels=grid)
        odir = layout.object_dir(ds, obj.object_id)
        save_new(layout.level0_voxel_path(ds, obj.object_id), voxels=obj.grid)
        layout.atomic_write_json(odir / "subdivision_map.json", sub.records)
        layout.atomic_write_json(
            odir / "metadata.json",
            {
                "object_id": obj.object_id,
                **obj.meta,
                "resolution": config.resolution,
                "num_levels": n_levels,
                "num_subvolumes": len(sub.records),
                "num_unique_subvolumes": len(sub.grids),
            },
        )

    # As upstream's pipeline: trivial = all-empty (an all-full grid is an ordinary sample).
    trivial = sorted(h for (_, h), g in unique.items() if not g.any())
    object_splits = splits.assign_splits([o.object_id for o in objs], config.split, config.seed)
    split_doc = splits.build_splits(
        object_splits, usage, hash_level, trivial, identity["split"], config.seed
    )
    layout.atomic_write_json(ds / "splits.json", split_doc)
    registry_doc = metadata.registry(entries, total_per_level)
    layout.atomic_write_json(ds / "registry.json", registry_doc)
    previous = _previous_created_at(ds / "metadata.json") if resumed else None
    layout.atomic_write_json(
        ds / "metadata.json",
        metadata.dataset_metadata(
            registry_doc,
            base_resolution=config.resolution,
            min_resolution=config.min_resolution,
            object_ids=[o.object_id for o in objs],
            seed=config.seed,
            created=metadata.created_at(previous),
        ),
    )
    unique_per_level: dict[int, int] = defaultdict(int)
    for level, _ in unique:
        unique_per_level[level] += 1

    # Ray files: one per object (level 0) and per non-empty unique sub-volume.
    def spv(level: int) -> int:
        return rays.samples_for_level(
            config.samples_per_view, level, config.adaptive, config.min_samples_per_view
        )

    base = (config.seed, config.divisions)
    records = resume.load_records(out) if resumed else {}

    def job(level: int, key: str, grid: np.ndarray) -> tuple:
        path = layout.ray_path(rd, level, key)
        record = records.get(path.relative_to(out).as_posix())
        return (level, key, grid, str(path), *base, spv(level), record)

    jobs = [job(0, o.object_id, o.grid) for o in objs]
    n_empty = 0
    for (level, h), grid in sorted(unique.items()):
        if grid.any():
            jobs.append(job(level, h, grid))
        else:
            n_empty += 1
    results: list[tuple] = []
    try:
        _run_jobs(jobs, config.resolved_workers(), progress, results)
    finally:  # also after Ctrl-C: the files finished so far need no full check next time
        for level, key, *_, record, _why in results:
            records[layout.ray_path(rd, level, key).relative_to(out).as_posix()] = record
        resume.save_records(out, records)
    results.sort(key=lambda r: (r[0], r[1]))

    levels = list(range(n_levels))
    files = {lv: 0 for lv in levels}
    n_rays = {lv: 0 for lv in levels}
    n_hits = {lv: 0 for lv in levels}
    rays_found = 0
    for level, key, nr, nh, status, _record, why in results:
        files[level] += 1
        n_rays[level] += nr
        n_hits[level] += nh
        rays_found += status == KEPT
        if status == REWRITTEN:
            rewritten.append({"file": str(layout.ray_path(rd, level, key)), "reason": str(why)})
    skipped += rays_found
    written += len(results) - rays_found
    total_rays, total_hits = sum(n_rays.values()), sum(n_hits.values())
    layout.atomic_write_json(
        rd / "processing_summary.json",
        metadata.processing_summary(
            dataset_dir=DATASET_DIR,
            output_dir=RAY_DIR,
            divisions=config.divisions,
            samples_per_view=config.samples_per_view,
            adaptive=config.adaptive,
            min_samples=config.min_samples_per_view,
            samples_per_level={lv: spv(lv) for lv in levels},
            total_subvolumes=len(objs) + len(unique),
            processed=len(results),
            skipped_already_exists=rays_found,
            skipped_empty=n_empty,
            errors=0,
            min_level=0,
            max_level=None,
            extras={
                "generator": "gpuloader",
                "paths_relative_to": "the folder that holds dataset/ and this folder",
                "sampling_mode": rays.SAMPLING_MODE,
                "num_views": config.divisions**2,
                "samples_per_view_per_level": {str(lv): spv(lv) for lv in levels},
                "camera_radius": "2 x half the largest extent of each grid",
                "face_rule": FACE_RULE,
                "skip_empty": True,
                "voxel_size": 1.0,
                "seed": config.seed,
                "num_objects": len(objs),
                "levels": levels,
                "num_ray_files": len(results),
                "ray_files_per_level": {str(lv): files[lv] for lv in levels},
                "rays_per_level": {str(lv): n_rays[lv] for lv in levels},
                "hits_per_level": {str(lv): n_hits[lv] for lv in levels},
                "total_rays": total_rays,
                "total_hits": total_hits,
                "hit_rate": total_hits / total_rays if total_rays else 0.0,
            },
        ),
    )
    empty_splits = splits.empty_split_warnings(object_splits, identity["split"])
    for message in empty_splits:
        warnings.warn(message, EmptySplitWarning, stacklevel=3)
    return {
        "out_dir": str(out),
        "dataset_dir": str(ds),
        "ray_dir": str(rd),
        "num_objects": len(objs),
        "object_splits": object_splits,
        "unique_subvolumes_per_level": {lv: unique_per_level.get(lv, 0) for lv in levels[1:]},
        "ray_files_per_level": files,
        "num_ray_files": len(results),
        "total_rays": total_rays,
        "total_hits": total_hits,
        "leaked_hashes": split_doc["statistics"]["leaked_hashes"],
        "empty_splits": empty_splits,
        "resumed": resumed,
        "files_written": written,
        "files_skipped": skipped,
        "rewritten": rewritten,
        "seconds": time.perf_counter() - start,
    }
