"""Every CUDA source in ``kernels/`` compiles with NVRTC (design decision 8; no GPU needed).

NVRTC comes from the pip wheel ``nvidia-cuda-nvrtc-cu12`` (the ``dev`` extra);
:func:`gpuloader.fused.cuda_build.ensure_nvrtc` makes CuPy find it. The tests skip only when
CuPy or NVRTC cannot be loaded at all, and say why.
"""

from __future__ import annotations

import re

import pytest

from gpuloader.fused import cuda as fused_cuda
from gpuloader.fused import cuda_build


@pytest.fixture(scope="module")
def nvrtc_version():
    try:
        return cuda_build.ensure_nvrtc()
    except ImportError as e:
        pytest.skip(f"CuPy is not installed ({e}): `pip install -e .[dev]` brings it")
    except RuntimeError as e:
        pytest.skip(f"NVRTC cannot be loaded: {e}")


def test_kernels_folder_found():
    kdir = cuda_build.kernels_dir()
    assert (kdir / "fused.cu").is_file() and (kdir / "philox.cuh").is_file()
    assert (kdir / "fused_args.cuh").is_file() and (kdir / "transform.cuh").is_file()
    assert (kdir / fused_cuda.MODULE_SOURCE).is_file()


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_every_kernel_source_compiles(nvrtc_version, arch):
    sizes = cuda_build.compile_kernels_nvrtc(arch)
    kdir = cuda_build.kernels_dir()
    assert set(sizes) == {p.name for p in kdir.glob("*.cu")} == {"fused.cu"}
    assert all(size > 0 for size in sizes.values())


def test_ptx_has_every_kernel_and_exact_float_ops(nvrtc_version):
    """Compiled as CuPy compiles it (our options, then CuPy's own ``-ftz=true``)."""
    from cupy.cuda import nvrtc

    source = fused_cuda.MODULE_SOURCE
    kdir = cuda_build.kernels_dir()
    options = ["-arch=compute_80", *cuda_build.NVRTC_OPTIONS, f"-I{kdir}", "-ftz=true"]
    prog = nvrtc.createProgram((kdir / source).read_text(), source, [], [])
    try:
        nvrtc.compileProgram(prog, options)
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    args = fused_cuda.FUSED_ARGS_DTYPE
    for name in fused_cuda.KERNEL_NAMES:
        assert f".entry {name}(" in ptx, name  # extern "C": unmangled entry points
        # one parameter, gpl_fused_args by value: the device's size and alignment of the
        # struct are FUSED_ARGS_DTYPE's
        params = re.search(rf"\.entry {name}\(([^)]*)\)", ptx)[1].split(",")
        want = f".param .align {args.alignment} .b8 {name}_param_0[{args.itemsize}]"
        assert [p.strip() for p in params] == [want], (name, params)
    ops = {line.split()[0] for line in ptx.splitlines() if line.strip()}
    # no fused multiply-add in float32 (decision 3), and no flush-to-zero in the float32
    # arithmetic that must round like numpy (libdevice's float64 log/sin/cos may use .ftz
    # on internal tests; that does not touch our values)
    for op in ("mul", "add", "div", "sqrt", "fma"):
        assert not [o for o in ops if o.startswith(op) and o.endswith(".f32") and "ftz" in o]
    assert not [o for o in ops if o.startswith("fma") and o.endswith("f32")]
    assert "neg.ftz.f32" not in ops and "cvt.rn.ftz.f32.f64" not in ops
    assert {"mul.rn.f32", "add.rn.f32", "div.rn.f32", "sqrt.rn.f32", "cvt.rn.f32.f64"} <= ops


def test_compile_error_carries_the_log(nvrtc_version, tmp_path, monkeypatch):
    (tmp_path / "fused.cu").write_text('extern "C" __global__ void f() { undeclared(); }\n')
    monkeypatch.setenv("GPULOADER_KERNELS", str(tmp_path))
    with pytest.raises(RuntimeError, match="undeclared"):
        cuda_build.compile_kernels_nvrtc()


def test_kernels_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("GPULOADER_KERNELS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="GPULOADER_KERNELS"):
        cuda_build.kernels_dir()
    (tmp_path / "fused.cu").write_text("")
    assert cuda_build.kernels_dir() == tmp_path
