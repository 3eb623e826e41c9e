"""The DALI pipeline of the GPU loader: parallel reader workers -> (GPU) batch buffers.

One external source in sample mode runs :class:`~gpuloader.reading.reader.RayReader` in
``num_workers`` Python worker processes (``parallel=True``, shared memory, ``prefetch``
batches ahead). On a GPU (``device_id`` set) every output but ``meta`` goes ``.gpu()``, so the
host->device copy is DALI's, overlapped with the workers; without one the pipeline runs on the
CPU (``device_id=None``).

:meth:`RayPipeline.next_batch` returns a :class:`RawBatch`: each output's samples
**concatenated** into one buffer (``TensorList.copy_to_external``: on the GPU a device-to-
device copy into a torch CUDA tensor on torch's current stream, no host round trip; on the
CPU a copy into a numpy array), plus the per-sample shapes from DALI's host-side metadata.

Sharding and resume: the reader reads exactly the sampler's batches, which are already this
rank's shard (``RayBatchSampler(rank, world_size)``), so DALI's ``shard_id``/``num_shards``
(arguments of its file readers, not of an external source) are not used: the order is ours.
A resumed epoch starts at the reader's ``first_start`` (a new pipeline); later DALI epochs
start at batch 0.

Worker faults: every run is waited for by a :class:`~gpuloader.reading.dali_guard.DaliGuard`
(a worker that dies or sends nothing within ``worker_timeout`` seconds raises
:class:`~gpuloader.errors.WorkerError`; the pipeline is then stopped for good: build a new one).

Shutdown: :meth:`RayPipeline.close` stops the worker pool (joins the processes, frees the
shared memory) and the pipeline; it is idempotent and also runs from ``__del__``.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpuloader.errors import WorkerError
from gpuloader.reading.dali_guard import DaliGuard, build_bounded, stop_pipeline
from gpuloader.reading.processes import DEFAULT_TIMEOUT
from gpuloader.reading.reader import (
    OUTPUT_DTYPES,
    OUTPUT_NAMES,
    OUTPUT_NDIM,
    RayReader,
)

__all__ = [
    "RawBatch",
    "RayPipeline",
    "dali_available",
    "concat_tensorlist",
    "dali_dtypes",
]


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no DALI
        return False
    return True


@dataclass
class RawBatch:
    """One batch as the reader produced it, before augmentation.

    Attributes:
        arrays: output name -> every slot's samples concatenated along axis 0 (voxels flat,
            (sum D*H*W,)); numpy arrays (CPU) or torch CUDA tensors (GPU). No ``meta``.
        shapes: output name -> list of per-slot shapes (host).
        meta: (slots, 5) int64 host array (reader.py: index, epoch, level, side, replaced).
    """

    arrays: dict[str, Any]
    shapes: dict[str, list[tuple[int, ...]]]
    meta: np.ndarray


def dali_dtypes(dtypes: list[np.dtype]) -> list[Any]:
    """DALI's type of each numpy dtype (uint8, float32, int32, int64)."""
    from nvidia.dali import types

    table = {
        np.dtype(np.uint8): types.UINT8,
        np.dtype(np.float32): types.FLOAT,
        np.dtype(np.int32): types.INT32,
        np.dtype(np.int64): types.INT64,
    }
    return [table[np.dtype(d)] for d in dtypes]


def concat_tensorlist(tl: Any, name: str, device: Any = None) -> tuple[Any, list[tuple]]:
    """Every sample of a DALI TensorList, concatenated along axis 0 (voxels: flattened).

    Args:
        tl: ``TensorListCPU`` or ``TensorListGPU`` of output ``name``.
        name: reader output name (gives dtype and trailing shape).
        device: torch CUDA device for a ``TensorListGPU`` (the copy runs on torch's current
            stream of that device).

    Returns:
        (array, shapes): a numpy array (CPU) or torch CUDA tensor (GPU) of shape
        ``(sum of N_i, *rest)`` (voxels: ``(sum of D*H*W,)``), and the per-sample shapes.
    """
    shapes = [tuple(int(x) for x in s) for s in tl.shape()]
    dtype = OUTPUT_DTYPES[name]
    if name == "voxels":
        out_shape: tuple[int, ...] = (sum(int(np.prod(s)) for s in shapes),)
    else:
        rest = shapes[0][1:] if shapes else ((3,) if OUTPUT_NDIM[name] == 2 else ())
        if not rest and OUTPUT_NDIM[name] == 2:
            rest = (3,)
        out_shape = (sum(s[0] for s in shapes), *rest)
    if device is None:
        out = np.empty(out_shape, dtype=dtype)
        if out.size:
            tl.copy_to_external(ctypes.c_void_p(out.ctypes.data))
        return out, shapes
    import torch

    out_t = torch.empty(out_shape, dtype=getattr(torch, dtype.name), device=device)
    if out_t.numel():
        stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
        tl.copy_to_external(ctypes.c_void_p(out_t.data_ptr()), stream, True)
    return out_t, shapes


