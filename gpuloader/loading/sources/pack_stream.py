"""Streaming whole batches from a pack, for data larger than memory.

When a split fits neither the GPU nor host RAM, batches still come whole: a
:class:`PackBatchReader` (in worker processes: DALI's parallel external source in batch
mode, one whole loader batch per DALI sample, or torch DataLoader workers) computes the
epoch plan itself (a pure function of seed and epoch), selects each sample's rows
(Feistel, vectorized over the batch) and gathers them from the pack's memory-mapped level
arrays into one buffer per output, in output order; it also gathers the batch's view
positions and reads its grids (through the voxel cache). The main process then runs the same
fused pass as a resident store (numpy, or the CUDA kernels after one host-to-device copy per
output) on that batch-sized store, with the row selection already done (``keep ==
ray_count``), so the decisions are those of every other store and back end.

Outputs of one reader call (:data:`STREAM_OUTPUTS`)::

    origins, directions (T, 3) float32   distances (T,) float32   hits (T,) uint8
    view_ids, face_ids (T,) int32        view_positions (V, 3) float32
    grids (G,) uint8 (each sample's grid, flat, in slot order)    meta (2,) int64 (epoch, i)
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import numpy as np

from gpuloader import schema
from gpuloader.errors import GPULoaderError
from gpuloader.fused.cpu import select_store_rows
from gpuloader.plan.batch import BatchPlan
from gpuloader.plan.epoch import EpochPlan, build_epoch_plan
from gpuloader.reading.reader import OUTPUT_DTYPES, OUTPUT_NDIM, RAY_OUTPUTS
from gpuloader.stores.layout import StoreLayout
from gpuloader.stores.npz import chunk_span

__all__ = ["STREAM_OUTPUTS", "PackBatchReader", "local_plan", "pack_layout"]

STREAM_OUTPUTS: tuple[str, ...] = (*RAY_OUTPUTS, "view_positions", "grids", "meta")


def pack_layout(
    dataset: Any, sides: np.ndarray, bad: dict[int, tuple[str, str]] | None = None
) -> tuple[StoreLayout, np.ndarray]:
    """Each sample's place in its pack level: (layout with level-relative starts, levels).

    ``dataset.ray_store`` must be a PackedRayStore (``locate`` gives the offsets). A chunk
    (``rays_per_chunk``) starts ``ray_offset`` rows into its file and has ``num_rays`` rows.
    ``bad``: samples already known bad (no place); with the dataset's ``on_error='skip'`` a
    sample the pack left out as bad joins them (``layout.bad``) instead of raising.
    """
    from gpuloader.format.validate import classify
    from gpuloader.reading.headers import find_bad

    store = dataset.ray_store
    skip = getattr(dataset, "on_error", "raise") == "skip"
    bad = dict(bad or {})
    k = len(dataset.samples)
    r0 = np.zeros(k, np.int64)
    n = np.zeros(k, np.int64)
    v0 = np.zeros(k, np.int64)
    v = np.zeros(k, np.int64)
    for i, s in enumerate(dataset.samples):
        if i in bad:
            continue
        try:
            _, r0[i], n[i], v0[i], v[i] = store.locate(s)
            off, n[i] = chunk_span(s, int(n[i]))
        except Exception as exc:
            if not skip or classify(exc) is None:
                raise
            bad[i] = find_bad(dataset, i)  # the error a full read gives, as the CPU API's
            r0[i] = n[i] = v0[i] = v[i] = 0
            continue
        r0[i] += off
    levels = np.array([int(s["level"]) for s in dataset.samples], dtype=np.int64)
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
    the fused pass then keeps every row (``keep == ray_count``) of a batch-sized store."""
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
        dataset: the dataset (its ``ray_store`` a PackedRayStore); a light copy is kept.
        sampler: the RayBatchSampler (only ``batches(epoch)`` is called; copied).
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
        ds = copy.copy(dataset)
        ds.transform = None
        self.dataset = ds
        smp = copy.copy(sampler)
        smp.dataset = None
        self.sampler = smp
        self.segment = list(segment)
        self.layout = layout
        self.levels = levels
        self.seed = int(getattr(dataset, "seed", 0))
        self.sps = getattr(dataset, "samples_per_subvolume", None)
        self.first_epoch = int(first_epoch)
        self.first_start = int(first_start)
        self._plans: dict[int, EpochPlan] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_plans"] = {}
        return state

    def plan(self, epoch: int) -> EpochPlan:
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
            arrays = store._level(int(level)).arrays
            sel = slice(None) if uniq.size == 1 else np.flatnonzero(ray_level == level)
            for k in ("origins", "directions", "distances", "hits", "view_ids", "face_ids"):
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
            views[sel] = np.take(store._level(int(level)).arrays["view_positions"], vrows[sel], 0)
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
        from gpuloader.reading.reader import encode_error

        e = int(batch_info.epoch_idx)
        start = self.first_start if e == 0 else 0
        try:
            arrays = self.read(self.first_epoch + e, start + int(batch_info.iteration))
        except GPULoaderError as exc:
            raise RuntimeError(encode_error(exc)) from exc
        return tuple([a] for a in arrays)


