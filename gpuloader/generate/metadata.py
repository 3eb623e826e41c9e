"""The JSON files of a generated dataset, key for key as upstream's generator writes them.

Upstream (``tomgillooly/voxel-dataset-generator``) writes five kinds of JSON file; tools
written against it (its resume check, analysis and visualisation examples) read them:

* ``dataset/metadata.json`` (``MetadataWriter.write_dataset_metadata``): dataset facts,
  ``created_at``, ``deduplication_stats`` per level (``{level, unique, total, empty,
  deduplication_ratio}``, ratio = unique / total, ``empty`` = unique all-empty sub-volumes
  of the level) and ``overall_stats``.
* ``dataset/splits.json`` (``HierarchicalSplitter.save_split_assignments``): see
  :mod:`gpuloader.generate.splits`.
* ``dataset/registry.json`` (``SubvolumeRegistry.save_registry``): ``stats`` (overall and per
  level) and ``registry`` ``{hash: {level, count, path, is_empty, resolution}}`` for every
  unique sub-volume (levels >= 1).
* ``dataset/objects/object_<ID>/metadata.json`` (``write_object_metadata``): ``source_hash``
  and ``original_bbox_*`` included.
* ``ray_dataset_hierarchical/processing_summary.json`` (the ray tracer's summary).

We write every upstream key with upstream's meaning and keep a few extra keys of our own.
Deliberate differences, all so that the output is a pure function of the config:

* ``created_at`` is the only time stamp. It is the UTC time of the first run into the
  folder (a resumed run keeps it), or ``SOURCE_DATE_EPOCH`` when that environment variable
  is set (the reproducible-builds convention); it is not part of the config fingerprint.
* Paths are relative: registry ``path`` is relative to ``dataset/``; processing_summary's
  ``dataset_dir`` and ``output_dir`` are relative to the output folder (upstream writes the
  paths it was given, which are relative when run with its defaults).

``UPSTREAM_KEYS`` lists the keys each file must hold; ``gpuloader verify`` checks them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "UPSTREAM_KEYS",
    "UPSTREAM_NESTED_KEYS",
    "created_at",
    "dataset_metadata",
    "level_stats",
    "missing_keys",
    "processing_summary",
    "registry",
    "shape_bbox",
    "source_hash",
]

#: Top-level keys of each JSON file as upstream writes it (file name -> keys).
UPSTREAM_KEYS: dict[str, tuple[str, ...]] = {
    "metadata.json": (
        "dataset_name",
        "version",
        "created_at",
        "base_resolution",
        "min_resolution",
        "num_levels",
        "level_resolutions",
        "num_objects",
        "compression_enabled",
        "deduplication_stats",
        "overall_stats",
    ),
    "splits.json": ("config", "object_splits", "hash_object_usage", "trivial_hashes", "statistics"),
    "registry.json": ("stats", "registry"),
    "object metadata.json": (
        "object_id",
        "source_file",
        "voxel_pitch",
        "original_bbox_min",
        "original_bbox_max",
        "original_bbox_extents",
        "num_occupied_voxels",
        "occupancy_ratio",
        "source_hash",
    ),
    "processing_summary.json": (
        "dataset_dir",
        "output_dir",
        "sphere_divisions",
        "samples_per_view",
        "adaptive_sampling",
        "min_samples",
        "samples_per_level",
        "total_subvolumes",
        "processed",
        "skipped_already_exists",
        "skipped_empty",
        "errors",
        "min_level",
        "max_level",
    ),
}

#: Keys of nested objects with fixed keys: (file, dotted path) -> keys. ``*`` stands for
#: every entry of a mapping whose keys are data (levels, hashes).
UPSTREAM_NESTED_KEYS: dict[tuple[str, str], tuple[str, ...]] = {
    ("metadata.json", "deduplication_stats.*"): (
        "level",
        "unique",
        "total",
        "empty",
        "deduplication_ratio",
    ),
    ("metadata.json", "overall_stats"): (
        "total_subvolumes",
        "unique_subvolumes",
        "deduplication_ratio",
    ),
    ("splits.json", "config"): ("train_ratio", "val_ratio", "test_ratio", "seed"),
    ("splits.json", "statistics"): ("objects", "unique_nontrivial_hashes", "trivial_hashes"),
    ("splits.json", "statistics.objects"): ("train", "val", "test", "total"),
    ("splits.json", "statistics.unique_nontrivial_hashes"): ("total", "distribution"),
    ("splits.json", "statistics.unique_nontrivial_hashes.distribution"): (
        "only_train",
        "only_val",
        "only_test",
        "train_val",
        "train_test",
        "val_test",
        "all_splits",
        "trivial",
    ),
    ("splits.json", "statistics.trivial_hashes"): ("count",),
    ("registry.json", "stats"): (
        "total_subvolumes",
        "unique_subvolumes",
        "overall_deduplication_ratio",
        "levels",
        "level_stats",
    ),
    ("registry.json", "stats.level_stats.*"): (
        "level",
        "unique",
        "total",
        "empty",
        "deduplication_ratio",
    ),
    ("registry.json", "registry.*"): ("level", "count", "path", "is_empty", "resolution"),
}


def missing_keys(file: str, doc: Any, limit: int = 3) -> list[str]:
    """Dotted names of the upstream keys that ``doc`` (the parsed ``file``) lacks.

    ``file`` is a key of :data:`UPSTREAM_KEYS`. Mappings keyed by data (``*``) are checked
    entry by entry; at most ``limit`` faulty entries of each are named.
    """
    if not isinstance(doc, dict):
        return ["(the file is not a JSON object)"]
    out = [k for k in UPSTREAM_KEYS[file] if k not in doc]
    for (f, path), keys in UPSTREAM_NESTED_KEYS.items():
        if f != file:
            continue
        faulty = 0
        for where, node in _walk(doc, path.split(".")):
            if not isinstance(node, dict):
                continue  # absent parents are reported at their own level
            lacking = [f"{where}.{k}" for k in keys if k not in node]
            if lacking:
                faulty += 1
                if faulty <= limit:
                    out += lacking
        if faulty > limit:
            out.append(f"... ({faulty} entries of {path} lack keys)")
    return out


def _walk(node: Any, parts: Sequence[str], where: str = "") -> Iterable[tuple[str, Any]]:
    if not parts:
        yield where, node
        return
    if not isinstance(node, dict):
        return
    head, rest = parts[0], parts[1:]
    keys = list(node) if head == "*" else ([head] if head in node else [])
    for k in keys:
        yield from _walk(node[k], rest, f"{where}.{k}" if where else str(k))


# ---------------------------------------------------------------- values


def created_at(previous: Any = None) -> str:
    """ISO 8601 time stamp for ``created_at``.

    ``SOURCE_DATE_EPOCH`` (seconds since 1970, UTC) wins when set; else ``previous`` (the
    value of an earlier run into the same folder) when it is a string; else now, in UTC.
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            return datetime.fromtimestamp(int(epoch), tz=timezone.utc).isoformat()
        except (ValueError, OverflowError, OSError):
            pass
    if isinstance(previous, str) and previous:
        return previous
    return datetime.now(tz=timezone.utc).replace(microsecond=0).isoformat()


