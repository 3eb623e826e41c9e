"""The store fill: every file of a split read once by worker processes into a resident store.

:func:`fill_store` reads every file of the split once, in parallel worker
processes (the DALI pipeline's parallel external source when DALI is installed, else a torch
DataLoader; in this process with ``num_workers=0``), through the dataset's own ray store (npz
files or a pack), and copies each batch of samples into place (on a GPU, device to device from
DALI's output buffers). Sizes come from the files' headers first, so the arrays are allocated
once and memory stays at the split's size plus one batch; every file's shapes are checked
against its header (a file that changed since the index was built is a named error).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from gpuloader import schema
from gpuloader.dataset.view import ON_ERROR, DatasetView
from gpuloader.errors import DamagedFileError, SkippedFileWarning
from gpuloader.format.validate import classify
from gpuloader.plan.sampler import RayRequest
from gpuloader.reading.headers import estimate_layout, find_bad
from gpuloader.reading.pipeline import RayPipeline, dali_available
from gpuloader.reading.reader import BAD, RayReader
from gpuloader.reading.samples import EpochBatches, ReaderDataset, keep_batch, raw_from_samples
from gpuloader.reading.torch_guard import guarded_batches
from gpuloader.stores.layout import StoreLayout, spread_layout, store_bytes, take_layout
from gpuloader.stores.resident import STORE_KEYS, ResidentStore

__all__ = ["fill_store"]

log = logging.getLogger("gpuloader")

_RAY_KEYS = schema.RAY_FIELDS
RAY_RECORD = schema.RAY_RECORD
#: rays written per block into a record store (about 2.5 MB of records: cache-sized)
_BLOCK_ROWS = 65536


class _AllSamples:
    """A sampler-like order over every sample, consecutive, in chunks (the fill's order)."""

    def __init__(self, n: int, batch_size: int) -> None:
        self.n = int(n)
        self.subvolumes_per_batch = int(batch_size)

    def batches(self, epoch: int) -> list[list[RayRequest]]:
        bs = self.subvolumes_per_batch
        return [
            [RayRequest(i, epoch, None) for i in range(s, min(s + bs, self.n))]
            for s in range(0, self.n, bs)
        ]


def _raw_batches(
    view: DatasetView,
    batch_size: int,
    num_workers: int,
    device_id: int | None,
    backend: str,
    worker_timeout: float = 60.0,
) -> Iterator[Any]:
    """The fill's source: RawBatches of consecutive samples, every row, untransformed."""

    ds = view.with_(transform=None, samples_per_subvolume=None)
    order = _AllSamples(len(ds.samples), batch_size)
    reader = RayReader(ds, order, first_epoch=0, batch_size=batch_size, mark_bad=True)
    if backend == "dali" or (backend == "auto" and num_workers > 0 and dali_available()):
        pipe = RayPipeline(
            reader,
            batch_size=batch_size,
            num_workers=max(1, num_workers),
            prefetch=2,
            device_id=device_id,
            worker_timeout=worker_timeout,
        )
        try:
            while True:
                try:
                    yield pipe.next_batch()
                except StopIteration:
                    return
        finally:
            pipe.close()
    import torch

    dl = torch.utils.data.DataLoader(
        ReaderDataset(reader),
        batch_sampler=EpochBatches(reader),
        collate_fn=keep_batch,
        num_workers=num_workers,
        prefetch_factor=4 if num_workers > 0 else None,
        timeout=worker_timeout if num_workers > 0 else 0,
    )
    for samples in guarded_batches(dl, worker_timeout):
        yield raw_from_samples(samples)


def fill_store(
    dataset: Any,
    location: str = "host",
    device: Any = None,
    num_workers: int = 2,
    batch_size: int = 32,
    backend: str = "auto",
    progress: bool | None = None,
    layout: StoreLayout | None = None,
    on_error: str | None = None,
    worker_timeout: float = 60.0,
    indices: np.ndarray | None = None,
) -> ResidentStore:
    """Read every sample of ``dataset`` (its split) into a resident store.

    Args:
        dataset: a HierarchicalVoxelRayDataset or its DatasetView (its ``ray_store`` is
            read: npz or pack).
        location: "host" (numpy in RAM) or "gpu" (CuPy on ``device``).
        device: the torch CUDA device for "gpu".
        num_workers: reader processes (0: read in this process).
        batch_size: samples per fill batch.
        backend: "auto" (host: workers write straight into a shared-memory store, "direct";
            gpu: DALI when installed and num_workers > 0), "direct", "dali" or "torch".
        progress: show a progress bar (default: when stderr is a terminal).
        layout: a layout already estimated (:func:`estimate_layout`).
        on_error: "raise" or "skip" (default: the dataset's): a bad file (every check of
            :mod:`gpuloader.format.validate`, on every row) raises its named error, or is
            recorded in ``store.bad`` (and warned about once, naming the files) and its
            place left unused.
        worker_timeout: seconds to wait for the workers' next batch before raising
            :class:`~gpuloader.errors.WorkerError` (a dead worker raises at once).
        indices: hold only these samples (dataset indices; a rank's fixed shard,
            ``RayBatchSampler.shard_indices``); the layout still has every sample, the
            others holding nothing. None: every sample.

    Raises:
        DamagedFileError: a bad file (``on_error='raise'``), or one whose arrays differ from
            its header (the file changed since the dataset was indexed).
    """
    if location not in ("host", "gpu"):
        raise ValueError(f"location must be 'host' or 'gpu'; got {location!r}")
    view = DatasetView.of(dataset)
    policy = on_error or view.on_error
    if policy not in ON_ERROR:
        raise ValueError(f"on_error must be 'raise' or 'skip'; got {on_error!r}")
    view = view.with_(on_error=policy)
    if indices is not None:  # a compact store of the subset, then indexed as the dataset
        held = np.unique(np.asarray(indices, dtype=np.int64))
        full = layout if layout is not None else estimate_layout(view, policy)
        store = fill_store(
            view.subset(held),
            location,
            device,
            num_workers,
            batch_size,
            backend,
            progress,
            take_layout(full, held),
            policy,
            worker_timeout,
        )
        store.layout = spread_layout(store.layout, held, len(view))
        store.held = held
        return store
    tick = time.perf_counter()
    layout = layout if layout is not None else estimate_layout(view, policy)
    sizes = {
        "rays": int(layout.ray_count.sum()),
        "view_positions": int(layout.view_count.sum()),
        "grids": int((layout.side**3).sum()),
        "samples": len(layout.side),
    }
    if location == "gpu":
        import cupy as xp

        device_id = int(getattr(device, "index", None) or 0)
        dev_ctx: Any = xp.cuda.Device(device_id)
    else:
        xp = np
        device_id = None
        dev_ctx = _Null()
    direct = backend == "direct" or (backend == "auto" and num_workers > 0)
    if location == "host" and direct and _shm_free() >= _host_spans(sizes)["_total"][0] * 1.05:
        arrays = _fill_host_direct(view, layout, sizes, num_workers, progress, worker_timeout)
        status = arrays.pop("status")
        _record_bad(view, layout, np.flatnonzero(status == _BAD_SAMPLE).tolist(), policy)
        seconds = time.perf_counter() - tick
        store = ResidentStore(arrays=arrays, layout=layout, location=location, fill_seconds=seconds)
        log.info("gpuloader: filled %r in %.2f s", store, seconds)
        return _announce(store)
    with dev_ctx:
        arrays = {}
        if location == "host":  # rays as records: one cache line per ray in a gather
            records = np.empty(sizes["rays"], dtype=RAY_RECORD)
            arrays["records"] = records
            arrays.update({k: records[k] for k in _RAY_KEYS})
        for k, (dt, rest) in STORE_KEYS.items():
            if k not in arrays:
                n = sizes["rays"] if k in _RAY_KEYS else sizes[k]
                arrays[k] = xp.empty((n, *rest), dtype=dt)
        samples = view.samples
        from tqdm import tqdm

        show = sys.stderr.isatty() if progress is None else progress
        nbatches = -(-len(samples) // batch_size)
        bar = tqdm(
            total=nbatches,
            desc=f"gpuloader: filling the {location} store ({store_bytes(layout) / 2**20:.0f} MiB)",
            unit="batch",
            disable=not show,
        )
        with bar:
            raws = _raw_batches(view, batch_size, num_workers, device_id, backend, worker_timeout)
            for raw in raws:
                bad = _place(raw, arrays, layout, samples, xp)
                _record_bad(view, layout, bad, policy)
                bar.update(1)
        if location == "gpu":
            xp.cuda.get_current_stream().synchronize()
    seconds = time.perf_counter() - tick
    store = ResidentStore(arrays=arrays, layout=layout, location=location, fill_seconds=seconds)
    log.info("gpuloader: filled %r in %.2f s", store, seconds)
    return _announce(store)


#: the fill's per-sample status (host direct fill): written, or bad (left out)
_WRITTEN, _BAD_SAMPLE = 1, 2


def _record_bad(view: DatasetView, layout: StoreLayout, bad: list[int], policy: str) -> None:
    """Samples a worker found bad: their named error again (``raise``), or recorded in
    ``layout.bad`` (``skip``); the error is read again here, where it can be kept."""
    for i in bad:
        if i in layout.bad:
            continue
        if policy != "skip":
            view.read_sample(i, 0, None)  # raises the named error, naming the file
            raise DamagedFileError(
                f"{view.samples[i].get('ray_path')}: a fill worker found this sample bad, "
                "but it reads fine here: the file is changing while it is read"
            )
        layout.bad[i] = find_bad(view, i)


def _announce(store: ResidentStore) -> ResidentStore:
    """One warning naming every file the fill left out (``on_error='skip'``)."""
    if store.bad:
        files = sorted({f for f, _ in store.bad.values()})
        first = next(iter(store.bad.values()))[1]
        warnings.warn(
            f"gpuloader: the {store.location} store left out {len(store.bad)} bad samples "
            f"({len(files)} files; loaders replace them, on_error='skip'): "
            f"{', '.join(files)}; first error: {first}",
            SkippedFileWarning,
            stacklevel=3,
        )
    return store


def _shm_free() -> int:
    """Bytes free in ``/dev/shm`` (a store larger than that is filled the other way: a
    shared-memory file past its size would fault when written)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return int(st.f_bavail * st.f_frsize)


def _host_spans(sizes: dict[str, int]) -> dict[str, tuple[int, np.dtype, tuple[int, ...]]]:
    """Byte offset, dtype and shape of each array of a host store in one shared buffer."""
    parts = [
        ("records", np.dtype(RAY_RECORD), (sizes["rays"],)),
        ("view_positions", np.dtype(np.float32), (sizes["view_positions"], 3)),
        ("grids", np.dtype(np.uint8), (sizes["grids"],)),
        ("status", np.dtype(np.uint8), (sizes.get("samples", 0),)),  # _WRITTEN / _BAD_SAMPLE
    ]
    out, offset = {}, 0
    for name, dt, shape in parts:
        out[name] = (offset, dt, shape)
        offset += -(-int(np.prod(shape)) * dt.itemsize // 64) * 64  # 64-byte aligned
    out["_total"] = (offset, np.dtype(np.uint8), ())
    return out


def _map_host_arrays(path: str, spans: dict) -> dict[str, np.ndarray]:
    """The host store's arrays as views of the shared file ``path`` (read-write)."""
    total = spans["_total"][0]
    buf = np.memmap(path, dtype=np.uint8, mode="r+", shape=(max(total, 1),))
    arrays: dict[str, np.ndarray] = {}
    for name, (offset, dt, shape) in spans.items():
        if name == "_total":
            continue
        n = int(np.prod(shape)) * dt.itemsize
        arrays[name] = buf[offset : offset + n].view(dt).reshape(shape).view(np.ndarray)
    records = arrays["records"]
    arrays.update({k: records[k] for k in _RAY_KEYS})
    return arrays


class _DirectWriter:
    """Map-style dataset for DataLoader workers: item i reads sample i (every row, checked by
    the ray store) and writes it into its place in the shared store; returns i."""

    def __init__(self, view: DatasetView, layout: StoreLayout, path: str, spans: dict) -> None:
        ds = view.with_(transform=None, samples_per_subvolume=None)
        self.dataset, self.layout, self.path, self.spans = ds, layout, path, spans
        self._arrays: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return len(self.dataset.samples)

    def __getitem__(self, i: int) -> int:
        if self._arrays is None:
            self._arrays = _map_host_arrays(self.path, self.spans)
        a, lay = self._arrays, self.layout
        if i in lay.bad:  # found bad from its headers
            a["status"][i] = _BAD_SAMPLE
            return i
        try:
            sample = self.dataset.read_sample(i, 0, None)
        except Exception as exc:
            if self.dataset.on_error != "skip" or classify(exc) is None:
                raise
            a["status"][i] = _BAD_SAMPLE  # recorded by the main process (_record_bad)
            return i
        n, v, s = int(lay.ray_count[i]), int(lay.view_count[i]), int(lay.side[i])
        vox = np.asarray(sample["voxels"]).reshape(sample["voxels"].shape[-3:])
        got_n, got_v = len(sample["distances"]), len(sample["view_positions"])
        if got_n != n or got_v != v or vox.shape != (s, s, s):
            path = self.dataset.samples[i].get("ray_path")
            raise DamagedFileError(
                f"{path}: the file changed since the dataset was indexed (rays {got_n} vs {n}, "
                f"views {got_v} vs {v}, grid {vox.shape} vs side {s}); rebuild the dataset "
                "object (or regenerate the file)"
            )
        r0 = int(lay.ray_start[i])
        rec = a["records"][r0 : r0 + n]
        for k in _RAY_KEYS:
            rec[k] = sample[k]
        v0 = int(lay.view_start[i])
        a["view_positions"][v0 : v0 + v] = sample["view_positions"]
        g0 = int(lay.grid_start[i])
        a["grids"][g0 : g0 + s**3] = vox.reshape(-1).view(np.uint8)
        a["status"][i] = _WRITTEN
        return i


def _fill_host_direct(
    view: DatasetView,
    layout: StoreLayout,
    sizes: dict[str, int],
    num_workers: int,
    progress: Any,
    worker_timeout: float = 60.0,
) -> dict[str, np.ndarray]:
    """Fill a host store with no copy through this process: the store is a file in
    ``/dev/shm`` (shared memory) that every worker maps and writes its samples into; the
    file is unlinked when the fill ends (the memory stays mapped here, and is freed with the
    store)."""
    import tempfile

    import torch
    from tqdm import tqdm

    spans = _host_spans(sizes)
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, path = tempfile.mkstemp(prefix="gpuloader-store-", dir=folder)
    try:
        os.ftruncate(fd, max(spans["_total"][0], 1))
        os.close(fd)
        arrays = _map_host_arrays(path, spans)
        writer = _DirectWriter(view, layout, path, spans)
        loader = torch.utils.data.DataLoader(
            writer,
            batch_size=None,
            num_workers=num_workers,
            prefetch_factor=8,
            timeout=worker_timeout,
        )
        show = sys.stderr.isatty() if progress is None else progress
        desc = f"gpuloader: filling the host store ({store_bytes(layout) / 2**20:.0f} MiB)"
        with tqdm(total=len(writer), desc=desc, unit="file", disable=not show) as bar:
            for _ in guarded_batches(loader, worker_timeout):
                bar.update(1)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    return arrays


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _place(
    raw: Any, arrays: dict[str, Any], layout: StoreLayout, samples: list, xp: Any
) -> list[int]:
    """Copy one RawBatch of consecutive samples into its slices of the store; returns the
    samples the reader marked bad (``meta[4] == BAD``: nothing read, their places unused).

    Values are not checked again here: the reader's ray stores checked every row they
    returned, in the workers.
    """

    meta = raw.meta
    real = meta[:, 0] >= 0
    idx = meta[real, 0].astype(np.int64)
    if idx.size == 0:
        return []
    i0, i1 = int(idx[0]), int(idx[-1])
    if not np.array_equal(idx, np.arange(i0, i1 + 1)):
        raise RuntimeError(f"fill batch out of order: samples {idx.tolist()}")
    good = meta[real, 4] != BAD if meta.shape[1] > 4 else np.ones(idx.size, bool)
    rows = np.array([raw.shapes["origins"][j][0] for j in range(idx.size)], np.int64)
    nviews = np.array([raw.shapes["view_positions"][j][0] for j in range(idx.size)], np.int64)
    for j, i in enumerate(idx):  # shapes against the headers (host metadata only)
        if not good[j]:
            continue
        n, v, g = rows[j], nviews[j], raw.shapes["voxels"][j]
        s = int(layout.side[i])
        if n != layout.ray_count[i] or v != layout.view_count[i] or tuple(g) != (s, s, s):
            where = samples[i].get("ray_path") if n != layout.ray_count[i] else None
            raise DamagedFileError(
                f"{where or samples[i].get('voxel_path')}: the file changed since the dataset "
                f"was indexed (rays {n} vs {layout.ray_count[i]}, views {v} vs "
                f"{layout.view_count[i]}, grid {tuple(g)} vs side {s}); rebuild the dataset "
                "object (or regenerate the file)"
            )
    raw_rays = np.concatenate([[0], np.cumsum(rows)])
    raw_views = np.concatenate([[0], np.cumsum(nviews)])
    raw_grids = np.concatenate(
        [[0], np.cumsum([int(np.prod(raw.shapes["voxels"][j])) for j in range(idx.size)])]
    )
    records = "records" in arrays
    for a, b in _runs(good):  # runs of good consecutive samples: one copy per array each
        first = int(idx[a])
        spans = {
            "rays": (int(raw_rays[a]), int(raw_rays[b]), int(layout.ray_start[first])),
            "view_positions": (int(raw_views[a]), int(raw_views[b]), int(layout.view_start[first])),
            "grids": (int(raw_grids[a]), int(raw_grids[b]), int(layout.grid_start[first])),
        }
        for k in STORE_KEYS:
            if records and k in _RAY_KEYS:
                continue
            lo, hi, dst = spans.get(k, spans["rays"])
            if hi > lo:
                src = raw.arrays["voxels" if k == "grids" else k][lo:hi]
                arrays[k][dst : dst + hi - lo] = xp.asarray(src)
        if records:  # the record fields in cache-sized blocks: each block's lines loaded once
            lo, hi, dst = spans["rays"]
            for c in range(0, int(hi - lo), _BLOCK_ROWS):
                c1 = min(c + _BLOCK_ROWS, int(hi - lo))
                for k in _RAY_KEYS:
                    arrays[k][dst + c : dst + c1] = raw.arrays[k][lo + c : lo + c1]
    return [int(i) for i, ok in zip(idx, good, strict=True) if not ok]


def _runs(good: np.ndarray) -> list[tuple[int, int]]:
    """``[a, b)`` ranges of consecutive True entries of ``good``."""
    out, a = [], None
    for j, ok in enumerate(good.tolist() + [False]):
        if ok and a is None:
            a = j
        elif not ok and a is not None:
            out.append((a, j))
            a = None
    return out
