"""``BatchPlan``: one batch's per-sample decisions and store places, as a struct of arrays.

What the fused pass (:mod:`gpuloader.fused`) reads for a batch: made by the epoch plan
(:meth:`gpuloader.plan.epoch.EpochPlan.batch`); for a batch already gathered (the pack
stream, the sample stream) its starts are made local to a batch-sized store
(:func:`gpuloader.reading.pack_reader.local_plan`,
:meth:`gpuloader.loading.sources.sample_stream.SampleStream.assemble`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BatchPlan"]


@dataclass
class BatchPlan:
    """One batch's per-sample parameters (struct of arrays, B samples; see module doc).

    Attributes:
        seed: the dataset seed (Philox key).
        index, epoch: (B,) uint32 the sample's random stream.
        ray_start, ray_count, keep, out_start: (B,) int64 rows in the store, rows the sample
            has, rows kept (<= ray_count), first output row (exclusive cumsum of keep).
        select_keys: (B, 4) uint32 Feistel round keys (``rng.feistel_keys(seed, epoch,
            index, SUBSAMPLE)``).
        view_start, view_count, view_out_start: (B,) int64 view rows in the store and out.
        grid_start, side: (B,) int64 first byte of the sample's grid in the flat grid store,
            its side (grids are cubic).
        symmetry: (B,) int32. origin_scale, distance_scale, origin_std, direction_std: (B,)
            float32. jitter_threshold, purpose_offset: (B,) uint32.
    """

    seed: int
    index: np.ndarray
    epoch: np.ndarray
    ray_start: np.ndarray
    ray_count: np.ndarray
    keep: np.ndarray
    out_start: np.ndarray
    select_keys: np.ndarray
    view_start: np.ndarray
    view_count: np.ndarray
    view_out_start: np.ndarray
    grid_start: np.ndarray
    side: np.ndarray
    symmetry: np.ndarray
    origin_scale: np.ndarray
    distance_scale: np.ndarray
    origin_std: np.ndarray
    direction_std: np.ndarray
    jitter_threshold: np.ndarray
    purpose_offset: np.ndarray

    @property
    def batch_size(self) -> int:
        return int(self.index.shape[0])

    @property
    def num_rays(self) -> int:
        return int(self.keep.sum())

    @property
    def num_views(self) -> int:
        return int(self.view_count.sum())

    @property
    def grid_side(self) -> int:
        return int(self.side.max()) if self.side.size else 0
