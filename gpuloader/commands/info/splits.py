"""The split side of ``gpuloader info``: split names, per-split rows and cross-split leakage.

:func:`per_split_rows` counts each sample in every split it belongs to, as the dataset decides
it (:func:`gpuloader.format.index.split_membership`); :func:`leakage` recounts the non-trivial
sub-volume hashes used by objects of two splits from splits.json's hash_object_usage and
trivial_hashes, and compares the recount with what its statistics claim.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from gpuloader.format.index import split_membership

__all__ = ["SPLIT_ORDER", "split_names", "leakage", "per_split_rows"]

SPLIT_ORDER: tuple[str, ...] = ("train", "val", "test")


def split_names(found: set[str]) -> list[str]:
    """The split names found, train/val/test first (in that order), then the others sorted."""
    return [s for s in SPLIT_ORDER if s in found] + sorted(found - set(SPLIT_ORDER))


def _claimed_pairs(statistics: Any) -> dict[str, int] | None:
    """splits.json's per-pair leak counts, keyed ``"a-b"``; None when it states none."""
    if not isinstance(statistics, dict):
        return None
    pairs = statistics.get("leaked_hashes_per_split_pair")
    if not isinstance(pairs, dict):
        return None
    return {str(k): int(v) for k, v in pairs.items() if isinstance(v, int | float)}


def leakage(splits: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Recount leaks from hash_object_usage + trivial_hashes; compare with the statistics.

    ``names``: the splits, in table order. Keys: ``pairs`` (``"a-b" -> leaked hashes``),
    ``claimed_pairs``, ``leaked_hashes``, ``claimed_leaked_hashes``, ``matches`` (None when
    splits.json states nothing), ``splits``, ``matrix`` (S x S list of ints, diagonal: the
    non-trivial hashes each split uses), ``non_trivial_hashes``, ``trivial_hashes``.
    """
    usage = splits.get("hash_object_usage") or {}
    trivial = {str(h) for h in splits.get("trivial_hashes") or []}
    index = {s: i for i, s in enumerate(names)}
    matrix = np.zeros((len(names), len(names)), dtype=np.int64)
    leaked = 0
    non_trivial = 0
    for h, users in usage.items():
        if h in trivial or not isinstance(users, dict):
            continue
        non_trivial += 1
        used_by = sorted({str(s) for s in users.values() if str(s) in index}, key=index.get)
        for s in used_by:
            matrix[index[s], index[s]] += 1
        if len(used_by) > 1:
            leaked += 1
        for a, b in itertools.combinations(used_by, 2):
            matrix[index[a], index[b]] += 1
            matrix[index[b], index[a]] += 1
    pairs = {
        f"{a}-{b}": int(matrix[index[a], index[b]]) for a, b in itertools.combinations(names, 2)
    }
    statistics = splits.get("statistics")
    claimed = _claimed_pairs(statistics)
    claimed_total = statistics.get("leaked_hashes") if isinstance(statistics, dict) else None
    matches = None
    if claimed is not None or isinstance(claimed_total, int):
        matches = True
        if claimed is not None:
            for a, b in itertools.combinations(names, 2):
                said = claimed.get(f"{a}-{b}", claimed.get(f"{b}-{a}"))
                if said is not None and said != pairs[f"{a}-{b}"]:
                    matches = False
        if isinstance(claimed_total, int) and claimed_total != leaked:
            matches = False
    return {
        "pairs": pairs,
        "claimed_pairs": claimed,
        "leaked_hashes": leaked,
        "claimed_leaked_hashes": claimed_total if isinstance(claimed_total, int) else None,
        "matches": matches,
        "splits": names,
        "matrix": matrix.tolist(),
        "non_trivial_hashes": non_trivial,
        "trivial_hashes": len(trivial),
    }


def per_split_rows(
    splits: dict[str, Any],
    object_splits: dict[str, str],
    objects_per_split: dict[str, int],
    levels: list[int],
    file_occupancy: dict[tuple[int, str], float],
    file_rays: dict[tuple[int, str], tuple[int, int]],
) -> list[dict[str, Any]]:
    """One row per split and level, then the split's ``level="all"`` row.

    A sample counts in every split it belongs to (as the dataset decides it: the splits of
    the objects that use it; a trivial sub-volume is in every split), so the splits' rows can
    add up to more than the per-level totals. Samples no split claims go to "unassigned".
    """
    usage = splits.get("hash_object_usage") or {}
    trivial = {str(h) for h in splits.get("trivial_hashes") or []}
    members: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for key in sorted(set(file_occupancy) | set(file_rays)):
        level, name = key
        owners = split_membership(name, level, object_splits, usage, trivial) or {"unassigned"}
        for s in owners:
            members.setdefault((s, level), []).append(key)
    names = split_names({s for s, _ in members} | set(objects_per_split))
    rows: list[dict[str, Any]] = []
    for s in names:
        total = {"sub_volumes": 0, "ray_files": 0, "rays": 0, "hits": 0, "occ": []}
        for level in levels:
            keys = members.get((s, level), [])
            occ = [file_occupancy[k] for k in keys if k in file_occupancy]
            counts = [file_rays[k] for k in keys if k in file_rays]
            row = {
                "split": s,
                "level": level,
                "sub_volumes": len(occ),
                "ray_files": len(counts),
                "rays": sum(n for n, _ in counts),
                "hits": sum(h for _, h in counts),
                "occupancy": float(np.mean(occ)) if occ else None,
            }
            row["hit_rate"] = row["hits"] / row["rays"] if row["rays"] else None
            if level == 0:
                row["objects"] = objects_per_split.get(s, 0)
            rows.append(row)
            for k in ("sub_volumes", "ray_files", "rays", "hits"):
                total[k] += row[k]
            total["occ"] += occ
        rows.append(
            {
                "split": s,
                "level": "all",
                "objects": objects_per_split.get(s, 0),
                "sub_volumes": total["sub_volumes"],
                "ray_files": total["ray_files"],
                "rays": total["rays"],
                "hits": total["hits"],
                "hit_rate": total["hits"] / total["rays"] if total["rays"] else None,
                "occupancy": None,
            }
        )
    return rows
