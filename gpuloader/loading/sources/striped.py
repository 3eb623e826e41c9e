"""Whole batches from a striped pack: each epoch's stripes resident, then the fused pass.

``GPURayLoader(dataset, store="striped")`` over a striped
:class:`~gpuloader.stores.pack.store.PackedRayStore` (``gpuloader pack RAY_DIR OUT --layout
striped``; format in :mod:`gpuloader.stores.pack.striped`). :class:`StripedBatches`:

* **Stripes.** Epoch ``e`` uses stripe ``s = (e + offset_L) mod S_L`` of each level L
  (``offset_L`` a pure function of the loader's seed:
  :func:`~gpuloader.reading.stripe_reader.stripe_offset`); with ``RandomRaySubsample(
  num_rays=K)`` in the transform, K a multiple of W, the ``k = K/W`` consecutive stripes
  ``s, s+1, ... (mod S_L)``; without one, one stripe (W rows). Any other K is refused at
  ``GPURayLoader(...)`` with a ValueError naming W and the values that work.
* **Reading.** :class:`~gpuloader.reading.stripe_reader.StripeReader`: sequential reads of
  each stripe file into one resident buffer (dataset sample d's ``k*W`` rows at ``d*k*W``),
  and the next epoch's stripes read in a background thread while this epoch trains (at most
  two epochs' buffers alive, plus one chunk of raw records and the batches in flight). Every
  wait is bounded by ``worker_timeout``; a read error is raised in the consumer, naming the
  stripe file.
* **Batches.** The resident store's machinery
  (:class:`~gpuloader.loading.sources.resident.FusedBatches`) over that buffer: a
  :class:`~gpuloader.stores.layout.StoreLayout` whose ``ray_start`` points at the sample's
  rows of the buffer and whose ``ray_count`` is its distinct rows there; the epoch plan
  (:func:`~gpuloader.plan.epoch.build_epoch_plan`, as for every store: order, symmetries,
  scales, noise, jitter) then sets ``ray_count = keep`` (``keep = min(distinct rows,
  samples_per_subvolume, K, the sampler's share)``), so the fused pass keeps the *first*
  ``keep`` rows of the slot and draws no per-epoch row selection. Grids and views come from
  the levels' memory maps (one level: the map itself; several: concatenated once).
  Only the rows differ from the host store's batches.
* **CUDA** (not tested here: no GPU on CI): the buffer's fields and the grids and views are
  copied to device memory once per epoch and the resident store's kernels run on them.

Semantics (the pack's permutation fixes which rays travel together):

* over S_L consecutive epochs every ray of a sample is used at least once (exactly once
  with one stripe per epoch when ``n = S_L*W``; a sample with fewer rays wraps around its
  own rows, as the pack's module doc says);
* within an epoch each sample's rays are a uniform random subset of its rays, without
  repeats: the leading distinct rows of its stripes (``min(n, k*W)``; when the k stripes
  wrap past stripe S_L-1 of a sample with ``n < S_L*W``, the rows up to the first repeat,
  at least ``min(n, W)``: :func:`~gpuloader.reading.stripe_reader.distinct_rows`);
* which rays travel together is fixed by the pack: repack with another ``--seed`` to change
  it. A sample yields at most those rows: a sampler share above them is not made up.

Resume is exact: everything an epoch uses is a pure function of (seed, epoch), and a pass
started at batch ``start`` reads the epoch's stripes (waiting for, or dropping, a read in
flight) before it builds batch ``start``. Bad samples: those the pack left out (or that it
lacks) raise under ``on_error="raise"`` and are replaced under ``"skip"``, as in the pack
stream. A dataset of chunks (``rays_per_chunk``) cannot stream stripes (the pack's unit is
a ray file): use ``store="stream"``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from gpuloader import schema
from gpuloader.augment.transforms import RandomRaySubsample, Transform
from gpuloader.dataset.view import DatasetView
from gpuloader.errors import StalePackError
from gpuloader.loading.sources.base import BatchSource
from gpuloader.loading.sources.resident import FusedBatches
from gpuloader.plan.epoch import EpochPlan
from gpuloader.reading.stripe_reader import EpochStripes, StripeReader
from gpuloader.stores.layout import StoreLayout
from gpuloader.stores.pack.striped import StripedLevel
from gpuloader.stores.resident import ResidentStore

__all__ = ["StripedBatches", "stripes_per_epoch", "striped_places"]


def stripes_per_epoch(segment: Sequence[Transform], w: int) -> int:
    """k, the stripes an epoch uses per level: ``K/W`` for ``RandomRaySubsample(num_rays=K)``
    in the fused run (the smallest K when there are several), else 1.

    Raises:
        ValueError: K is not a multiple of W (the message names W and the values that work).
    """
    ks = [t.num_rays for t in segment if isinstance(t, RandomRaySubsample)]
    if not ks:
        return 1
    k = min(ks)
    if k % w:
        raise ValueError(
            f"store='striped': RandomRaySubsample(num_rays={k}) on a striped pack of W={w} "
            f"rays per stripe; num_rays must be a multiple of W: {w}, {2 * w}, {3 * w}, ... "
            f"(an epoch uses num_rays/W stripes), or repack with --stripe-rays to match"
        )
    return k // w


def striped_places(
    view: DatasetView, bad: dict[int, tuple[str, str]] | None = None
) -> tuple[dict[int, StripedLevel], np.ndarray, dict[int, tuple[str, str]]]:
    """Each sample's row in its striped level: ``(levels, rows, bad)``.

    ``levels``: level -> StripedLevel of the levels the samples use; ``rows`` (K,) int64
    (-1 for a bad sample); ``bad``: the samples known bad (``bad`` given, plus, under
    ``on_error='skip'``, those the pack left out or lacks).

    Raises:
        ValueError: a sample is a chunk (``rays_per_chunk``).
        StalePackError: a sample's ray count differs from the pack's.
        SampleNotInPackError, DamagedFileError: a sample the pack lacks or left out as bad
            (``on_error='raise'``).
    """
    from gpuloader.format.validate import classify
    from gpuloader.reading.headers import find_bad

    store = view.ray_store
    bad = dict(bad or {})
    rows = np.full(len(view.samples), -1, dtype=np.int64)
    levels: dict[int, StripedLevel] = {}
    for d, s in enumerate(view.samples):
        if s.get("ray_offset") is not None:
            raise ValueError(
                "store='striped' streams whole ray files, but the dataset is cut into chunks "
                "(rays_per_chunk); use store='stream', or a dataset without rays_per_chunk"
            )
        if d in bad:
            continue
        try:
            lv, i, n, _, _ = store.locate(s)
        except Exception as exc:
            if view.on_error != "skip" or classify(exc) is None:
                raise
            bad[d] = find_bad(view, d)
            continue
        expected = s.get("file_num_rays", s.get("num_rays"))
        if expected is not None and int(expected) != n:
            raise StalePackError(
                f"ray pack {store.pack_dir}: level {s['level']}, hash {s['hash']} has {n} "
                f"rays in the pack and {expected} in {s.get('ray_path')}; rebuild it: "
                f"`{store.rebuild_command(None)}`"
            )
        levels[int(s["level"])] = lv
        rows[d] = i
    return levels, rows, bad


class _EpochBatches(FusedBatches):
    """A resident store over one epoch's stripes: its plan keeps the first ``keep`` rows of
    each slot (``ray_count = keep``: no per-epoch row selection)."""

    def plan(self, epoch: int) -> EpochPlan:
        plan = super().plan(epoch)
        plan.arrays["ray_count"] = plan.arrays["keep"].copy()
        return plan


class StripedBatches(BatchSource):
    """Batches of a striped pack (module doc): a :class:`BatchSource`.

    Args:
        view: the loader's view of the dataset (its ray store a striped PackedRayStore).
        sampler: the RayBatchSampler (bad samples already replaced in it).
        segment: the known transforms (one fused run).
        device: torch device of the batches.
        levels, rows: :func:`striped_places`' levels and rows.
        seed: the loader's seed (stripe offsets).
        timeout: seconds any wait for a stripe read may take.
        threads, prefetch, cuda_graphs: as FusedBatches'.
        bad: samples known bad (their places are never read).
        held: the samples this rank reads (``shard_store``: its contiguous range of the pack
            order, ``sampler.shard_indices()``), or None for all.

    Raises:
        ValueError: ``RandomRaySubsample(num_rays=K)`` with K not a multiple of W.
    """

    def __init__(
        self,
        view: DatasetView,
        sampler: Any,
        segment: Sequence[Transform],
        device: torch.device,
        levels: dict[int, StripedLevel],
        rows: np.ndarray,
        seed: int,
        *,
        timeout: float = 60.0,
        threads: int = 1,
        prefetch: int = 4,
        cuda_graphs: bool = False,
        bad: dict[int, tuple[str, str]] | None = None,
        held: np.ndarray | None = None,
    ) -> None:
        self.view = view
        self.sampler = sampler
        self.segment = list(segment)
        self.device = device
        self.threads, self.prefetch, self.cuda_graphs = threads, prefetch, cuda_graphs
        self.bad = dict(bad or {})
        w = int(view.ray_store.stripe_rays)
        self.stripe_rays = w
        self.per_epoch = stripes_per_epoch(self.segment, w)
        sample_levels = np.asarray(view.levels, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        if held is not None:  # another rank's samples are not read
            mask = np.zeros(len(rows), dtype=bool)
            mask[np.asarray(held, dtype=np.int64)] = True
            rows = np.where(mask, rows, -1)
        self.reader = StripeReader(levels, sample_levels, rows, self.per_epoch, seed, timeout)
        self.grids, self.view_positions, self.layout = self._static_layout(
            levels, sample_levels, rows
        )

    def _static_layout(
        self, levels: dict[int, StripedLevel], sample_levels: np.ndarray, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, StoreLayout]:
        """The flat grids and views of the levels used, and the layout's fixed parts."""
        order = sorted(levels)
        if len(order) == 1:
            grids, views = levels[order[0]].grids, levels[order[0]].view_positions
            goff, voff = {order[0]: 0}, {order[0]: 0}
        else:
            gs = [levels[L].grids for L in order]
            vs = [levels[L].view_positions for L in order]
            goff = dict(zip(order, np.cumsum([0] + [g.shape[0] for g in gs[:-1]]), strict=True))
            voff = dict(zip(order, np.cumsum([0] + [v.shape[0] for v in vs[:-1]]), strict=True))
            grids = np.concatenate(gs) if gs else np.zeros(0, np.uint8)
            views = np.concatenate(vs) if vs else np.zeros((0, 3), np.float32)
        k = len(rows)
        z = {n: np.zeros(k, np.int64) for n in ("view_start", "view_count", "grid_start", "side")}
        for L, lv in levels.items():
            d = np.flatnonzero((sample_levels == L) & (rows >= 0))
            i = rows[d]
            z["view_start"][d] = voff[L] + lv.view_start[i]
            z["view_count"][d] = lv.view_count[i]
            z["grid_start"][d] = goff[L] + lv.grid_start[i]
            z["side"][d] = lv.side[i]
        stride = self.reader.row_stride
        layout = StoreLayout(
            ray_start=np.maximum(self.reader.slots, 0) * stride,
            ray_count=np.zeros(k, np.int64),
            bad=self.bad,
            **z,
        )
        return grids, views, layout

    def epoch_store(self, stripes: EpochStripes) -> ResidentStore:
        """The resident store of one epoch's stripes (host arrays, or device copies on CUDA)."""
        layout = StoreLayout(
            ray_start=self.layout.ray_start,
            ray_count=stripes.distinct,
            view_start=self.layout.view_start,
            view_count=self.layout.view_count,
            grid_start=self.layout.grid_start,
            side=self.layout.side,
            bad=self.bad,
        )
        rec = stripes.records
        if self.device.type == "cuda":  # pragma: no cover - needs a GPU (not tested on CI)
            import cupy as cp

            with cp.cuda.Device(self.device.index or 0):
                arrays: dict[str, Any] = {
                    k: cp.asarray(np.ascontiguousarray(rec[k], dtype=schema.STORE_KEYS[k][0]))
                    for k in schema.RAY_FIELDS
                }
                arrays["view_positions"] = cp.asarray(np.ascontiguousarray(self.view_positions))
                arrays["grids"] = cp.asarray(np.ascontiguousarray(self.grids))
            return ResidentStore(arrays, layout, "gpu")
        arrays = {"records": rec, **{k: rec[k] for k in schema.RAY_FIELDS}}
        arrays["view_positions"] = self.view_positions
        arrays["grids"] = self.grids
        return ResidentStore(arrays, layout, "host")

    def epoch_batches(self, epoch: int) -> FusedBatches:
        """The resident-store source of ``epoch``'s stripes (read now, or read ahead); starts
        reading the next epoch's in the background."""
        stripes = self.reader.get(epoch)
        self.reader.prefetch(epoch + 1)
        return _EpochBatches(
            self.epoch_store(stripes),
            self.view,
            self.sampler,
            self.segment,
            self.device,
            threads=self.threads,
            prefetch=self.prefetch,
            cuda_graphs=self.cuda_graphs,
        )

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch plan of ``epoch`` over its stripes (host arrays)."""
        return self.epoch_batches(epoch).plan(epoch)

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of ``epoch`` from plan batch ``start`` on (module doc)."""
        return self.epoch_batches(epoch).batches(epoch, start)

    def close(self) -> None:
        """Drop the stripe buffers and stop the background read."""
        self.reader.close()
