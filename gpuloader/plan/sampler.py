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

Distributed: with ``world_size > 1`` (by default from ``torch.distributed`` when it is
initialized) rank ``r`` gets batches ``r, r + world_size, ...`` of the epoch's global order
(:meth:`RayBatchSampler.global_batches`): the ranks' shards are disjoint and together cover
the epoch once. Every rank yields the same number of batches, so DDP never waits on a rank
that ran out: with ``drop_last=False`` the global list is padded by repeating its first
batches (as ``DistributedSampler`` pads), with ``drop_last=True`` the last
``len % world_size`` batches are dropped. ``len()`` is per rank.

That shard changes a rank's samples every epoch. With ``shard="samples"`` each rank owns a
fixed subset of the samples instead, the same every epoch (:meth:`RayBatchSampler.shard_indices`),
so it may keep only those in memory: per level (or over all samples with ``mixed_levels``),
a permutation keyed by the seed alone (:data:`~gpuloader.augment.rng.Purpose.SHARD`), or the
samples sorted by ``shard_keys``, is cut into ``world_size`` contiguous parts of near-equal
size (sizes differ by at most one per level and in total; which ranks get the larger parts
rotates over the levels; :mod:`gpuloader.plan.shard`). Each epoch a rank batches only its own
samples, with the same machinery as the global order (its samples of a level permuted by
``(seed, epoch)``, the same ray allocation, its batches permuted by ``(seed, epoch)``). The
ranks' subsets are disjoint and cover every sample once; their batch
counts may differ by a few, so every rank yields as many batches as the rank with the most,
repeating its own first batches (``drop_last=False``), or as many as the rank with the fewest,
dropping its last ones (``drop_last=True``; each level's incomplete batch is dropped per rank
then). With ``world_size == 1`` both modes give the same batches.

Resume: :meth:`RayBatchSampler.state_dict` is ``(epoch, batches_yielded)`` of the pass in
progress; after :meth:`RayBatchSampler.load_state_dict` the next pass starts that epoch at
that batch, so the next batch is the one an uninterrupted run would yield. (Behind a
``DataLoader`` with workers the sampler runs ahead of the training loop by the prefetched
batches: there, save ``{"epoch": e, "batches_yielded": steps_done}`` from your own count.)
The state also holds the batching arguments and the sample list's size and fingerprint
(:func:`~gpuloader.plan.resume.batching_identity`): a state of other arguments or data is
refused, naming what differs.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
from torch.utils.data import Sampler

from gpuloader.augment.rng import Purpose, permutation
from gpuloader.plan.resume import (
    batching_identity,
    check_resume_state,
    resume_state,
    samples_fingerprint,
)
from gpuloader.plan.shard import fit_batches, shard_batches, split_ranges, split_samples

__all__ = [
    "ALL_RAYS",
    "SHARD_MODES",
    "IndexedSamples",
    "RayBatchSampler",
    "RayRequest",
    "allocate_rays",
    "check_count",
    "distributed_rank_world",
    "order_only",
    "shard_batches",
    "split_samples",
]

#: ``RayBatchSampler(shard=...)``: split the epoch's batches over ranks, or the samples.
SHARD_MODES: tuple[str, ...] = ("batches", "samples")


class RayRequest(NamedTuple):
    """What the dataset should read: sample ``index``, draws of ``epoch``, ``num_rays`` rows
    (None: as many as the dataset's own limits allow)."""

    index: int
    epoch: int
    num_rays: int | None = None


class IndexedSamples(Protocol):
    """What :class:`RayBatchSampler` reads of its dataset (the upstream contract: any indexed
    dataset): ``samples``, dicts with ``'level'`` and ``'num_rays'``. Optional members: ``seed``
    (the default order seed; else 0) and ``available_rays(i)`` (the rows sample ``i`` may
    yield after the dataset's own limits; else its ``num_rays``). A
    HierarchicalVoxelRayDataset and its DatasetView have all three."""

    samples: Sequence[dict[str, Any]]


def order_only(sampler: Any) -> Any:
    """A shallow copy of ``sampler`` without its dataset (``dataset`` set to None where it has
    one): the order alone, light to pickle into reader workers, which call only
    ``batches(epoch)`` (and read ``subvolumes_per_batch``)."""
    order = copy.copy(sampler)
    if hasattr(order, "dataset"):
        order.dataset = None
    return order


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


#: what ``rays_per_batch=None`` means (error messages)
ALL_RAYS = "every ray of each sub-volume"

#: stream index of the batch-order permutation (per-level orders use ``level + 1``).
_BATCH_ORDER_STREAM = 0xFFFFFFFF


