"""The fused per-batch pass on the GPU: :mod:`gpuloader.fused.cpu` in CUDA.

One kernel for every ray of a batch (row selection, gather, symmetry, scale, noise,
renormalization, hits/ids conversion, ``ray_to_voxel``), one for the grids and one for the
view positions (``kernels/fused.cu``), reading straight from a resident store (every sample of
a split concatenated in device memory) with a :class:`~gpuloader.fused.cpu.BatchPlan`.
The functions have the signatures and semantics of their numpy twins and give the same
results: integers bit for bit, floats to rounding (only the float64 ``log``/``cos``/``sin`` of
the Gaussian draws may differ by an ulp before their rounding to float32).

Arrays (store, plan fields, ``out``) are CuPy arrays or objects with
``__cuda_array_interface__`` / CUDA DLPack (torch CUDA tensors: zero copy). Host (numpy)
inputs work too but are copied to the device on every call: a numpy plan in one packed copy,
a numpy store whole (fine for tests, not for a loader). Work runs on CuPy's current device and
stream; the calls never synchronize with the host when the plan is on the device and ``out``
gives the output sizes. Without ``out`` the sizes come from the plan (``num_rays``,
``num_views``, ``grid_side``), which reads a device plan back (a synchronization: the host
must know how much to allocate). Device plans are not range-checked (that would read them
back); host plans are (symmetry in [0, 48), ray counts < 2**32 where subsampled).

``out`` arrays must be C-contiguous device arrays of the documented dtype and shape; the
kernels write into them, and the returned container holds them (``out`` itself for the dict
functions, missing keys filled with new CuPy arrays).

Kernels are compiled once per device with NVRTC through :class:`cupy.RawModule`, with
:data:`gpuloader.fused.cuda_build.NVRTC_OPTIONS` (``--std=c++14 -fmad=false``) and
``-I<kernels>``; the symmetry table is uploaded once per device. Compiling, caching and
launching are :mod:`gpuloader.fused.cuda_build`'s (one place for both kernel modules);
this module keeps its own caches. Importing this module needs neither CuPy nor a GPU.

:class:`EpochGraphs` makes a whole epoch replayable: the epoch plan uploaded once, and one
captured CUDA graph per output slot whose kernels (``fused_rays_epoch``, ``fused_grids_epoch``,
``fused_views_epoch``: the same device code as the per-batch kernels) find their batch through
a device cursor that the graph's last node advances. A batch is then one graph launch and no
host work. Graphs have static shapes: the outputs' sizes (the epoch's largest batch) are fixed
when the graphs are captured, and output items past a batch's totals are left untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gpuloader import schema
from gpuloader.augment import symmetry
from gpuloader.fused.cuda_build import (
    _compiled_module,
    _device_symmetry_table,
    _dlpack_on_gpu,
    _import_cupy,
    _launch_kernel,
    _seed_key,
    _to_cupy,
)
from gpuloader.plan.batch import BatchPlan

if TYPE_CHECKING:  # pragma: no cover
    from gpuloader.plan.epoch import EpochPlan

__all__ = [
    "BLOCK",
    "MAX_BLOCKS",
    "MODULE_SOURCE",
    "KERNEL_NAMES",
    "RAY_KEYS",
    "select_store_rows",
    "gather_rays",
    "gather_grids",
    "gather_views",
    "fused_batch",
    "EPOCH_KERNEL_NAMES",
    "epoch_batch_totals",
    "EpochGraphs",
]

#: Threads per block of every launch.
BLOCK = 256
#: Most blocks of one launch (grid-stride loops cover the rest).
MAX_BLOCKS = 65536
#: The kernel source and its ``extern "C"`` kernels.
MODULE_SOURCE = "fused.cu"
#: The epoch-indexed kernels of :class:`EpochGraphs` (the last one advances the cursor).
EPOCH_KERNEL_NAMES = (
    "fused_rays_epoch",
    "fused_grids_epoch",
    "fused_views_epoch",
    "fused_next_batch",
)
KERNEL_NAMES = (
    "fused_rays",
    "fused_grids",
    "fused_views",
    "fused_select_rows",
    *EPOCH_KERNEL_NAMES,
)
#: Output keys of :func:`gather_rays`, in the kernel's argument order.
RAY_KEYS = (*schema.RAY_FIELDS, "ray_to_voxel")

#: dtype of every plan field as the kernels read it.
_PLAN_DTYPES: dict[str, np.dtype] = {
    **{
        f: np.dtype(np.int64)
        for f in (
            "ray_start",
            "ray_count",
            "keep",
            "out_start",
            "view_start",
            "view_out_start",
            "grid_start",
            "side",
        )
    },
    **{
        f: np.dtype(np.uint32)
        for f in ("select_keys", "epoch", "index", "jitter_threshold", "purpose_offset")
    },
    "symmetry": np.dtype(np.int32),
    **{
        f: np.dtype(np.float32)
        for f in ("origin_scale", "distance_scale", "origin_std", "direction_std")
    },
}
_SELECT_FIELDS = ("ray_start", "ray_count", "keep", "out_start", "select_keys")
_RAY_FIELDS = (
    *_SELECT_FIELDS,
    "symmetry",
    "origin_scale",
    "distance_scale",
    "origin_std",
    "direction_std",
    "epoch",
    "index",
    "purpose_offset",
)
_GRID_FIELDS = (
    "grid_start",
    "side",
    "symmetry",
    "jitter_threshold",
    "epoch",
    "index",
    "purpose_offset",
)
_VIEW_FIELDS = ("view_start", "view_out_start", "symmetry", "origin_scale")
_ALL_FIELDS = tuple(dict.fromkeys(_RAY_FIELDS + _GRID_FIELDS + _VIEW_FIELDS))

#: A null pointer kernel argument (8 zero bytes): a store field that is absent.
_NULL = np.uint64(0)

#: Compiled modules, by (kernel folder, device id); the symmetry table, by device id.
_module_cache: dict[tuple[str, int], Any] = {}
_table_cache: dict[int, Any] = {}


# --- CuPy, the module, launches (cupy_backend's helpers) -------------------------------------


def _cupy():
    return _import_cupy("fused_cupy", "fused_numpy")


def _kernel(name: str):
    return _compiled_module(_cupy(), MODULE_SOURCE, _module_cache).get_function(name)


def _launch(name: str, n: int, args: tuple) -> None:
    _launch_kernel(_kernel(name), n, args, BLOCK, MAX_BLOCKS)


def _symmetry_table():
    return _device_symmetry_table(_cupy(), _table_cache)


# --- argument plumbing -----------------------------------------------------------------------


def _on_device(x) -> bool:
    """True for a CuPy array, a ``__cuda_array_interface__`` object or a CUDA DLPack producer."""
    if isinstance(x, _cupy().ndarray) or hasattr(x, "__cuda_array_interface__"):
        return True
    return _dlpack_on_gpu(x)


def _as_cupy(x):
    """A CuPy view of a device array (no copy); host arrays are copied to the device."""
    cp = _cupy()
    return x if isinstance(x, cp.ndarray) else _to_cupy(cp, x)


def _device_plan(plan: BatchPlan, fields: tuple[str, ...]) -> dict[str, Any]:
    """The plan fields a kernel reads, as C-contiguous device arrays of the kernel's dtypes.

    Device fields are used as they are (a device-side cast if the dtype differs); host fields
    go to the device together, in one copy of a packed buffer (8-byte aligned slices).
    """
    cp = _cupy()
    out: dict[str, Any] = {}
    host: list[tuple[str, np.ndarray]] = []
    for f in fields:
        x = getattr(plan, f)
        dt = _PLAN_DTYPES[f]
        if _on_device(x):
            a = _as_cupy(x)
            out[f] = cp.ascontiguousarray(a if a.dtype == dt else a.astype(dt))
        else:
            host.append((f, np.ascontiguousarray(np.asarray(x, dtype=dt))))
    if host:
        offsets, size = [], 0
        for _, a in host:
            offsets.append(size)
            size += -(-a.nbytes // 8) * 8
        packed = np.zeros(max(size, 8), dtype=np.uint8)
        for (_, a), off in zip(host, offsets, strict=True):
            packed[off : off + a.nbytes] = a.reshape(-1).view(np.uint8)
        dev = cp.asarray(packed)  # the one host-to-device copy of the plan
        for (f, a), off in zip(host, offsets, strict=True):
            out[f] = dev[off : off + a.nbytes].view(a.dtype).reshape(a.shape)
    return out


def _check_host_plan(plan: BatchPlan, rays: bool) -> None:
    """Range checks that need no device read: only the plan fields that live on the host."""
    sym = plan.symmetry
    if not _on_device(sym):
        sym = np.asarray(sym)
        if sym.size and (sym.min() < 0 or sym.max() >= symmetry.NUM_SYMMETRIES):
            raise ValueError(
                f"BatchPlan.symmetry must be in [0, {symmetry.NUM_SYMMETRIES}); got values "
                f"{sym.min()}..{sym.max()}"
            )
    if rays and not _on_device(plan.keep) and not _on_device(plan.ray_count):
        keep = np.asarray(plan.keep, dtype=np.int64)
        count = np.asarray(plan.ray_count, dtype=np.int64)
        if np.any(count[keep < count] >= 1 << 32):
            raise ValueError("BatchPlan: subsampling needs ray_count < 2**32 per sample")


def _out_array(x, dtype, shape: tuple[int, ...] | None, name: str):
    """A caller's output buffer as a CuPy view; checked, never copied (the kernel writes it)."""
    cp = _cupy()
    if not _on_device(x):
        raise ValueError(f"out[{name!r}] must be a device array (CuPy, torch CUDA); got {type(x)}")
    a = _as_cupy(x)
    if a.dtype != dtype:
        raise ValueError(f"out[{name!r}] must be {np.dtype(dtype)}; got {a.dtype}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"out[{name!r}] must have shape {tuple(shape)}; got {tuple(a.shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"out[{name!r}] must be C-contiguous")
    return a if isinstance(a, cp.ndarray) else cp.asarray(a)


def _store_get(store, key: str):
    if isinstance(store, Mapping):
        return store.get(key)
    return getattr(store, key, None)


def _store_array(x, dtypes: tuple, cols: int | None, name: str):
    """A store array on the device, C-contiguous, of one of ``dtypes`` (no cast: a cast would
    copy the whole store on every batch); (R,) or (R, cols)."""
    cp = _cupy()
    a = _as_cupy(x)
    if a.dtype == np.bool_ and np.dtype(np.uint8) in dtypes:
        a = a.view(cp.uint8)
    if a.dtype not in dtypes:
        want = " or ".join(str(np.dtype(d)) for d in dtypes)
        raise ValueError(f"store[{name!r}] must be {want}; got {a.dtype}")
    ok = a.ndim == 1 if cols is None else (a.ndim == 2 and a.shape[1] == cols)
    if not ok:
        want = "(R,)" if cols is None else f"(R, {cols})"
        raise ValueError(f"store[{name!r}] must have shape {want}; got {tuple(a.shape)}")
    return cp.ascontiguousarray(a)


def _first_len(out, keys: tuple[str, ...]) -> int | None:
    if out is None:
        return None
    for k in keys:
        if k in out and out[k] is not None:
            return int(out[k].shape[0])
    return None


def _check_size(given: int, counts, what: str, reduce=np.sum) -> None:
    """``given`` (from ``out``) against the plan's host-side size; device plans: unchecked."""
    if _on_device(counts):
        return
    counts = np.asarray(counts, dtype=np.int64)
    want = int(reduce(counts)) if counts.size else 0
    ok = given >= want if reduce is np.max else given == want
    if not ok:
        raise ValueError(f"out does not fit the plan: {what} {given}, the plan needs {want}")


# --- the public functions --------------------------------------------------------------------


def select_store_rows(plan: BatchPlan):
    """The store rows of every kept ray of the batch, flat, in output order (on the GPU).

    Args:
        plan: the batch's parameters (ray_start, ray_count, keep, out_start, select_keys).

    Returns:
        ``rows`` (T,) int64 rows of the store, ``owner`` (T,) int64 sample of each output ray,
        ``j`` (T,) int64 position of the ray among its sample's kept rays (new CuPy arrays;
        T = ``plan.num_rays``, read back when the plan is on the device).
    """
    cp = _cupy()
    _check_host_plan(plan, rays=True)
    total = plan.num_rays
    rows, owner, j = (cp.empty(total, cp.int64) for _ in range(3))
    b = plan.batch_size
    if total == 0 or b == 0:
        return rows, owner, j
    p = _device_plan(plan, _SELECT_FIELDS)
    args = (*(p[f] for f in _SELECT_FIELDS), rows, owner, j, np.int32(b), np.int64(total))
    _launch("fused_select_rows", total, args)
    return rows, owner, j


def _rays(store, plan: BatchPlan, p: dict[str, Any], out: dict | None) -> dict[str, Any]:
    cp = _cupy()
    o = _store_array(_store_get(store, "origins"), (np.float32,), 3, "origins")
    d = _store_array(_store_get(store, "directions"), (np.float32,), 3, "directions")
    dist = _store_array(_store_get(store, "distances"), (np.float32,), None, "distances")
    src = {}
    for key, dt in (("hits", np.uint8), ("view_ids", np.int32), ("face_ids", np.int32)):
        x = _store_get(store, key)
        src[key] = None if x is None else _store_array(x, (dt,), None, key)
    total = _first_len(out, RAY_KEYS)
    if total is None:
        total = plan.num_rays
    else:
        _check_size(total, plan.keep, "rays (out's first dimension)")
    result: dict[str, Any] = out if out is not None else {}
    shapes = {"origins": (total, 3), "directions": (total, 3)}
    dtypes = {"origins": cp.float32, "directions": cp.float32, "distances": cp.float32}
    dtypes.update(hits=cp.float32, view_ids=cp.int64, face_ids=cp.int64, ray_to_voxel=cp.int64)
    bufs = {}
    for key in RAY_KEYS:
        if key in src and src[key] is None:
            bufs[key] = None  # not in the store: no output, a null pointer
            continue
        shape = shapes.get(key, (total,))
        if out is not None and out.get(key) is not None:
            bufs[key] = _out_array(out[key], dtypes[key], shape, key)
        else:
            bufs[key] = cp.empty(shape, dtypes[key])
            result[key] = bufs[key]
    b = plan.batch_size
    if total > 0 and b > 0:
        k0, k1 = _seed_key(plan.seed)
        null = _NULL
        args = (
            o,
            d,
            dist,
            null if src["hits"] is None else src["hits"],
            null if src["view_ids"] is None else src["view_ids"],
            null if src["face_ids"] is None else src["face_ids"],
            *(p[f] for f in _SELECT_FIELDS),
            _symmetry_table(),
            *(p[f] for f in _RAY_FIELDS[len(_SELECT_FIELDS) :]),
            k0,
            k1,
            *(null if bufs[k] is None else bufs[k] for k in RAY_KEYS),
            np.int32(b),
            np.int64(total),
        )
        _launch("fused_rays", total, args)
    return result


def gather_rays(store, plan: BatchPlan, out: dict | None = None) -> dict[str, Any]:
    """Every kept ray of the batch, gathered from the store and augmented (one kernel).

    Args:
        store: mapping (or object with attributes) of ``origins``/``directions`` (R, 3)
            float32, ``distances`` (R,) float32, ``hits`` (R,) uint8 (or bool),
            ``view_ids``/``face_ids`` (R,) int32; ``hits``/``view_ids``/``face_ids`` may be
            absent (their outputs are then left out).
        plan: the batch's parameters.
        out: preallocated device outputs to fill (any of the keys below; missing ones are
            allocated and added to it), or None for new CuPy arrays. T is taken from ``out``
            when it holds any key, else from ``plan.num_rays``.

    Returns:
        ``out`` (or a new dict) with ``origins``/``directions`` (T, 3) float32,
        ``distances``/``hits`` (T,) float32, ``view_ids``/``face_ids``/``ray_to_voxel`` (T,)
        int64.
    """
    _check_host_plan(plan, rays=True)
    return _rays(store, plan, _device_plan(plan, _RAY_FIELDS), out)


def _grids(grids, plan: BatchPlan, p: dict[str, Any], out):
    cp = _cupy()
    b = plan.batch_size
    if out is None:
        side = plan.grid_side
        out = cp.empty((b, 1, side, side, side), cp.float32)
        buf = out
    else:
        buf = _out_array(out, cp.float32, None, "voxels")
        shape = tuple(buf.shape)
        side = shape[-1] if len(shape) in (4, 5) else -1
        ok = len(shape) in (4, 5) and shape[0] == b and shape[-3:] == (side,) * 3
        if not ok or (len(shape) == 5 and shape[1] != 1):
            raise ValueError(
                f"grid out must have shape (B, 1, S, S, S) or (B, S, S, S) with B = {b}; got "
                f"{shape}"
            )
        _check_size(side, plan.side, "side S", np.max)
    if b == 0 or side == 0:
        return out
    g = _store_array(grids, (np.uint8,), None, "grids")
    k0, k1 = _seed_key(plan.seed)
    args = (
        g,
        p["grid_start"],
        p["side"],
        _symmetry_table(),
        *(p[f] for f in _GRID_FIELDS[2:]),
        k0,
        k1,
        buf,
        np.int32(b),
        np.int64(side),
    )
    _launch("fused_grids", b * side**3, args)
    return out


def gather_grids(grids, plan: BatchPlan, out=None):
    """The batch's grids with each sample's symmetry and occupancy jitter (one kernel).

    Args:
        grids: (G,) uint8 flat grid store (sample b: ``side[b]**3`` bytes from
            ``grid_start[b]``, C order (z, y, x)).
        plan: the batch's parameters (grid_start, side <= S, symmetry, jitter_threshold, ...).
        out: a preallocated (B, 1, S, S, S) (or (B, S, S, S)) float32 device array, or None
            for a new (B, 1, S, S, S) one with S = ``plan.grid_side``. Every voxel is written
            (the padding with 0), so ``out`` needs no clearing.

    Returns:
        ``out`` (or the new array): sample b in ``[b, 0, :side, :side, :side]``, 0 elsewhere.
    """
    _check_host_plan(plan, rays=False)
    return _grids(grids, plan, _device_plan(plan, _GRID_FIELDS), out)


def _views(view_positions, plan: BatchPlan, p: dict[str, Any], out):
    cp = _cupy()
    total = None if out is None else int(out.shape[0])
    if total is None:
        total = plan.num_views
        out = cp.empty((total, 3), cp.float32)
        buf = out
    else:
        buf = _out_array(out, cp.float32, (total, 3), "view_positions")
        _check_size(total, plan.view_count, "views (out's first dimension)")
    b = plan.batch_size
    if total == 0 or b == 0:
        return out
    v = _store_array(view_positions, (np.float32,), 3, "view_positions")
    args = (
        v,
        p["view_start"],
        p["view_out_start"],
        _symmetry_table(),
        p["symmetry"],
        p["origin_scale"],
        buf,
        np.int32(b),
        np.int64(total),
    )
    _launch("fused_views", total, args)
    return out


def gather_views(view_positions, plan: BatchPlan, out=None):
    """View positions of the batch, ``P_b p * origin_scale[b]`` (one kernel).

    Args:
        view_positions: (V_store, 3) float32 every view of the store.
        plan: the batch's parameters (view_start, view_out_start, symmetry, origin_scale).
        out: a preallocated (V, 3) float32 device array (V = sum of view_count), or None for
            a new one (V = ``plan.num_views``).

    Returns:
        ``out`` (or the new array), (V, 3) float32.
    """
    _check_host_plan(plan, rays=False)
    return _views(view_positions, plan, _device_plan(plan, _VIEW_FIELDS), out)


def fused_batch(store, plan: BatchPlan, out: dict | None = None) -> dict[str, Any]:
    """The whole batch: :func:`gather_rays`, :func:`gather_grids` and :func:`gather_views`
    launched back to back on the current stream, the plan converted (at most uploaded) once.

    Args:
        store: the ray arrays of :func:`gather_rays`, ``view_positions`` (V_store, 3) float32
            and ``grids`` (G,) uint8 (mapping or attributes).
        plan: the batch's parameters.
        out: preallocated device outputs: the ray keys, ``voxels`` (B, 1, S, S, S) float32 and
            ``view_positions`` (V, 3) float32 (missing ones are allocated and added), or None.

    Returns:
        ``out`` (or a new dict) with the ray keys of :func:`gather_rays`, ``voxels`` and
        ``view_positions``.
    """
    _check_host_plan(plan, rays=True)
    p = _device_plan(plan, _ALL_FIELDS)
    result = _rays(store, plan, p, out)
    given = {} if out is None else out
    result["voxels"] = _grids(_store_get(store, "grids"), plan, p, given.get("voxels"))
    result["view_positions"] = _views(
        _store_get(store, "view_positions"), plan, p, given.get("view_positions")
    )
    return result


# --- a CUDA graph per output slot --------------------------------------------------------------


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
            :func:`gather_rays` (``hits``/``view_ids``/``face_ids`` optional),
            ``view_positions`` (V_store, 3) float32 and ``grids`` (G,) uint8.
        outputs: R >= 1 dicts, one per slot, of C-contiguous device arrays: the
            :data:`RAY_KEYS` with T_max rows (``origins``/``directions`` (T_max, 3) float32,
            ``distances``/``hits`` (T_max,) float32, ``view_ids``/``face_ids``/``ray_to_voxel``
            (T_max,) int64; ``hits``/``view_ids``/``face_ids``/``ray_to_voxel`` may be absent,
            and are not written when the store lacks the field), ``voxels`` float32 of any
            shape with N_max elements (batch i: its first B * S**3, as (B, 1, S, S, S)) and
            ``view_positions`` (V_max, 3) float32. Kept by reference: the graphs write them.
    """

    def __init__(self, store: Any, outputs: Sequence[Mapping[str, Any]]) -> None:
        if not outputs:
            raise ValueError("EpochGraphs needs at least one output slot")
        cp = _cupy()
        self._store = {
            "origins": _store_array(_store_get(store, "origins"), (np.float32,), 3, "origins"),
            "directions": _store_array(
                _store_get(store, "directions"), (np.float32,), 3, "directions"
            ),
            "distances": _store_array(
                _store_get(store, "distances"), (np.float32,), None, "distances"
            ),
            "grids": _store_array(_store_get(store, "grids"), (np.uint8,), None, "grids"),
            "view_positions": _store_array(
                _store_get(store, "view_positions"), (np.float32,), 3, "view_positions"
            ),
        }
        for key, dt in (("hits", np.uint8), ("view_ids", np.int32), ("face_ids", np.int32)):
            x = _store_get(store, key)
            self._store[key] = None if x is None else _store_array(x, (dt,), None, key)
        dtypes = {"origins": cp.float32, "directions": cp.float32, "distances": cp.float32}
        dtypes.update(hits=cp.float32, view_ids=cp.int64, face_ids=cp.int64)
        dtypes.update(ray_to_voxel=cp.int64)
        self._outputs: list[dict[str, Any]] = []
        caps = None
        for s, out in enumerate(outputs):
            bufs: dict[str, Any] = {}
            rays = None
            for key in RAY_KEYS:
                x = out.get(key)
                if x is None or (key in self._store and self._store[key] is None):
                    if key in ("origins", "directions", "distances"):
                        raise ValueError(f"outputs[{s}] needs {key!r}")
                    bufs[key] = None
                    continue
                bufs[key] = _out_array(x, dtypes[key], None, key)
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
                bufs[key] = _out_array(out[key], cp.float32, None, key)
            vp = bufs["view_positions"]
            if vp.ndim != 2 or vp.shape[1] != 3:
                raise ValueError(f"outputs[{s}]['view_positions'] must be (V_max, 3)")
            c = (int(rays), int(bufs["voxels"].size), int(vp.shape[0]))
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
        for f in _ALL_FIELDS:
            shape = (slots, 4) if f == "select_keys" else (slots,)
            add(f, _PLAN_DTYPES[f], shape)
        add("batch_starts", np.dtype(np.int64), (batches + 1,))
        for name in _BATCH_TOTALS:
            add(name, np.dtype(np.int64), (batches,))
        return entries, max(size, 8)

    def _grow(self, slots: int, batches: int, stream) -> None:
        """A larger arena (graphs captured again): the old one is freed after ``stream``'s
        queued work (the graphs that read it)."""
        cp = _cupy()
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
        key = _seed_key(plan.seed)
        if self._graphs is None or self._key != key:
            self._key = key
            self._capture()
        self._next, self._end = int(start), nb
        return totals

    # -- the graphs ---------------------------------------------------------------------------

    def _capture(self) -> None:
        """One graph per slot, captured on a stream of its own (nothing runs)."""
        cp = _cupy()
        names = EPOCH_KERNEL_NAMES
        for name in names:
            _kernel(name)  # compiled and loaded before the capture
        table = _symmetry_table()
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
        """The four kernels of one slot's graph (captured by :meth:`_capture`)."""
        st, f, null = self._store, self._fields, _NULL
        k0, k1 = self._key
        t_max, n_max, v_max = self.capacity
        rays = (
            st["origins"],
            st["directions"],
            st["distances"],
            *(null if st[k] is None else st[k] for k in ("hits", "view_ids", "face_ids")),
            *(f[k] for k in _SELECT_FIELDS),
            table,
            *(f[k] for k in _RAY_FIELDS[len(_SELECT_FIELDS) :]),
            k0,
            k1,
            *(null if bufs[k] is None else bufs[k] for k in RAY_KEYS),
            f["batch_starts"],
            f["batch_rays"],
            f["cursor"],
        )
        _launch("fused_rays_epoch", t_max, rays)
        grids = (
            st["grids"],
            f["grid_start"],
            f["side"],
            table,
            *(f[k] for k in _GRID_FIELDS[2:]),
            k0,
            k1,
            bufs["voxels"],
            f["batch_starts"],
            f["batch_side"],
            f["cursor"],
        )
        _launch("fused_grids_epoch", n_max, grids)
        views = (
            st["view_positions"],
            f["view_start"],
            f["view_out_start"],
            table,
            f["symmetry"],
            f["origin_scale"],
            bufs["view_positions"],
            f["batch_starts"],
            f["batch_views"],
            f["cursor"],
        )
        _launch("fused_views_epoch", v_max, views)
        _launch("fused_next_batch", 1, (f["cursor"],))

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
