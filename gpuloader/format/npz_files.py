"""Opening npz files with named errors: every reader of the format opens files through here.

A file that cannot be opened says why, naming the file: permission denied or a symlink loop
(:class:`~gpuloader.errors.UnreadableFileError`, not damage), not a zip archive (a bare
``.npy``, a pickle or text: :class:`~gpuloader.errors.NotAnNpzError`), a member that does not
inflate or fails its CRC (:class:`~gpuloader.errors.CorruptArchiveError`), a pickled object
array (:class:`~gpuloader.errors.PickledArrayError`), a missing key
(:class:`~gpuloader.errors.MissingKeyError`), a member whose ``.npy`` header declares more
bytes than the file can hold (:class:`~gpuloader.errors.DeclaredSizeError`: checked from the
headers before anything is allocated, so a forged header or a deflate bomb costs nothing).
The checks of the arrays' contents are :mod:`gpuloader.format.validate`'s.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from gpuloader.errors import (
    CorruptArchiveError,
    DeclaredSizeError,
    FileCheckError,
    MissingKeyError,
    NotAnNpzError,
    PickledArrayError,
    UnreadableFileError,
)

__all__ = [
    "FIX",
    "MAX_INFLATE_RATIO",
    "NPZ_DECODE_ERRORS",
    "HeaderCheck",
    "check_member_size",
    "declared_bytes",
    "load_npz",
    "make_error",
    "member_headers",
    "npz_error",
    "unreadable_error",
]

#: The fix named by damage errors.
FIX = (
    "regenerate it: rerun the same `gpuloader generate` command into the same OUT (it "
    "rewrites damaged files); or delete the sample's ray file to leave the sample out"
)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"
#: Most bytes one compressed byte of a zip member may inflate to. Deflate's limit is about
#: 1032:1 (a 258-byte match per 2 bits); the margin covers the stream's own headers.
MAX_INFLATE_RATIO = 1100
_SLACK = 4096  # bytes: a member's .npy header and deflate framing on tiny members
#: ``check(key, shape, dtype)`` run on each member's ``.npy`` header before it is inflated;
#: raises a named error to refuse the member.
HeaderCheck = Callable[[str, tuple[int, ...], np.dtype], None]


def make_error(
    cls: type[FileCheckError],
    path: Any,
    detail: str,
    key: str | None = None,
    row: int | None = None,
    fix: str = FIX,
) -> FileCheckError:
    where = str(path)
    if key is not None:
        where += f": {key!r}"
        if row is not None:
            where += f" row {int(row)}"
    return cls(f"{where}: {detail}; {fix}", path=path, key=key, row=row, detail=detail)


def unreadable_error(path: Any, exc: BaseException) -> FileCheckError | None:
    """The named error for an OSError that is not damage (permission, symlink loop, a
    folder, an I/O error); None for any other exception."""
    if not isinstance(exc, OSError) or isinstance(exc, zipfile.BadZipFile):
        return None
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return make_error(
            UnreadableFileError,
            path,
            f"permission denied ({exc.strerror or exc})",
            fix="make it readable (chmod / chown) or run as a user who may read it",
        )
    if exc.errno == errno.ELOOP:
        return make_error(
            UnreadableFileError,
            path,
            "symlink loop (too many levels of symbolic links)",
            fix="point the link at the real file or remove it",
        )
    if isinstance(exc, IsADirectoryError):
        return make_error(UnreadableFileError, path, "is a folder, not a file", fix="remove it")
    if exc.errno == errno.EIO:
        return make_error(
            UnreadableFileError,
            path,
            f"I/O error ({exc.strerror or exc})",
            fix="check the disk or file system, then restore the file",
        )
    return None


# What numpy's npz reader can raise on a damaged file: zip and zlib errors, a bad ``.npy``
# header (ValueError wraps a SyntaxError; CPython's parser can also fail with SystemError,
# RecursionError or TypeError on garbage), or a short read.
NPZ_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    ValueError,
    OSError,
    KeyError,
    SyntaxError,
    SystemError,
    RecursionError,
    TypeError,
    OverflowError,
)


def npz_error(path: Any, exc: BaseException, key: str | None = None) -> FileCheckError:
    """The named error for an exception raised while opening ``path`` or reading ``key``."""
    if isinstance(exc, FileCheckError):
        return exc
    got = unreadable_error(path, exc)
    if got is not None:
        return got
    text = f"{type(exc).__name__}: {str(exc).strip() or 'no detail'}"
    if isinstance(exc, ValueError) and ("pickle" in str(exc) or "Object arrays" in str(exc)):
        return make_error(PickledArrayError, path, f"holds a pickled object array ({text})", key)
    if key is None:
        return make_error(CorruptArchiveError, path, f"not a readable npz archive ({text})")
    return make_error(CorruptArchiveError, path, f"does not inflate ({text})", key)


def _size(n: int) -> str:
    """``n`` bytes in words: ``12.0 TB``, ``134.2 MB``, ``512 B``."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def declared_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes an ``.npy`` header's ``shape`` and ``dtype`` declare (exact, no overflow);
    0 when a dimension is negative (numpy refuses that header itself)."""
    if any(int(d) < 0 for d in shape):
        return 0
    return math.prod(int(d) for d in shape) * int(np.dtype(dtype).itemsize)


def check_member_size(
    path: Any,
    key: str,
    info: zipfile.ZipInfo,
    shape: tuple[int, ...],
    dtype: np.dtype,
    file_size: int | None = None,
) -> None:
    """Refuse a member whose header declares more bytes than its zip entry can inflate to.

    Limits: the entry's uncompressed size (the zip reader never returns more) and
    :data:`MAX_INFLATE_RATIO` times its compressed size (1x for a stored entry), that
    compressed size at most ``file_size`` (the file's bytes; None: not known).

    Raises:
        DeclaredSizeError: naming the file, the key, the declared and the possible bytes.
    """
    want = declared_bytes(shape, dtype)
    compressed = int(info.compress_size)
    if file_size is not None:
        compressed = min(compressed, int(file_size))
    ratio = 1 if info.compress_type == zipfile.ZIP_STORED else MAX_INFLATE_RATIO
    limit = min(int(info.file_size), ratio * compressed + _SLACK)
    if want <= limit:
        return
    held = f"its zip entry holds {_size(int(info.file_size))} from {_size(compressed)} compressed"
    detail = (
        f"header declares shape {tuple(int(d) for d in shape)} {np.dtype(dtype)} = "
        f"{_size(want)}, but {held} (at most {_size(limit)} possible); a damaged or forged "
        "header (or a decompression bomb), refused before allocating"
    )
    raise make_error(DeclaredSizeError, path, detail, key)


def _read_npy_header(f: Any, version: tuple[int, int]) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from an open member positioned after its magic (reads the header only)."""
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:  # 2.0, or 3.0 (same layout, utf-8)
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(int(s) for s in shape), np.dtype(dtype)


def _member_name(names: list[str], key: str) -> str:
    """The zip entry numpy reads for ``key`` (``key`` itself first, as ``NpzFile``)."""
    return key if key in names else f"{key}.npy"


def _checked_header(
    path: Any, zf: zipfile.ZipFile, key: str, file_size: int | None
) -> tuple[tuple[int, ...], np.dtype]:
    """Header of ``key`` in ``zf``, its declared size checked; nothing inflated past it.

    Raises:
        CorruptArchiveError: the entry is not a ``.npy`` array. DeclaredSizeError.
    """
    info = zf.getinfo(_member_name(zf.namelist(), key))
    with zf.open(info) as f:
        magic = f.read(len(_NPY_MAGIC) + 2)
        if magic[: len(_NPY_MAGIC)] != _NPY_MAGIC or len(magic) < len(_NPY_MAGIC) + 2:
            raise make_error(CorruptArchiveError, path, "the entry is not a .npy array", key)
        shape, dtype = _read_npy_header(f, (magic[-2], magic[-1]))
    if dtype.hasobject:  # numpy would refuse it too (allow_pickle=False); say it first
        raise make_error(PickledArrayError, path, "holds a pickled object array", key)
    check_member_size(path, key, info, shape, dtype, file_size)
    return shape, dtype


@contextlib.contextmanager
def _opened(path: Path, data: bytes | None) -> Iterator[tuple[BinaryIO, int]]:
    """The file (or ``data``) open, with its size, after refusing what is not a zip
    archive (a bare ``.npy``, text, empty); both passes of :func:`load_npz` read this one
    open file, so the headers checked are those of the bytes inflated.

    Raises:
        FileNotFoundError; UnreadableFileError, NotAnNpzError.
    """
    if data is not None:
        f: BinaryIO = io.BytesIO(data)
    else:
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise npz_error(path, exc) from exc
    with f:
        try:
            magic = f.read(6)
            size = len(data) if data is not None else os.fstat(f.fileno()).st_size
            f.seek(0)
        except OSError as exc:
            raise npz_error(path, exc) from exc
        if magic == _NPY_MAGIC:
            raise make_error(NotAnNpzError, path, "holds a bare .npy array, not an npz archive")
        if magic[:4] not in _ZIP_MAGIC:
            what = "is empty" if not magic else "is not a zip archive (nor an npz)"
            raise make_error(NotAnNpzError, path, what)
        yield f, size


def _headers(
    path: Path, f: BinaryIO, size: int, keys: tuple[str, ...] | None, optional: tuple[str, ...]
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """:func:`member_headers` of the open file ``f`` of ``size`` bytes."""
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    key = None
    try:
        with zipfile.ZipFile(f) as zf:
            have = [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]
            wanted = have if keys is None else list(keys)
            missing = [k for k in wanted if k not in have]
            if missing:
                detail = f"missing array(s) {missing} (has {sorted(have)})"
                raise make_error(MissingKeyError, path, detail, missing[0])
            wanted += [k for k in optional if k in have and k not in wanted]
            for key in wanted:
                out[key] = _checked_header(path, zf, key, size)
    except FileCheckError:
        raise
    except NPZ_DECODE_ERRORS as exc:
        raise npz_error(path, exc, key) from exc
    return out


def member_headers(
    path: Path | str,
    keys: tuple[str, ...] | None,
    data: bytes | None = None,
    optional: tuple[str, ...] = (),
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{key: (shape, dtype)}`` of arrays ``keys`` (None: all; then ``optional`` ones the
    file has) of an ``.npz``, from their ``.npy`` headers only (a few KB inflated each),
    every declared size checked (:func:`check_member_size`).

    Raises:
        FileNotFoundError: no such file (callers name it as a layout problem).
        MissingKeyError, DeclaredSizeError, and the errors of :func:`load_npz`.
    """
    path = Path(path)
    with _opened(path, data) as (f, size):
        return _headers(path, f, size, keys, optional)


def load_npz(
    path: Path | str,
    keys: tuple[str, ...] | None = None,
    data: bytes | None = None,
    *,
    optional: tuple[str, ...] = (),
    check_header: HeaderCheck | None = None,
) -> dict[str, np.ndarray]:
    """Arrays ``keys`` (None: all) of an ``.npz``, inflated whole (CRC checked).

    The members' ``.npy`` headers are read first (:func:`member_headers`): a declared size
    the file cannot hold, or one ``check_header`` refuses, raises before anything is
    allocated.

    Args:
        data: the file's bytes, already read (``path`` then only names it).
        optional: arrays also returned when the file has them (no error when it has not).
        check_header: ``check(key, shape, dtype)`` run on each header before inflating.

    Raises:
        FileNotFoundError: no such file (callers name it as a layout problem).
        MissingKeyError: a key is not in the archive (all missing keys are named).
        DeclaredSizeError: a header declares more bytes than the file can hold.
        UnreadableFileError, NotAnNpzError, CorruptArchiveError, PickledArrayError: as named;
        or what ``check_header`` raises.
    """
    path = Path(path)
    out: dict[str, np.ndarray] = {}
    with _opened(path, data) as (f, size):
        heads = _headers(path, f, size, keys, optional)
        if check_header is not None:
            for k, (shape, dtype) in heads.items():
                check_header(k, shape, dtype)
        key = None
        try:
            f.seek(0)
            with np.load(f, allow_pickle=False) as npz:
                for key in heads:
                    out[key] = npz[key]
        except FileCheckError:
            raise
        except NPZ_DECODE_ERRORS as exc:
            raise npz_error(path, exc, key) from exc
    for k, a in out.items():
        if a.dtype.hasobject:
            raise make_error(PickledArrayError, path, "holds a pickled object array", k)
    return out
