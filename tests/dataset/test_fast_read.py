"""``fast_load_npz`` (the one-pass npz reader of the ray and voxel reads) gives what
``load_npz`` gives: the same arrays (values, dtypes, shapes, writable, Fortran order kept) and,
on a bad file, the same named error."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from gpuloader.errors import DeclaredSizeError, MissingKeyError, NotAnNpzError
from gpuloader.format.npz_files import load_npz
from gpuloader.stores.npz import fast_load_npz


def test_same_arrays_as_load_npz(tmp_path: Path) -> None:
    p = tmp_path / "r.npz"
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    f = np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3))
    np.savez_compressed(p, a=a, f=f, s=np.int64(7), opt=np.ones(2, np.uint8))
    for keys, optional in ((("a", "f", "s"), ("opt", "nothere")), (("a",), ())):
        want = load_npz(p, keys, optional=optional)
        got = fast_load_npz(p, keys, optional=optional)
        assert list(got) == list(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
            assert np.array_equal(got[k], want[k]) and got[k].flags.writeable
    assert fast_load_npz(p, ("f",))["f"].flags.f_contiguous


def test_same_errors_as_load_npz(tmp_path: Path) -> None:
    bare = tmp_path / "bare.npz"
    np.save(bare.with_suffix(".npy"), np.zeros(3))
    bare.with_suffix(".npy").rename(bare)
    with pytest.raises(NotAnNpzError):
        fast_load_npz(bare, ("a",))
    good = tmp_path / "g.npz"
    np.savez_compressed(good, a=np.zeros(3))
    with pytest.raises(MissingKeyError):
        fast_load_npz(good, ("a", "b"))
    with pytest.raises(FileNotFoundError):
        fast_load_npz(tmp_path / "none.npz", ("a",))
    forged = tmp_path / "forged.npz"  # header declares 10^9 rows in a few bytes
    text = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000,), }"
    header = b"\x93NUMPY\x01\x00" + b"v\x00" + text
    header = header.ljust(8 + 2 + 118, b" ") + b"\n"
    with zipfile.ZipFile(forged, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.npy", header + b"\0" * 16)
    with pytest.raises(DeclaredSizeError):
        fast_load_npz(forged, ("a",))
