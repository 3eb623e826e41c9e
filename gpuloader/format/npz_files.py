"""Opening npz files with named errors: every reader of the format opens files through here.

A file that cannot be opened says why, naming the file: permission denied or a symlink loop
(:class:`~gpuloader.errors.UnreadableFileError`, not damage), not a zip archive (a bare
``.npy``, a pickle or text: :class:`~gpuloader.errors.NotAnNpzError`), a member that does not
inflate or fails its CRC (:class:`~gpuloader.errors.CorruptArchiveError`), a pickled object
array (:class:`~gpuloader.errors.PickledArrayError`), a missing key
(:class:`~gpuloader.errors.MissingKeyError`). The checks of the arrays' contents are
:mod:`gpuloader.format.validate`'s.
"""

from __future__ import annotations

import errno
import io
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from gpuloader.errors import (
    CorruptArchiveError,
    FileCheckError,
    MissingKeyError,
    NotAnNpzError,
    PickledArrayError,
    UnreadableFileError,
)

__all__ = ["FIX", "NPZ_DECODE_ERRORS", "load_npz", "make_error", "npz_error", "unreadable_error"]

#: The fix named by damage errors.
FIX = "regenerate it (gpuloader generate) or delete it and rebuild the index"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"


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


def load_npz(
    path: Path | str, keys: tuple[str, ...] | None = None, data: bytes | None = None
) -> dict[str, np.ndarray]:
    """Arrays ``keys`` (None: all) of an ``.npz``, inflated whole (CRC checked).

    ``data``: the file's bytes, already read (``path`` then only names it).

    Raises:
        FileNotFoundError: no such file (callers name it as a layout problem).
        MissingKeyError: a key is not in the archive (all missing keys are named).
        UnreadableFileError, NotAnNpzError, CorruptArchiveError, PickledArrayError: as named.
    """
    path = Path(path)
    if data is not None:
        magic = data[:6]
    else:
        try:
            with open(path, "rb") as f:
                magic = f.read(6)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise npz_error(path, exc) from exc
    if magic == _NPY_MAGIC:
        raise make_error(NotAnNpzError, path, "holds a bare .npy array, not an npz archive")
    if magic[:4] not in _ZIP_MAGIC:
        what = "is empty" if not magic else "is not a zip archive (nor an npz)"
        raise make_error(NotAnNpzError, path, what)
    out: dict[str, np.ndarray] = {}
    key = None
    try:
        with np.load(path if data is None else io.BytesIO(data), allow_pickle=False) as npz:
            names = list(npz.files)
            wanted = names if keys is None else list(keys)
            missing = [k for k in wanted if k not in names]
            if missing:
                raise make_error(
                    MissingKeyError,
                    path,
                    f"missing array(s) {missing} (has {sorted(names)})",
                    missing[0],
                )
            for key in wanted:
                out[key] = npz[key]
    except FileCheckError:
        raise
    except FileNotFoundError:
        raise
    except NPZ_DECODE_ERRORS as exc:
        raise npz_error(path, exc, key) from exc
    for k, a in out.items():
        if a.dtype.hasobject:
            raise make_error(PickledArrayError, path, "holds a pickled object array", k)
    return out
