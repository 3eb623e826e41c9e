"""``GPURayLoader``: the batches of ``DataLoader(..., RayBatchSampler, collate_ray_batch)``,
read by parallel workers, moved to the device and augmented there in one batched pass.

Data flow of one batch::

    RayBatchSampler order (pure function of seed, epoch)
      -> RayReader per sample (DALI parallel external source, or torch DataLoader workers):
         only the rows needed, custom CPU transforms
      -> each output concatenated over the batch (on the GPU: DALI's copy, then device to
         device; no host round trip)
      -> per-sample SamplePlans (draw_plan with SampleContext(dataset.seed, epoch, index)),
         stacked by plan.to_batch_params -> one pass per known segment: select_rows_batch,
         transform_rays, transform_points, transform_voxels (augment_cupy on CUDA,
         augment_numpy on the CPU)
      -> the dict of ``collate_ray_batch`` (same keys, dtypes and shapes), on the device.

The decisions (order, rows, symmetries, noise) are those of the CPU API for the same dataset
seed, sampler arguments and transform, whatever the back end, device or number of workers.
``seed`` is the order seed (as ``RayBatchSampler``'s); per-sample draws use ``dataset.seed``,
as the dataset does.

Scripts that use the DALI back end start its workers with ``spawn``: guard the entry point
with ``if __name__ == "__main__":``.

Worker faults: a reader worker (DALI or DataLoader; of the stream, the pack stream or a store's
fill) that dies, or sends no batch for ``worker_timeout`` seconds (hung, stopped), raises
:class:`~gpuloader.errors.WorkerError` where the batch is awaited: a death at once (also one
between epochs: the next pass raises at its start), a hang after ``worker_timeout``. Its first
line names the worker's pid and what happened; the broken workers are killed and freed before
it is raised, and the next ``iter(loader)`` starts new ones: that pass is the next epoch, as
an undisturbed run gives it (``load_state_dict(state_dict())`` first repeats the failed pass
from the batch it stopped at). A named error a worker raises (a bad file) keeps its own first
line, which names the file, on every back end (module :mod:`gpuloader.reading.workers`).

Distributed: the sampler shards the epoch's batches over ``torch.distributed``'s ranks (or
the ``rank``/``world_size`` given), and every store and back end reads exactly the sampler's
batches, so each rank's loader yields its shard. DALI's own ``shard_id``/``num_shards`` (of
its file readers) are not used: the order is ours, and the external source reads only the
rank's batches. Every rank holds the whole split in a resident store, unless
``shard_store=True``: then each rank owns a fixed subset of the samples
(``RayBatchSampler(shard="samples")``, ``sampler.shard_indices()``), batched within the rank
each epoch, and its store holds only that subset (``fill_store(indices=...)``).

Bad files (``on_error``, default the dataset's): ``"raise"`` stops at the first bad file with
its named error (first line: the file), on every store and back end. ``"skip"`` replaces a bad
sample by the rule of :mod:`gpuloader.plan.replace`, exactly as the CPU API does: bad
samples known before reading (found by a store's fill, recorded in a pack, or by their
headers) are replaced in the epoch's batches (``SkippingSampler``); the per-sample reader
replaces them as it reads (``read_sample_checked`` in the workers, the replaced index in
``meta``). Each batch carries ``skipped`` (``(position, bad index, error)``, as
``collate_ray_batch``'s); ``loader.errors`` lists the bad files met, ``loader.skipped`` counts
the replacements, and each epoch that replaced samples ends with one warning naming them.
With ``shard_store=True`` a replacement comes from the rank's own subset.

Resume: :meth:`GPURayLoader.state_dict` is ``(epoch, batches_yielded)`` of the pass in
progress (batches handed to the caller, not those read ahead); after
:meth:`GPURayLoader.load_state_dict` (on this loader or a new one) the next pass starts that
epoch at that batch: the store's plan, the stream's batch reader and the per-sample reader
all start there without reading the batches before it.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from gpuloader.augment import numpy_backend as augment_numpy
from gpuloader.augment.plan import to_batch_params
from gpuloader.augment.rng import SampleContext
from gpuloader.augment.transforms import (
    Compose,
    Transform,
    draw_plan,
    ray_budget,
    split_for_device,
)
from gpuloader.dataset.collate import RAY_DTYPES
from gpuloader.errors import DamagedFileError, UnsupportedTransformError, WorkerError
from gpuloader.loading.sources.pack_stream import PackBatchReader, StreamBatches, pack_layout
from gpuloader.loading.sources.resident import FusedBatches
from gpuloader.loading.sparse_batch import dense_batch_to_sparse
from gpuloader.plan.replace import KnownBad, SkippingSampler
from gpuloader.plan.sampler import RayBatchSampler
from gpuloader.reading.fill import fill_store
from gpuloader.reading.headers import estimate_layout, find_bad
from gpuloader.reading.pipeline import RawBatch, RayPipeline, dali_available
from gpuloader.reading.reader import RAY_OUTPUTS, RayReader
from gpuloader.reading.samples import EpochBatches, ReaderDataset, keep_batch, raw_from_samples
from gpuloader.reading.workers import guarded_batches, stop_loader
from gpuloader.stores.budget import choose_store
from gpuloader.stores.layout import store_bytes, take_layout
from gpuloader.stores.pack import PackedRayStore
from gpuloader.stores.resident import ResidentStore

__all__ = ["GPURayLoader", "known_segments"]

log = logging.getLogger("gpuloader")
_warned_no_dali = False


def known_segments(transform: Callable | None) -> tuple[list[Callable], list[list[Transform]], Any]:
    """Split a transform for the loader: (custom CPU callables, known segments, ToDevice target).

    Known segments are the runs of known transforms that ``Compose`` fuses (segment ``j``
    draws with ``segment=j``), so the loader draws exactly what the CPU API draws.

    Raises:
        UnsupportedTransformError: a custom callable after a known transform.
    """
    cpu, known, target = split_for_device(transform)
    if not known:
        return cpu, [], target
    if isinstance(transform, Compose):
        segments = [list(seg) for seg in transform.segments if isinstance(seg, list)]
    else:
        segments = [list(known)]
    return cpu, segments, target


def _cuda_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no working CuPy means no GPU augmentation
        return False


def _resolve_device(device: Any, target: Any) -> torch.device:
    if isinstance(device, str) and device == "auto":
        if target is not None:
            device = target
        else:
            device = "cuda" if _cuda_usable() else "cpu"
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or a CUDA device; got {device!r}")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _dali_picklable(reader: RayReader) -> bool:
    try:
        from nvidia.dali import pickling

        pickling._DaliPickle.dumps(reader)
    except Exception:  # noqa: BLE001 - any failure: the reader cannot go to spawned workers
        return False
    return True


def _owners(counts: np.ndarray, xp: Any) -> Any:
    """(sum(counts),) int32 on the array module's device: item -> its sample (on the GPU
    computed there, so no per-item array crosses from the host)."""
    if xp is np:
        return np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    ends = xp.asarray(np.cumsum(counts))
    total = int(counts.sum())
    return xp.searchsorted(ends, xp.arange(total), side="right").astype(xp.int32)


class GPURayLoader:
    """Ray batches of ``collate_ray_batch`` form, read in parallel and augmented on the device.

    Args:
        dataset: a :class:`~gpuloader.dataset.hierarchical.HierarchicalVoxelRayDataset`.
            With ``sparse_voxels=True`` the batches have its sparse keys instead of
            ``voxels`` (as ``collate_ray_batch``'s), converted on the device.
        rays_per_batch, subvolumes_per_batch, shuffle, drop_last: as ``RayBatchSampler``.
        transform: the transform (None: ``dataset.transform``). Custom callables must come
            before the known transforms; they run per sample in the reader.
        seed: order seed (None: ``dataset.seed``).
        num_workers: reader processes (DALI: >= 1; torch: 0 reads in this process).
        prefetch: batches read ahead.
        device: "auto" (ToDevice's target if the transform has one, else CUDA when torch
            and CuPy can use it, else CPU), "cpu", "cuda" or "cuda:N".
        backend: "auto" (DALI if importable, else torch), "dali" or "torch": the reader of
            the store's fill, or of every sample when streaming.
        start_method: how DALI starts its workers ("spawn" or "fork").
        store: where the split lives while batches are made: "auto" (GPU when the split
            takes under ``gpu_budget``, else host RAM under ``host_budget``, else streaming),
            "gpu", "host", "stream" (the per-sample reader over the dataset's ray store, npz
            or pack), or a :class:`~gpuloader.stores.resident.ResidentStore` already filled
            (shared by several loaders of one dataset). Custom callables in the transform
            need "stream".
        gpu_budget, host_budget: bytes, or a fraction of the free memory (default 0.5).
        threads: background threads building a host store's batches ahead (1; 0 builds
            each batch on demand; more helps only with cores to spare).
        progress: progress bar of the fill (default: when stderr is a terminal).
        rank, world_size: this process's shard of every epoch (``RayBatchSampler``; default:
            ``torch.distributed`` when initialized, else 0 and 1).
        cuda_graphs: with the GPU store, make each batch by replaying a captured CUDA graph
            (one per output slot) instead of launching the kernels from Python
            (``FusedBatches``; default False). Opt-in: not yet validated on hardware.
        on_error: "raise" or "skip" (default: the dataset's ``on_error``): what a bad file
            does (module doc, "Bad files").
        worker_timeout: seconds to wait for a batch from the reader workers before raising
            :class:`~gpuloader.errors.WorkerError` (module doc, "Worker faults"; default 60).
        shard_store: with several ranks, each rank owns a fixed subset of the samples
            (``RayBatchSampler(shard="samples")``) and a resident store holds only that
            subset (module doc, "Distributed"). Default False: the epoch's batches are dealt
            to the ranks, and each rank's store holds the whole split.

    Attributes:
        backend: "dali" or "torch". device: the torch device of the batches.
        sampler: the RayBatchSampler that decides order and ray counts.
        store: "gpu", "host" or "stream"; store_reason: why; resident: the ResidentStore.
        errors: ``(file, first line of its error)`` of every bad file met (``on_error=
            'skip'``), in the order met; skipped: samples replaced so far.
    """

    def __init__(
        self,
        dataset: Any,
        rays_per_batch: int | None = 4096,
        subvolumes_per_batch: int = 8,
        transform: Callable | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int | None = None,
        num_workers: int = 2,
        prefetch: int = 2,
        device: Any = "auto",
        backend: str = "auto",
        start_method: str = "spawn",
        store: Any = "auto",
        gpu_budget: float | int | None = None,
        host_budget: float | int | None = None,
        threads: int = 1,
        progress: bool | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        cuda_graphs: bool = False,
        on_error: str | None = None,
        worker_timeout: float = 60.0,
        shard_store: bool = False,
    ) -> None:
        self._closed = True  # until fully built: makes close()/__del__ safe on errors
        self._pipe: RayPipeline | None = None
        self._torch_loader: torch.utils.data.DataLoader | None = None
        self._fused: FusedBatches | None = None
        self._stream: StreamBatches | None = None
        self.resident: ResidentStore | None = None
        if backend not in ("auto", "dali", "torch"):
            raise ValueError(f"backend must be 'auto', 'dali' or 'torch'; got {backend!r}")
        self.dataset = dataset
        self.transform = dataset.transform if transform is None else transform
        cpu, segments, target = known_segments(self.transform)
        self._segments = segments
        self.device = _resolve_device(device, target)
        # the sampler and the reader see the loader's transform (its ray budget)
        view = copy.copy(dataset)
        view.transform = self.transform
        self.on_error = on_error or getattr(dataset, "on_error", "raise")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip'; got {on_error!r}")
        view.on_error = self.on_error
        self.errors: list[tuple[str, str]] = []
        self.skipped = 0
        self._skipping: SkippingSampler | None = None  # known bad samples replaced in plans
        self._bad_lines: dict[int, str] = {}
        self.sampler = RayBatchSampler(
            view,
            rays_per_batch=rays_per_batch,
            subvolumes_per_batch=subvolumes_per_batch,
            shuffle=shuffle,
            drop_last=drop_last,
            seed=seed,
            rank=rank,
            world_size=world_size,
            shard="samples" if shard_store else "batches",
        )
        self.shard_store = bool(shard_store)
        # the samples this rank's batches use: a resident store needs only these
        self._held = self.sampler.shard_indices() if shard_store else None
        self.seed = self.sampler.seed
        self.num_workers = int(num_workers)
        self.prefetch = max(1, int(prefetch))
        self.start_method = start_method
        self.worker_timeout = float(worker_timeout)
        if not self.worker_timeout > 0:
            raise ValueError(f"worker_timeout must be > 0 seconds; got {worker_timeout!r}")
        self._cpu_transforms = cpu
        self._budget = ray_budget(self.transform)
        self._data_seed = int(getattr(dataset, "seed", 0))
        self._hashes = [str(s["hash"]) for s in dataset.samples]
        self.epoch = 0
        self._pipe_epoch: int | None = None  # epoch the pipeline's next DALI epoch reads
        self._pipe_fresh = False
        self._resume_at = 0  # batches of ``self.epoch`` the next pass skips (load_state_dict)
        self._pass: list[int] | None = None  # [epoch, batches yielded] of the pass in progress
        self.backend = self._choose_backend(backend)
        self.store, self.store_reason = self._choose_store(
            store, cpu, segments, gpu_budget, host_budget
        )
        if self.store in ("host", "gpu"):
            if isinstance(store, ResidentStore):
                self.resident = store
            else:
                self.resident = fill_store(
                    view,
                    location=self.store,
                    device=self.device,
                    num_workers=self.num_workers,
                    # host: workers write into a shared-memory store (no copy through here)
                    backend="direct" if self.store == "host" and self.num_workers else self.backend,
                    progress=progress,
                    layout=self._layout,
                    on_error=self.on_error,
                    worker_timeout=self.worker_timeout,
                    indices=self._held,
                )
            self._fused = FusedBatches(
                self.resident,
                dataset,
                self._known_bad(self.resident.bad),
                segments[0] if segments else [],
                self.device,
                threads=threads,
                prefetch=max(2, self.prefetch),
                cuda_graphs=cuda_graphs,
            )
        if (
            self.store == "stream"
            and self._fusable
            and isinstance(getattr(dataset, "ray_store", None), PackedRayStore)
        ):
            # whole batches from the pack: the batch reader in workers, then the fused pass
            est = self._layout or estimate_layout(view, self.on_error)  # headers read once
            layout, levels = pack_layout(view, est.side, est.bad)
            reader = PackBatchReader(
                dataset,
                self._known_bad(layout.bad),
                segments[0] if segments else [],
                layout,
                levels,
            )
            self._stream = StreamBatches(
                reader,
                self._hashes,
                self.device,
                num_workers=self.num_workers,
                backend=self.backend,
                prefetch=self.prefetch,
                worker_timeout=self.worker_timeout,
            )
            self.store_reason += "; whole batches from the pack"
        if self.device.type == "cuda":
            from gpuloader.fused import cuda_build as augment_cupy

            self._aug: Any = augment_cupy
        else:
            self._aug = augment_numpy
        self._closed = False
        log.info(
            "GPURayLoader: store=%s (%s), backend=%s, device=%s, workers=%d, %d batches per epoch",
            self.store,
            self.store_reason,
            self.backend,
            self.device,
            self.num_workers,
            len(self),
        )

    # -- setup -----------------------------------------------------------------------------

    def _reader(self, first_epoch: int, first_start: int = 0) -> RayReader:
        return RayReader(
            self.sampler.dataset,
            self.sampler,
            first_epoch=first_epoch,
            first_start=first_start,
            cpu_transforms=self._cpu_transforms,
            ray_budget=self._budget,
            batch_size=self.sampler.subvolumes_per_batch,
        )

    def _known_bad(self, bad: dict[int, tuple[str, str]]) -> Any:
        """The sampler for whole-batch paths: bad samples known before reading (a store's
        fill, a pack's manifest, bad headers) replaced in every epoch's batches."""
        if not bad:
            return self.sampler
        if self.on_error != "skip":  # a store filled under skip has no data for these
            _, (_, line) = min(bad.items())
            raise DamagedFileError(
                f"{line} (left out of the store as bad; this loader has on_error='raise': "
                "use on_error='skip', or repair the file and fill the store again)"
            )
        for file, line in bad.values():
            self._note_error(file, line)
        known = KnownBad.of_dataset(self.sampler.dataset, bad, self._budget)
        held = self.resident.held if self.resident is not None else None
        if held is not None:  # replacements come from the samples the store holds
            outside = np.ones(len(known.available), bool)
            outside[held] = False
            known.available[outside] = -1
        self._skipping = SkippingSampler(self.sampler, known)
        return self._skipping

    def _note_error(self, file: str, line: str) -> None:
        if all(f != file for f, _ in self.errors):
            self.errors.append((file, line))

    def _bad_line(self, index: int) -> str:
        """First line of the error of sample ``index``, which a worker found bad and
        replaced (read again here: only numbers cross the worker channel)."""
        got = self._bad_lines.get(index)
        if got is None:
            file, got = find_bad(self.sampler.dataset, index)
            self._bad_lines[index] = got
            self._note_error(file, got)
        return got

    def _choose_store(
        self,
        store: Any,
        cpu: list,
        segments: list,
        gpu_budget: float | int | None,
        host_budget: float | int | None,
    ) -> tuple[str, str]:
        self._layout = None
        fusable = self._fusable = not cpu and len(segments) <= 1
        why_not = (
            "custom callables in the transform run per sample"
            if cpu
            else "the transform has several fused runs"
        )
        if isinstance(store, ResidentStore):
            if not fusable:
                raise UnsupportedTransformError(
                    f"a resident store needs a transform of known transforms only ({why_not}); "
                    "use store='stream'"
                )
            if store.location == "gpu" and self.device.type != "cuda":
                raise ValueError("a GPU-resident store needs device='cuda'")
            need = self.sampler.shard_indices()
            if store.held is not None and not np.isin(need, store.held).all():
                raise ValueError(
                    "the store holds only part of the split (fill_store(indices=...)), not "
                    f"every sample this rank's batches use ({len(need)} samples); fill it with "
                    "indices=loader.sampler.shard_indices() of the same rank and world size"
                )
            return store.location, "a store filled by the caller"
        if store not in ("auto", "gpu", "host", "stream"):
            raise ValueError(
                f"store must be 'auto', 'gpu', 'host', 'stream' or a ResidentStore; got {store!r}"
            )
        if store == "stream":
            return "stream", "asked for"
        if not fusable:
            if store != "auto":
                raise UnsupportedTransformError(
                    f"store={store!r} builds whole batches from known transforms, but {why_not}"
                    "; use store='stream' (or 'auto'), or move the custom step out"
                )
            return "stream", why_not
        if store == "gpu" and self.device.type != "cuda":
            raise ValueError(
                f"store='gpu' needs a CUDA device; the loader's device is {self.device}"
            )
        self._layout = estimate_layout(self.dataset, self.on_error)
        held = self._layout if self._held is None else take_layout(self._layout, self._held)
        nbytes = store_bytes(held)
        if store != "auto":
            return store, f"asked for ({nbytes / 2**20:.1f} MiB)"
        return choose_store(nbytes, self.device, gpu_budget, host_budget)

    def _choose_backend(self, backend: str) -> str:
        global _warned_no_dali
        if backend == "torch":
            return "torch"
        if not dali_available():
            if backend == "dali":
                raise ImportError(
                    "backend='dali' needs NVIDIA DALI (pip install nvidia-dali-cuda120); "
                    "or use backend='torch'"
                )
            if not _warned_no_dali:
                _warned_no_dali = True
                warnings.warn(
                    "GPURayLoader: NVIDIA DALI is not installed; reading with a torch "
                    "DataLoader instead (pip install nvidia-dali-cuda120 for the DALI reader)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return "torch"
        if self.num_workers < 1:
            if backend == "dali":
                raise ValueError("backend='dali' needs num_workers >= 1")
            return "torch"
        if self.start_method == "spawn" and not _dali_picklable(self._reader(0)):
            msg = (
                "GPURayLoader: the reader (dataset or a custom CPU transform) cannot be "
                "pickled for DALI's spawned workers"
            )
            if backend == "dali":
                raise UnsupportedTransformError(
                    msg + "; define custom transforms at module level, or use backend='torch'"
                )
            warnings.warn(msg + "; reading with a torch DataLoader instead", stacklevel=3)
            return "torch"
        return "dali"

    # -- bookkeeping -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the next pass (order and every draw); each pass then advances it by one.
        A position restored by :meth:`load_state_dict` is kept when ``epoch`` is its epoch."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self._resume_at = 0
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands (module doc): ``epoch`` and ``batches_yielded`` of the pass
        in progress (or of the next pass; a finished epoch reads as the next epoch at 0),
        with ``seed``, ``world_size``, ``num_batches`` and the dataset's state to check it."""
        from gpuloader.plan.sampler import resume_state

        epoch, done = self._pass if self._pass is not None else (self.epoch, self._resume_at)
        state = resume_state(
            epoch, done, len(self), self.seed, self.sampler.world_size, self.sampler.shard
        )
        state["rank"] = self.sampler.rank
        ds_state = getattr(self.dataset, "state_dict", None)
        if ds_state is not None:
            state["dataset"] = ds_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (:meth:`state_dict`'s, of any rank of the same run): the
        next pass yields that epoch's batches from ``batches_yielded`` on, exactly those an
        uninterrupted run would yield.

        Raises:
            ValueError: the state belongs to another dataset, seed, world size or batching.
        """
        from gpuloader.plan.sampler import check_resume_state

        epoch, start = check_resume_state(
            state,
            len(self),
            self.seed,
            self.sampler.world_size,
            "GPURayLoader",
            self.sampler.shard,
        )
        ds_load = getattr(self.dataset, "load_state_dict", None)
        if "dataset" in state and ds_load is not None:
            ds_load(state["dataset"])
        self.epoch, self._resume_at = epoch, start
        self._pass = None

    def __repr__(self) -> str:
        return (
            f"GPURayLoader(store={self.store!r}, backend={self.backend!r}, "
            f"device={str(self.device)!r}, batches={len(self)}, workers={self.num_workers})"
        )

    # -- iteration -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._closed:
            raise RuntimeError("GPURayLoader is closed")
        epoch, start = self.epoch, self._resume_at
        self.epoch, self._resume_at = epoch + 1, 0
        if self._fused is not None:
            it = self._fused(epoch, start)
        elif self._stream is not None:
            it = self._stream(epoch, start)
        elif self.backend == "dali":
            it = self._iter_dali(epoch, start)
        else:
            it = self._iter_torch(epoch, start)
        if getattr(self.dataset, "sparse_voxels", False):
            it = self._sparse(it)
        if self.on_error == "skip":
            it = self._with_skips(it, epoch, start)
        pos = self._pass = [epoch, start]
        return self._counted(it, pos)

    def _sparse(self, it: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """``it``'s dense batches as the sparse batches of ``collate_ray_batch`` (a dataset
        with ``sparse_voxels=True``): ``voxels`` replaced by the sparse keys, on the device."""
        mode = getattr(self.dataset, "sparse_mode", "coo")
        conn = int(getattr(self.dataset, "sparse_connectivity", 6))
        try:
            for batch in it:
                sp = dense_batch_to_sparse(batch["voxels"], batch["voxel_shapes"], mode, conn)
                sp.update((k, v) for k, v in batch.items() if k not in ("voxels", *sp))
                yield sp
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def _with_skips(
        self, it: Iterator[dict[str, Any]], epoch: int, start: int
    ) -> Iterator[dict[str, Any]]:
        """``it`` with each batch's ``skipped`` list (module doc), counted in ``skipped``;
        at the end of the epoch one warning naming the bad files met."""
        from gpuloader.dataset.hierarchical import SkippedFileWarning

        plan = self._skipping.skipped(epoch) if self._skipping is not None else None
        met: dict[int, str] = {}
        try:
            for i, batch in enumerate(it, start):
                got = plan[i] if plan is not None else batch.get("skipped", [])
                if got:
                    batch["skipped"] = list(got)
                    self.skipped += len(got)
                    met.update((bad, line) for _, bad, line in got)
                yield batch
            if met:  # each error's first line names its file
                warnings.warn(
                    f"GPURayLoader: epoch {epoch}: {len(met)} bad samples replaced "
                    f"(on_error='skip'): {'; '.join(sorted(set(met.values())))}",
                    SkippedFileWarning,
                    stacklevel=2,
                )
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def _counted(self, it: Iterator[dict[str, Any]], pos: list[int]) -> Iterator[dict[str, Any]]:
        """``it``, counting in ``pos[1]`` the batches handed out (for :meth:`state_dict`)."""
        try:
            for batch in it:
                pos[1] += 1
                yield batch
            if self._pass is pos:
                self._pass = None
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def _iter_dali(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        if self._pipe is None or not self._pipe_fresh or self._pipe_epoch != epoch or start:
            if self._pipe is not None:
                self._pipe.close()
                self._pipe = None
            self._pipe = RayPipeline(
                self._reader(epoch, start),
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
                yield self._assemble(raw)
        except WorkerError:
            if pipe is self._pipe:
                self._pipe = None  # closed on the error: the next pass starts new workers
            raise
        finally:
            if done and pipe is self._pipe and not pipe._closed:
                pipe.reset()
                self._pipe_epoch = epoch + 1
                self._pipe_fresh = True

    def _iter_torch(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        if self._torch_loader is None:
            reader = self._reader(epoch)
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
                yield self._assemble(raw_from_samples(samples))
        except WorkerError:
            if loader is self._torch_loader:
                self._torch_loader = None  # its workers are stopped: the next pass starts new
            raise

    # -- one batch -------------------------------------------------------------------------

    def _assemble(self, raw: RawBatch) -> dict[str, Any]:
        """Concatenated reader outputs -> augmented collate_ray_batch dict on the device."""
        if self.device.type == "cuda":
            import cupy

            stream = torch.cuda.current_stream(self.device)
            with cupy.cuda.Device(self.device.index), cupy.cuda.ExternalStream(stream.cuda_stream):
                return self._assemble_xp(raw, cupy)
        return self._assemble_xp(raw, np)

    def _assemble_xp(self, raw: RawBatch, xp: Any) -> dict[str, Any]:
        meta = raw.meta
        real = np.flatnonzero(meta[:, 0] >= 0)
        if real.size and real[-1] != real.size - 1:
            raise RuntimeError("filler slots must come after the real samples of a batch")
        b = int(real.size)
        index, epochs, levels = meta[:b, 0], meta[:b, 1], meta[:b, 2]
        replaced = meta[:b, 4] if meta.shape[1] > 4 else np.full(b, -1)
        skipped = [(p, int(r), self._bad_line(int(r))) for p, r in enumerate(replaced) if r >= 0]
        counts = np.array([s[0] for s in raw.shapes["origins"][:b]], dtype=np.int64)
        vcounts = np.array([s[0] for s in raw.shapes["view_positions"][:b]], dtype=np.int64)
        vshapes = [tuple(s) for s in raw.shapes["voxels"][:b]]
        arrays = {k: xp.asarray(v) for k, v in raw.arrays.items()}  # zero-copy views
        vox, sides = self._stack_voxels(arrays["voxels"], vshapes, xp)
        rays = {k: arrays[k] for k in RAY_OUTPUTS}
        vp = arrays["view_positions"]
        contexts = [SampleContext(self._data_seed, int(epochs[i]), int(index[i])) for i in range(b)]
        for j, seg in enumerate(self._segments):
            plans = [
                draw_plan(seg, contexts[i], int(sides[i]), segment=j, level=int(levels[i]))
                for i in range(b)
            ]
            params = to_batch_params(plans, contexts)
            want = np.array(
                [
                    c if p.num_rays is None else p.num_rays
                    for p, c in zip(plans, counts, strict=True)
                ],
                dtype=np.int64,
            )
            if np.any(want < counts):
                rows, owner = self._aug.select_rows_batch(counts, want, params)
                starts = xp.asarray(np.concatenate([[0], np.cumsum(counts)[:-1]]))
                take = starts[xp.asarray(owner).astype(xp.int64)] + xp.asarray(rows)
                rays = {k: v[take] for k, v in rays.items()}
                counts = np.minimum(want, counts)
            if all(p.is_identity for p in plans):
                continue
            total = int(counts.sum())
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            ray_sample = _owners(counts, xp)
            ray_row = xp.arange(total, dtype=xp.int64) - xp.asarray(starts)[ray_sample]
            o, d, dist = self._aug.transform_rays(
                rays["origins"],
                rays["directions"],
                rays["distances"],
                ray_sample,
                ray_row.astype(xp.int32),
                params,
            )
            rays.update(origins=o, directions=d, distances=dist)
            vp_sample = _owners(vcounts, xp)
            vp = self._aug.transform_points(vp, vp_sample, params)
            if any(p.symmetry != 0 or p.jitter_prob > 0 for p in plans):
                vox = self._aug.transform_voxels(vox, sides, params)
        out = self._to_torch(vox, vshapes, rays, vp, vcounts, counts, levels, index, xp)
        if skipped:
            out["skipped"] = skipped
        return out

    @staticmethod
    def _stack_voxels(flat: Any, shapes: list[tuple[int, ...]], xp: Any) -> tuple[Any, np.ndarray]:
        """Flat grids -> (B, S, S, S) uint8 zero-padded at the end of each axis, and sides."""
        b = len(shapes)
        sides = np.array([max(s) if s else 0 for s in shapes], dtype=np.int64)
        side = int(sides.max()) if b else 0
        if all(s == (side, side, side) for s in shapes):
            return flat[: b * side**3].reshape(b, side, side, side), sides
        out = xp.zeros((b, side, side, side), dtype=xp.uint8)
        off = 0
        for i, (d, h, w) in enumerate(shapes):
            size = d * h * w
            out[i, :d, :h, :w] = flat[off : off + size].reshape(d, h, w)
            off += size
        return out, sides

    def _tensor(self, a: Any, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(a, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(a))
        else:  # a CuPy array: zero-copy through DLPack
            t = torch.from_dlpack(a)
        return t.to(dtype)

    def _to_torch(
        self,
        vox: Any,
        vshapes: list[tuple[int, ...]],
        rays: dict[str, Any],
        vp: Any,
        vcounts: np.ndarray,
        counts: np.ndarray,
        levels: np.ndarray,
        index: np.ndarray,
        xp: Any,
    ) -> dict[str, Any]:
        dev = self.device
        b = len(vshapes)
        voxels = self._tensor(vox, torch.float32).reshape(b, 1, *vox.shape[1:])
        out: dict[str, Any] = {
            "voxels": voxels,
            "voxel_shapes": torch.tensor(
                [list(s) for s in vshapes], dtype=torch.long, device=dev
            ).reshape(b, 3),
        }
        for k, dtype in RAY_DTYPES.items():
            out[k] = self._tensor(rays[k], dtype)
        num_rays = torch.from_numpy(counts.astype(np.int64)).to(dev)
        out["ray_to_voxel"] = self._tensor(_owners(counts, xp), torch.long)
        out["num_rays"] = num_rays
        out["levels"] = torch.from_numpy(levels.astype(np.int64)).to(dev)
        out["hashes"] = [self._hashes[int(i)] for i in index]
        vpt = self._tensor(vp, torch.float32)
        out["view_positions"] = list(torch.split(vpt, vcounts.tolist()))
        return out

    # -- shutdown --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every worker (DALI pool or DataLoader workers) and free their shared memory."""
        if (
            getattr(self, "_closed", True)
            and self._pipe is None
            and self._torch_loader is None
            and getattr(self, "_stream", None) is None
        ):
            return
        self._closed = True
        self._fused = None
        self.resident = None
        stream, self._stream = getattr(self, "_stream", None), None
        if stream is not None:
            stream.close()
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe.close()
        loader, self._torch_loader = self._torch_loader, None
        if loader is not None:
            stop_loader(loader)

    def __enter__(self) -> GPURayLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass
