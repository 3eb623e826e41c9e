"""Whole batches streamed from a pack, for data larger than memory: a batch source.

The batch reader (:class:`~gpuloader.reading.pack_reader.PackBatchReader`, in DALI's
batch-mode workers or torch DataLoader workers) computes the epoch plan, selects and gathers
each batch's rows into one buffer per output (module doc of
:mod:`gpuloader.reading.pack_reader`). :class:`StreamBatches` then runs the same fused pass as
a resident store on that batch-sized store with the local plan (numpy, or the CUDA kernels
after one host-to-device copy per output), so the decisions are those of every other store
and back end.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from gpuloader.errors import WorkerError
from gpuloader.loading.sources.base import BatchSource
from gpuloader.loading.sources.batch_dict import fused_dict, fused_pass, to_device
from gpuloader.reading.pack_reader import (
    STREAM_OUTPUTS,
    PackBatchReader,
    PackItems,
    PassIndices,
    batch_pipeline,
    local_plan,
)
from gpuloader.reading.workers import guarded_batches, stop_loader

__all__ = ["StreamBatches"]


class StreamBatches(BatchSource):
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
        self._loader: Any = None  # the DataLoader (persistent workers) of the torch back end

    @staticmethod
    def _as_is(batch: Any) -> Any:
        """The DataLoader's collate: the reader's arrays unchanged."""
        return batch

    def close(self) -> None:
        """Stop the DALI workers and pipeline, or the persistent DataLoader workers."""
        guard, self._pipe = self._pipe, None
        if guard is not None:
            guard.close()
        loader, self._loader = self._loader, None
        if loader is not None:
            stop_loader(loader)

    def _torch_loader(self) -> Any:
        """The DataLoader of the torch back end, built once: its workers last across epochs
        (persistent), each pass's ``(epoch, i)`` set on its sampler."""
        if self._loader is None:
            nw = self.num_workers
            self._loader = torch.utils.data.DataLoader(
                PackItems(self.reader),
                batch_size=None,
                sampler=PassIndices(),
                num_workers=nw,
                prefetch_factor=self.prefetch if nw > 0 else None,
                persistent_workers=nw > 0,
                timeout=self.worker_timeout if nw > 0 else 0,
                # numpy arrays come through the queue as they are: torch tensors would come
                # as file descriptors fetched from the worker, a wait no timeout bounds
                collate_fn=StreamBatches._as_is,
            )
        return self._loader

    def _raw(self, epoch: int, n: int, start: int = 0) -> Any:
        """The reader's outputs of batches ``start, ..., n - 1`` of ``epoch``.

        Raises:
            WorkerError: a worker died or sent nothing within ``worker_timeout`` (its
                workers are stopped; the next call starts new ones).
        """
        if self.backend == "dali":
            if self._pipe is None or self._pipe_epoch != epoch or start:
                self.close()
                self.reader.first_epoch = epoch
                self.reader.first_start = start  # DALI's later epochs start at batch 0
                self._pipe = batch_pipeline(
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
        dl = self._torch_loader()
        dl.sampler.epoch, dl.sampler.n, dl.sampler.start = epoch, n, start
        try:
            for arrays in guarded_batches(dl, self.worker_timeout):
                yield tuple(np.asarray(a) for a in arrays)
        except WorkerError:
            if dl is self._loader:
                self._loader = None  # its workers are stopped: the next pass starts new ones
            raise

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of ``epoch`` from batch ``start`` on (a resumed epoch)."""
        plan = self.reader.plan(epoch)
        n = len(plan)
        cuda = getattr(self.device, "type", "cpu") == "cuda"
        for i, arrays in enumerate(self._raw(epoch, n, start), start):
            local = dict(zip(STREAM_OUTPUTS, arrays, strict=True))
            meta = local.pop("meta")
            if tuple(meta.tolist()) != (epoch, i):
                raise RuntimeError(f"stream out of order: got {meta}, want {(epoch, i)}")
            bp = local_plan(plan.batch(i))
            levels = plan.levels[plan.slots(i)]
            if cuda:
                yield self._assemble_cuda(local, bp, levels)
            else:
                batch = fused_dict(fused_pass(local, bp), bp, levels, self.hashes)
                on_cpu = self.device is None or self.device.type == "cpu"
                yield batch if on_cpu else to_device(batch, self.device)

    def _assemble_cuda(self, local: dict, bp: Any, levels: np.ndarray) -> dict[str, Any]:
        """The batch-sized store goes to the device (one copy per output), then the CUDA
        fused pass."""
        import cupy

        dev = self.device
        stream = torch.cuda.current_stream(dev)
        with cupy.cuda.Device(dev.index or 0), cupy.cuda.ExternalStream(stream.cuda_stream):
            store = {k: cupy.asarray(v) for k, v in local.items()}
            out = fused_pass(store, bp, cuda=True)
        return fused_dict(out, bp, levels, self.hashes, dev)