#: dtype and rank of each output: the per-sample reader's, plus flat grids and (epoch, i)
_STREAM_DTYPES = {
    **{k: OUTPUT_DTYPES[k] for k in (*RAY_OUTPUTS, "view_positions")},
    "grids": schema.GRID_DTYPE,
    "meta": np.dtype(np.int64),
}
_STREAM_NDIM = {k: OUTPUT_NDIM[k] for k in (*RAY_OUTPUTS, "view_positions")}


class _BatchIndexDataset:
    """Map-style view for torch DataLoader workers: item ``i`` is batch ``start + i`` of
    ``self.epoch`` (``n`` batches in all)."""

    def __init__(self, reader: PackBatchReader, epoch: int, n: int, start: int = 0) -> None:
        self.reader, self.epoch, self.n, self.start = reader, epoch, n, start

    def __len__(self) -> int:
        return max(0, self.n - self.start)

    def __getitem__(self, i: int) -> tuple[np.ndarray, ...]:
        return self.reader.read(self.epoch, self.start + int(i))


def _dali_stream(
    reader: PackBatchReader, num_workers: int, prefetch: int, worker_timeout: float = 60.0
) -> Any:
    """A CPU DALI pipeline whose parallel batch-mode external source yields whole batches,
    built, in a :class:`~gpuloader.reading.workers.DaliGuard` that bounds every run by
    ``worker_timeout`` seconds."""
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    from gpuloader.reading.pipeline import dali_dtypes
    from gpuloader.reading.workers import DaliGuard, stop_pipeline

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
            dtype=dali_dtypes([_STREAM_DTYPES[k] for k in STREAM_OUTPUTS]),
            ndim=[_STREAM_NDIM.get(k, 1) for k in STREAM_OUTPUTS],
        )
        pipe.set_outputs(*outs)
    try:
        pipe.build()  # starts the workers
    except BaseException:
        stop_pipeline(pipe)
        raise
    return DaliGuard(pipe, worker_timeout)


