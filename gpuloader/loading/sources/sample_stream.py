"""The per-sample stream: the sample reader in workers, then the fused pass per batch.

The source of ``store="stream"`` over npz files, and of any transform a resident store cannot
take (custom CPU callables, several fused runs)::

    RayBatchSampler order (pure function of seed, epoch)
      -> RayReader per sample (DALI parallel external source, or torch DataLoader workers):
         only the rows needed, the dataset's row subsample, custom CPU transforms
      -> each output concatenated over the batch (a RawBatch; on the GPU: DALI's copy, then
         device to device; no host round trip)
      -> a batch-sized store (the arrays of a ResidentStore: rays, views, flat cubic grids)
         and, per known segment j, a local BatchPlan (draw_plans with the samples'
         SampleContext(dataset.seed, epoch, index) and segment=j; row selection keyed by
         SUBSAMPLE + the segment's offset): one fused pass per segment
         (:mod:`gpuloader.fused.cpu` / :func:`gpuloader.fused.cuda.fused_batch`), the output
         of segment j the store of segment j + 1
      -> the dict of ``collate_ray_batch`` (same keys, dtypes and shapes), on the device.

The decisions are those of the CPU API (``Compose`` applies each segment's plan to each
sample in turn: rows, symmetry, scales, noise, jitter) for the same dataset seed, sampler
arguments and transform, whatever the back end, device or number of workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from gpuloader.augment import rng
from gpuloader.augment.transforms import Transform, draw_plans
from gpuloader.errors import WorkerError
from gpuloader.loading.sources.base import BatchSource
from gpuloader.loading.sources.batch_dict import fused_dict, fused_pass
from gpuloader.plan.batch import BatchPlan
from gpuloader.reading.pipeline import RawBatch, RayPipeline
from gpuloader.reading.reader import RAY_OUTPUTS, RayReader
from gpuloader.reading.samples import EpochBatches, ReaderDataset, keep_batch, raw_from_samples
from gpuloader.reading.workers import guarded_batches, stop_loader

__all__ = ["SampleStream", "assemble", "segment_plan"]


def _exclusive(counts: np.ndarray) -> np.ndarray:
    """(B,) int64 exclusive cumulative sum: where each sample's rows start."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def segment_plan(
    segment: Sequence[Transform],
    j: int,
    seed: int,
    index: np.ndarray,
    epochs: np.ndarray,
    levels: np.ndarray,
    sides: np.ndarray,
    counts: np.ndarray,
    vcounts: np.ndarray,
) -> BatchPlan:
    """The local plan of known segment ``j`` over a batch-sized store (samples one after the
    other: rays, views and cubic grids in slot order).

    Args:
        segment: the segment's known transforms (empty: the identity).
        j: the segment's place among the transform's fused runs (offsets the purposes).
        seed: the dataset seed. index, epochs, levels, sides: (B,) int64 each sample's
            dataset index, epoch, level and grid side.
        counts, vcounts: (B,) int64 rays and views each sample has in the store.

    Returns:
        the BatchPlan: ``draw_plans``' parameters (what ``draw_plan`` gives each sample),
        ``keep = min(counts, num_rays)`` and the Feistel keys of purpose ``SUBSAMPLE + offset``.
    """
    b = index.shape[0]
    params: dict[str, np.ndarray] = {}
    keys = np.zeros((b, rng.FEISTEL_ROUNDS), np.uint32)
    num_rays = None
    for epoch in np.unique(epochs):  # one epoch per batch; draws are keyed by one epoch
        sel = np.flatnonzero(epochs == epoch)
        drawn = draw_plans(
            segment, seed, int(epoch), index[sel], sides[sel], segment=j, level=levels[sel]
        )
        num_rays = drawn.pop("num_rays")
        for k, v in drawn.items():
            params.setdefault(k, np.zeros(b, v.dtype))[sel] = v
        purpose = rng.Purpose.SUBSAMPLE + int(drawn["purpose_offset"][0])
        words = rng.random_words(
            seed, int(epoch), index[sel][:, None], purpose, np.arange(rng.FEISTEL_ROUNDS)
        )
        keys[sel] = words[..., 0]
    if not params:  # an empty batch
        params = draw_plans(segment, seed, 0, index, sides, segment=j, level=levels)
        params.pop("num_rays")
    keep = counts if num_rays is None else np.minimum(counts, int(num_rays))
    vstart = _exclusive(vcounts)
    return BatchPlan(
        seed=int(seed),
        index=index.astype(np.uint32),
        epoch=epochs.astype(np.uint32),
        ray_start=_exclusive(counts),
        ray_count=counts.astype(np.int64),
        keep=keep.astype(np.int64),
        out_start=_exclusive(keep),
        select_keys=keys,
        view_start=vstart,
        view_count=vcounts.astype(np.int64),
        view_out_start=vstart,
        grid_start=_exclusive(sides.astype(np.int64) ** 3),
        side=sides.astype(np.int64),
        **params,
    )


