"""splits.json: object split assignment and sub-volume sharing bookkeeping.

Objects are shuffled with ``numpy.random.default_rng(seed)`` and cut into train, val, test
by the ratios (largest-remainder rounding; every split with a positive ratio gets at least
one object when there are at least as many objects as such splits: with 3 or more objects
and non-zero ratios, no split is empty). ``empty_split_warnings`` names any split left
empty and why. Trivial hashes are the all-empty sub-volumes only, as upstream's pipeline
writes them (its splitter would also count all-full ones, but the pipeline approximates
triviality with ``is_empty``); an all-full sub-volume is an ordinary sample. A non-trivial
hash used by objects of two or more splits is a leak between each pair of those splits; it
is counted, not prevented (as upstream).
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
    ratios: Sequence[float],
    seed: int,
) -> dict:
    """The splits.json document, keys as upstream's ``save_split_assignments`` writes them.

    Args:
        object_splits: ``{object ID: split}``.
        usage: ``{hash: object IDs using it}`` for every sub-volume hash (levels >= 1).
        hash_levels: ``{hash: level}``.
        trivial: hashes of all-empty sub-volumes (upstream's pipeline lists only those; an
            all-full sub-volume is an ordinary sample).
        ratios: (train, val, test) ratios.
        seed: the split seed.

    ``statistics`` holds upstream's ``objects``, ``unique_nontrivial_hashes`` (with the
    distribution of hashes over split combinations) and ``trivial_hashes``, then our extras:
    ``leaked_hashes``, ``leaked_hashes_per_split_pair``, ``unique_hashes_per_level``.
    """
    trivial_set = set(trivial)
    hash_object_usage = {
        h: {oid: object_splits[oid] for oid in sorted(set(ids))} for h, ids in sorted(usage.items())
    }
    pair_leaks = {f"{a}-{b}": 0 for a, b in itertools.combinations(SPLITS, 2)}
    distribution = {
        "only_train": 0,
        "only_val": 0,
        "only_test": 0,
        "train_val": 0,
        "train_test": 0,
        "val_test": 0,
        "all_splits": 0,
        "trivial": len(trivial_set),
    }
    leaked = 0
    for h, users in hash_object_usage.items():
        if h in trivial_set:
            continue
        used_by = sorted(set(users.values()), key=SPLITS.index)
        if len(used_by) == 1:
            distribution[f"only_{used_by[0]}"] += 1
        elif len(used_by) == 2:
            distribution["_".join(used_by)] += 1
        elif len(used_by) == 3:
            distribution["all_splits"] += 1
        if len(used_by) > 1:
            leaked += 1
            for a, b in itertools.combinations(used_by, 2):
                pair_leaks[f"{a}-{b}"] += 1
    per_level: dict[str, int] = {}
    for h in hash_object_usage:
        key = str(hash_levels[h])
        per_level[key] = per_level.get(key, 0) + 1
    objects = {s: sum(v == s for v in object_splits.values()) for s in SPLITS}
    statistics = {
        "objects": {**objects, "total": len(object_splits)},
        "unique_nontrivial_hashes": {
            "total": len(hash_object_usage) - len(trivial_set & set(hash_object_usage)),
            "distribution": distribution,
        },
        "trivial_hashes": {"count": len(trivial_set)},
        "leaked_hashes": leaked,
        "leaked_hashes_per_split_pair": pair_leaks,
        "unique_hashes_per_level": dict(sorted(per_level.items(), key=lambda kv: int(kv[0]))),
    }
    train, val, test = (float(r) for r in ratios)
    return {
        "config": {"train_ratio": train, "val_ratio": val, "test_ratio": test, "seed": int(seed)},
        "object_splits": dict(object_splits),
        "hash_object_usage": hash_object_usage,
        "trivial_hashes": sorted(trivial_set),
        "statistics": statistics,
    }


def empty_split_warnings(object_splits: Mapping[str, str], ratios: Sequence[float]) -> list[str]:
    """One sentence per split that holds no object, saying why (ratio 0 or too few objects)."""
    n = len(object_splits)
    out = []
    for name, ratio in zip(SPLITS, ratios, strict=True):
        if any(v == name for v in object_splits.values()):
            continue
        if float(ratio) == 0.0:
            why = f"its ratio is 0 (--split {' '.join(f'{float(r):g}' for r in ratios)})"
        else:
            positive = sum(float(r) > 0 for r in ratios)
            why = (
                f"{n} object(s) cannot fill {positive} splits; generate at least {positive} "
                "objects (--num-objects, more --shapes or --mesh files)"
            )
        out.append(f"split {name!r} is empty: no object was assigned to it, because {why}")
    return out
