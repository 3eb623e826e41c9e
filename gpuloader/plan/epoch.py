"""The epoch plan: every decision of one epoch, computed at once as arrays.

For one epoch the plan holds, per *slot* (a sample's place in a batch), in batch order:

    batch_starts    (nb + 1,) int64   slots of batch i: batch_starts[i]:batch_starts[i + 1]
    index           (S,) int64        dataset index of the slot's sample
    keep            (S,) int64        rays the slot yields (sampler share, dataset limits)
    out_start       (S,) int64        first output ray of the slot within its batch
    view_out_start  (S,) int64        first output view row within its batch
    select_keys     (S, 4) uint32     Feistel keys of the row selection
    ray_start, ray_count, view_start, view_count, grid_start, side   (S,) int64, from the store
    symmetry (S,) int32, origin_scale, distance_scale, origin_std, direction_std (S,) float32,
    jitter_threshold, purpose_offset (S,) uint32, epoch (S,) uint32

The values are those of the per-sample path: the sampler's batches and ray counts
(``RayBatchSampler.batches``), the dataset's row count ``min(n, samples_per_subvolume,
request, ray_budget)`` and row choice (``rng.select_rows``: Feistel keys of purpose SUBSAMPLE),
and ``transforms.draw_plan`` for the parameters (computed by ``transforms.draw_plans``,
vectorized). So every store and back end makes the same decisions for the same seed.

``plan.batch(i)`` is batch ``i`` as a :class:`~gpuloader.fused.cpu.BatchPlan`:
slices (views) of these arrays, so a plan uploaded to the GPU once per epoch yields device
batch plans with no copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from gpuloader.augment import rng
from gpuloader.augment.transforms import Transform, draw_plans
from gpuloader.plan.batch import BatchPlan
from gpuloader.stores.layout import StoreLayout

__all__ = ["EpochPlan", "build_epoch_plan"]

#: per-slot arrays of an EpochPlan that a BatchPlan takes, by name
_SLOT_FIELDS = tuple(f.name for f in fields(BatchPlan) if f.name != "seed")


@dataclass
class EpochPlan:
    """Every batch of one epoch as arrays (module doc). ``arrays`` may be numpy or CuPy."""

    seed: int
    epoch: int
    batch_starts: np.ndarray
    arrays: dict[str, Any]
    levels: np.ndarray  # (S,) int64 level of each slot's sample (host)

    def __len__(self) -> int:
        return int(self.batch_starts.shape[0]) - 1

    def slots(self, i: int) -> slice:
        return slice(int(self.batch_starts[i]), int(self.batch_starts[i + 1]))

    def batch(self, i: int) -> BatchPlan:
        """Batch ``i`` as a BatchPlan of views into the epoch's arrays."""
        sl = self.slots(i)
        return BatchPlan(seed=self.seed, **{k: self.arrays[k][sl] for k in _SLOT_FIELDS})

    def to(self, xp: Any) -> EpochPlan:
        """The same plan with its arrays on ``xp`` (``cupy``: one upload per epoch)."""
        return EpochPlan(
            seed=self.seed,
            epoch=self.epoch,
            batch_starts=self.batch_starts,
            arrays={k: xp.asarray(v) for k, v in self.arrays.items()},
            levels=self.levels,
        )


def _exclusive_cumsum_per_batch(values: np.ndarray, batch_starts: np.ndarray) -> np.ndarray:
    """(S,) int64: for each slot, the sum of ``values`` over earlier slots of its batch."""
    total = np.concatenate([[0], np.cumsum(values)])
    first = np.repeat(batch_starts[:-1], np.diff(batch_starts))
    return (total[:-1] - total[first]).astype(np.int64)


def build_epoch_plan(
    batches: Sequence[Sequence[Any]],
    layout: StoreLayout,
    levels: np.ndarray,
    segment: Sequence[Transform],
    seed: int,
    epoch: int,
    samples_per_subvolume: int | None = None,
) -> EpochPlan:
    """The plan of one epoch.

    Args:
        batches: the sampler's batches of ``epoch`` (lists of ``RayRequest(index, epoch,
            num_rays)``; ``num_rays`` None means every available ray).
        layout: where each dataset sample lives in the store.
        levels: (K,) int64 level of each dataset sample.
        segment: the known transforms (one fused run; empty for none).
        seed: the dataset seed (every per-sample draw).
        epoch: the epoch.
        samples_per_subvolume: the dataset's own row limit.
    """
    sizes = np.array([len(b) for b in batches], dtype=np.int64)
    batch_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    flat = [r for b in batches for r in b]
    index = np.array([int(r[0]) for r in flat], dtype=np.int64)
    request = np.array([-1 if r[2] is None else int(r[2]) for r in flat], dtype=np.int64)
    count = layout.ray_count[index]
    side = layout.side[index]
    level = np.asarray(levels, dtype=np.int64)[index]
    params = draw_plans(segment, seed, epoch, index, side, level=level)
    keep = count.copy()
    for limit in (samples_per_subvolume, params.pop("num_rays")):
        if limit is not None:
            keep = np.minimum(keep, int(limit))
    keep = np.where(request >= 0, np.minimum(keep, request), keep)
    s = index.shape[0]
    keys = rng.random_words(
        seed, epoch, index[:, None], rng.Purpose.SUBSAMPLE, np.arange(rng.FEISTEL_ROUNDS)
    )[..., 0].reshape(s, rng.FEISTEL_ROUNDS)
    vcount = layout.view_count[index]
    arrays: dict[str, Any] = {
        "index": index.astype(np.uint32),
        "epoch": np.full(s, epoch, dtype=np.uint32),
        "ray_start": layout.ray_start[index],
        "ray_count": count,
        "keep": keep,
        "out_start": _exclusive_cumsum_per_batch(keep, batch_starts),
        "select_keys": np.ascontiguousarray(keys, dtype=np.uint32),
        "view_start": layout.view_start[index],
        "view_count": vcount,
        "view_out_start": _exclusive_cumsum_per_batch(vcount, batch_starts),
        "grid_start": layout.grid_start[index],
        "side": side,
        **params,
    }
    return EpochPlan(
        seed=int(seed),
        epoch=int(epoch),
        batch_starts=batch_starts,
        arrays=arrays,
        levels=np.asarray(levels, dtype=np.int64)[index],
    )