def source_hash(source_file: str, grid: np.ndarray | None = None) -> str:
    """SHA-256 hex digest that upstream's resume check compares.

    Meshes (``grid`` None): the digest of the path string, as upstream hashes ``mesh_path``.
    Procedural shapes: the digest of the level-0 grid's bytes followed by the source name,
    upstream's rule for objects made from arrays (vertex and face bytes, then the name).
    """
    h = hashlib.sha256()
    if grid is not None:
        h.update(np.ascontiguousarray(grid, dtype=bool).tobytes())
    h.update(str(source_file).encode("utf-8"))
    return h.hexdigest()


def shape_bbox(grid: np.ndarray) -> dict[str, list[float]]:
    """``original_bbox_min/max/extents`` (x, y, z) of a procedural shape's occupied voxels.

    In the shape's own coordinates, where the grid spans [-1, 1] on every axis (pitch 2 / n).
    """
    n = grid.shape[0]
    pitch = 2.0 / n
    occ = np.argwhere(grid)  # (z, y, x)
    if occ.size == 0:
        lo = hi = np.zeros(3)
    else:
        lo = -1.0 + pitch * occ.min(axis=0)[::-1].astype(np.float64)
        hi = -1.0 + pitch * (occ.max(axis=0)[::-1] + 1).astype(np.float64)
    return {
        "original_bbox_min": [float(v) for v in lo],
        "original_bbox_max": [float(v) for v in hi],
        "original_bbox_extents": [float(v) for v in hi - lo],
    }


