"""``GPURayLoader``: the batches of ``DataLoader(..., RayBatchSampler, collate_ray_batch)``,
read by parallel workers, moved to the device and augmented there in one batched pass.

Where a batch comes from (``loader.store``, ``loader.store_reason``; the choice is
:mod:`gpuloader.loading.setup`'s), one :class:`~gpuloader.loading.sources.base.BatchSource`
each, all ending in the same fused pass and the dict of ``collate_ray_batch`` (same keys,
dtypes and shapes), on the device:

* ``"gpu"``/``"host"``: the split held whole in a resident store, filled once by reader
  workers; each batch one fused gather (:mod:`gpuloader.loading.sources.resident`);
* ``"stream"`` over a pack: whole batches gathered by reader workers
  (:mod:`gpuloader.loading.sources.pack_stream`);
* ``"stream"`` otherwise (npz files, custom CPU transforms, several fused runs): the
  per-sample reader in workers, then the fused pass over the read batch
  (:mod:`gpuloader.loading.sources.sample_stream`);
* ``"striped"``: a striped pack (``gpuloader pack --layout striped``), the epoch's stripes
  resident, the next epoch's read in the background
  (:mod:`gpuloader.loading.sources.striped`).

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
sample by the rule of :mod:`gpuloader.plan.replace`, exactly as the CPU API does (whether it
was known before reading or met by the reader: :mod:`gpuloader.loading.skips`). Each batch
carries ``skipped`` (``(position, bad index, error)``, as ``collate_ray_batch``'s);
``loader.errors`` lists the bad files met, ``loader.skipped`` counts the replacements, and each
epoch that replaced samples ends with one warning naming them. With ``shard_store=True`` a
replacement comes from the rank's own subset.

Passes: one at a time per loader, on every store and back end. A new ``iter(loader)`` ends
the pass in progress (its workers' read-ahead dropped, as at the end of a pass) and reads the
next epoch from its first batch, complete: ``next(iter(loader))`` followed by ``for batch in
loader`` gives one batch of epoch e, then all of epoch e + 1. The ended iterator's next
``next()`` raises :class:`~gpuloader.errors.PassEndedError` naming why (``close()`` ends a
pass too); for independent passes, use one loader per pass
(:mod:`gpuloader.loading.passes`).

Resume: :meth:`GPURayLoader.state_dict` is ``(epoch, batches_yielded)`` of the pass in
progress (batches handed to the caller, not those read ahead); after
:meth:`GPURayLoader.load_state_dict` (on this loader or a new one) the next pass starts that
epoch at that batch: the store's plan, the stream's batch reader and the per-sample reader
all start there without reading the batches before it.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from gpuloader.augment.transforms import ray_budget
from gpuloader.dataset.view import DatasetView
from gpuloader.loading.passes import NEW_PASS, LoaderPass
from gpuloader.loading.setup import (
    LoaderSetup,
    choose_setup,
    known_segments,
    resolve_device,
)
from gpuloader.loading.skips import SkipLedger
from gpuloader.loading.sources.base import BatchSource
from gpuloader.loading.sources.make import make_source
from gpuloader.loading.sources.resident import FusedBatches
from gpuloader.loading.sparse_batch import sparse_batches
from gpuloader.plan.resume import check_resume_state, is_bare_position, resume_state
from gpuloader.plan.sampler import ALL_RAYS, RayBatchSampler, check_count
from gpuloader.stores.resident import ResidentStore

__all__ = ["GPURayLoader", "known_segments"]

log = logging.getLogger("gpuloader")


class GPURayLoader:
    """Ray batches of ``collate_ray_batch`` form, read in parallel and augmented on the device.

    One pass at a time: a new ``iter(loader)`` ends the pass in progress, whose iterator then
    raises :class:`~gpuloader.errors.PassEndedError` on its next ``next()`` (module doc,
    "Passes").

    Args:
        dataset: a :class:`~gpuloader.dataset.hierarchical.HierarchicalVoxelRayDataset`.
            With ``sparse_voxels=True`` the batches have its sparse keys instead of
            ``voxels`` (as ``collate_ray_batch``'s), converted on the device.
        rays_per_batch, subvolumes_per_batch, shuffle, drop_last: as ``RayBatchSampler``.
        transform: the transform (None: ``dataset.transform``). Custom callables must come
            before the known transforms; they run per sample in the reader.
        seed: order seed (None: ``dataset.seed``).
        num_workers: reader processes (DALI: >= 1; torch: 0 reads in this process). The
            striped store has no reader processes (one background thread reads the next
            stripe), so it ignores ``num_workers`` and ``backend``; the resident stores use
            them for the fill only.
        prefetch: batches read ahead.
        device: "auto" (ToDevice's target if the transform has one, else CUDA when torch
            and CuPy can use it, else CPU), "cpu", "cuda" or "cuda:N" (a malformed one, or
            CUDA on a machine without it, raises ValueError here).
        backend: "auto" (DALI if importable, else torch), "dali" or "torch": the reader of
            the store's fill, or of every sample when streaming.
        start_method: how DALI starts its workers ("spawn" or "fork").
        store: where the split lives while batches are made: "auto" (GPU when the split
            takes under ``gpu_budget``, else host RAM under ``host_budget``, else the striped
            store on a striped pack, else streaming), "gpu", "host", "stream" (the
            per-sample reader over the dataset's ray store, npz or pack), "striped", or a
            :class:`~gpuloader.stores.resident.ResidentStore` already filled (shared by
            several loaders of one dataset). Custom callables in the transform need "stream".
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
        store: "gpu", "host", "stream" or "striped"; store_reason: why; resident: the ResidentStore.
        errors: ``(file, first line of its error)`` of every bad file met (``on_error=
            'skip'``), in the order met, first those the dataset lists (its index build's);
            skipped: samples replaced so far.
        setup: all of these choices as one :class:`~gpuloader.loading.setup.LoaderSetup`;
            source: the :class:`~gpuloader.loading.sources.base.BatchSource` that makes the
            batches (None once closed).
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
        self._current: weakref.ref[LoaderPass] | None = None  # the pass in progress
        self.source: BatchSource | None = None
        self.resident: ResidentStore | None = None
        if backend not in ("auto", "dali", "torch"):
            raise ValueError(f"backend must be 'auto', 'dali' or 'torch'; got {backend!r}")
        check_count("GPURayLoader", "rays_per_batch", rays_per_batch, ALL_RAYS)
        check_count("GPURayLoader", "subvolumes_per_batch", subvolumes_per_batch, "the default, 8")
        self.dataset = dataset
        data = DatasetView.of(dataset)
        self.transform = data.transform if transform is None else transform
        cpu, segments, target = known_segments(self.transform)
        self.device = resolve_device(device, target)
        self.on_error = on_error or data.on_error
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip'; got {on_error!r}")
        # the sampler and the readers see the loader's transform (its ray budget) and policy
        view = data.with_(transform=self.transform, on_error=self.on_error)
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
        self.seed = self.sampler.seed
        self.num_workers = int(num_workers)
        self.prefetch = max(1, int(prefetch))
        self.start_method = start_method
        self.worker_timeout = float(worker_timeout)
        if not self.worker_timeout > 0:
            raise ValueError(f"worker_timeout must be > 0 seconds; got {worker_timeout!r}")
        budget = ray_budget(self.transform)
        self._skips = SkipLedger(view)
        self.epoch = 0
        self._resume_at = 0  # batches of ``self.epoch`` the next pass skips (load_state_dict)
        self._pass: list[int] | None = None  # [epoch, batches yielded] of the pass in progress
        # the samples this rank's batches use: a resident store needs only these
        held = self.sampler.shard_indices() if shard_store else None
        self.setup: LoaderSetup = choose_setup(
            dataset=dataset,
            sampler=self.sampler,
            device=self.device,
            cpu=cpu,
            segments=segments,
            backend=backend,
            store=store,
            num_workers=self.num_workers,
            start_method=start_method,
            on_error=self.on_error,
            ray_budget=budget,
            held=held,
            gpu_budget=gpu_budget,
            host_budget=host_budget,
        )
        self.backend, self.store = self.setup.backend, self.setup.store
        self.store_reason = self.setup.reason
        self.source = make_source(
            self.setup,
            view,
            self.sampler,
            self._skips,
            store,
            num_workers=self.num_workers,
            prefetch=self.prefetch,
            start_method=start_method,
            worker_timeout=self.worker_timeout,
            ray_budget=budget,
            held=held,
            threads=threads,
            progress=progress,
            cuda_graphs=cuda_graphs,
        )
        if isinstance(self.source, FusedBatches):
            self.resident = self.source.store
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

    # -- what users read -------------------------------------------------------------------

    @property
    def errors(self) -> list[tuple[str, str]]:
        """``(file, first line of its error)`` of every bad file met, in the order met."""
        return self._skips.errors

    @property
    def skipped(self) -> int:
        """Samples replaced so far (``on_error='skip'``)."""
        return self._skips.skipped

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
        epoch, done = self._pass if self._pass is not None else (self.epoch, self._resume_at)
        state = resume_state(
            epoch,
            done,
            len(self),
            self.seed,
            self.sampler.world_size,
            self.sampler.shard,
            self.sampler.identity(),
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
            ValueError: the state belongs to another dataset, seed, world size or batching
                (the message names what differs), its position is beyond the epoch or not an
                integer, or it lacks a key (``seed``, ``dataset``, ...: named).
        """
        epoch, start = check_resume_state(
            state,
            len(self),
            self.seed,
            self.sampler.world_size,
            "GPURayLoader",
            self.sampler.shard,
            self.sampler.identity(),
        )
        ds_load = getattr(self.dataset, "load_state_dict", None)
        if ds_load is not None and "dataset" not in state and not is_bare_position(state):
            raise ValueError(
                "GPURayLoader.load_state_dict: the state lacks 'dataset' (the dataset's "
                "state_dict(), which this loader's state holds); pass state_dict()'s dict, whole"
            )
        if ds_load is not None and "dataset" in state:
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
        if self._closed or self.source is None:
            raise RuntimeError("GPURayLoader is closed")
        self._end_pass(NEW_PASS)  # one pass at a time (module doc, "Passes")
        epoch, start = self.epoch, self._resume_at
        self.epoch, self._resume_at = epoch + 1, 0
        it = self.source.batches(epoch, start)
        data = DatasetView.of(self.dataset)
        if data.sparse_voxels:
            it = sparse_batches(it, data.sparse_mode, data.sparse_connectivity)
        if self.on_error == "skip":
            it = self._skips.with_skips(it, epoch, start)
        pos = self._pass = [epoch, start]

        def done() -> None:
            if self._pass is pos:
                self._pass = None

        current = LoaderPass(it, pos, done)
        self._current = weakref.ref(current)
        return current

    def _end_pass(self, why: str) -> None:
        """End the pass in progress, if any (:class:`~gpuloader.loading.passes.LoaderPass`)."""
        ref, self._current = getattr(self, "_current", None), None
        current = ref() if ref is not None else None
        if current is not None:
            current.end(why)

    # -- shutdown --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every worker (DALI pool or DataLoader workers) and free their shared memory."""
        self._closed = True
        self._end_pass("the loader was closed (loader.close())")
        self.resident = None
        source, self.source = getattr(self, "source", None), None
        if source is not None:
            source.close()

    def __enter__(self) -> GPURayLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass
