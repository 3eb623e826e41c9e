"""A whole epoch of the fused pass as CUDA graphs: :class:`EpochGraphs`, :func:`epoch_batch_totals`.

:class:`EpochGraphs` makes an epoch replayable: the epoch plan
(:class:`~gpuloader.plan.epoch.EpochPlan`) uploaded once, and one captured CUDA graph per
output slot whose kernels (``fused_rays_epoch``, ``fused_grids_epoch``, ``fused_views_epoch``
of ``kernels/fused.cu``: the same device code as the per-batch kernels of
:mod:`gpuloader.fused.cuda`) find their batch through a device cursor that the graph's last
node (``fused_next_batch``) advances. A batch is then one graph launch and no host work.
Graphs have static shapes: the outputs' sizes (the epoch's largest batch) are fixed when the
graphs are captured, and output items past a batch's totals are left untouched.

Each slot's graph launches its four kernels with one argument struct
(:func:`gpuloader.fused.cuda.fused_args`: the store, the arena's plan arrays, the slot's
outputs and the key), captured by value. Importing this module needs neither CuPy nor a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gpuloader.fused import cuda
from gpuloader.fused.cuda_build import seed_key

if TYPE_CHECKING:  # pragma: no cover
    from gpuloader.plan.epoch import EpochPlan

__all__ = ["epoch_batch_totals", "EpochGraphs"]


def epoch_batch_totals(plan: EpochPlan) -> dict[str, np.ndarray]:
    """Per-batch sizes of an epoch plan (host arrays), each (nb,) int64.

    ``rays``: sum of ``keep``; ``views``: sum of ``view_count``; ``side``: the largest grid
    side S (0 for an empty batch); ``size``: the number of samples B; ``voxels``: B * S**3.
    Empty batches give zeros.
    """
    starts = np.asarray(plan.batch_starts, dtype=np.int64)
    a, b = starts[:-1], starts[1:]

    def sums(x) -> np.ndarray:
        c = np.concatenate([[0], np.cumsum(np.asarray(x, dtype=np.int64))])
        return (c[b] - c[a]).astype(np.int64)

    size = (b - a).astype(np.int64)
    side = np.zeros(a.shape[0], np.int64)
    full = size > 0
    if full.any():
        sides = np.asarray(plan.arrays["side"], dtype=np.int64)
        # each segment runs to the next non-empty batch's start: its own end
        side[full] = np.maximum.reduceat(sides, a[full])
    return {
        "rays": sums(plan.arrays["keep"]),
        "views": sums(plan.arrays["view_count"]),
        "side": side,
        "size": size,
        "voxels": size * side**3,
    }


#: Per-batch arrays of the arena, after the per-slot fields: name -> epoch_batch_totals key.
_BATCH_TOTALS = {"batch_rays": "rays", "batch_views": "views", "batch_side": "side"}
#: Store arrays every slot needs, then those that may be absent (their outputs not written).
_REQUIRED_STORE = ("origins", "directions", "distances", "grids", "view_positions")
_OPTIONAL_STORE = ("hits", "view_ids", "face_ids")


class EpochGraphs:
    """One CUDA graph per output slot that makes any batch of an epoch plan (module doc).

    The graph of slot ``s`` is ``fused_rays_epoch``, ``fused_grids_epoch``,
    ``fused_views_epoch`` writing slot ``s``'s outputs, then ``fused_next_batch``; each kernel
    reads the batch to make from a device cursor. :meth:`load` uploads an epoch plan (one
    host-to-device copy into a persistent arena: the plan's per-slot arrays, ``batch_starts``,
    the per-batch totals and the cursor); :meth:`launch` replays the graph of batch ``i``'s
    slot, ``i % R``. Batches must be launched in order from :meth:`load`'s ``start``, on one
    stream (the one that :meth:`load` used, or one ordered after it).

    Static shapes: the launch sizes are the outputs' capacities, fixed at capture. Every batch
    of a loaded epoch must fit them (checked by :meth:`load`); output items past a batch's
    totals (rays, views; voxels past B * S**3) are left untouched. The graphs are captured on
    first use and again when the arena grows (a longer epoch) or the seed changes; new
    outputs need a new ``EpochGraphs``.

    Args:
        store: mapping (or attributes) of device arrays: the ray arrays of
            :func:`~gpuloader.fused.cuda.gather_rays` (``hits``/``view_ids``/``face_ids``
            optional), ``view_positions`` (V_store, 3) float32 and ``grids`` (G,) uint8.
        outputs: R >= 1 dicts, one per slot, of C-contiguous device arrays: the
            :data:`~gpuloader.fused.cuda.RAY_KEYS` with T_max rows (``origins``/``directions``
            (T_max, 3) float32, ``distances``/``hits`` (T_max,) float32,
            ``view_ids``/``face_ids``/``ray_to_voxel`` (T_max,) int64;
            ``hits``/``view_ids``/``face_ids``/``ray_to_voxel`` may be absent, and are not
            written when the store lacks the field), ``voxels`` float32 of any shape with
            N_max elements (batch i: its first B * S**3, as (B, 1, S, S, S)) and
            ``view_positions`` (V_max, 3) float32. Kept by reference: the graphs write them.
    """

    def __init__(self, store: Any, outputs: Sequence[Mapping[str, Any]]) -> None:
        if not outputs:
            raise ValueError("EpochGraphs needs at least one output slot")
        self._store: dict[str, Any] = {
            k: cuda.store_array(cuda.store_get(store, k), k) for k in _REQUIRED_STORE
        }
        for key in _OPTIONAL_STORE:
            x = cuda.store_get(store, key)
            self._store[key] = None if x is None else cuda.store_array(x, key)
        self._outputs: list[dict[str, Any]] = []
        caps = None
        for s, out in enumerate(outputs):
            bufs = self._slot_outputs(s, out)
            c = (int(bufs["origins"].shape[0]), int(bufs["voxels"].size))
            c = (*c, int(bufs["view_positions"].shape[0]))
            if caps is not None and c != caps:
                raise ValueError(f"every slot needs the same capacities: {caps} and {c}")
            caps = c
            self._outputs.append(bufs)
        assert caps is not None
        #: (T_max, N_max, V_max): rays, voxels and views one slot holds
        self.capacity: tuple[int, int, int] = caps
        self._arena = None
        self._fields: dict[str, Any] = {}
        self._layout: list[tuple[str, int, np.dtype, tuple[int, ...]]] = []
        self._arena_caps = (0, 0)  # slots, batches
        self._graphs: list[Any] | None = None
        self._key: tuple[np.uint32, np.uint32] | None = None
        self._capture_stream = None
        self._next = 0
        self._end = 0

    def _slot_outputs(self, s: int, out: Mapping[str, Any]) -> dict[str, Any]:
        """Slot ``s``'s output buffers, checked (None: a ray output not written)."""
        bufs: dict[str, Any] = {}
        rays = None
        for key in cuda.RAY_KEYS:
            x = out.get(key)
            if x is None or (key in self._store and self._store[key] is None):
                if key in ("origins", "directions", "distances"):
                    raise ValueError(f"outputs[{s}] needs {key!r}")
                bufs[key] = None
                continue
            bufs[key] = cuda.out_array(x, cuda.OUT_DTYPES[key], None, key)
            n = int(bufs[key].shape[0])
            want = (n, 3) if key in ("origins", "directions") else (n,)
            if tuple(bufs[key].shape) != want or (rays is not None and n != rays):
                raise ValueError(
                    f"outputs[{s}][{key!r}] must have shape {want} with the rows of the "
                    f"other ray outputs; got {tuple(bufs[key].shape)}"
                )
            rays = n
        for key in ("voxels", "view_positions"):
            if out.get(key) is None:
                raise ValueError(f"outputs[{s}] needs {key!r}")
            bufs[key] = cuda.out_array(out[key], cuda.OUT_DTYPES[key], None, key)
        vp = bufs["view_positions"]
        if vp.ndim != 2 or vp.shape[1] != 3:
            raise ValueError(f"outputs[{s}]['view_positions'] must be (V_max, 3)")
        return bufs

    @property
    def num_slots(self) -> int:
        """R, the number of output slots (and graphs)."""
        return len(self._outputs)

    # -- the arena: the epoch plan on the device, at fixed addresses --------------------------

    def _plan_layout(self, slots: int, batches: int) -> tuple[list, int]:
        """(name, byte offset, dtype, shape) of every arena array, 8-byte aligned; total size."""
        entries: list[tuple[str, int, np.dtype, tuple[int, ...]]] = []
        size = 0

        def add(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
            nonlocal size
            entries.append((name, size, np.dtype(dtype), shape))
            size += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 8) * 8

        add("cursor", np.dtype(np.int64), (2,))
        for f, dt in cuda.PLAN_DTYPES.items():
            add(f, dt, (slots, 4) if f == "select_keys" else (slots,))
        add("batch_starts", np.dtype(np.int64), (batches + 1,))
        for name in _BATCH_TOTALS:
            add(name, np.dtype(np.int64), (batches,))
        return entries, max(size, 8)

    def _grow(self, slots: int, batches: int, stream) -> None:
        """A larger arena (graphs captured again): the old one is freed after ``stream``'s
        queued work (the graphs that read it)."""
        cp = cuda.cupy_module()
        if self._arena is not None:
            (stream or cp.cuda.get_current_stream()).synchronize()
        caps = (max(slots, self._arena_caps[0]), max(batches, self._arena_caps[1]))
        self._layout, size = self._plan_layout(*caps)
        self._arena = cp.empty(size, cp.uint8)
        self._fields = {
            name: self._arena[off : off + int(np.prod(shape)) * dt.itemsize].view(dt).reshape(shape)
            for name, off, dt, shape in self._layout
        }
        self._arena_caps = caps
        self._graphs = None

    def load(self, plan: EpochPlan, start: int = 0, stream=None) -> dict[str, np.ndarray]:
        """Upload ``plan`` (host arrays) and set the cursor to batch ``start``.

        One host-to-device copy on ``stream`` (a CuPy stream; None: the current one), ordered
        after the batches already launched there. Captures the graphs when needed (on a
        stream of their own; nothing runs then).

        Returns:
            :func:`epoch_batch_totals` of ``plan``.

        Raises:
            ValueError: a batch does not fit the outputs (``capacity``).
        """
        totals = epoch_batch_totals(plan)
        nb = int(totals["size"].shape[0])
        need = tuple(int(totals[k].max()) if nb else 0 for k in ("rays", "voxels", "views"))
        if any(n > c for n, c in zip(need, self.capacity, strict=True)):
            raise ValueError(
                f"the epoch's largest batch (rays, voxels, views) = {need} does not fit the "
                f"outputs {self.capacity}: graphs need static sizes (new outputs, new "
                "EpochGraphs)"
            )
        if not 0 <= start <= nb:
            raise ValueError(f"start {start} outside the epoch's {nb} batches")
        slots = int(plan.batch_starts[-1])
        if self._arena is None or slots > self._arena_caps[0] or nb > self._arena_caps[1]:
            self._grow(slots, nb, stream)
        host = np.zeros(self._arena.shape[0], np.uint8)
        per_batch = {"batch_starts": np.asarray(plan.batch_starts, dtype=np.int64)}
        per_batch.update({k: totals[v] for k, v in _BATCH_TOTALS.items()})
        for name, off, dt, _ in self._layout:
            if name == "cursor":
                a = np.array([start, nb], np.int64)
            elif name in per_batch:
                a = per_batch[name]
            else:
                a = np.asarray(plan.arrays[name], dtype=dt)
            a = np.ascontiguousarray(a, dtype=dt).reshape(-1).view(np.uint8)
            host[off : off + a.size] = a
        self._arena.set(host, stream=stream)  # the one upload of the epoch
        key = seed_key(plan.seed)
        if self._graphs is None or self._key != key:
            self._key = key
            self._capture()
        self._next, self._end = int(start), nb
        return totals

    # -- the graphs ---------------------------------------------------------------------------

    def _capture(self) -> None:
        """One graph per slot, captured on a stream of its own (nothing runs)."""
        cp = cuda.cupy_module()
        for name in cuda.EPOCH_KERNEL_NAMES:
            cuda.kernel(name)  # compiled and loaded before the capture
        table = cuda.symmetry_table()
        if self._capture_stream is None:
            self._capture_stream = cp.cuda.Stream(non_blocking=True)
        stream = self._capture_stream
        graphs = []
        for bufs in self._outputs:
            stream.begin_capture()
            try:
                with stream:
                    self._launch_batch(bufs, table)
            except BaseException:
                try:  # leave the stream usable; the launch's error is the one to report
                    stream.end_capture()
                except Exception:
                    pass
                raise
            graphs.append(stream.end_capture())
        self._graphs = graphs

    def _launch_batch(self, bufs: dict[str, Any], table) -> None:
        """The four kernels of one slot's graph (captured by :meth:`_capture`), all with one
        argument struct: the store, the arena, the slot's outputs and the key."""
        k0, k1 = self._key
        args = cuda.fused_args(
            **self._store,
            **self._fields,
            **{f"out_{k}": v for k, v in bufs.items()},
            sym_table=table,
            key0=k0,
            key1=k1,
        )
        t_max, n_max, v_max = self.capacity
        cuda.launch("fused_rays_epoch", t_max, args)
        cuda.launch("fused_grids_epoch", n_max, args)
        cuda.launch("fused_views_epoch", v_max, args)
        cuda.launch("fused_next_batch", 1, args)

    def launch(self, i: int, stream=None) -> int:
        """Make batch ``i`` of the loaded epoch: one graph launch on ``stream`` (a CuPy stream;
        None: the current one). Batches go in order from :meth:`load`'s ``start``.

        Returns:
            the slot written, ``i % R``: batch i's rays are the first ``rays[i]`` rows of its
            ray outputs, its grids the first B * S**3 voxels, its views the first ``views[i]``
            rows (``epoch_batch_totals``), once ``stream`` gets there.
        """
        if self._graphs is None:
            raise RuntimeError("EpochGraphs.launch before load")
        if i != self._next or not 0 <= i < self._end:
            raise ValueError(
                f"batch {i} out of order: the graphs make batch {self._next} next "
                f"({self._end} in the epoch)"
            )
        slot = i % len(self._graphs)
        self._graphs[slot].launch(stream)
        self._next += 1
        return slot
