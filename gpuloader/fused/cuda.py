"""The fused per-batch pass on the GPU: :mod:`gpuloader.fused.cpu` in CUDA.

One kernel for every ray of a batch (row selection, gather, symmetry, scale, noise,
renormalization, hits/ids conversion, ``ray_to_voxel``), one for the grids and one for the
view positions (``kernels/fused.cu``), reading straight from a resident store (every sample of
a split concatenated in device memory) with a :class:`~gpuloader.plan.batch.BatchPlan`.
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

Kernel arguments: every kernel of ``fused.cu`` takes one ``gpl_fused_args`` struct by value
(``kernels/fused_args.cuh``). Its host twin is :data:`FUSED_ARGS_DTYPE`, a numpy structured
dtype with ``align=True`` (pointers as uint64 device addresses, 0 for null), and
:func:`fused_args` fills a size-one array of it: CuPy's ``RawKernel`` passes a numpy array of
size one by value (the driver copies ``sizeof(gpl_fused_args)`` bytes from its data; CuPy
>= 13.6; a ``numpy.void`` scalar is not accepted by 13.x). Kernels are compiled once per device
(:mod:`gpuloader.fused.cuda_build`: NVRTC, ``--std=c++14 -fmad=false``); the symmetry table is
uploaded once per device. :mod:`gpuloader.fused.graphs` replays whole epochs as CUDA graphs
with the same kernels' epoch-indexed twins. Importing this module needs neither CuPy nor a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gpuloader import schema
from gpuloader.augment import symmetry
from gpuloader.fused.cuda_args import (
    FUSED_ARGS_DTYPE,
    OUT_DTYPES,
    PLAN_DTYPES,
    RAY_KEYS,
    fused_args,
)
from gpuloader.fused.cuda_build import (
    BLOCK,
    MAX_BLOCKS,
    MODULE_SOURCE,
    compiled_module,
    device_symmetry_table,
    dlpack_on_gpu,
    import_cupy,
    launch_kernel,
    seed_key,
    to_cupy,
)
from gpuloader.plan.batch import BatchPlan

__all__ = [
    "BLOCK",
    "MAX_BLOCKS",
    "MODULE_SOURCE",
    "KERNEL_NAMES",
    "EPOCH_KERNEL_NAMES",
    "RAY_KEYS",
    "OUT_DTYPES",
    "PLAN_DTYPES",
    "FUSED_ARGS_DTYPE",
    "fused_args",
    "cupy_module",
    "kernel",
    "launch",
    "symmetry_table",
    "on_device",
    "store_get",
    "store_array",
    "out_array",
    "select_store_rows",
    "gather_rays",
    "gather_grids",
    "gather_views",
    "fused_batch",
]

#: The epoch-indexed kernels of :class:`gpuloader.fused.graphs.EpochGraphs` (the last one
#: advances the cursor).
EPOCH_KERNEL_NAMES = (
    "fused_rays_epoch",
    "fused_grids_epoch",
    "fused_views_epoch",
    "fused_next_batch",
)
#: Every ``extern "C"`` kernel of :data:`MODULE_SOURCE`.
KERNEL_NAMES = (
    "fused_rays",
    "fused_grids",
    "fused_views",
    "fused_select_rows",
    *EPOCH_KERNEL_NAMES,
)
_SELECT_FIELDS = ("ray_start", "ray_count", "keep", "out_start", "select_keys")
_STREAM_FIELDS = ("epoch", "index", "purpose_offset")
_RAY_FIELDS = (
    *_SELECT_FIELDS,
    "symmetry",
    *("origin_scale", "distance_scale", "origin_std", "direction_std"),
    *_STREAM_FIELDS,
)
_GRID_FIELDS = ("grid_start", "side", "symmetry", "jitter_threshold", *_STREAM_FIELDS)
_VIEW_FIELDS = ("view_start", "view_out_start", "symmetry", "origin_scale")
#: Compiled modules, by (kernel folder, device id); the symmetry table, by device id.
_module_cache: dict[tuple[str, int], Any] = {}
_table_cache: dict[int, Any] = {}


# --- CuPy, the module, launches --------------------------------------------------------------


def cupy_module():
    """The ``cupy`` module (ImportError naming this module and its CPU twin without it)."""
    return import_cupy("gpuloader.fused.cuda", "gpuloader.fused.cpu")


def kernel(name: str):
    """Kernel ``name`` of :data:`MODULE_SOURCE`, compiled for the current device."""
    return compiled_module(cupy_module(), MODULE_SOURCE, _module_cache).get_function(name)


def launch(name: str, n: int, args: np.ndarray) -> None:
    """Launch kernel ``name`` over ``n`` items (:data:`BLOCK` threads a block, at most
    :data:`MAX_BLOCKS` blocks) with ``args``, a :func:`fused_args` struct."""
    launch_kernel(kernel(name), n, (args,), BLOCK, MAX_BLOCKS)


def symmetry_table():
    """``SYMMETRY_TABLE`` on the current device, (48, 6) int32 (uploaded once per device)."""
    return device_symmetry_table(cupy_module(), _table_cache)


# --- argument plumbing -----------------------------------------------------------------------


def on_device(x) -> bool:
    """True for a CuPy array, a ``__cuda_array_interface__`` object or a CUDA DLPack producer."""
    if isinstance(x, cupy_module().ndarray) or hasattr(x, "__cuda_array_interface__"):
        return True
    return dlpack_on_gpu(x)


def _as_cupy(x):
    """A CuPy view of a device array (no copy); host arrays are copied to the device."""
    cp = cupy_module()
    return x if isinstance(x, cp.ndarray) else to_cupy(cp, x)


def _device_plan(plan: BatchPlan, fields: tuple[str, ...]) -> dict[str, Any]:
    """The plan fields a kernel reads, as C-contiguous device arrays of the kernel's dtypes.

    Device fields are used as they are (a device-side cast if the dtype differs); host fields
    go to the device together, in one copy of a packed buffer (8-byte aligned slices).
    """
    cp = cupy_module()
    out: dict[str, Any] = {}
    host: list[tuple[str, np.ndarray]] = []
    for f in fields:
        x = getattr(plan, f)
        dt = PLAN_DTYPES[f]
        if on_device(x):
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
    if not on_device(sym):
        sym = np.asarray(sym)
        if sym.size and (sym.min() < 0 or sym.max() >= symmetry.NUM_SYMMETRIES):
            raise ValueError(
                f"BatchPlan.symmetry must be in [0, {symmetry.NUM_SYMMETRIES}); got values "
                f"{sym.min()}..{sym.max()}"
            )
    if rays and not on_device(plan.keep) and not on_device(plan.ray_count):
        keep = np.asarray(plan.keep, dtype=np.int64)
        count = np.asarray(plan.ray_count, dtype=np.int64)
        if np.any(count[keep < count] >= 1 << 32):
            raise ValueError("BatchPlan: subsampling needs ray_count < 2**32 per sample")


def out_array(x, dtype, shape: tuple[int, ...] | None, name: str):
    """A caller's output buffer as a CuPy view; checked, never copied (the kernel writes it)."""
    cp = cupy_module()
    if not on_device(x):
        raise ValueError(f"out[{name!r}] must be a device array (CuPy, torch CUDA); got {type(x)}")
    a = _as_cupy(x)
    if a.dtype != dtype:
        raise ValueError(f"out[{name!r}] must be {np.dtype(dtype)}; got {a.dtype}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"out[{name!r}] must have shape {tuple(shape)}; got {tuple(a.shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"out[{name!r}] must be C-contiguous")
    return a if isinstance(a, cp.ndarray) else cp.asarray(a)


def store_get(store, key: str):
    """``store[key]`` of a mapping, ``store.key`` of an object; None when absent."""
    if isinstance(store, Mapping):
        return store.get(key)
    return getattr(store, key, None)


def store_array(x, key: str):
    """Store array ``key`` on the device, C-contiguous, of its ``schema.STORE_KEYS`` dtype (no
    cast: a cast would copy the whole store on every batch; ``hits`` may be bool) and shape
    (R,) or (R, 3)."""
    cp = cupy_module()
    dtype, trailing = schema.STORE_KEYS[key]
    a = _as_cupy(x)
    if a.dtype == np.bool_ and dtype == np.uint8:
        a = a.view(cp.uint8)
    if a.dtype != dtype:
        raise ValueError(f"store[{key!r}] must be {dtype}; got {a.dtype}")
    if (a.ndim, tuple(a.shape[1:])) != (1 + len(trailing), trailing):
        want = f"(R, {trailing[0]})" if trailing else "(R,)"
        raise ValueError(f"store[{key!r}] must have shape {want}; got {tuple(a.shape)}")
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
    if on_device(counts):
        return
    counts = np.asarray(counts, dtype=np.int64)
    want = int(reduce(counts)) if counts.size else 0
    ok = given >= want if reduce is np.max else given == want
    if not ok:
        raise ValueError(f"out does not fit the plan: {what} {given}, the plan needs {want}")


def _plan_args(plan: BatchPlan, p: dict[str, Any]) -> dict[str, Any]:
    """The struct fields the per-batch kernels share: the plan ``p`` on the device, the
    symmetry table and the key."""
    k0, k1 = seed_key(plan.seed)
    return {**p, "sym_table": symmetry_table(), "key0": k0, "key1": k1}


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
    cp = cupy_module()
    _check_host_plan(plan, rays=True)
    total = plan.num_rays
    rows, owner, j = (cp.empty(total, cp.int64) for _ in range(3))
    b = plan.batch_size
    if total == 0 or b == 0:
        return rows, owner, j
    p = _device_plan(plan, _SELECT_FIELDS)
    args = fused_args(**p, out_rows=rows, out_owner=owner, out_j=j, num_samples=b, num_rays=total)
    launch("fused_select_rows", total, args)
    return rows, owner, j


def _rays(store, plan: BatchPlan, p: dict[str, Any], out: dict | None) -> dict[str, Any]:
    cp = cupy_module()
    src = {}
    for key in schema.RAY_FIELDS:
        x = store_get(store, key)
        optional = key in ("hits", "view_ids", "face_ids")
        src[key] = None if optional and x is None else store_array(x, key)
    total = _first_len(out, RAY_KEYS)
    if total is None:
        total = plan.num_rays
    else:
        _check_size(total, plan.keep, "rays (out's first dimension)")
    result: dict[str, Any] = out if out is not None else {}
    bufs = {}
    for key in RAY_KEYS:
        if key in src and src[key] is None:
            bufs[key] = None  # not in the store: no output, a null pointer
            continue
        shape = (total, 3) if key in ("origins", "directions") else (total,)
        if out is not None and out.get(key) is not None:
            bufs[key] = out_array(out[key], OUT_DTYPES[key], shape, key)
        else:
            bufs[key] = cp.empty(shape, OUT_DTYPES[key])
            result[key] = bufs[key]
    b = plan.batch_size
    if total > 0 and b > 0:
        outs = {f"out_{k}": v for k, v in bufs.items()}
        args = fused_args(**_plan_args(plan, p), **src, **outs, num_samples=b, num_rays=total)
        launch("fused_rays", total, args)
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
    cp = cupy_module()
    b = plan.batch_size
    if out is None:
        side = plan.grid_side
        out = cp.empty((b, 1, side, side, side), cp.float32)
        buf = out
    else:
        buf = out_array(out, cp.float32, None, "voxels")
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
    g = store_array(grids, "grids")
    args = fused_args(**_plan_args(plan, p), grids=g, out_voxels=buf, num_samples=b, grid_side=side)
    launch("fused_grids", b * side**3, args)
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
    cp = cupy_module()
    total = None if out is None else int(out.shape[0])
    if total is None:
        total = plan.num_views
        out = cp.empty((total, 3), cp.float32)
        buf = out
    else:
        buf = out_array(out, cp.float32, (total, 3), "view_positions")
        _check_size(total, plan.view_count, "views (out's first dimension)")
    b = plan.batch_size
    if total == 0 or b == 0:
        return out
    v = store_array(view_positions, "view_positions")
    args = fused_args(
        **_plan_args(plan, p), view_positions=v, out_view_positions=buf, num_samples=b,
        num_views=total,
    )  # fmt: skip
    launch("fused_views", total, args)
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
    p = _device_plan(plan, tuple(PLAN_DTYPES))
    result = _rays(store, plan, p, out)
    given = {} if out is None else out
    result["voxels"] = _grids(store_get(store, "grids"), plan, p, given.get("voxels"))
    result["view_positions"] = _views(
        store_get(store, "view_positions"), plan, p, given.get("view_positions")
    )
    return result
