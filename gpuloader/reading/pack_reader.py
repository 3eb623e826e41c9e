"""Whole batches read from a pack, in worker processes: the pack stream's reader side.

When a split fits neither the GPU nor host RAM, batches still come whole: a
:class:`PackBatchReader` (in worker processes: DALI's parallel external source in batch
mode, one whole loader batch per DALI sample, or torch DataLoader workers) computes the
epoch plan itself (a pure function of seed and epoch), selects each sample's rows
(Feistel, vectorized over the batch) and gathers them from the pack's memory-mapped level
arrays into one buffer per output, in output order; it also gathers the batch's view
positions and reads its grids (through the voxel cache). The loader then runs the fused pass
on that batch-sized store with :func:`local_plan` (the row selection already done: ``keep ==
ray_count``; :mod:`gpuloader.loading.sources.pack_stream`).

Outputs of one reader call (:data:`STREAM_OUTPUTS`)::

    origins, directions (T, 3) float32   distances (T,) float32   hits (T,) uint8
    view_ids, face_ids (T,) int32        view_positions (V, 3) float32
    grids (G,) uint8 (each sample's grid, flat, in slot order)    meta (2,) int64 (epoch, i)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from gpuloader import schema
from gpuloader.dataset.view import DatasetView
from gpuloader.errors import GPULoaderError
from gpuloader.fused.cpu import select_store_rows
from gpuloader.plan.batch import BatchPlan
from gpuloader.plan.epoch import EpochPlan, build_epoch_plan
from gpuloader.plan.sampler import order_only
from gpuloader.reading.reader import OUTPUT_DTYPES, OUTPUT_NDIM, RAY_OUTPUTS, encode_error
from gpuloader.stores.layout import StoreLayout
from gpuloader.stores.npz import chunk_span

__all__ = [
    "STREAM_DTYPES",
    "STREAM_NDIM",
    "STREAM_OUTPUTS",
    "BatchIndexDataset",
    "PackBatchReader",
    "PackItems",
    "PassIndices",
    "batch_pipeline",
    "local_plan",
    "pack_layout",
]

STREAM_OUTPUTS: tuple[str, ...] = (*RAY_OUTPUTS, "view_positions", "grids", "meta")
#: dtype of each output: the per-sample reader's, plus flat grids and (epoch, i)
STREAM_DTYPES: dict[str, np.dtype] = {
    **{k: OUTPUT_DTYPES[k] for k in (*RAY_OUTPUTS, "view_positions")},
    "grids": schema.GRID_DTYPE,
    "meta": np.dtype(np.int64),
}
#: rank of each output
STREAM_NDIM: dict[str, int] = {
    **{k: OUTPUT_NDIM[k] for k in (*RAY_OUTPUTS, "view_positions")},
    "grids": 1,
    "meta": 1,
}


def pack_layout(
    dataset: Any, sides: np.ndarray, bad: dict[int, tuple[str, str]] | None = None
) -> tuple[StoreLayout, np.ndarray]:
    """Each sample's place in its pack level: (layout with level-relative starts, levels).

    ``dataset`` (a HierarchicalVoxelRayDataset or its DatasetView): its ``ray_store`` must be
    a PackedRayStore (``locate`` gives the offsets). A chunk
    (``rays_per_chunk``) starts ``ray_offset`` rows into its file and has ``num_rays`` rows.
    ``bad``: samples already known bad (no place); with the dataset's ``on_error='skip'`` a
    sample the pack left out as bad joins them (``layout.bad``) instead of raising.

    Returns:
        the layout ((K,) int64 arrays by dataset index) and ``levels`` (K,) int64.
    """
    from gpuloader.format.validate import classify
    from gpuloader.reading.headers import find_bad

    view = DatasetView.of(dataset)
    store = view.ray_store
    skip = view.on_error == "skip"
    bad = dict(bad or {})
    k = len(view.samples)
    r0 = np.zeros(k, np.int64)
    n = np.zeros(k, np.int64)
    v0 = np.zeros(k, np.int64)
    v = np.zeros(k, np.int64)
    for i, s in enumerate(view.samples):
        if i in bad:
            continue
        try:
            _, r0[i], n[i], v0[i], v[i] = store.locate(s)
            off, n[i] = chunk_span(s, int(n[i]))
        except Exception as exc:
            if not skip or classify(exc) is None:
                raise
            bad[i] = find_bad(view, i)  # the error a full read gives, as the CPU API's
            r0[i] = n[i] = v0[i] = v[i] = 0
            continue
        r0[i] += off
    levels = np.array(view.levels, dtype=np.int64)
    sides = np.where(np.isin(np.arange(k), list(bad)), 0, np.asarray(sides, np.int64))
    layout = StoreLayout(
        ray_start=r0,
        ray_count=n,
        view_start=v0,
        view_count=v,
        grid_start=np.zeros(k, np.int64),
        side=sides,
        bad=bad,
    )
    return layout, levels


def local_plan(bp: BatchPlan) -> BatchPlan:
    """The plan of a batch whose rows were already selected and gathered in output order:
    the fused pass then keeps every row (``keep == ray_count``) of a batch-sized store
    (rays from ``out_start``, views from ``view_out_start``, grids one cube after another)."""
    grid_sizes = bp.side.astype(np.int64) ** 3
    return replace(
        bp,
        ray_start=np.asarray(bp.out_start, np.int64),
        ray_count=np.asarray(bp.keep, np.int64),
        view_start=np.asarray(bp.view_out_start, np.int64),
        grid_start=np.concatenate([[0], np.cumsum(grid_sizes)[:-1]]).astype(np.int64),
    )


class PackBatchReader:
    """Reads whole batches from a pack (module doc); picklable, stateless per call.

    Args:
        dataset: the dataset or its DatasetView (its ``ray_store`` a PackedRayStore); its
            view without the transform is kept (pickled into the workers).
        sampler: the RayBatchSampler (only ``batches(epoch)`` is called; its order is kept,
            ``plan.sampler.order_only``).
        segment: the known transforms (for the ray counts of the plan).
        layout: :func:`pack_layout`'s layout. levels: (K,) int64.
        first_epoch: the epoch of DALI's epoch 0.
        first_start: the batch of ``first_epoch`` that DALI's iteration 0 reads (resume).
    """

    def __init__(
        self,
        dataset: Any,
        sampler: Any,
        segment: list,
        layout: StoreLayout,
        levels: np.ndarray,
        first_epoch: int = 0,
        first_start: int = 0,
    ) -> None:
        self.dataset = DatasetView.of(dataset).with_(transform=None)
        self.sampler = order_only(sampler)
        self.segment = list(segment)
        self.layout = layout
        self.levels = levels
        self.seed = self.dataset.seed
        self.sps = self.dataset.samples_per_subvolume
        self.first_epoch = int(first_epoch)
        self.first_start = int(first_start)
        self._plans: dict[int, EpochPlan] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_plans"] = {}
        return state

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch plan of ``epoch`` (the last one kept)."""
        got = self._plans.get(epoch)
        if got is None:
            got = build_epoch_plan(
                self.sampler.batches(epoch),
                self.layout,
                self.levels,
                self.segment,
                self.seed,
                epoch,
                self.sps,
            )
            self._plans = {epoch: got}
        return got

    def read(self, epoch: int, i: int) -> tuple[np.ndarray, ...]:
        """Batch ``i`` of ``epoch``: the outputs of :data:`STREAM_OUTPUTS`.

        Raises:
            StopIteration: ``i`` is past the epoch's last batch.
        """
        plan = self.plan(epoch)
        if i >= len(plan):
            raise StopIteration
        bp = plan.batch(i)
        rows, owner, _ = select_store_rows(bp)
        store = self.dataset.ray_store
        out: dict[str, np.ndarray] = {}
        levels = self.levels[np.asarray(bp.index, np.int64)]
        t = rows.shape[0]
        ray_level = levels[owner]
        uniq = np.unique(levels)
        for level in uniq:
            arrays = store.level_arrays(int(level))
            sel = slice(None) if uniq.size == 1 else np.flatnonzero(ray_level == level)
            for k in RAY_OUTPUTS:
                src = arrays[k]
                if k not in out:
                    out[k] = np.empty((t, *src.shape[1:]), dtype=src.dtype)
                out[k][sel] = np.take(src, rows[sel], axis=0)
        vcount = np.asarray(bp.view_count, np.int64)
        vowner = np.repeat(np.arange(vcount.shape[0]), vcount)
        vrows = np.asarray(bp.view_start)[vowner] + (
            np.arange(vowner.shape[0]) - np.asarray(bp.view_out_start)[vowner]
        )
        views = np.empty((vrows.shape[0], 3), np.float32)
        vlevel = levels[vowner]
        for level in uniq:
            sel = np.flatnonzero(vlevel == level)
            views[sel] = np.take(store.level_arrays(int(level))["view_positions"], vrows[sel], 0)
        out["view_positions"] = views
        grids = [
            np.ascontiguousarray(self.dataset.voxels(int(j)), dtype=np.uint8).reshape(-1)
            for j in np.asarray(bp.index, np.int64)
        ]
        out["grids"] = np.concatenate(grids) if grids else np.zeros(0, np.uint8)
        out["meta"] = np.array([epoch, i], dtype=np.int64)
        return tuple(out[k] for k in STREAM_OUTPUTS)

    def __call__(self, batch_info: Any) -> tuple[list[np.ndarray], ...]:
        """DALI batch-mode entry: one DALI sample per loader batch."""
        e = int(batch_info.epoch_idx)
        start = self.first_start if e == 0 else 0
        try:
            arrays = self.read(self.first_epoch + e, start + int(batch_info.iteration))
        except GPULoaderError as exc:
            raise RuntimeError(encode_error(exc)) from exc
        return tuple([a] for a in arrays)


