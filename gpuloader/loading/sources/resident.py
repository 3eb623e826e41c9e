"""Whole batches from a resident store: the epoch plan, then one fused pass per batch.

:class:`FusedBatches` turns a :class:`~gpuloader.stores.resident.ResidentStore` and the
sampler's order into the dicts of ``collate_ray_batch``:

* once per epoch: :func:`~gpuloader.plan.epoch.build_epoch_plan` (vectorized draws;
  on CUDA uploaded to the device once, with the per-slot ``num_rays``/``levels``/
  ``voxel_shapes`` as torch tensors, so a batch needs no host-to-device copy);
* per batch on the CPU: :mod:`gpuloader.fused.cpu` (row selection, gather,
  symmetry, normalization, noise, ``ray_to_voxel``; grids; views), batches built ahead by a
  small thread pool (numpy releases the GIL in its gathers);
* per batch on CUDA: the three kernels of ``kernels/fused.cu`` (:mod:`gpuloader.fused.cuda`)
  on a side stream, writing into a ring of preallocated torch tensors (CuPy views of them made
  once); torch's current stream waits on an event, and a slot is overwritten only after
  the work the consumer queued while it held that slot's batch. **Reuse:** a batch's
  tensors are valid until ``ring`` (default 3) further batches have been taken; ``clone()``
  what you keep longer.
* per batch on CUDA with ``cuda_graphs=True`` (opt-in, not yet validated on hardware): the
  epoch plan goes into a persistent device arena once per epoch and each batch is one replay
  of a captured CUDA graph (:class:`gpuloader.fused.graphs.EpochGraphs`: one graph per ring
  slot, the epoch-indexed kernels of ``kernels/fused.cu`` walking the epoch with a device
  cursor), on the same side stream and ring. Graphs have static sizes: captured for the
  ring's capacities (the largest batch seen), captured again when the ring grows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from gpuloader.augment.transforms import Transform
from gpuloader.dataset.view import DatasetView
from gpuloader.loading.sources.base import BatchSource
from gpuloader.loading.sources.batch_dict import (
    RAY_KEYS,
    batch_dict,
    fused_dict,
    fused_pass,
    to_device,
)
from gpuloader.plan.epoch import EpochPlan, build_epoch_plan
from gpuloader.stores.resident import ResidentStore

__all__ = ["FusedBatches"]


class FusedBatches(BatchSource):
    """Batches of a resident store (module doc): a :class:`BatchSource`.

    Args:
        store: the resident store (host or gpu).
        dataset: the dataset it was filled from, or its DatasetView (samples, seed,
            samples_per_subvolume).
        sampler: the RayBatchSampler that decides order and ray counts.
        segment: the known transforms (one fused run).
        device: torch device of the batches.
        threads: CPU batch builders of a host store, in background threads that build
            ``prefetch`` batches ahead (0: each batch built on demand in the consumer's thread).
        prefetch: batches built ahead (CPU) .
        ring: output slots on CUDA (see module doc).
        cuda_graphs: on CUDA, replay a captured CUDA graph per batch instead of launching
            the kernels from Python (module doc; opt-in, not yet validated on hardware).
    """

    def __init__(
        self,
        store: ResidentStore,
        dataset: Any,
        sampler: Any,
        segment: Sequence[Transform],
        device: torch.device,
        threads: int = 1,
        prefetch: int = 4,
        ring: int = 3,
        cuda_graphs: bool = False,
    ) -> None:
        self.store = store
        self.sampler = sampler
        self.segment = list(segment)
        self.device = device
        view = DatasetView.of(dataset)
        self.seed = view.seed
        self.samples_per_subvolume = view.samples_per_subvolume
        self.levels = view.levels
        self.hashes = list(view.hashes)
        self.threads = max(0, int(threads))
        self.prefetch = max(1, int(prefetch))
        self.ring = max(2, int(ring))
        self.cuda_graphs = bool(cuda_graphs)
        self._gpu: _GPUState | None = None

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch plan of ``epoch`` (host arrays)."""
        return build_epoch_plan(
            self.sampler.batches(epoch),
            self.store.layout,
            self.levels,
            self.segment,
            self.seed,
            epoch,
            self.samples_per_subvolume,
        )

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of ``epoch`` from plan batch ``start`` on (a resumed epoch)."""
        plan = self.plan(epoch)
        if self.store.location == "gpu":
            return self._iter_gpu(plan, start)
        return self._iter_host(plan, start)

    def close(self) -> None:
        """Drop the CUDA ring and graphs (the store stays: it may be shared)."""
        self._gpu = None

    # -- CPU ---------------------------------------------------------------------------------

    def build_host(self, plan: EpochPlan, i: int) -> dict[str, Any]:
        """Batch ``i`` of ``plan`` from a host store: collate_ray_batch's dict (CPU tensors)."""
        bp = plan.batch(i)
        out = fused_pass(self.store.arrays, bp)
        return fused_dict(out, bp, plan.levels[plan.slots(i)], self.hashes)

    def _iter_host(self, plan: EpochPlan, start: int = 0) -> Iterator[dict[str, Any]]:
        n = len(plan)
        move = self.device.type != "cpu"
        if self.threads == 0:  # built on demand, in the consumer's thread
            for i in range(start, n):
                yield (
                    self._to_device(self.build_host(plan, i)) if move else self.build_host(plan, i)
                )
            return
        with ThreadPoolExecutor(self.threads, thread_name_prefix="gpuloader-batch") as pool:
            pending: deque = deque()
            nxt = start
            while nxt < n and len(pending) < self.prefetch:
                pending.append(pool.submit(self.build_host, plan, nxt))
                nxt += 1
            while pending:
                batch = pending.popleft().result()
                if nxt < n:
                    pending.append(pool.submit(self.build_host, plan, nxt))
                    nxt += 1
                yield self._to_device(batch) if move else batch

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return to_device(batch, self.device)

    # -- CUDA --------------------------------------------------------------------------------

    def _iter_gpu(self, plan: EpochPlan, start: int = 0) -> Iterator[dict[str, Any]]:
        if self._gpu is None:
            self._gpu = _GPUState(self)
        yield from self._gpu.iterate(plan, start)


class _GPUState:
    """Device-side state of the CUDA path: side stream, the ring of outputs, the kernels."""

    def __init__(self, owner: FusedBatches) -> None:
        import cupy

        from gpuloader.fused import cuda as fused_cupy
        from gpuloader.fused import graphs

        self.owner = owner
        self.cupy = cupy
        self.kernels = fused_cupy
        self.epoch_graphs = graphs
        self.device = owner.device
        self.stream = torch.cuda.Stream(self.device)
        self.slots: list[dict[str, torch.Tensor]] = []
        self.capacity = (0, 0, 0)  # rays, voxels, views per slot
        self.graphs: Any = None  # graphs.EpochGraphs over the ring (cuda_graphs)

    def _ensure_ring(self, rays: int, voxels: int, views: int, b: int) -> None:
        if (
            self.slots
            and rays <= self.capacity[0]
            and voxels <= self.capacity[1]
            and views <= self.capacity[2]
        ):
            return
        torch.cuda.current_stream(self.device).synchronize()
        if self.graphs is not None:
            self.stream.synchronize()  # no replay in flight reads the arena we drop
        dev = self.device
        self.capacity = (rays, voxels, views)
        self.slots = []
        for _ in range(self.owner.ring):
            self.slots.append(
                {
                    "origins": torch.empty((rays, 3), dtype=torch.float32, device=dev),
                    "directions": torch.empty((rays, 3), dtype=torch.float32, device=dev),
                    "distances": torch.empty(rays, dtype=torch.float32, device=dev),
                    "hits": torch.empty(rays, dtype=torch.float32, device=dev),
                    "view_ids": torch.empty(rays, dtype=torch.long, device=dev),
                    "face_ids": torch.empty(rays, dtype=torch.long, device=dev),
                    "ray_to_voxel": torch.empty(rays, dtype=torch.long, device=dev),
                    "voxels": torch.empty(voxels, dtype=torch.float32, device=dev),
                    "view_positions": torch.empty((views, 3), dtype=torch.float32, device=dev),
                }
            )
        self.views = [{k: self.cupy.asarray(v) for k, v in s.items()} for s in self.slots]
        self.graphs = None  # captured again for the new outputs

    def iterate(self, plan: EpochPlan, start: int = 0) -> Iterator[dict[str, Any]]:
        """The plan's batches from ``start`` on (module doc)."""
        cp = self.cupy
        owner = self.owner
        n = len(plan)
        if n <= start:
            return
        keep = plan.arrays["keep"]
        totals = self.epoch_graphs.epoch_batch_totals(plan)  # per batch: rays, views, B, S, B*S^3
        tot, vtot, bsz = totals["rays"], totals["views"], totals["size"]
        side_max, vox = totals["side"], totals["voxels"]
        self._ensure_ring(int(tot.max()), int(vox.max()), int(vtot.max()), int(bsz.max()))
        dev = self.device
        consumer = torch.cuda.current_stream(dev)
        with cp.cuda.Device(dev.index or 0):
            if owner.cuda_graphs:
                side_stream = cp.cuda.ExternalStream(self.stream.cuda_stream)
                if self.graphs is None:
                    self.graphs = self.epoch_graphs.EpochGraphs(owner.store.arrays, self.views)
                # the epoch's one upload, on the side stream: after last epoch's replays
                self.graphs.load(plan, start, stream=side_stream)
            else:
                dplan = plan.to(cp)  # one upload per epoch
            keep_t = torch.as_tensor(keep, device=dev)
            levels_t = torch.as_tensor(plan.levels, device=dev)
            side_t = torch.as_tensor(plan.arrays["side"], device=dev)
            shapes_t = side_t[:, None].expand(-1, 3).contiguous()
            counts_host = [plan.arrays["view_count"][plan.slots(i)].tolist() for i in range(n)]
            free = [torch.cuda.Event() for _ in self.slots]
            ready: list[torch.cuda.Event | None] = [None] * len(self.slots)

            def launch(i: int) -> None:
                s = i % len(self.slots)
                self.stream.wait_event(free[s])  # the consumer is done with this slot
                if owner.cuda_graphs:
                    written = self.graphs.launch(i, side_stream)  # one graph replay
                    if written != s:  # pragma: no cover - EpochGraphs uses i % R too
                        raise RuntimeError(f"graph of batch {i} wrote slot {written}, not {s}")
                    ev = torch.cuda.Event()
                    ev.record(self.stream)
                    ready[s] = ev
                    return
                with (
                    torch.cuda.stream(self.stream),
                    cp.cuda.ExternalStream(self.stream.cuda_stream),
                ):
                    bp = dplan.batch(i)
                    t, v, b, sm = int(tot[i]), int(vtot[i]), int(bsz[i]), int(side_max[i])
                    views = self.views[s]
                    out = {k: views[k][:t] for k in RAY_KEYS}
                    self.kernels.gather_rays(owner.store.arrays, bp, out=out)
                    grid = views["voxels"][: b * sm**3].reshape(b, 1, sm, sm, sm)
                    self.kernels.gather_grids(owner.store.arrays["grids"], bp, out=grid)
                    self.kernels.gather_views(
                        owner.store.arrays["view_positions"], bp, out=views["view_positions"][:v]
                    )
                ev = torch.cuda.Event()
                ev.record(self.stream)
                ready[s] = ev

            launch(start)
            for i in range(start, n):
                s = i % len(self.slots)
                if i + 1 < n:
                    launch(i + 1)  # the next batch is queued before this one is handed out
                consumer.wait_event(ready[s])
                sl = plan.slots(i)
                t, v, b, sm = int(tot[i]), int(vtot[i]), int(bsz[i]), int(side_max[i])
                slot = self.slots[s]
                yield batch_dict(
                    {k: slot[k][:t] for k in RAY_KEYS},
                    slot["voxels"][: b * sm**3].view(b, 1, sm, sm, sm),
                    slot["view_positions"][:v],
                    counts_host[i],
                    shapes_t[sl],
                    keep_t[sl],
                    levels_t[sl],
                    [owner.hashes[int(j)] for j in plan.arrays["index"][sl]],
                )
                free[s].record(consumer)  # what the consumer queued with this batch is before it
