"""The fused per-batch pass on the GPU: :mod:`gpuloader.augment.fused_numpy` in CUDA.

One kernel for every ray of a batch (row selection, gather, symmetry, scale, noise,
renormalization, hits/ids conversion, ``ray_to_voxel``), one for the grids and one for the
view positions (``kernels/fused.cu``), reading straight from a resident store (every sample of
a split concatenated in device memory) with a :class:`~gpuloader.augment.fused_numpy.BatchPlan`.
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
:data:`gpuloader.augment.cupy_backend.NVRTC_OPTIONS` (``--std=c++14 -fmad=false``) and
``-I<kernels>``; the symmetry table is uploaded once per device. Compiling, caching and
launching are :mod:`gpuloader.augment.cupy_backend`'s (one place for both kernel modules);
this module keeps its own caches. Importing this module needs neither CuPy nor a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gpuloader.augment import symmetry
from gpuloader.augment.cupy_backend import (
    _compiled_module,
    _device_symmetry_table,
    _dlpack_on_gpu,
    _import_cupy,
    _launch_kernel,
    _seed_key,
    _to_cupy,
)
from gpuloader.augment.fused_numpy import BatchPlan

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
]

#: Threads per block of every launch.
BLOCK = 256
#: Most blocks of one launch (grid-stride loops cover the rest).
MAX_BLOCKS = 65536
#: The kernel source and its ``extern "C"`` kernels.
MODULE_SOURCE = "fused.cu"
KERNEL_NAMES = ("fused_rays", "fused_grids", "fused_views", "fused_select_rows")
#: Output keys of :func:`gather_rays`, in the kernel's argument order.
RAY_KEYS = ("origins", "directions", "distances", "hits", "view_ids", "face_ids", "ray_to_voxel")

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