def level_stats(level: int, unique: int, total: int, empty: int) -> dict[str, int | float]:
    """One ``deduplication_stats`` / ``level_stats`` entry (ratio = unique / total)."""
    return {
        "level": int(level),
        "unique": int(unique),
        "total": int(total),
        "empty": int(empty),
        "deduplication_ratio": unique / total if total else 0,
    }


def registry(
    entries: Mapping[str, Mapping[str, Any]], total_per_level: Mapping[int, int]
) -> dict[str, Any]:
    """``registry.json``.

    Args:
        entries: ``{hash: {level, count, path, is_empty, resolution}}`` in first-seen order.
        total_per_level: sub-volume occurrences (all objects) per level.
    """
    levels = sorted(total_per_level)
    per_level = {
        str(lv): level_stats(
            lv,
            sum(1 for e in entries.values() if e["level"] == lv),
            total_per_level[lv],
            sum(1 for e in entries.values() if e["level"] == lv and e["is_empty"]),
        )
        for lv in levels
    }
    total = sum(total_per_level.values())
    return {
        "stats": {
            "total_subvolumes": total,
            "unique_subvolumes": len(entries),
            "overall_deduplication_ratio": len(entries) / total if total else 0,
            "levels": levels,
            "level_stats": per_level,
        },
        "registry": {h: dict(e) for h, e in entries.items()},
    }


def dataset_metadata(
    registry_doc: Mapping[str, Any],
    *,
    base_resolution: int,
    min_resolution: int,
    object_ids: Sequence[str],
    seed: int,
    created: str,
) -> dict[str, Any]:
    """``dataset/metadata.json``: upstream's keys first, then our extras."""
    stats = registry_doc["stats"]
    resolutions = []
    r = base_resolution
    while r >= min_resolution:
        resolutions.append(r)
        r //= 2
    return {
        "dataset_name": "gpuloader_generated",
        "version": "1.0",
        "created_at": created,
        "base_resolution": base_resolution,
        "min_resolution": min_resolution,
        "num_levels": len(resolutions),
        "level_resolutions": resolutions,
        "num_objects": len(object_ids),
        "compression_enabled": True,
        "deduplication_stats": dict(stats["level_stats"]),
        "overall_stats": {
            "total_subvolumes": stats["total_subvolumes"],
            "unique_subvolumes": stats["unique_subvolumes"],
            "deduplication_ratio": stats["overall_deduplication_ratio"],
        },
        # extras
        "generator": "gpuloader",
        "object_ids": list(object_ids),
        "seed": seed,
    }


def processing_summary(
    *,
    dataset_dir: str | Path,
    output_dir: str | Path,
    divisions: int,
    samples_per_view: int,
    adaptive: bool,
    min_samples: int,
    samples_per_level: Mapping[int, int],
    total_subvolumes: int,
    processed: int,
    skipped_already_exists: int,
    skipped_empty: int,
    errors: int,
    min_level: int,
    max_level: int | None,
    extras: Mapping[str, Any],
) -> dict[str, Any]:
    """``processing_summary.json``: upstream's keys with its meaning, then ``extras``.

    As upstream, ``min_samples`` and ``samples_per_level`` are null without adaptive
    sampling; ``processed`` counts ray files written or found (``skipped_already_exists``
    of them were found), ``total_subvolumes`` every unique grid considered (level-0 objects
    included), ``skipped_empty`` the empty ones (no ray file).
    """
    return {
        "dataset_dir": str(dataset_dir),
        "output_dir": str(output_dir),
        "sphere_divisions": divisions,
        "samples_per_view": samples_per_view,
        "adaptive_sampling": adaptive,
        "min_samples": min_samples if adaptive else None,
        "samples_per_level": (
            {str(k): int(v) for k, v in sorted(samples_per_level.items())} if adaptive else None
        ),
        "total_subvolumes": total_subvolumes,
        "processed": processed,
        "skipped_already_exists": skipped_already_exists,
        "skipped_empty": skipped_empty,
        "errors": errors,
        "min_level": min_level,
        "max_level": max_level,
        **extras,
    }