def _permutation(n: int, seed: int, epoch: int, stream: int) -> np.ndarray:
    """A permutation of ``range(n)``: a pure function of (seed, epoch, stream)."""
    return np.asarray(permutation(n, seed, epoch, Purpose.SHUFFLE, index=stream), dtype=np.int64)


def distributed_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: the given values, else ``torch.distributed``'s when it is
    initialized, else ``(0, 1)``.

    Raises:
        ValueError: ``world_size < 1`` or ``rank`` outside ``[0, world_size)``.
    """
    if rank is None or world_size is None:
        dist_rank, dist_world = 0, 1
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist_rank, dist_world = dist.get_rank(), dist.get_world_size()
        except ImportError:  # torch without distributed support
            pass
        world_size = dist_world if world_size is None else world_size
        rank = dist_rank if rank is None else rank
    rank, world_size = int(rank), int(world_size)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}); got {rank}")
    return rank, world_size


def check_count(owner: str, name: str, value: Any, none_means: str | None = None) -> int | None:
    """``value`` as an int >= 1: a count argument ``name`` of ``owner``; None is kept where
    ``none_means`` says what it means (else refused).

    Raises:
        TypeError: not an int (a bool, a float, a string). ValueError: below 1.
    """
    allowed = "an int >= 1" + (f" or None ({none_means})" if none_means else "")
    if value is None and none_means:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"{owner}: {name} must be {allowed}; got {name}={value!r} ({type(value).__name__})"
        )
    if value < 1:
        raise ValueError(f"{owner}: {name} must be {allowed}; got {name}={value!r}")
    return int(value)


def _resolve_batch_arguments(
    rays_per_batch: Any,
    subvolumes_per_batch: Any,
    shuffle: bool | None,
    drop_last: bool | None,
    batch_size: int | None,
) -> tuple[int | None, int, bool, bool]:
    """``(rays_per_batch, subvolumes_per_batch, shuffle, drop_last)`` from either API.

    The seed's order is ``(dataset, rays_per_batch, subvolumes_per_batch, shuffle,
    drop_last)``; the newer upstream's is ``(dataset, batch_size, shuffle, drop_last)``
    (``batch_size`` sub-volumes, every ray of each). A bool in the third place means the
    upstream order; ``batch_size=`` by keyword means upstream's meaning. ``subvolumes_per_batch``
    None means the default, 8.
    """
    owner = "RayBatchSampler"
    if isinstance(subvolumes_per_batch, bool):  # (dataset, batch_size, shuffle[, drop_last])
        if batch_size is not None:
            raise TypeError("RayBatchSampler got batch_size twice (by position and keyword)")
        if shuffle is not None and drop_last is not None:
            raise TypeError("RayBatchSampler got drop_last twice (by position and keyword)")
        batch_size = check_count(owner, "batch_size", rays_per_batch)
        shuffle, drop_last = subvolumes_per_batch, shuffle if shuffle is not None else drop_last
        rays_per_batch, subvolumes_per_batch = None, batch_size
    elif batch_size is not None:
        if rays_per_batch != 4096 or subvolumes_per_batch is not None:
            raise TypeError(
                "RayBatchSampler: pass either batch_size (the newer upstream API: batch_size "
                "sub-volumes, every ray of each) or rays_per_batch/subvolumes_per_batch (the "
                "seed's), not both"
            )
        rays_per_batch, subvolumes_per_batch = None, check_count(owner, "batch_size", batch_size)
    rays_per_batch = check_count(owner, "rays_per_batch", rays_per_batch, ALL_RAYS)
    subvolumes_per_batch = check_count(
        owner, "subvolumes_per_batch", subvolumes_per_batch, "the default, 8"
    )
    if subvolumes_per_batch is None and rays_per_batch is not None and rays_per_batch <= 8:
        warnings.warn(
            f"RayBatchSampler(dataset, {rays_per_batch}) reads {rays_per_batch} as "
            "rays_per_batch (the seed's order): at most one ray per sub-volume of 8. For the "
            f"newer upstream's meaning ({rays_per_batch} sub-volumes, every ray of each) pass "
            f"batch_size={rays_per_batch}",
            UserWarning,
            stacklevel=3,
        )
    return (
        rays_per_batch,
        8 if subvolumes_per_batch is None else int(subvolumes_per_batch),
        True if shuffle is None else bool(shuffle),
        False if drop_last is None else bool(drop_last),
    )


class RayBatchSampler(Sampler):
    """Batches of ``subvolumes_per_batch`` sub-volumes holding ``rays_per_batch`` rays.

    Args:
        dataset: an indexed dataset (:class:`IndexedSamples`): ``.samples`` (dicts with
            'level' and 'num_rays'), optionally ``available_rays(i)`` (rows it may read after
            its own limits) and ``.seed``; a HierarchicalVoxelRayDataset or its DatasetView.
        rays_per_batch: rays in a batch, an int >= 1 (None: every available ray of each
            sub-volume).
        subvolumes_per_batch: sub-volumes in a batch, an int >= 1 (None: 8). A count below 1
            or not an int raises ValueError / TypeError naming the argument.
        shuffle: permute samples (within a level) and batches each epoch.
        drop_last: drop each level's last, incomplete batch.
        seed: order seed (default: ``dataset.seed``).
        mixed_levels: allow several levels in one batch (collate then zero-pads grids).
        rank, world_size: this process's shard (module doc); default: ``torch.distributed``
            when initialized, else 0 and 1. Every rank must use the same seed.
        shard: what is split over ranks (module doc): ``"batches"`` (default), each epoch's
            batches, so a rank's samples change every epoch; ``"samples"``, a fixed subset of
            the samples per rank (:meth:`shard_indices`), batched each epoch on its own.
        shard_keys: with ``shard="samples"``, ``(K,)`` int64 per dataset sample: each level's
            samples are sorted by it and cut into contiguous ranges
            (:func:`~gpuloader.plan.shard.split_ranges`) instead of a seeded permutation.
            Default: the dataset's ray store's ``shard_keys(samples)`` where it has one (a
            striped pack: a sample's place in it, so a rank reads one contiguous byte range
            of each stripe), else the permutation.
        batch_size: the newer upstream's argument: ``batch_size`` sub-volumes per batch,
            every ray of each (``subvolumes_per_batch=batch_size, rays_per_batch=None``).
            Upstream's positional order ``(dataset, batch_size, shuffle, drop_last)`` works
            too (recognised by the bool in third place).

    Each pass uses the current epoch and advances it by one when it starts (so epochs differ
    even without ``set_epoch``); ``set_epoch(e)`` pins the epoch of the next pass, as with
    ``DistributedSampler``. ``batches(epoch)`` gives any epoch's batches (this rank's)
    without iterating; ``global_batches(epoch)`` those of every rank.
    """

    #: the fixed subset of each rank: ``[rank][group] -> (stream, sorted indices)``; None
    #: with ``shard="batches"``
    _owned: list[list[tuple[int, np.ndarray]]] | None

    def __init__(
        self,
        dataset: IndexedSamples,
        rays_per_batch: int | None = 4096,
        subvolumes_per_batch: int | None = None,
        shuffle: bool | None = None,
        drop_last: bool | None = None,
        seed: int | None = None,
        mixed_levels: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        batch_size: int | None = None,
        shard: str = "batches",
        shard_keys: Any = None,
    ) -> None:
        rays_per_batch, subvolumes_per_batch, shuffle, drop_last = _resolve_batch_arguments(
            rays_per_batch, subvolumes_per_batch, shuffle, drop_last, batch_size
        )
        if shard not in SHARD_MODES:
            raise ValueError(f"shard must be one of {SHARD_MODES}; got {shard!r}")
        self.dataset = dataset
        self.rays_per_batch = rays_per_batch
        self.subvolumes_per_batch = int(subvolumes_per_batch)
        self.batch_size = self.subvolumes_per_batch  # upstream's name
        self.shuffle = shuffle
        self.drop_last = drop_last
        # the optional members of IndexedSamples
        self.seed = int(seed if seed is not None else getattr(dataset, "seed", 0))
        self.mixed_levels = mixed_levels
        self.shard = shard
        self.rank, self.world_size = distributed_rank_world(rank, world_size)
        self.epoch = 0
        self._resume_at = 0  # batches of ``self.epoch`` the next pass skips (load_state_dict)
        self._pass: list[int] | None = None  # [epoch, batches yielded] of the pass in progress
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
        self._owned = None
        self._fingerprint: str | None = None  # of the sample list, made by the first state
        if shard == "samples":
            if shard_keys is None:  # a striped pack: ranks own contiguous ranges of it
                keys_of = getattr(getattr(dataset, "ray_store", None), "shard_keys", None)
                shard_keys = keys_of(samples) if callable(keys_of) else None
            self._owned = (
                split_samples(self._groups, self.world_size, self.seed)
                if shard_keys is None
                else split_ranges(self._groups, self.world_size, np.asarray(shard_keys))
            )
            counts = [self._num_batches(groups) for groups in self._owned]
            self._per_rank = min(counts) if drop_last else max(counts)
            if self._per_rank and not min(counts):
                raise ValueError(
                    f"shard='samples': rank {counts.index(0)} of {self.world_size} owns no "
                    f"samples ({len(samples)} samples); use fewer processes or shard='batches'"
                )

    def shard_indices(self) -> np.ndarray:
        """(K_r,) int64, sorted: the dataset indices this rank's batches may read, the same
        every epoch (all indices with ``shard="batches"`` or one process)."""
        if self._owned is None:
            return np.arange(len(self._capacity), dtype=np.int64)
        return np.sort(np.concatenate([idx for _, idx in self._owned[self.rank]]))

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the next pass (its order and every ray draw). A position restored by
        :meth:`load_state_dict` is kept when ``epoch`` is the restored epoch."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self._resume_at = 0
        self.epoch = epoch

    def _group_batches(self, n: int) -> int:
        full, rest = divmod(n, self.subvolumes_per_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def _num_batches(self, groups: Sequence[tuple[int, np.ndarray]]) -> int:
        return sum(self._group_batches(len(idx)) for _, idx in groups)

    def __len__(self) -> int:
        """Batches per epoch of this rank."""
        if self._owned is not None:
            return self._per_rank
        n, ws = self._num_batches(self._groups), self.world_size
        return n // ws if self.drop_last else -(-n // ws)

    def batches(self, epoch: int) -> list[list[RayRequest]]:
        """This rank's batches of ``epoch``, in order (a pure function of seed and epoch)."""
        return self._rank_batches(self.rank, epoch)

    def _rank_batches(self, rank: int, epoch: int) -> list[list[RayRequest]]:
        if self._owned is None:
            return shard_batches(self.global_batches(epoch), rank, self.world_size, self.drop_last)
        return fit_batches(self._order(self._owned[rank], epoch), self._per_rank)

    def global_batches(self, epoch: int) -> list[list[RayRequest]]:
        """Every batch of ``epoch`` over all ranks, in order (a pure function of seed, epoch).

        With ``shard="samples"``: the ranks' batches interleaved (rank ``r``'s are ``r, r +
        world_size, ...``), padding or dropping included.
        """
        if self._owned is None:
            return self._order(self._groups, epoch)
        ranks = [self._rank_batches(r, epoch) for r in range(self.world_size)]
        return [batch for row in zip(*ranks, strict=True) for batch in row]

    def _order(
        self, groups: Sequence[tuple[int, np.ndarray]], epoch: int
    ) -> list[list[RayRequest]]:
        """The batches of the samples of ``groups`` in ``epoch``: each group permuted and cut
        into batches, then the batches permuted (by seed and epoch)."""
        chunks: list[np.ndarray] = []
        spb = self.subvolumes_per_batch
        for stream, idx in groups:
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
        epoch, start = self.epoch, self._resume_at
        self.epoch, self._resume_at = epoch + 1, 0
        pos = self._pass = [epoch, start]
        for batch in self.batches(epoch)[start:]:
            pos[1] += 1  # counted when handed out
            yield batch
        if self._pass is pos:
            self._pass = None

    # -- resume ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the order stands: ``epoch`` and ``batches_yielded`` (of this rank) of the pass
        in progress, or of the next pass; a finished epoch reads as the next epoch at 0.
        ``seed``, ``world_size``, ``num_batches`` and ``shard`` are there to check the state on
        load."""
        epoch, done = self._pass if self._pass is not None else (self.epoch, self._resume_at)
        return resume_state(
            epoch, done, len(self), self.seed, self.world_size, self.shard, self.identity()
        )

    def identity(self) -> dict[str, Any]:
        """What a resume state must match besides its place (``batching_identity``): the
        batching arguments, the number of samples and a fingerprint of the sample list (made
        once, on the first call)."""
        if self._fingerprint is None and self.dataset is not None:
            self._fingerprint = samples_fingerprint(self.dataset.samples)
        return batching_identity(
            num_samples=len(self._capacity),
            fingerprint=self._fingerprint,
            rays_per_batch=self.rays_per_batch,
            subvolumes_per_batch=self.subvolumes_per_batch,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            mixed_levels=self.mixed_levels,
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (:meth:`state_dict`'s): the next pass starts its epoch at
        its batch. Only ``epoch`` and ``batches_yielded`` are required.

        Raises:
            ValueError: the state was saved with other batching arguments or samples, another
                seed, world size, epoch length or shard mode (named), or its
                ``batches_yielded`` is beyond the epoch.
        """
        self.epoch, self._resume_at = check_resume_state(
            state,
            len(self),
            self.seed,
            self.world_size,
            "RayBatchSampler",
            self.shard,
            self.identity(),
        )
        self._pass = None
