"""splits.json: object split assignment and sub-volume sharing bookkeeping.

Objects are shuffled with ``numpy.random.default_rng(seed)`` and cut into train, val, test
by the ratios (largest-remainder rounding; a split with a positive ratio gets at least one
object when there are enough objects). A non-trivial hash used by objects of two or more
splits is a leak between each pair of those splits; it is counted, not prevented (as upstream).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

SPLITS: tuple[str, ...] = ("train", "val", "test")


def split_counts(n: int, ratios: Sequence[float]) -> list[int]:
    """Objects per split for ``n`` objects and (train, val, test) ``ratios`` summing to 1.

    Largest-remainder rounding (a zero ratio gets no object); then every split with a
    positive ratio gets at least one object when ``n`` allows, taken from the largest split.
    """
    exact = [n * float(r) for r in ratios]
    counts = [int(np.floor(x)) for x in exact]
    by_remainder = sorted(range(3), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    positive = [i for i, r in enumerate(ratios) if r > 0]
    if n >= len(positive):
        for i in positive:
            if counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] += 1
    return counts


def assign_splits(object_ids: Sequence[str], ratios: Sequence[float], seed: int) -> dict[str, str]:
    """``{object ID: split}``, deterministic for (IDs, ratios, seed); keys in ID order."""
    ids = sorted(object_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    counts = split_counts(len(ids), ratios)
    bounds = np.cumsum([0, *counts])
    out: dict[str, str] = {}
    for s, name in enumerate(SPLITS):
        for pos in order[bounds[s] : bounds[s + 1]]:
            out[ids[int(pos)]] = name
    return dict(sorted(out.items()))


def build_splits(
    object_splits: Mapping[str, str],
    usage: Mapping[str, Iterable[str]],
    hash_levels: Mapping[str, int],
    trivial: Iterable[str],
    config: dict,
) -> dict:
    """The splits.json document.

    Args:
        object_splits: ``{object ID: split}``.
        usage: ``{hash: object IDs using it}`` for every sub-volume hash (levels >= 1).
        hash_levels: ``{hash: level}``.
        trivial: hashes of all-empty or all-full sub-volumes.
        config: ratios, seed ... (stored as given).
    """
    trivial_set = set(trivial)
    hash_object_usage = {
        h: {oid: object_splits[oid] for oid in sorted(set(ids))} for h, ids in sorted(usage.items())
    }
    pair_leaks = {f"{a}-{b}": 0 for a, b in itertools.combinations(SPLITS, 2)}
    leaked = 0
    for h, users in hash_object_usage.items():
        if h in trivial_set:
            continue
        used_by = sorted(set(users.values()), key=SPLITS.index)
        if len(used_by) > 1:
            leaked += 1
            for a, b in itertools.combinations(used_by, 2):
                pair_leaks[f"{a}-{b}"] += 1
    per_level: dict[str, int] = {}
    for h in hash_object_usage:
        key = str(hash_levels[h])
        per_level[key] = per_level.get(key, 0) + 1
    statistics = {
        "num_objects": len(object_splits),
        "objects_per_split": {s: sum(v == s for v in object_splits.values()) for s in SPLITS},
        "num_unique_hashes": len(hash_object_usage),
        "unique_hashes_per_level": dict(sorted(per_level.items(), key=lambda kv: int(kv[0]))),
        "num_trivial_hashes": len(trivial_set),
        "leaked_hashes": leaked,
        "leaked_hashes_per_split_pair": pair_leaks,
    }
    return {
        "object_splits": dict(object_splits),
        "hash_object_usage": hash_object_usage,
        "trivial_hashes": sorted(trivial_set),
        "config": config,
        "statistics": statistics,
    }