class StreamBatches:
    """Whole batches streamed from a pack (module doc), then the fused pass.

    Args:
        reader: the batch reader (pickled into the workers).
        hashes: each dataset sample's hash.
        device: torch device of the batches.
        num_workers: reader processes (0: in this process).
        backend: "dali" or "torch" (DataLoader workers).
        prefetch: batches read ahead.
        worker_timeout: seconds to wait for a batch before raising
            :class:`~gpuloader.errors.WorkerError` (a dead worker raises at once; the workers
            are then stopped, and the next pass starts new ones).
    """

    def __init__(
        self,
        reader: PackBatchReader,
        hashes: list[str],
        device: Any,
        num_workers: int = 2,
        backend: str = "torch",
        prefetch: int = 2,
        worker_timeout: float = 60.0,
    ) -> None:
        self.reader = reader
        self.hashes = hashes
        self.device = device
        self.num_workers = int(num_workers)
        self.backend = backend if self.num_workers > 0 else "torch"
        self.prefetch = max(1, int(prefetch))
        self.worker_timeout = float(worker_timeout)
        self._pipe: Any = None  # the DaliGuard of the DALI pipeline
        self._pipe_epoch: int | None = None

    @staticmethod
    def _as_is(batch: Any) -> Any:
        """The DataLoader's collate: the reader's arrays unchanged."""
        return batch

    def close(self) -> None:
        """Stop the DALI workers and pipeline (DataLoader workers end with each pass)."""
        guard, self._pipe = self._pipe, None
        if guard is not None:
            guard.close()

    def _raw(self, epoch: int, n: int, start: int = 0) -> Any:
        """The reader's outputs of batches ``start, ..., n - 1`` of ``epoch``.

        Raises:
            WorkerError: a worker died or sent nothing within ``worker_timeout`` (its
                workers are stopped; the next call starts new ones).
        """
        from gpuloader.errors import WorkerError
        from gpuloader.reading.workers import guarded_batches

        if self.backend == "dali":
            if self._pipe is None or self._pipe_epoch != epoch or start:
                self.close()
                self.reader.first_epoch = epoch
                self.reader.first_start = start  # DALI's later epochs start at batch 0
                self._pipe = _dali_stream(
                    self.reader, self.num_workers, self.prefetch, self.worker_timeout
                )
            guard = self._pipe
            self._pipe_epoch = None  # mid-epoch: an interrupted pass rebuilds the pipeline
            try:
                for _ in range(start, n):
                    yield tuple(np.array(tl.at(0)) for tl in guard.run())
                try:  # the end of DALI's epoch: the next one continues this pipeline
                    guard.run()
                except StopIteration:
                    guard.reset()
                    self._pipe_epoch = epoch + 1
            except WorkerError:
                if self._pipe is guard:
                    self._pipe = None  # stopped by the guard: the next pass builds anew
                raise
            return
        import torch

        dl = torch.utils.data.DataLoader(
            _BatchIndexDataset(self.reader, epoch, n, start),
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch if self.num_workers > 0 else None,
            timeout=self.worker_timeout if self.num_workers > 0 else 0,
            # numpy arrays come through the queue as they are: torch tensors would come as
            # file descriptors fetched from the worker, a wait no timeout bounds
            collate_fn=StreamBatches._as_is,
        )
        for arrays in guarded_batches(dl, self.worker_timeout):
            yield tuple(np.asarray(a) for a in arrays)

    def __call__(self, epoch: int, start: int = 0) -> Any:
        """The batches of ``epoch`` from batch ``start`` on (a resumed epoch)."""
        from gpuloader.loading.sources.resident import assemble_host, to_device

        plan = self.reader.plan(epoch)
        n = len(plan)
        for i, arrays in enumerate(self._raw(epoch, n, start), start):
            local = dict(zip(STREAM_OUTPUTS, arrays, strict=True))
            if tuple(local["meta"].tolist()) != (epoch, i):
                raise RuntimeError(f"stream out of order: got {local['meta']}, want {(epoch, i)}")
            bp = local_plan(plan.batch(i))
            if getattr(self.device, "type", "cpu") == "cuda":
                yield self._assemble_cuda(local, bp, plan, i)
            else:
                batch = assemble_host(local, bp, plan, i, self.hashes)
                cpu = self.device is None or self.device.type == "cpu"
                yield batch if cpu else to_device(batch, self.device)

    def _assemble_cuda(self, local: dict, bp: BatchPlan, plan: EpochPlan, i: int) -> dict:
        """The batch-sized store goes to the device (one copy per output), then the CUDA
        fused pass."""
        import cupy
        import torch

        from gpuloader.fused import cuda as fused_cupy
        from gpuloader.loading.sources.resident import batch_dict

        dev = self.device
        stream = torch.cuda.current_stream(dev)
        with cupy.cuda.Device(dev.index or 0), cupy.cuda.ExternalStream(stream.cuda_stream):
            store = {k: cupy.asarray(v) for k, v in local.items() if k != "meta"}
            rays = fused_cupy.gather_rays(store, bp)
            vox = fused_cupy.gather_grids(store["grids"], bp)
            vp = fused_cupy.gather_views(store["view_positions"], bp)
        levels = plan.levels[plan.slots(i)]
        return batch_dict(rays, vox, vp, bp, levels, self.hashes, torch.from_dlpack, dev)
