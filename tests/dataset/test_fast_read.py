"""``fast_load_npz`` (the one-pass npz reader of the ray and voxel reads) gives what
``load_npz`` gives: the same arrays (values, dtypes, shapes, writable, Fortran order kept) and,
on a bad file, the same named error."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gpuloader.errors import DeclaredSizeError, MissingKeyError, NotAnNpzError
from gpuloader.format.npz_direct import fast_load_npz
from gpuloader.format.npz_files import load_npz


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


@pytest.fixture()
def direct(monkeypatch) -> list[str]:
    """Files just written count as settled (their directories are remembered), and every
    fall-back to ``load_npz`` is listed: the direct reader should take every sound file."""
    from gpuloader.format import header_cache
    from gpuloader.format import npz_direct as npz

    monkeypatch.setattr(header_cache, "SETTLE_S", -1.0)
    npz._DIRS.clear()
    fell: list[str] = []
    real = npz.load_npz

    def counting(path, *a, **k):
        fell.append(str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(npz, "load_npz", counting)
    return fell


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "deflated"])
def test_sound_files_are_read_directly(tmp_path: Path, direct, save) -> None:
    """Stored and deflated members, a member longer than the first inflated block, an empty
    array and a Fortran-ordered one: the arrays of ``np.load``, without a fall-back."""
    p = tmp_path / "r.npz"
    rng = np.random.default_rng(0)
    arrays = {
        "big": rng.standard_normal((20_000, 3)).astype(np.float32),  # 240 KB: many blocks
        "empty": np.zeros((0, 3), np.float32),
        "f": np.asfortranarray(rng.integers(0, 9, (5, 7)).astype(np.int16)),
        "s": np.float64(2.5),
    }
    save(p, **arrays)
    for _ in range(2):  # the second read from the remembered directory
        got = fast_load_npz(p, tuple(arrays))
        for k, want in arrays.items():
            assert got[k].dtype == want.dtype and got[k].shape == np.shape(want)
            assert np.array_equal(got[k], want) and got[k].flags.writeable
    assert got["f"].flags.f_contiguous
    assert direct == []


def test_a_rewritten_file_is_read_afresh(tmp_path: Path, direct) -> None:
    """A file rewritten in place (its remembered directory then lies about offsets): the new
    arrays, whether the rewrite moved its size or only its times."""
    p = tmp_path / "r.npz"
    np.savez_compressed(p, a=np.arange(1000, dtype=np.int64), b=np.ones(3))
    assert np.array_equal(fast_load_npz(p, ("a", "b"))["a"], np.arange(1000))
    np.savez_compressed(p, a=np.arange(5, dtype=np.int64), b=np.zeros(3))
    got = fast_load_npz(p, ("a", "b"))
    assert np.array_equal(got["a"], np.arange(5)) and np.array_equal(got["b"], np.zeros(3))
    assert direct == []


def test_a_member_longer_than_its_header_is_refused_as_load_npz_refuses_it(
    tmp_path: Path, direct
) -> None:
    """A member that inflates to more than its ``.npy`` header declares (extra bytes after
    the data): the direct reader stops one byte past the data and hands the file to
    ``load_npz``, which names the error (or reads it as numpy does)."""
    p = tmp_path / "long.npz"
    buf = io.BytesIO()
    np.save(buf, np.arange(4, dtype=np.float32))
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.npy", buf.getvalue() + b"\0" * (1 << 20))  # 1 MiB after the data
    try:
        want = load_npz(p, ("a",))
    except Exception as exc:  # noqa: BLE001 - the named error load_npz gives
        with pytest.raises(type(exc)):
            fast_load_npz(p, ("a",))
    else:
        assert np.array_equal(fast_load_npz(p, ("a",))["a"], want["a"])
    assert direct == [str(p)]


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "deflated"])
def test_a_read_holds_one_inflater_and_one_chunk_besides_its_arrays(
    tmp_path: Path, direct, save
) -> None:
    """Ten members of 400 KB: the peak of a read is its arrays plus a bounded working set
    (one inflater, one chunk of input and one of output), not one inflater and the whole
    compressed member per member, nor a copy of each member before it lands in its array."""
    import tracemalloc

    from gpuloader.format import npz_direct

    rng = np.random.default_rng(1)
    arrays = {f"m{i}": rng.integers(0, 50, 100_000).astype(np.float32) for i in range(10)}
    p = tmp_path / "many.npz"
    save(p, **arrays)
    fast_load_npz(p, tuple(arrays))  # the directory remembered, modules warm
    tracemalloc.start()
    got = fast_load_npz(p, tuple(arrays))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held = sum(a.nbytes for a in got.values())
    assert all(np.array_equal(got[k], v) for k, v in arrays.items())
    # input and its unconsumed tail, output blocks and their joined bytes, one inflater
    bound = 2 * npz_direct._IN_CHUNK + 2 * npz_direct._OUT_CHUNK + (64 << 10)
    assert peak - held < bound, (peak, held)
    assert direct == []


def _archives(tmp_path: Path) -> dict[str, Path]:
    """Zip archives of npy members as numpy, zipfile and other writers make them."""
    buf = io.BytesIO()
    np.save(buf, np.arange(300, dtype=np.float32))
    npy = buf.getvalue()
    made: dict[str, Path] = {}

    def zipped(name: str, **kw) -> zipfile.ZipFile:
        made[name] = tmp_path / f"{name}.npz"
        return zipfile.ZipFile(made[name], "w", **kw)

    np.savez_compressed(tmp_path / "numpy.npz", a=np.ones((40, 3), np.float32), b=np.int64(3))
    made["numpy"] = tmp_path / "numpy.npz"
    many = {f"m{i:03d}": np.full(i + 1, i, np.int32) for i in range(150)}  # directory > 4 KB
    np.savez(tmp_path / "many.npz", **many)
    made["many"] = tmp_path / "many.npz"
    with zipped("comment", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.npy", npy)
        zf.comment = b"a comment"
    # zip64 fields in the local header only (as numpy writes each member)
    with zipped("local_zip64") as zf, zf.open("a.npy", "w", force_zip64=True) as f:
        f.write(npy)
    with zipped("utf8") as zf:
        zf.writestr("é.npy", npy)
        zf.writestr("a.npy", npy)
    with zipped("duplicate") as zf, pytest.warns(UserWarning, match="Duplicate"):
        zf.writestr("a.npy", npy)
        zf.writestr("a.npy", npy[:-4] + b"\0\0\0\0")
    prepended = tmp_path / "prepended.npz"
    prepended.write_bytes(b"\0" * 100 + made["numpy"].read_bytes())
    made["prepended"] = prepended
    return made


def test_the_directory_is_zipfiles_or_left_to_zipfile(tmp_path: Path) -> None:
    """The struct parser of the central directory gives exactly ``zipfile``'s entries for a
    plain archive, and None (``zipfile`` reads it) for anything it does not parse; reads
    through either give ``load_npz``'s arrays or its error."""
    import os

    from gpuloader.format import npz_direct as npz

    parsed = []
    for name, p in _archives(tmp_path).items():
        with open(p, "rb", buffering=0) as fh:
            got = npz._read_directory(fh, os.fstat(fh.fileno()).st_size)
            fh.seek(0)
            with zipfile.ZipFile(fh) as zf:
                want = npz._Directory.of_infos(zf.infolist())
                keys = tuple(n.removesuffix(".npy") for n in zf.namelist())
        if got is not None:
            parsed.append(name)
            assert got._index == want._index and got._fields == want._fields, name
        npz._DIRS.clear()
        try:
            ref = load_npz(p, keys)
        except Exception as exc:  # noqa: BLE001 - the same named error (data before the zip)
            with pytest.raises(type(exc)):
                fast_load_npz(p, keys)
            continue
        for k, v in fast_load_npz(p, keys).items():
            assert np.array_equal(v, ref[k]), (name, k)
    assert sorted(parsed) == ["local_zip64", "many", "numpy", "utf8"]