class BatchIndexDataset:
    """Map-style view for torch DataLoader workers: item ``i`` is batch ``start + i`` of
    ``epoch`` (``n`` batches in all)."""

    def __init__(self, reader: PackBatchReader, epoch: int, n: int, start: int = 0) -> None:
        self.reader, self.epoch, self.n, self.start = reader, epoch, n, start

    def __len__(self) -> int:
        return max(0, self.n - self.start)

    def __getitem__(self, i: int) -> tuple[np.ndarray, ...]:
        return self.reader.read(self.epoch, self.start + int(i))


class PackItems:
    """Map-style view for persistent torch DataLoader workers: item ``(epoch, i)`` is batch
    ``i`` of ``epoch`` (the epoch travels with the index, so the workers last across
    epochs)."""

    def __init__(self, reader: PackBatchReader) -> None:
        self.reader = reader

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, ...]:
        return self.reader.read(int(key[0]), int(key[1]))


class PassIndices:
    """The sampler of :class:`PackItems`: ``(epoch, i)`` for ``i`` in ``start .. n - 1``,
    set before each pass (it lives in this process)."""

    def __init__(self) -> None:
        self.epoch, self.n, self.start = 0, 0, 0

    def __iter__(self) -> Any:
        return iter([(self.epoch, i) for i in range(self.start, self.n)])

    def __len__(self) -> int:
        return max(0, self.n - self.start)


