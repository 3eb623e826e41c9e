"""The CuPy augmentation back end: ``augment.numpy_backend`` on the GPU, one kernel per field.

The functions here have the signatures and semantics of their numpy twins
(:mod:`gpuloader.augment.numpy_backend`; read its docstrings) and give the same results for the same
:class:`~gpuloader.augment.numpy_backend.BatchParams`: integers bit for bit, floats to rounding (the
kernels round every float32 product and sum on their own, like numpy; only the float64
``log``/``cos``/``sin`` of the Gaussian draws may differ by an ulp before their rounding to
float32). Array arguments are CuPy arrays or anything :func:`cupy.asarray` takes without a
copy to the host: objects with ``__cuda_array_interface__`` such as torch CUDA tensors.
Results are new CuPy arrays (hand them to torch with ``torch.from_dlpack``). Work runs on
CuPy's current device and stream.

Kernels (``kernels/augment.cu`` with the headers ``transform.cuh`` and ``philox.cuh``) are
compiled once per process and device with NVRTC through :class:`cupy.RawModule` with
:data:`NVRTC_OPTIONS` and ``-I<kernels>`` (CuPy also caches the binary on disk; the source it
gets carries a digest of every file in ``kernels/``, so an edited header is recompiled).
:mod:`gpuloader.fused.cuda` compiles, caches and launches ``kernels/fused.cu`` with
this module's helpers too. CuPy appends ``-ftz=true`` to every
compile; the kernels write their float32 operations in PTX so that it changes nothing.
The kernel folder is, in order: ``$GPULOADER_KERNELS``; ``kernels/`` beside the package
(a source checkout); ``gpuloader/kernels/`` (an installed wheel).

Launch configuration: 1-D grids of :data:`BLOCK` = 256 threads, ``ceil(n / 256)`` blocks capped
at :data:`MAX_BLOCKS`; every kernel is a grid-stride loop, so the cap only changes how many
items each thread does, never a result.

Per-sample parameters travel host -> device in one copy per call (a packed (fields, B) array
whose rows the kernels see as separate pointers). Importing this module needs neither CuPy
nor a GPU: CuPy is imported on first use.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import threading
from pathlib import Path

import numpy as np

from gpuloader.augment import rng, symmetry
from gpuloader.augment.numpy_backend import SYMMETRY_TABLE, BatchParams

__all__ = [
    "BLOCK",
    "MAX_BLOCKS",
    "NVRTC_OPTIONS",
    "kernels_dir",
    "ensure_nvrtc",
    "compile_kernels_nvrtc",
    "batch_feistel_keys",
    "transform_rays",
    "transform_points",
    "transform_voxels",
    "select_rows_batch",
]

#: Threads per block of every launch.
BLOCK = 256
#: Most blocks of one launch (grid-stride loops cover the rest).
MAX_BLOCKS = 65536
#: NVRTC options besides the include path: no fused multiply-add anywhere (decision 3).
NVRTC_OPTIONS = ("--std=c++14", "-fmad=false")
#: The kernel source CuPy compiles; the ``extern "C"`` kernels it holds.
MODULE_SOURCE = "augment.cu"
KERNEL_NAMES = ("transform_rays", "transform_points", "transform_voxels", "select_rows")

_lock = threading.Lock()
#: Compiled modules, by (kernel folder, device id); the symmetry table, by device id.
_module_cache: dict[tuple[str, int], object] = {}
_table_cache: dict[int, object] = {}


# --- finding things ------------------------------------------------------------------------


def kernels_dir() -> Path:
    """The folder that holds the ``.cu``/``.cuh`` sources.

    ``$GPULOADER_KERNELS`` if set, else ``<repo>/kernels`` (next to the package in a source
    checkout), else ``gpuloader/kernels`` (inside an installed wheel).

    Raises:
        FileNotFoundError: naming the places looked at, when none holds ``augment.cu``.
    """
    env = os.environ.get("GPULOADER_KERNELS")
    pkg = Path(__file__).resolve().parents[1]  # the gpuloader package
    candidates = [Path(env)] if env else [pkg.parent / "kernels", pkg / "kernels"]
    for d in candidates:
        if (d / MODULE_SOURCE).is_file():
            return d
    where = ", ".join(str(d) for d in candidates)
    raise FileNotFoundError(
        f"gpuloader CUDA kernels not found: no {MODULE_SOURCE} in {where}. Reinstall gpuloader "
        "(the wheel ships gpuloader/kernels/) or set GPULOADER_KERNELS to the kernels folder."
    )


def _nvrtc_lib_dirs() -> list[Path]:
    """Library folders of the pip NVRTC wheels (nvidia-cuda-nvrtc-cu12, nvidia-cuda-nvrtc)."""
    dirs = []
    for pkg, sub in (("nvidia.cuda_nvrtc", "lib"), ("nvidia.cu13", "lib")):
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            continue
        for loc in (spec.submodule_search_locations or []) if spec else []:
            if (Path(loc) / sub).is_dir():
                dirs.append(Path(loc) / sub)
    return dirs


def ensure_nvrtc() -> tuple[int, int]:
    """Make ``cupy.cuda.nvrtc`` usable and return the NVRTC version (major, minor).

    CuPy usually finds the pip-installed ``libnvrtc`` itself. If it does not, the library (and
    its ``libnvrtc-builtins``) is preloaded from the ``nvidia.cuda_nvrtc`` package folder with
    ``RTLD_GLOBAL`` so that CuPy's own ``dlopen`` of the soname succeeds. Needs no GPU.

    Raises:
        ImportError: CuPy is not installed.
        RuntimeError: no loadable NVRTC; the message says what to install.
    """
    from cupy.cuda import nvrtc

    try:
        return tuple(nvrtc.getVersion())
    except Exception as first:  # CuPy raises several kinds here
        tried = []
        for d in _nvrtc_lib_dirs():
            libs = sorted(d.glob("libnvrtc-builtins.so*")) + sorted(d.glob("libnvrtc.so*"))
            for lib in libs:
                if ".alt." in lib.name:
                    continue
                tried.append(str(lib))
                try:
                    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    pass
        try:
            return tuple(nvrtc.getVersion())
        except Exception:
            raise RuntimeError(
                "NVRTC (the CUDA runtime compiler) could not be loaded by CuPy "
                f"({first}); preloaded: {tried or 'nothing found'}. Install it with "
                "`pip install nvidia-cuda-nvrtc-cu12` (CUDA 12) or put libnvrtc on "
                "LD_LIBRARY_PATH."
            ) from first


def _source_digest(kdir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(kdir.glob("*.cu*")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _import_cupy(user: str, cpu_twin: str):
    """The ``cupy`` module; without it an ImportError that names ``gpuloader.augment.<user>``
    and its CPU twin ``gpuloader.augment.<cpu_twin>``."""
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            f"gpuloader.augment.{user} needs CuPy: `pip install cupy-cuda12x` "
            f"(or use gpuloader.augment.{cpu_twin} on the CPU)"
        ) from e
    return cupy


def _cupy():
    return _import_cupy("cupy_backend", "numpy_backend")


# --- compiling -----------------------------------------------------------------------------


def compile_kernels_nvrtc(arch: str = "compute_80") -> dict[str, int]:
    """Compile every ``kernels/*.cu`` to PTX with NVRTC (no GPU needed): a CI check.

    Args:
        arch: virtual architecture for ``-arch``.

    Returns:
        ``{file name: PTX size in bytes}``.

    Raises:
        RuntimeError: a source did not compile; the message holds its path and NVRTC's log.
    """
    ensure_nvrtc()
    from cupy.cuda import nvrtc

    kdir = kernels_dir()
    options = [f"-arch={arch}", *NVRTC_OPTIONS, f"-I{kdir}"]
    sizes = {}
    for path in sorted(kdir.glob("*.cu")):
        prog = nvrtc.createProgram(path.read_text(), path.name, [], [])
        try:
            try:
                nvrtc.compileProgram(prog, options)
            except nvrtc.NVRTCError as e:
                log = nvrtc.getProgramLog(prog)
                raise RuntimeError(
                    f"NVRTC failed to compile {path} ({' '.join(options)}): {e}\n{log}"
                ) from e
            ptx = nvrtc.getPTX(prog)
            sizes[path.name] = len(ptx)
        finally:
            nvrtc.destroyProgram(prog)
    return sizes


def _compiled_module(cp, source: str, cache: dict):
    """The compiled :class:`cupy.RawModule` of ``kernels/<source>`` for the current device.

    Compiled once per (kernel folder, device) and kept in ``cache`` (each kernel module keeps
    its own), with :data:`NVRTC_OPTIONS` and ``-I<kernels>``; the code CuPy gets starts with
    the digest of every file in ``kernels/``, so that CuPy's disk cache sees an edited header.
    """
    kdir = kernels_dir()
    key = (str(kdir), int(cp.cuda.Device().id))
    with _lock:
        mod = cache.get(key)
        if mod is None:
            ensure_nvrtc()
            code = f"// sources digest {_source_digest(kdir)}\n" + (kdir / source).read_text()
            mod = cp.RawModule(code=code, options=(*NVRTC_OPTIONS, f"-I{kdir}"))
            cache[key] = mod
    return mod


def _launch_kernel(kernel, n: int, args: tuple, block: int, max_blocks: int) -> None:
    """1-D launch of ``kernel`` (a grid-stride loop over ``n`` items): ``block`` threads,
    ``ceil(n / block)`` blocks capped at ``max_blocks``."""
    blocks = max(1, min(-(-int(n) // block), max_blocks))
    kernel((blocks,), (block,), args)


def _device_symmetry_table(cp, cache: dict):
    """:data:`numpy_backend.SYMMETRY_TABLE` on the current device, (48, 6) int32, uploaded
    once per device and kept in ``cache``."""
    dev = int(cp.cuda.Device().id)
    with _lock:
        table = cache.get(dev)
        if table is None:
            table = cp.asarray(SYMMETRY_TABLE, dtype=cp.int32)
            cache[dev] = table
    return table


def _kernel(name: str):
    return _compiled_module(_cupy(), MODULE_SOURCE, _module_cache).get_function(name)


def _launch(name: str, n: int, args: tuple) -> None:
    _launch_kernel(_kernel(name), n, args, BLOCK, MAX_BLOCKS)


def _symmetry_table():
    return _device_symmetry_table(_cupy(), _table_cache)


# --- argument plumbing ---------------------------------------------------------------------


def _seed_key(seed: int) -> tuple[np.uint32, np.uint32]:
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)


_DLPACK_CUDA_DEVICES = (2, 13)  # kDLCUDA, kDLCUDAManaged


def _dlpack_on_gpu(x) -> bool:
    """True for a DLPack producer (without ``__cuda_array_interface__``) on a CUDA device."""
    if isinstance(x, np.ndarray) or not hasattr(x, "__dlpack_device__"):
        return False
    try:
        return int(x.__dlpack_device__()[0]) in _DLPACK_CUDA_DEVICES
    except Exception:
        return False


def _to_cupy(cp, x):
    """A CuPy view of ``x`` when it lives on the GPU (``__cuda_array_interface__`` or a CUDA
    DLPack producer), else a host-to-device copy of it."""
    if not hasattr(x, "__cuda_array_interface__") and _dlpack_on_gpu(x):
        return cp.from_dlpack(x)
    return cp.asarray(x)


def _as_cupy(x):
    return _to_cupy(_cupy(), x)


def _device(x, dtype, shape: tuple | None = None, name: str = "array"):
    """``x`` as a C-contiguous CuPy array of ``dtype`` (no copy when it already is one)."""
    cp = _cupy()
    a = _as_cupy(x)
    if a.dtype != dtype:
        a = a.astype(dtype)
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(a.shape)}")
    return cp.ascontiguousarray(a)


def _upload_rows(columns: list[tuple[np.ndarray, np.dtype]]) -> list:
    """Several (B,) 4-byte host arrays -> device views, in one host-to-device copy."""
    cp = _cupy()
    b = columns[0][0].shape[0]
    packed = np.empty((len(columns), b), dtype=np.uint32)
    for i, (a, dt) in enumerate(columns):
        packed[i] = np.ascontiguousarray(np.asarray(a, dtype=dt)).view(np.uint32)
    dev = cp.asarray(packed)
    return [dev[i].view(dt) for i, (_, dt) in enumerate(columns)]


def _host(a) -> np.ndarray:
    """A (small) per-sample array on the host; device arrays are copied back (a sync)."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "__cuda_array_interface__") or _dlpack_on_gpu(a):
        return np.asarray(_as_cupy(a).get())
    return np.asarray(a)


def _check_symmetry(params: BatchParams) -> np.ndarray:
    sym = _host(params.symmetry).astype(np.int64)
    if sym.size and (sym.min() < 0 or sym.max() >= symmetry.NUM_SYMMETRIES):
        raise ValueError(
            f"BatchParams.symmetry must be in [0, {symmetry.NUM_SYMMETRIES}); got values "
            f"{sym.min()}..{sym.max()}"
        )
    return sym


def batch_feistel_keys(params: BatchParams) -> np.ndarray:
    """Every sample's ray-selection round keys: (B, 4) uint32, row b equal to
    ``rng.feistel_keys(seed, epoch[b], index[b], Purpose.SUBSAMPLE + purpose_offset[b])``
    (one vectorised Philox call on the host)."""
    b = params.batch_size
    counter = np.empty((b, rng.FEISTEL_ROUNDS, 4), dtype=np.uint32)
    counter[..., 0] = np.arange(rng.FEISTEL_ROUNDS, dtype=np.uint32)[None, :]
    counter[..., 1] = _host(params.index).astype(np.uint32)[:, None]
    counter[..., 2] = _host(params.epoch).astype(np.uint32)[:, None]
    purpose = (
        _host(params.purpose_offset).astype(np.uint64) + np.uint64(rng.Purpose.SUBSAMPLE)
    ) & np.uint64(0xFFFFFFFF)
    counter[..., 3] = purpose.astype(np.uint32)[:, None]
    return np.ascontiguousarray(rng.philox4x32(counter, _seed_key(params.seed))[..., 0])


# --- the public functions ------------------------------------------------------------------


def transform_rays(origins, directions, distances, ray_sample, ray_row, params: BatchParams):
    """Apply each ray's sample parameters on the GPU (see ``augment_numpy.transform_rays``).

    Args:
        origins, directions: (N, 3) float32 device arrays.
        distances: (N,) float32.
        ray_sample: (N,) int32 sample of each ray, in [0, B).
        ray_row: (N,) int32 position of the ray among its sample's kept rays.
        params: per-sample parameters (host arrays, (B,)).

    Returns:
        New CuPy arrays ``origins`` (N, 3), ``directions`` (N, 3), ``distances`` (N,) float32.
    """
    cp = _cupy()
    o = _device(origins, cp.float32, name="origins")
    n = int(o.shape[0]) if o.ndim else 0
    o = _device(o, cp.float32, (n, 3), "origins")
    d = _device(directions, cp.float32, (n, 3), "directions")
    dist = _device(distances, cp.float32, (n,), "distances")
    s = _device(ray_sample, cp.int32, (n,), "ray_sample")
    row = _device(ray_row, cp.int32, (n,), "ray_row")
    out_o = cp.empty((n, 3), cp.float32)
    out_d = cp.empty((n, 3), cp.float32)
    out_dist = cp.empty((n,), cp.float32)
    if n == 0:
        return out_o, out_d, out_dist
    sym = _check_symmetry(params)
    f32, u32 = np.dtype(np.float32), np.dtype(np.uint32)
    dev = _upload_rows(
        [
            (sym, np.dtype(np.int32)),
            (_host(params.origin_scale), f32),
            (_host(params.distance_scale), f32),
            (_host(params.origin_std), f32),
            (_host(params.direction_std), f32),
            (_host(params.epoch), u32),
            (_host(params.index), u32),
            (_host(params.purpose_offset), u32),
        ]
    )
    k0, k1 = _seed_key(params.seed)
    args = (o, d, dist, s, row, _symmetry_table(), *dev, k0, k1, out_o, out_d, out_dist)
    _launch("transform_rays", n, (*args, np.int64(n)))
    return out_o, out_d, out_dist


def transform_points(points, point_sample, params: BatchParams):
    """View positions ``p' = P p * origin_scale`` on the GPU.

    Args:
        points: (V, 3) float32 device array.
        point_sample: (V,) int32 sample of each point, in [0, B).
        params: per-sample parameters.

    Returns:
        (V, 3) float32 CuPy array.
    """
    cp = _cupy()
    p = _device(points, cp.float32, name="points")
    n = int(p.shape[0]) if p.ndim else 0
    p = _device(p, cp.float32, (n, 3), "points")
    s = _device(point_sample, cp.int32, (n,), "point_sample")
    out = cp.empty((n, 3), cp.float32)
    if n == 0:
        return out
    sym = _check_symmetry(params)
    dev = _upload_rows([(sym, np.dtype(np.int32)), (_host(params.origin_scale), np.float32)])
    _launch("transform_points", n, (p, s, _symmetry_table(), *dev, out, np.int64(n)))
    return out


def transform_voxels(voxels, sides, params: BatchParams):
    """Each sample's symmetry and occupancy jitter on its grid, on the GPU.

    Args:
        voxels: (B, S, S, S) uint8 device array, sample b in ``[0, sides[b])^3``, 0 elsewhere.
        sides: (B,) int side of each sample's cube (host array; checked to lie in [0, S]).
        params: per-sample parameters.

    Returns:
        (B, S, S, S) uint8 CuPy array (see ``augment_numpy.transform_voxels``).
    """
    cp = _cupy()
    vox = _as_cupy(voxels)
    if vox.ndim != 4 or not (vox.shape[1] == vox.shape[2] == vox.shape[3]):
        raise ValueError(f"voxels must have shape (B, S, S, S); got {tuple(vox.shape)}")
    b, side = int(vox.shape[0]), int(vox.shape[1])
    vox = _device(vox, cp.uint8)
    sides_h = _host(sides).astype(np.int64).reshape(-1)
    if sides_h.shape != (b,):
        raise ValueError(f"sides must have shape ({b},); got {sides_h.shape}")
    if b and (sides_h.min() < 0 or sides_h.max() > side):
        raise ValueError(f"sides must lie in [0, {side}] (the batch's S); got {sides_h}")
    out = cp.empty_like(vox)
    if out.size == 0:
        return out
    sym = _check_symmetry(params)[:b]
    u32 = np.dtype(np.uint32)
    dev = _upload_rows(
        [
            (sides_h, np.dtype(np.int32)),
            (sym, np.dtype(np.int32)),
            (_host(params.jitter_threshold)[:b], u32),
            (_host(params.epoch)[:b], u32),
            (_host(params.index)[:b], u32),
            (_host(params.purpose_offset)[:b], u32),
        ]
    )
    sides_d, sym_d, *rest = dev
    k0, k1 = _seed_key(params.seed)
    args = (vox, sides_d, _symmetry_table(), sym_d, *rest, k0, k1, out, np.int32(b))
    _launch("transform_voxels", out.size, (*args, np.int32(side)))
    return out


def select_rows_batch(n, k, params: BatchParams):
    """The kept rows of every sample, flat, on the GPU (see ``augment_numpy.select_rows_batch``).

    Args:
        n: (B,) rays available per sample (host; device arrays are copied back: the output
            size must be known on the host).
        k: (B,) rays wanted per sample (k >= n keeps all, in file order).
        params: gives each sample's stream; purpose SUBSAMPLE + offset.

    Returns:
        ``rows`` (sum(max(0, min(k, n))),) int64 CuPy array, ``ray_sample`` (same,) int32.
    """
    cp = _cupy()
    n_h = _host(n).astype(np.int64).reshape(-1)
    k_h = _host(k).astype(np.int64).reshape(-1)
    b = n_h.shape[0]
    if k_h.shape != (b,):
        raise ValueError(f"n and k must both have shape (B,); got {n_h.shape} and {k_h.shape}")
    counts = np.maximum(0, np.minimum(k_h, n_h))
    permuted = k_h < n_h
    if np.any(n_h[permuted] >= 1 << 32):
        raise ValueError("select_rows_batch: subsampling needs n < 2**32 rays per sample")
    offsets = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    total = int(offsets[-1])
    if total == 0:
        return cp.zeros(0, cp.int64), cp.zeros(0, cp.int32)
    keys = batch_feistel_keys(params)[:b]
    packed = np.concatenate([n_h, k_h, offsets, keys.view(np.int64).reshape(-1)])
    dev = cp.asarray(packed)
    n_d, k_d, off_d = dev[:b], dev[b : 2 * b], dev[2 * b : 3 * b + 1]
    keys_d = dev[3 * b + 1 :].view(cp.uint32)
    rows = cp.empty(total, cp.int64)
    owner = cp.empty(total, cp.int32)
    args = (n_d, k_d, off_d, keys_d, rows, owner, np.int32(b), np.int64(total))
    _launch("select_rows", total, args)
    return rows, owner
