"""The object-folder check of ``gpuloader verify``: one unit per ``objects/object_<ID>/``.

:func:`check_object` reads the folder's metadata.json, its level_0.npz grid and its
subdivision_map.json records, checks every record's keys, level, hash, positions and octant,
and re-hashes the sub-volume each record names from the level-0 grid. It reports the
``(level, hash, is_empty)`` references the dataset-wide checks pair with files and splits.json.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from gpuloader.commands.verify.report import (
    FORMAT,
    HASH,
    MAP,
    MISSING,
    UNREADABLE,
    UnitResult,
    describe,
)
from gpuloader.format import layout
from gpuloader.format.grid_hash import grid_hash

__all__ = ["MAP_KEYS", "check_object"]

#: Keys of one subdivision_map.json record.
MAP_KEYS: tuple[str, ...] = layout.SUBDIVISION_RECORD_KEYS
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _aggregate(res: UnitResult, file: Path, issues: dict[str, list[int]], kind: str) -> None:
    """One problem per kind of record issue, with a count and the first record index."""
    for message, where in issues.items():
        res.add(file, f"{len(where)} record(s) {message} (first: record {where[0]})", kind)


def check_object(job: tuple[str, ...]) -> UnitResult:
    """Object folder: metadata.json, subdivision_map.json records, level_0.npz.

    ``job``: (dataset folder, object ID[, names of its files not to read: links out of the
    dataset, reported as such by the caller]). The payload holds ``object_id``, ``records`` (how
    many) and ``refs``, a list of ``(level, hash, all records empty)``.
    """
    dataset_dir, oid = Path(job[0]), job[1]
    refused = set(job[2]) if len(job) > 2 else set()
    res = UnitResult()
    odir = layout.object_dir(dataset_dir, oid)
    meta_path = odir / "metadata.json"
    map_path = odir / "subdivision_map.json"
    grid_path = layout.level0_voxel_path(dataset_dir, oid)
    res.payload = {"object_id": oid, "refs": [], "records": 0}

    if meta_path.name in refused:
        pass
    elif not meta_path.is_file():
        res.add(meta_path, "object metadata.json is missing; re-generate the object", MISSING)
    else:
        try:
            meta = layout.read_json(meta_path)
            if not isinstance(meta, dict):
                res.add(meta_path, "metadata.json is not a JSON object", FORMAT)
        except Exception as exc:
            res.add(meta_path, f"cannot parse JSON ({describe(exc)})", UNREADABLE)

    grid = None
    if grid_path.name in refused:
        pass
    elif not grid_path.is_file():
        res.add(grid_path, "level_0.npz is missing from the object folder", MISSING)
    else:
        try:
            with np.load(grid_path, allow_pickle=False) as f:
                if "voxels" in f.files:
                    grid = np.asarray(f["voxels"]).astype(bool)
        except Exception:
            pass  # reported by the file check of level_0.npz
        if grid is not None and (grid.ndim != 3 or len(set(grid.shape)) != 1):
            grid = None

    if map_path.name in refused:
        return res
    if not map_path.is_file():
        res.add(map_path, "subdivision_map.json is missing; re-generate the object", MISSING)
        return res
    try:
        records = layout.read_json(map_path)
    except Exception as exc:
        res.add(map_path, f"cannot parse JSON ({describe(exc)})", UNREADABLE)
        return res
    if not isinstance(records, list):
        res.add(map_path, "subdivision_map.json must be a JSON list of records", FORMAT)
        return res
    res.payload["records"] = len(records)
    res.counts["subdivision records"] += len(records)

    issues: dict[str, list[int]] = defaultdict(list)
    content: dict[str, list[int]] = defaultdict(list)
    per_level: Counter = Counter()
    refs: dict[tuple[int, str], bool] = {}
    for n, rec in enumerate(records):
        if not isinstance(rec, dict):
            issues["are not JSON objects"].append(n)
            continue
        missing = [k for k in MAP_KEYS if k not in rec]
        if missing:
            issues[f"lack key(s) {missing}"].append(n)
            continue
        level, h = rec["level"], rec["hash"]
        if not isinstance(level, int) or isinstance(level, bool) or level < 1:
            issues["have a level that is not an integer >= 1"].append(n)
            continue
        if not isinstance(h, str) or not _HEX64.match(h):
            issues["have a hash that is not a 64-digit lowercase hex SHA-256"].append(n)
            continue
        if layout.object_name(rec["object_id"]) != oid:
            issues[f"name another object_id than {oid}"].append(n)
        if not isinstance(rec["is_empty"], bool):
            issues["have a non-boolean is_empty"].append(n)
        per_level[level] += 1
        refs[(level, h)] = refs.get((level, h), True) and rec["is_empty"] is True
        pos = [rec[f"position_{a}"] for a in "xyz"]
        gpos = [rec[f"global_position_{a}"] for a in "xyz"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in pos + gpos):
            issues["have non-integer positions"].append(n)
            continue
        octant = rec["octant_index"]
        expected_octant = 4 * (pos[0] > 0) + 2 * (pos[1] > 0) + (pos[2] > 0)
        if octant != expected_octant:
            issues["have an octant_index that does not match position_x/y/z"].append(n)
        if grid is None:
            continue
        side = grid.shape[0] >> level
        if side < 1 or any(p not in (0, side) for p in pos):
            issues[f"have positions other than 0 or side (base >> level = {side})"].append(n)
            continue
        if any(g < 0 or g + side > grid.shape[0] or g % side for g in gpos):
            issues["have global positions outside the level-0 grid"].append(n)
            continue
        sub = grid[gpos[0] : gpos[0] + side, gpos[1] : gpos[1] + side, gpos[2] : gpos[2] + side]
        if grid_hash(sub) != h:
            content["have a hash that differs from the level-0 grid at their position"].append(n)
        if rec["is_empty"] is not (not sub.any()):
            content["have is_empty that disagrees with the level-0 grid"].append(n)
    _aggregate(res, map_path, issues, MAP)
    _aggregate(res, map_path, content, HASH)
    if per_level:
        top = max(per_level)
        wrong = {
            lv: per_level.get(lv, 0) for lv in range(1, top + 1) if per_level.get(lv, 0) != 8**lv
        }
        if wrong:
            res.add(
                map_path,
                "records per level should be 8**level (one per octant); got "
                + ", ".join(f"level {lv}: {c}" for lv, c in wrong.items()),
                MAP,
            )
    res.payload["refs"] = [(lv, h, empty) for (lv, h), empty in refs.items()]
    return res
