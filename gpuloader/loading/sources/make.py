"""The source a loader's setup chose, built: :func:`make_source`.

``setup.source`` (:class:`~gpuloader.loading.setup.LoaderSetup`) names it:

* ``"resident"``: the caller's store, or one filled now by reader workers
  (:func:`~gpuloader.reading.fill.fill_store`; on the host the workers write straight into
  shared memory), then :class:`~gpuloader.loading.sources.resident.FusedBatches`;
* ``"pack"``: each sample's place in the pack (:func:`~gpuloader.reading.pack_reader.pack_layout`,
  from the headers read once), the batch reader, then
  :class:`~gpuloader.loading.sources.pack_stream.StreamBatches`;
* ``"striped"``: each sample's row in its striped level
  (:func:`~gpuloader.loading.sources.striped.striped_places`), then
  :class:`~gpuloader.loading.sources.striped.StripedBatches` (the epoch's stripes resident);
* ``"samples"``: :class:`~gpuloader.loading.sources.sample_stream.SampleStream`.

Bad samples known before reading (the fill's, the pack's, the headers') go to the skip
ledger, which replaces them in the whole-batch sources' sampler
(:meth:`~gpuloader.loading.skips.SkipLedger.known_bad`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpuloader.dataset.view import DatasetView
from gpuloader.loading.setup import LoaderSetup
from gpuloader.loading.skips import SkipLedger
from gpuloader.loading.sources.base import BatchSource
from gpuloader.loading.sources.pack_stream import StreamBatches
from gpuloader.loading.sources.resident import FusedBatches
from gpuloader.loading.sources.sample_stream import SampleStream
from gpuloader.loading.sources.striped import StripedBatches, striped_places
from gpuloader.reading.fill import fill_store
from gpuloader.reading.headers import estimate_layout
from gpuloader.reading.pack_reader import PackBatchReader, pack_layout
from gpuloader.stores.resident import ResidentStore

__all__ = ["make_source"]


def make_source(
    setup: LoaderSetup,
    view: DatasetView,
    sampler: Any,
    skips: SkipLedger,
    store: Any,
    *,
    num_workers: int,
    prefetch: int,
    start_method: str,
    worker_timeout: float,
    ray_budget: int | None,
    held: np.ndarray | None = None,
    threads: int = 1,
    progress: bool | None = None,
    cuda_graphs: bool = False,
) -> BatchSource:
    """The source of ``setup`` (module doc).

    Args:
        setup: the loader's setup. view: the loader's view of the dataset (its transform and
            ``on_error``). sampler: the loader's RayBatchSampler. skips: its skip ledger.
        store: the loader's ``store`` argument (a ResidentStore is used as it is).
        held: the samples this rank's store holds (``shard_store``), or None for all.
        num_workers, prefetch, start_method, worker_timeout, threads, progress, cuda_graphs:
            GPURayLoader's. ray_budget: rows the transform keeps, or None.

    Raises:
        DamagedFileError: bad samples known before reading under ``on_error='raise'``.
    """
    segment = list(setup.segments[0]) if setup.segments else []
    hashes = list(view.hashes)
    if setup.source == "resident":
        if isinstance(store, ResidentStore):
            resident = store
        else:
            host = setup.store == "host"
            resident = fill_store(
                view,
                location=setup.store,
                device=setup.device,
                num_workers=num_workers,
                # host: workers write into a shared-memory store (no copy through here)
                backend="direct" if host and num_workers else setup.backend,
                progress=progress,
                layout=setup.layout,
                on_error=view.on_error,
                worker_timeout=worker_timeout,
                indices=held,
            )
        return FusedBatches(
            resident,
            view,
            skips.known_bad(sampler, resident.bad, resident.held),
            segment,
            setup.device,
            threads=threads,
            prefetch=max(2, prefetch),
            cuda_graphs=cuda_graphs,
        )
    if setup.source == "pack":
        # whole batches from the pack: the batch reader in workers, then the fused pass
        est = setup.layout or estimate_layout(view, view.on_error)  # headers read once
        layout, levels = pack_layout(view, est.side, est.bad)
        reader = PackBatchReader(
            view, skips.known_bad(sampler, layout.bad), segment, layout, levels
        )
        return StreamBatches(
            reader,
            hashes,
            setup.device,
            num_workers=num_workers,
            backend=setup.backend,
            prefetch=prefetch,
            worker_timeout=worker_timeout,
        )
    if setup.source == "striped":
        levels, rows, bad = striped_places(view)
        return StripedBatches(
            view,
            skips.known_bad(sampler, bad),
            segment,
            setup.device,
            levels,
            rows,
            sampler.seed,
            timeout=worker_timeout,
            threads=threads,
            prefetch=max(2, prefetch),
            cuda_graphs=cuda_graphs,
            bad=bad,
            held=held,
        )
    return SampleStream(
        sampler,
        setup.segments,
        setup.cpu_transforms,
        ray_budget,
        view.seed,
        hashes,
        setup.device,
        backend=setup.backend,
        num_workers=num_workers,
        prefetch=prefetch,
        start_method=start_method,
        worker_timeout=worker_timeout,
        bad_line=skips.bad_line,
    )