def _cube_grids(flat: Any, shapes: list[tuple[int, ...]], sides: np.ndarray, xp: Any) -> Any:
    """Flat grids of the given (D, H, W) shapes -> flat cubes (sample b: ``sides[b]**3``
    bytes, C order, a smaller grid zero-padded at the end of each axis, as collate pads)."""
    sizes = sides.astype(np.int64) ** 3
    total = int(sizes.sum())
    if all(s == (n, n, n) for s, n in zip(shapes, sides.tolist(), strict=True)):
        return flat[:total]
    out = xp.zeros(total, dtype=xp.uint8)
    off = 0
    for (d, h, w), n, start in zip(shapes, sides.tolist(), _exclusive(sizes).tolist(), strict=True):
        cube = out[start : start + n**3].reshape(n, n, n)
        cube[:d, :h, :w] = flat[off : off + d * h * w].reshape(d, h, w)
        off += d * h * w
    return out


def _next_store(out: dict[str, Any], sides: np.ndarray, xp: Any) -> dict[str, Any]:
    """The outputs of one segment as the batch-sized store of the next (the store's dtypes:
    hits uint8, ids int32, grids flat uint8 cubes; every value exact)."""
    vox = out["voxels"]  # (B, 1, S, S, S) float32
    if np.all(sides == vox.shape[-1]):
        grids = vox.reshape(-1)
    else:
        parts = [vox[b, 0, :n, :n, :n].reshape(-1) for b, n in enumerate(sides.tolist())]
        grids = xp.concatenate(parts) if parts else xp.zeros(0, xp.float32)
    return {
        "origins": out["origins"],
        "directions": out["directions"],
        "distances": out["distances"],
        "hits": out["hits"].astype(xp.uint8),
        "view_ids": out["view_ids"].astype(xp.int32),
        "face_ids": out["face_ids"].astype(xp.int32),
        "view_positions": out["view_positions"],
        "grids": grids.astype(xp.uint8),
    }


def assemble(
    raw: RawBatch,
    segments: Sequence[Sequence[Transform]],
    seed: int,
    hashes: Sequence[str],
    device: torch.device,
    bad_line: Callable[[int], str],
) -> dict[str, Any]:
    """One read batch -> the augmented ``collate_ray_batch`` dict on ``device`` (module doc).

    Args:
        raw: the reader's outputs, concatenated over the batch's slots (fillers last).
        segments: the known segments (none: the identity).
        seed: the dataset seed. hashes: each dataset sample's hash.
        device: the batch's device (CUDA: the fused pass runs there, on torch's stream).
        bad_line: the first line of the error of a bad sample a worker replaced.
    """
    meta = raw.meta
    real = np.flatnonzero(meta[:, 0] >= 0)
    if real.size and real[-1] != real.size - 1:
        raise RuntimeError("filler slots must come after the real samples of a batch")
    b = int(real.size)
    index, epochs, levels = meta[:b, 0], meta[:b, 1], meta[:b, 2]
    replaced = meta[:b, 4] if meta.shape[1] > 4 else np.full(b, -1)
    skipped = [(p, int(r), bad_line(int(r))) for p, r in enumerate(replaced) if r >= 0]
    counts = np.array([s[0] for s in raw.shapes["origins"][:b]], dtype=np.int64)
    vcounts = np.array([s[0] for s in raw.shapes["view_positions"][:b]], dtype=np.int64)
    vshapes = [tuple(int(x) for x in s) for s in raw.shapes["voxels"][:b]]
    sides = np.array([max(s) if s else 0 for s in vshapes], dtype=np.int64)
    shapes = np.array(vshapes, dtype=np.int64).reshape(b, 3)

    def run(xp: Any) -> dict[str, Any]:
        arrays = {k: xp.asarray(v) for k, v in raw.arrays.items()}  # zero-copy views
        store = {k: arrays[k] for k in (*RAY_OUTPUTS, "view_positions")}
        store["grids"] = _cube_grids(arrays["voxels"], vshapes, sides, xp)
        n = counts
        runs = list(segments) or [[]]
        for j, seg in enumerate(runs):
            bp = segment_plan(seg, j, seed, index, epochs, levels, sides, n, vcounts)
            out = fused_pass(store, bp, cuda=xp is not np)
            if j + 1 < len(runs):
                store, n = _next_store(out, sides, xp), bp.keep
        return fused_dict(out, bp, levels.astype(np.int64), hashes, device, shapes)

    if device.type == "cuda":
        import cupy

        stream = torch.cuda.current_stream(device)
        with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream):
            batch = run(cupy)
    else:
        batch = run(np)
    if skipped:
        batch["skipped"] = skipped
    return batch


class SampleStream(BatchSource):
    """Batches of the per-sample reader (module doc): a :class:`BatchSource`.

    Args:
        sampler: the loader's RayBatchSampler; its ``dataset`` is the loader's view of the
            dataset (a bad sample is replaced by the reader as it reads).
        segments: the transform's known segments. cpu_transforms: its custom callables (run
            per sample in the reader). ray_budget: rows the transform keeps, or None.
        seed: the dataset seed. hashes: each dataset sample's hash.
        device: torch device of the batches.
        backend: "dali" (RayPipeline) or "torch" (DataLoader workers, or this process).
        num_workers, prefetch, start_method, worker_timeout: the readers' (GPURayLoader's).
        bad_line: the skip ledger's first line of a replaced sample's error.
    """

    def __init__(
        self,
        sampler: Any,
        segments: Sequence[Sequence[Transform]],
        cpu_transforms: Sequence[Callable],
        ray_budget: int | None,
        seed: int,
        hashes: Sequence[str],
        device: torch.device,
        backend: str,
        num_workers: int,
        prefetch: int,
        start_method: str,
        worker_timeout: float,
        bad_line: Callable[[int], str],
    ) -> None:
        self.sampler = sampler
        self.segments = [list(s) for s in segments]
        self.cpu_transforms = list(cpu_transforms)
        self.ray_budget = ray_budget
        self.seed = int(seed)
        self.hashes = hashes
        self.device = device
        self.backend = backend
        self.num_workers = int(num_workers)
        self.prefetch = int(prefetch)
        self.start_method = start_method
        self.worker_timeout = float(worker_timeout)
        self.bad_line = bad_line
        self._pipe: RayPipeline | None = None
        self._pipe_epoch: int | None = None  # epoch the pipeline's next DALI epoch reads
        self._pipe_fresh = False
        self._torch_loader: torch.utils.data.DataLoader | None = None

    def reader(self, first_epoch: int, first_start: int = 0) -> RayReader:
        """The per-sample reader (pickled into the workers)."""
        return RayReader(
            self.sampler.dataset,
            self.sampler,
            first_epoch=first_epoch,
            first_start=first_start,
            cpu_transforms=self.cpu_transforms,
            ray_budget=self.ray_budget,
            batch_size=self.sampler.subvolumes_per_batch,
        )

    def assemble(self, raw: RawBatch) -> dict[str, Any]:
        """One read batch as the augmented batch dict (:func:`assemble`)."""
        return assemble(raw, self.segments, self.seed, self.hashes, self.device, self.bad_line)

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of ``epoch`` from batch ``start`` on (a resumed epoch)."""
        if self.backend == "dali":
            return self._iter_dali(epoch, start)
        return self._iter_torch(epoch, start)

    def close(self) -> None:
        """Stop the DALI pool or the DataLoader workers and free their shared memory."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe.close()
        loader, self._torch_loader = self._torch_loader, None
        if loader is not None:
            stop_loader(loader)

    def _iter_dali(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        if self._pipe is None or not self._pipe_fresh or self._pipe_epoch != epoch or start:
            if self._pipe is not None:
                self._pipe.close()
                self._pipe = None
            self._pipe = RayPipeline(
                self.reader(epoch, start),
                batch_size=self.sampler.subvolumes_per_batch,
                num_workers=self.num_workers,
                prefetch=self.prefetch,
                device_id=self.device.index if self.device.type == "cuda" else None,
                start_method=self.start_method,
                worker_timeout=self.worker_timeout,
            )
            self._pipe_epoch = epoch
        pipe = self._pipe
        self._pipe_fresh = False
        done = False
        try:
            while True:
                try:
                    raw = pipe.next_batch()
                except StopIteration:
                    done = True
                    break
                yield self.assemble(raw)
        except WorkerError:
            if pipe is self._pipe:
                self._pipe = None  # closed on the error: the next pass starts new workers
            raise
        finally:
            if done and pipe is self._pipe and not pipe.closed:
                pipe.reset()
                self._pipe_epoch = epoch + 1
                self._pipe_fresh = True

    def _iter_torch(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        if self._torch_loader is None:
            reader = self.reader(epoch)
            nw = self.num_workers
            self._torch_loader = torch.utils.data.DataLoader(
                ReaderDataset(reader),
                batch_sampler=EpochBatches(reader),
                collate_fn=keep_batch,
                num_workers=nw,
                prefetch_factor=self.prefetch if nw > 0 else None,
                persistent_workers=nw > 0,
                timeout=self.worker_timeout if nw > 0 else 0,
            )
        loader = self._torch_loader
        loader.batch_sampler.epoch = epoch
        loader.batch_sampler.start = start
        try:
            for samples in guarded_batches(loader, self.worker_timeout):
                yield self.assemble(raw_from_samples(samples))
        except WorkerError:
            if loader is self._torch_loader:
                self._torch_loader = None  # its workers are stopped: the next pass starts new
            raise