class RayPipeline:
    """A DALI pipeline around one :class:`~gpuloader.reading.reader.RayReader`.

    Args:
        reader: the per-sample callable (pickled into the workers).
        batch_size: slots per batch (the sampler's ``subvolumes_per_batch``).
        num_workers: Python reader processes (``py_num_workers``, >= 1).
        prefetch: batches computed ahead (external source and pipeline queue depth).
        device_id: CUDA device for ``.gpu()`` outputs, or None for a CPU-only pipeline.
        start_method: ``"spawn"`` (safe once CUDA is initialized) or ``"fork"``.
        num_threads: DALI CPU threads.
        bytes_per_sample_hint: initial shared-memory slot size per sample.
        worker_timeout: seconds :meth:`next_batch` waits for a batch before it raises
            :class:`~gpuloader.errors.WorkerError` (a dead worker raises at once).
    """

    def __init__(
        self,
        reader: RayReader,
        batch_size: int,
        num_workers: int = 2,
        prefetch: int = 2,
        device_id: int | None = None,
        start_method: str = "spawn",
        num_threads: int = 1,
        bytes_per_sample_hint: int | None = None,
        worker_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        from nvidia.dali import fn
        from nvidia.dali.pipeline import Pipeline

        if num_workers < 1:
            raise ValueError(f"the DALI back end needs num_workers >= 1; got {num_workers}")
        self.reader = reader
        self.batch_size = int(batch_size)
        self.device_id = device_id
        self._closed = False
        self._guard: DaliGuard | None = None
        self._torch_device = None
        if device_id is not None:
            import torch

            self._torch_device = torch.device("cuda", int(device_id))
        depth = max(1, int(prefetch))
        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=max(1, int(num_threads)),
            device_id=device_id,
            py_num_workers=int(num_workers),
            py_start_method=start_method,
            prefetch_queue_depth=depth,
        )
        dtypes = dali_dtypes([OUTPUT_DTYPES[n] for n in OUTPUT_NAMES])
        with pipe:
            kwargs: dict[str, Any] = {}
            if bytes_per_sample_hint:
                kwargs["bytes_per_sample_hint"] = int(bytes_per_sample_hint)
            outs = fn.external_source(
                source=reader,
                num_outputs=len(OUTPUT_NAMES),
                batch=False,
                parallel=True,
                prefetch_queue_depth=depth,
                dtype=dtypes,
                ndim=[OUTPUT_NDIM[n] for n in OUTPUT_NAMES],
                **kwargs,
            )
            if device_id is not None:
                outs = [
                    o if n == "meta" else o.gpu() for n, o in zip(OUTPUT_NAMES, outs, strict=True)
                ]
            pipe.set_outputs(*outs)
        self._pipe = pipe
        try:
            build_bounded(pipe, worker_timeout)  # starts the workers
        except BaseException:
            self.close()
            raise
        self._guard = DaliGuard(pipe, worker_timeout)

    def next_batch(self) -> RawBatch:
        """The next batch of the epoch.

        Raises:
            StopIteration: the epoch is over (call :meth:`reset` for the next one).
            WorkerError: a worker died or none answered within ``worker_timeout`` (the
                pipeline is closed).
            GPULoaderError subclasses raised by the reader in a worker (re-raised here).
        """
        if self._closed or self._guard is None:
            raise RuntimeError("the pipeline is closed")
        args = ()
        if self._torch_device is not None:
            import torch

            # outputs bound to torch's stream: the copies below are ordered after them
            args = (torch.cuda.current_stream(self._torch_device),)
        try:
            outs = self._guard.run(*args)
        except WorkerError:
            self.close()
            raise
        arrays: dict[str, Any] = {}
        shapes: dict[str, list[tuple]] = {}
        meta = None
        for name, tl in zip(OUTPUT_NAMES, outs, strict=True):
            if name == "meta":
                meta = np.array(tl.as_array(), dtype=np.int64).reshape(len(tl), -1)
                continue
            arrays[name], shapes[name] = concat_tensorlist(tl, name, self._torch_device)
        assert meta is not None
        return RawBatch(arrays=arrays, shapes=shapes, meta=meta)

    def reset(self) -> None:
        """Start the next epoch (after ``StopIteration``)."""
        if not self._closed and self._guard is not None:
            self._guard.reset()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (or a worker fault closed the pipeline)."""
        return self._closed

    def close(self) -> None:
        """Stop the workers (joined; shared memory freed) and the pipeline. Idempotent."""
        if self._closed:
            return
        self._closed = True
        pipe, self._pipe = getattr(self, "_pipe", None), None
        guard, self._guard = getattr(self, "_guard", None), None
        if guard is not None:
            guard.close()
        else:
            stop_pipeline(pipe)

    def __enter__(self) -> RayPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass
