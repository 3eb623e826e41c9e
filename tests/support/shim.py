"""The CUDA kernels on the CPU for tests (design decision 8): the g++ build, the argument
struct as the header declares it, checked shim kernels and a numpy stand-in for CuPy.

* :func:`fused_library`: ``tests/support/cuda_shim/fused_launcher.cpp`` (which includes
  ``kernels/fused.cu``) compiled by g++ with ``tests/support/cuda_shim/shim.h`` forced in, the
  flags that keep float results rounded like the GPU's (``-ffp-contract=off``), and every
  warning a failure; one library per session. Every launcher has the C signature
  ``launch_<kernel>(int grid, int block, const gpl_fused_args* args)``.
* :func:`header_fields`: the fields of ``gpl_fused_args`` parsed from
  ``kernels/fused_args.cuh`` (C type, name), and :data:`POINTEES` the dtype each pointer field
  points at, so that the tests take the kernels' argument types from the header itself.
* :class:`ShimKernel`: stands for a ``cupy.RawKernel``; it checks the struct it gets (every
  pointer the kernel reads is a live "device" array of the pointee's dtype, C-contiguous,
  writeable for outputs; null only where allowed) and runs the launcher.
* :class:`DevArray` / :func:`fake_cupy`: "device" arrays are a numpy subclass whose
  ``.data.ptr`` is their address (as CuPy's), recorded so that :class:`ShimKernel` can tell
  which array a pointer is.
* :func:`run_cpp`: compile and run a small C++ program (the struct layout test).
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import types
import weakref
from pathlib import Path

import numpy as np
import pytest

from gpuloader.fused import cuda as fused_cuda

ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / "tests" / "support" / "cuda_shim"
KERNELS = ROOT / "kernels"
#: g++ flags of every build: C++14 like NVRTC's, no contraction, every warning reported.
CXX_FLAGS = ["-std=c++14", "-O1", "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unknown-pragmas"]


# --- the struct as kernels/fused_args.cuh declares it ----------------------------------------

#: C type of a field (pointee type for a pointer) -> numpy dtype.
C_TYPES = {
    "float": np.dtype(np.float32),
    "int": np.dtype(np.int32),
    "unsigned int": np.dtype(np.uint32),
    "unsigned char": np.dtype(np.uint8),
    "long long": np.dtype(np.int64),
}
_FIELD = re.compile(
    r"^\s*(const\s+)?(unsigned char|unsigned int|long long|float|int)(\*?)\s+(\w+);"
)


def header_fields() -> list[tuple[str, str]]:
    """(C type, name) of every field of ``gpl_fused_args``, in order (``"const float*"``)."""
    text = (KERNELS / "fused_args.cuh").read_text()
    body = text[text.index("struct gpl_fused_args {") : text.index("};")]
    fields = []
    for line in body.splitlines():
        m = _FIELD.match(line)
        if m:
            fields.append((f"{m[1] or ''}{m[2]}{m[3]}", m[4]))
    return fields


def _pointees() -> dict[str, tuple[np.dtype, bool]]:
    out = {}
    for ctype, name in header_fields():
        if ctype.endswith("*"):
            const = ctype.startswith("const ")
            out[name] = (C_TYPES[ctype.removeprefix("const ")[:-1]], not const)
    return out


#: pointer field -> (dtype it points at, whether the kernels write it)
POINTEES = _pointees()
#: pointer fields the kernels accept as null (the field is then skipped)
NULLABLE = frozenset(
    ("hits", "view_ids", "face_ids", "out_hits", "out_view_ids", "out_face_ids", "out_ray_to_voxel")
)
_SELECT = ("ray_start", "ray_count", "keep", "out_start", "select_keys")
_STREAM = ("epoch", "index", "purpose_offset", "sym_table")
_RAYS = (
    *("origins", "directions", "distances", "hits", "view_ids", "face_ids"),
    *_SELECT,
    *("symmetry", "origin_scale", "distance_scale", "origin_std", "direction_std"),
    *_STREAM,
    *(f"out_{k}" for k in fused_cuda.RAY_KEYS),
)
_GRIDS = ("grids", "grid_start", "side", "symmetry", "jitter_threshold", *_STREAM, "out_voxels")
_VIEWS = (
    *("view_positions", "view_start", "view_out_start", "symmetry", "origin_scale"),
    *("sym_table", "out_view_positions"),
)
#: kernel -> (pointer fields it reads, size fields it reads: each must be > 0)
KERNEL_READS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fused_rays": (_RAYS, ("num_samples", "num_rays")),
    "fused_grids": (_GRIDS, ("num_samples", "grid_side")),
    "fused_views": (_VIEWS, ("num_samples", "num_views")),
    "fused_select_rows": (
        (*_SELECT, "out_rows", "out_owner", "out_j"),
        ("num_samples", "num_rays"),
    ),
    "fused_rays_epoch": ((*_RAYS, "batch_starts", "batch_rays", "cursor"), ()),
    "fused_grids_epoch": ((*_GRIDS, "batch_starts", "batch_side", "cursor"), ()),
    "fused_views_epoch": ((*_VIEWS, "batch_starts", "batch_views", "cursor"), ()),
    "fused_next_batch": (("cursor",), ()),
}


# --- the build --------------------------------------------------------------------------------


def _gxx() -> str:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found: the CPU run of the CUDA kernels needs a C++ compiler")
    return gxx


def _compile(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"g++ failed:\n{' '.join(cmd)}\n{res.stderr}"
    assert "warning" not in res.stderr, res.stderr


_library: dict[str, ctypes.CDLL] = {}


def fused_library(tmp_path_factory) -> ctypes.CDLL:
    """``fused_launcher.cpp`` built by g++ and loaded with ctypes, once per session (typed
    launchers and ``shim_*`` device helpers). Skips without g++; fails on an error or a
    warning, or when the compiled struct's size is not ``FUSED_ARGS_DTYPE``'s."""
    if "dll" in _library:
        return _library["dll"]
    so = tmp_path_factory.mktemp("cuda_shim") / "libfused.so"
    cmd = [
        _gxx(), *CXX_FLAGS, "-fPIC", "-shared", "-include", str(SHIM / "shim.h"), f"-I{KERNELS}",
        "-x", "c++", str(SHIM / "fused_launcher.cpp"), "-o", str(so),
    ]  # fmt: skip
    _compile(cmd)
    dll = ctypes.CDLL(str(so))
    for name in KERNEL_READS:
        fn = getattr(dll, f"launch_{name}")
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        fn.restype = None
    dll.shim_fused_args_size.restype = ctypes.c_longlong
    assert dll.shim_fused_args_size() == fused_cuda.FUSED_ARGS_DTYPE.itemsize
    u32 = np.ctypeslib.ndpointer(np.uint32, flags="C_CONTIGUOUS")
    u32_out = np.ctypeslib.ndpointer(np.uint32, flags="C_CONTIGUOUS,WRITEABLE")
    f32_out = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS,WRITEABLE")
    c_u32, c_ll = ctypes.c_uint32, ctypes.c_longlong
    dll.shim_philox.argtypes = [u32, c_u32, c_u32, u32_out, c_ll]
    dll.shim_normal3.argtypes = [u32, f32_out, c_ll]
    dll.shim_hash32.argtypes = [u32, u32_out, c_ll]
    dll.shim_feistel_permute.argtypes = [u32, c_u32, u32, u32_out, c_ll]
    dll.shim_feistel_bits.argtypes = [c_u32]
    dll.shim_feistel_bits.restype = ctypes.c_int
    _library["dll"] = dll
    return dll


def run_cpp(tmp_path: Path, source: str) -> str:
    """Compile ``source`` (C++, with ``-I kernels``) as a program with g++, run it and return
    its standard output. Skips without g++; fails on an error or a warning."""
    src, exe = tmp_path / "prog.cpp", tmp_path / "prog"
    src.write_text(source)
    _compile([_gxx(), *CXX_FLAGS, f"-I{KERNELS}", str(src), "-o", str(exe)])
    return subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout


# --- "device" arrays and the checked kernels ---------------------------------------------------

#: address -> the live "device" array whose ``.data.ptr`` gave it last
_ADDRESSES: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()


class DevArray(np.ndarray):
    """A "device" array of the numpy stand-in for CuPy (plain numpy arrays are host arrays);
    ``.data.ptr`` is its address, as for a CuPy array."""

    @property
    def data(self):  # type: ignore[override]
        _ADDRESSES[self.ctypes.data] = self
        return types.SimpleNamespace(ptr=self.ctypes.data)


class NoReadBack(DevArray):
    """A device plan field that must not be read back on the host (a synchronization)."""

    def _refuse(self, *a, **k):
        raise AssertionError("a device plan field was read back on the host")

    sum = max = min = tolist = item = __int__ = __index__ = __bool__ = _refuse  # type: ignore


def dev(a) -> DevArray:
    """``a`` as a "device" array (a view, no copy)."""
    return np.asarray(a).view(DevArray)


def fake_cupy(stats: dict):
    """A numpy stand-in for the ``cupy`` module: arrays are :class:`DevArray`; ``asarray`` of
    a host array counts an upload in ``stats["uploads"]``; ``empty`` fills every byte with
    0xAB (garbage: every element must be written)."""

    def asarray(a, dtype=None):
        if not isinstance(a, DevArray):
            stats["uploads"] += 1
        return np.asarray(a, dtype=dtype).view(DevArray)

    def empty(shape, dtype=np.float64):
        a = np.empty(shape, dtype)
        a.view(np.uint8)[...] = 0xAB
        return a.view(DevArray)

    return types.SimpleNamespace(
        ndarray=DevArray,
        asarray=asarray,
        ascontiguousarray=lambda a: np.ascontiguousarray(a).view(DevArray),
        empty=empty,
        float32=np.float32,
        int32=np.int32,
        int64=np.int64,
        uint8=np.uint8,
        uint32=np.uint32,
        from_dlpack=lambda x: pytest.fail("no DLPack in these tests"),
        cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=0)),
    )


class ShimKernel:
    """Stands for a ``cupy.RawKernel``: ``kernel(grid, block, (args,))`` checks the struct
    ``args`` (see the module doc) and runs the shim launcher; ``launches`` records
    (name, grid, block) of each call."""

    def __init__(self, dll, name: str, launches: list | None = None):
        self.fn = getattr(dll, f"launch_{name}")
        self.pointers, self.sizes = KERNEL_READS[name]
        self.name = name
        self.launches = launches if launches is not None else []

    def check(self, args) -> None:
        assert len(args) == 1, f"{self.name}: {len(args)} arguments, the kernel takes one"
        (a,) = args
        assert isinstance(a, np.ndarray) and a.shape == (1,), f"{self.name}: {type(a)}"
        assert a.dtype == fused_cuda.FUSED_ARGS_DTYPE, f"{self.name}: dtype {a.dtype}"
        for f in self.pointers:
            where = f"{self.name}.{f}"
            addr = int(a[f][0])
            if addr == 0:
                assert f in NULLABLE, f"{where}: a null pointer"
                continue
            arr = _ADDRESSES.get(addr)
            assert arr is not None, f"{where}: {addr:#x} is not a live device array"
            dtype, out = POINTEES[f]
            assert arr.dtype == dtype, f"{where}: dtype {arr.dtype} instead of {dtype}"
            assert arr.flags.c_contiguous, f"{where}: not C-contiguous"
            assert not out or arr.flags.writeable, f"{where}: not writeable"
        for f in self.sizes:
            assert int(a[f][0]) > 0, f"{self.name}.{f} = {int(a[f][0])}"

    def __call__(self, grid, block, args):
        self.check(args)
        self.launches.append((self.name, tuple(grid), tuple(block)))
        self.fn(int(grid[0]), int(block[0]), args[0].ctypes.data)


def install_fake_cupy(monkeypatch, kernel_factory, cp) -> None:
    """Make :mod:`gpuloader.fused.cuda` (and so :mod:`gpuloader.fused.graphs`) run on ``cp``
    (:func:`fake_cupy`) with ``kernel_factory(name)`` for its kernels, empty caches."""
    monkeypatch.setattr(fused_cuda, "cupy_module", lambda: cp)
    monkeypatch.setattr(fused_cuda, "kernel", kernel_factory)
    monkeypatch.setattr(fused_cuda, "_table_cache", {})
    monkeypatch.setattr(fused_cuda, "_module_cache", {})
