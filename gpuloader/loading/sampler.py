"""Batch sampler that honours ``rays_per_batch``.

:class:`RayBatchSampler` yields lists of :class:`RayRequest` ``(index, epoch, num_rays)``.
The dataset reads ``num_rays`` rows of sample ``index`` with the draws of ``epoch``, so the
epoch and the ray counts reach DataLoader workers inside the indices themselves: no shared
state, and the same batches whatever ``num_workers`` is.

Rays per batch: ``rays_per_batch`` is shared out over the batch's sub-volumes evenly, the
remainder going one ray each to the first ones; a sub-volume holding fewer rays than its
share gives the rest to the others (water-filling, :func:`allocate_rays`). So every batch
holds exactly ``rays_per_batch`` rays whenever its sub-volumes hold that many in all.

Order: a pure function of ``(seed, epoch)``: sample order within a level and batch order
come from counter-based permutations, so a run can be repeated, resumed or sharded.
By default a batch holds one level only, so its grids have one size and stack.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from gpuloader.augment.rng import Purpose, permutation

__all__ = ["RayBatchSampler", "RayRequest", "allocate_rays"]


class RayRequest(NamedTuple):
    """What the dataset should read: sample ``index``, draws of ``epoch``, ``num_rays`` rows
    (None: as many as the dataset's own limits allow)."""

    index: int
    epoch: int
    num_rays: int | None = None


def allocate_rays(capacities: Sequence[int], total: int) -> list[int]:
    """Share ``total`` rays over sub-volumes holding ``capacities`` rays (water-filling).

    Each gets ``total // m`` (the first ``total % m`` one more); a sub-volume that holds
    fewer gets all it has and the shortfall is shared over the others the same way.

    Returns:
        list of ints, ``alloc[i] <= capacities[i]``, ``sum == min(total, sum(capacities))``.
    """
    caps = [max(0, int(c)) for c in capacities]
    alloc = [0] * len(caps)
    remaining = max(0, int(total))
    active = list(range(len(caps)))
    while active:
        share, extra = divmod(remaining, len(active))
        quota = {i: share + (1 if j < extra else 0) for j, i in enumerate(active)}
        full = [i for i in active if caps[i] <= quota[i]]
        if not full:
            for i in active:
                alloc[i] = quota[i]
            break
        for i in full:
            alloc[i] = caps[i]
            remaining -= caps[i]
        active = [i for i in active if caps[i] > quota[i]]
    return alloc


#: stream index of the batch-order permutation (per-level orders use ``level + 1``).
_BATCH_ORDER_STREAM = 0xFFFFFFFF


def _permutation(n: int, seed: int, epoch: int, stream: int) -> np.ndarray:
    """A permutation of ``range(n)``: a pure function of (seed, epoch, stream)."""
    return np.asarray(permutation(n, seed, epoch, Purpose.SHUFFLE, index=stream), dtype=np.int64)


class RayBatchSampler:
    """Batches of ``subvolumes_per_batch`` sub-volumes holding ``rays_per_batch`` rays.

    Args:
        dataset: an indexed dataset: ``.samples`` (dicts with 'level' and 'num_rays'),
            optionally ``available_rays(i)`` (rows it may read after its own limits) and
            ``.seed``.
        rays_per_batch: rays in a batch (None: every available ray of each sub-volume).
        subvolumes_per_batch: sub-volumes in a batch.
        shuffle: permute samples (within a level) and batches each epoch.
        drop_last: drop each level's last, incomplete batch.
        seed: order seed (default: ``dataset.seed``).
        mixed_levels: allow several levels in one batch (collate then zero-pads grids).

    Each pass uses the current epoch and advances it by one when it starts (so epochs differ
    even without ``set_epoch``); ``set_epoch(e)`` pins the epoch of the next pass, as with
    ``DistributedSampler``. ``batches(epoch)`` gives any epoch's batches without iterating.
    """

    def __init__(
        self,
        dataset: Any,
        rays_per_batch: int | None = 4096,
        subvolumes_per_batch: int = 8,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int | None = None,
        mixed_levels: bool = False,
    ) -> None:
        if subvolumes_per_batch < 1:
            raise ValueError(f"subvolumes_per_batch must be >= 1; got {subvolumes_per_batch}")
        if rays_per_batch is not None and rays_per_batch < 0:
            raise ValueError(f"rays_per_batch must be >= 0 or None; got {rays_per_batch}")
        self.dataset = dataset
        self.rays_per_batch = rays_per_batch
        self.subvolumes_per_batch = int(subvolumes_per_batch)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed if seed is not None else getattr(dataset, "seed", 0))
        self.mixed_levels = mixed_levels
        self.epoch = 0
        samples = dataset.samples
        avail = getattr(dataset, "available_rays", None)
        self._capacity = np.array(
            [avail(i) if avail is not None else s["num_rays"] for i, s in enumerate(samples)],
            dtype=np.int64,
        )
        if mixed_levels:
            self._groups: list[tuple[int, np.ndarray]] = [
                (0, np.arange(len(samples), dtype=np.int64))
            ]
        else:
            levels = np.array([s["level"] for s in samples], dtype=np.int64)
            self._groups = [(int(lv) + 1, np.flatnonzero(levels == lv)) for lv in np.unique(levels)]

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the next pass (its order and every ray draw)."""
        self.epoch = int(epoch)

    def _group_batches(self, n: int) -> int:
        full, rest = divmod(n, self.subvolumes_per_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def __len__(self) -> int:
        return sum(self._group_batches(len(idx)) for _, idx in self._groups)

    def batches(self, epoch: int) -> list[list[RayRequest]]:
        """Every batch of ``epoch``, in order (a pure function of seed and epoch)."""
        chunks: list[np.ndarray] = []
        spb = self.subvolumes_per_batch
        for stream, idx in self._groups:
            order = idx[_permutation(len(idx), self.seed, epoch, stream)] if self.shuffle else idx
            for b in range(self._group_batches(len(order))):
                chunks.append(order[b * spb : (b + 1) * spb])
        if self.shuffle and len(chunks) > 1:
            chunks = [
                chunks[i] for i in _permutation(len(chunks), self.seed, epoch, _BATCH_ORDER_STREAM)
            ]
        return [self._requests(c, epoch) for c in chunks]

    def _requests(self, chunk: np.ndarray, epoch: int) -> list[RayRequest]:
        if self.rays_per_batch is None:
            return [RayRequest(int(i), epoch, None) for i in chunk]
        alloc = allocate_rays(self._capacity[chunk].tolist(), self.rays_per_batch)
        return [RayRequest(int(i), epoch, int(k)) for i, k in zip(chunk, alloc, strict=True)]

    def __iter__(self) -> Iterator[list[RayRequest]]:
        # A generator: the epoch is taken (and advanced) when the pass really starts. The
        # multi-worker DataLoader calls iter() twice per pass and drops the first iterator.
        epoch = self.epoch
        self.epoch = epoch + 1
        yield from self.batches(epoch)
