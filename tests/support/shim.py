"""Builds the CUDA kernels as a CPU shared library for tests (design decision 8).

A launcher of ``tests/cuda_shim/`` (which includes one ``kernels/*.cu``) is compiled by g++
with ``tests/cuda_shim/shim.h`` forced in, the flags that keep float results rounded like the
GPU's (``-ffp-contract=off``), and every warning turned into a failure. Used by
``test_kernels_cpu.py`` (``launcher.cpp``) and ``test_fused_kernels_cpu.py``
(``fused_launcher.cpp``), each with its own description of the launchers' arguments.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / "tests" / "support" / "cuda_shim"
KERNELS = ROOT / "kernels"


def build_shim_library(
    tmp_path_factory,
    launcher: str,
    library: str,
    signatures: Mapping[str, Sequence[Any]],
    argtype: Callable[[Any], Any],
) -> ctypes.CDLL:
    """``tests/cuda_shim/<launcher>`` built by g++ as ``<library>`` in a new temporary folder,
    loaded with ctypes. Skips the test when g++ is missing; fails on an error or a warning.

    ``signatures``: kernel name -> its arguments after (grid, block); the C function
    ``launch_<name>`` gets ``argtypes`` (int grid, int block, then ``argtype(a)`` for each
    argument ``a``) and no result.
    """
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found: the CPU run of the CUDA kernels needs a C++ compiler")
    so = tmp_path_factory.mktemp("cuda_shim") / library
    cmd = [
        gxx, "-std=c++14", "-O1", "-ffp-contract=off", "-fPIC", "-shared",
        "-Wall", "-Wextra", "-Wno-unknown-pragmas",
        "-include", str(SHIM / "shim.h"), f"-I{KERNELS}",
        "-x", "c++", str(SHIM / launcher), "-o", str(so),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"g++ failed:\n{' '.join(cmd)}\n{res.stderr}"
    assert "warning" not in res.stderr, res.stderr
    dll = ctypes.CDLL(str(so))
    for name, sig in signatures.items():
        fn = getattr(dll, f"launch_{name}")
        fn.argtypes = [ctypes.c_int, ctypes.c_int] + [argtype(a) for a in sig]
        fn.restype = None
    return dll