def batch_pipeline(
    reader: PackBatchReader, num_workers: int, prefetch: int, worker_timeout: float = 60.0
) -> Any:
    """A CPU DALI pipeline whose parallel batch-mode external source yields whole batches,
    built, in a :class:`~gpuloader.reading.workers.DaliGuard` that bounds every run by
    ``worker_timeout`` seconds."""
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    from gpuloader.reading.pipeline import dali_dtypes
    from gpuloader.reading.workers import DaliGuard, build_bounded, stop_pipeline

    pipe = Pipeline(
        batch_size=1,
        num_threads=1,
        device_id=None,
        py_num_workers=max(1, num_workers),
        py_start_method="spawn",
        prefetch_queue_depth=max(2, prefetch),
    )
    with pipe:
        outs = fn.external_source(
            source=reader,
            num_outputs=len(STREAM_OUTPUTS),
            batch=True,
            batch_info=True,
            parallel=True,
            dtype=dali_dtypes([STREAM_DTYPES[k] for k in STREAM_OUTPUTS]),
            ndim=[STREAM_NDIM[k] for k in STREAM_OUTPUTS],
        )
        pipe.set_outputs(*outs)
    try:
        build_bounded(pipe, worker_timeout)  # starts the workers
    except BaseException:
        stop_pipeline(pipe)
        raise
    return DaliGuard(pipe, worker_timeout)
