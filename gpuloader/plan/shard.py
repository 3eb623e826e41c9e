"""How an epoch, or the samples, are split over ranks (``RayBatchSampler(shard=...)``).

* :func:`shard_batches` (``shard="batches"``): rank ``r`` gets batches ``r, r + world_size,
  ...`` of the epoch's global order, padded (or cut) to equal counts.
* :func:`split_samples` (``shard="samples"``): each rank owns a fixed part of every group of
  samples, cut from a permutation keyed by the seed alone.
* :func:`split_ranges` (``shard="samples"`` with ``shard_keys``): the same cut, from the
  samples sorted by a key instead: with the key a sample's place in a striped pack, each rank
  owns a contiguous range of the pack order, so it reads one contiguous byte range per stripe.

Both splits cut a group of ``n`` samples into ``world_size`` contiguous parts whose sizes
differ by at most one; the ranks that get the larger parts rotate from group to group, so
rank totals differ by at most one too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gpuloader.augment.rng import Purpose, permutation

__all__ = ["fit_batches", "shard_batches", "split_ranges", "split_samples"]


def fit_batches(batches: list, n: int) -> list:
    """``batches`` cut to ``n``, or padded to ``n`` by repeating them from the start."""
    if n <= len(batches) or not batches:
        return batches[:n]
    pad = n - len(batches)
    return batches + (batches * (pad // len(batches) + 1))[:pad]


def shard_batches(batches: list, rank: int, world_size: int, drop_last: bool) -> list:
    """Rank ``rank``'s share of ``batches``: every ``world_size``-th from ``rank``, equal in
    length on every rank (padded by repeating the first batches, or the remainder dropped
    when ``drop_last``)."""
    if world_size == 1:
        return batches
    n = len(batches)
    total = n - n % world_size if drop_last else -(-n // world_size) * world_size
    return fit_batches(batches, total)[rank::world_size]


def _cut(
    ordered: Sequence[tuple[int, np.ndarray]], world_size: int
) -> list[list[tuple[int, np.ndarray]]]:
    """Each group's ordered samples cut into ``world_size`` contiguous parts (module doc):
    ``[rank][group] -> (stream, sorted int64 indices)``."""
    out: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(world_size)]
    first = 0  # the rank that gets the first larger part of this group
    for stream, order in ordered:
        base, extra = divmod(len(order), world_size)
        sizes = [base + ((r - first) % world_size < extra) for r in range(world_size)]
        ends = np.cumsum(sizes)
        for r in range(world_size):
            out[r].append((stream, np.sort(order[ends[r] - sizes[r] : ends[r]])))
        first = (first + extra) % world_size
    return out


def split_samples(
    groups: Sequence[tuple[int, np.ndarray]], world_size: int, seed: int
) -> list[list[tuple[int, np.ndarray]]]:
    """Each rank's fixed part of every group ``(stream, sample indices)`` (``shard="samples"``).

    A group is permuted by ``(seed, stream)`` (:data:`Purpose.SHARD`, no epoch) and cut
    (module doc).

    Returns:
        ``[rank][group] -> (stream, sorted int64 indices)``, every group on every rank (empty
        where a rank owns none of it).
    """
    ordered = []
    for stream, idx in groups:
        perm = np.asarray(permutation(len(idx), seed, 0, Purpose.SHARD, index=stream))
        ordered.append((stream, np.asarray(idx, dtype=np.int64)[perm.astype(np.int64)]))
    return _cut(ordered, world_size)


def split_ranges(
    groups: Sequence[tuple[int, np.ndarray]], world_size: int, keys: np.ndarray
) -> list[list[tuple[int, np.ndarray]]]:
    """As :func:`split_samples`, but each group sorted by ``keys`` (``(K,)`` int64 over all
    dataset samples; ties by index) before the cut: rank ``r`` owns the ``r``-th contiguous
    range of that order in every group."""
    keys = np.asarray(keys, dtype=np.int64)
    ordered = []
    for stream, idx in groups:
        idx = np.asarray(idx, dtype=np.int64)
        ordered.append((stream, idx[np.lexsort((idx, keys[idx]))]))
    return _cut(ordered, world_size)
