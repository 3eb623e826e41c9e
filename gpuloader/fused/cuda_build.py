"""Building and launching the CUDA kernels of ``kernels/``: NVRTC, compile, cache, launch.

The kernel sources (``kernels/fused.cu`` with the headers ``fused_args.cuh``,
``transform.cuh`` and ``philox.cuh``) are compiled once per process and device with NVRTC
through :class:`cupy.RawModule` with :data:`NVRTC_OPTIONS` and ``-I<kernels>``
(:func:`compiled_module`; CuPy also caches the binary on disk, and the source it gets carries a
digest of every file in ``kernels/``, so an edited header is recompiled). CuPy appends
``-ftz=true`` to every compile; the kernels write their float32 operations in PTX so that it
changes nothing. The kernel folder is, in order: ``$GPULOADER_KERNELS``; ``kernels/`` beside
the package (a source checkout); ``gpuloader/kernels/`` (an installed wheel).

Launch configuration (:func:`launch_kernel`): 1-D grids of :data:`BLOCK` = 256 threads,
``ceil(n / 256)`` blocks capped at :data:`MAX_BLOCKS`; every kernel is a grid-stride loop, so
the cap only changes how many items each thread does, never a result.

Also here: the symmetry table on the device (:func:`device_symmetry_table`), CuPy's import
(:func:`import_cupy`), device arrays from CUDA DLPack producers (:func:`dlpack_on_gpu`,
:func:`to_cupy`), device addresses (:func:`device_pointer`) and the Philox key of a seed
(:func:`seed_key`). :mod:`gpuloader.fused.cuda` wraps the kernels with these. Importing this
module needs neither CuPy nor a GPU: CuPy is imported on first use.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from gpuloader.augment.numpy_backend import SYMMETRY_TABLE

__all__ = [
    "BLOCK",
    "MAX_BLOCKS",
    "NVRTC_OPTIONS",
    "MODULE_SOURCE",
    "kernels_dir",
    "ensure_nvrtc",
    "compile_kernels_nvrtc",
    "compiled_module",
    "launch_kernel",
    "device_symmetry_table",
    "import_cupy",
    "dlpack_on_gpu",
    "to_cupy",
    "device_pointer",
    "seed_key",
]

#: Threads per block of every launch.
BLOCK = 256
#: Most blocks of one launch (grid-stride loops cover the rest).
MAX_BLOCKS = 65536
#: NVRTC options besides the include path: no fused multiply-add anywhere (decision 3).
NVRTC_OPTIONS = ("--std=c++14", "-fmad=false")
#: The kernel source of the fused pass; :func:`kernels_dir` looks for it.
MODULE_SOURCE = "fused.cu"

_lock = threading.Lock()


# --- finding things ------------------------------------------------------------------------


def kernels_dir() -> Path:
    """The folder that holds the ``.cu``/``.cuh`` sources.

    ``$GPULOADER_KERNELS`` if set, else ``<repo>/kernels`` (next to the package in a source
    checkout), else ``gpuloader/kernels`` (inside an installed wheel).

    Raises:
        FileNotFoundError: naming the places looked at, when none holds ``fused.cu``.
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


def import_cupy(user: str, cpu_twin: str):
    """The ``cupy`` module; without it an ImportError that names the module ``user`` that
    needs it and its CPU twin ``cpu_twin`` (module paths)."""
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            f"{user} needs CuPy: `pip install cupy-cuda12x` (or use {cpu_twin} on the CPU)"
        ) from e
    return cupy


# --- compiling -----------------------------------------------------------------------------


def compile_kernels_nvrtc(arch: str = "compute_80") -> dict[str, int]:
    """Compile every ``kernels/*.cu`` (``fused.cu``) to PTX with NVRTC (no GPU needed): a CI
    check.

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


def compiled_module(cp, source: str, cache: dict) -> Any:
    """The compiled :class:`cupy.RawModule` of ``kernels/<source>`` for the current device.

    Compiled once per (kernel folder, device) and kept in ``cache`` (the caller's), with
    :data:`NVRTC_OPTIONS` and ``-I<kernels>``; the code CuPy gets starts with the digest of
    every file in ``kernels/``, so that CuPy's disk cache sees an edited header.
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


def launch_kernel(kernel, n: int, args: tuple, block: int, max_blocks: int) -> None:
    """1-D launch of ``kernel`` (a grid-stride loop over ``n`` items): ``block`` threads,
    ``ceil(n / block)`` blocks capped at ``max_blocks``."""
    blocks = max(1, min(-(-int(n) // block), max_blocks))
    kernel((blocks,), (block,), args)


def device_symmetry_table(cp, cache: dict) -> Any:
    """:data:`numpy_backend.SYMMETRY_TABLE` on the current device, (48, 6) int32, uploaded
    once per device and kept in ``cache`` (the caller's)."""
    dev = int(cp.cuda.Device().id)
    with _lock:
        table = cache.get(dev)
        if table is None:
            table = cp.asarray(SYMMETRY_TABLE, dtype=cp.int32)
            cache[dev] = table
    return table


# --- argument plumbing ---------------------------------------------------------------------


def seed_key(seed: int) -> tuple[np.uint32, np.uint32]:
    """The Philox key of a dataset seed: (seed & 0xffffffff, seed >> 32) of its low 64 bits."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)


_DLPACK_CUDA_DEVICES = (2, 13)  # kDLCUDA, kDLCUDAManaged


def dlpack_on_gpu(x) -> bool:
    """True for a DLPack producer (without ``__cuda_array_interface__``) on a CUDA device."""
    if isinstance(x, np.ndarray) or not hasattr(x, "__dlpack_device__"):
        return False
    try:
        return int(x.__dlpack_device__()[0]) in _DLPACK_CUDA_DEVICES
    except Exception:
        return False


def to_cupy(cp, x) -> Any:
    """A CuPy view of ``x`` when it lives on the GPU (``__cuda_array_interface__`` or a CUDA
    DLPack producer), else a host-to-device copy of it."""
    if not hasattr(x, "__cuda_array_interface__") and dlpack_on_gpu(x):
        return cp.from_dlpack(x)
    return cp.asarray(x)


def device_pointer(a) -> int:
    """The device address of a CuPy array's first element (``a.data.ptr``); 0 for None."""
    return 0 if a is None else int(a.data.ptr)
