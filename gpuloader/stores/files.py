"""The files of a pack, local or on object storage: :class:`PackFiles` and its local form.

A pack is read through a :class:`PackFiles`: whole small files (the manifest, a level's
``index.npz``, ``grids.npy``), the sizes of the others and byte spans of the large ones (a
striped pack's stripes). :class:`LocalPackFiles` serves a folder on disk (memory maps where
they help); :class:`gpuloader.stores.remote.RemotePackFiles` serves an fsspec URL such as
``s3://bucket/prefix`` with concurrent range requests. Names are relative to the pack's root,
``/``-separated (``"level_3/stripe_0.bin"``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from gpuloader.errors import IncompletePackError

__all__ = ["LocalPackFiles", "PackFiles", "check_spans", "load_npy", "load_npz"]


@runtime_checkable
class PackFiles(Protocol):
    """Read access to the files of one pack.

    Attributes:
        root: the pack's folder or URL, as messages name it (``str``).
        remote: True for object storage (no memory maps; every read is a request).
    """

    root: str
    remote: bool

    def where(self, name: str) -> str:
        """The full path or URL of file ``name``, for messages."""
        ...

    def exists(self, name: str) -> bool:
        """Whether file ``name`` exists."""
        ...

    def size(self, name: str) -> int:
        """Bytes of file ``name`` (FileNotFoundError if missing)."""
        ...

    def read_bytes(self, name: str) -> bytes:
        """The whole of file ``name`` (FileNotFoundError if missing)."""
        ...

    def read_spans(self, name: str, spans: Sequence[tuple[int, int]], out: memoryview) -> None:
        """Byte spans ``(offset, nbytes)`` of file ``name`` (ascending, not overlapping), one
        after the other into ``out`` (a writable byte view of exactly ``sum(nbytes)``).

        Raises:
            IncompletePackError: the file ends before a span does.
        """
        ...


def check_spans(spans: Sequence[tuple[int, int]], out: memoryview) -> list[tuple[int, int]]:
    """``spans`` as ints, checked ascending and not overlapping, filling ``out`` exactly
    (ValueError otherwise)."""
    got = [(int(a), int(n)) for a, n in spans]
    end = 0
    for a, n in got:
        if a < end or n < 0:
            raise ValueError(f"byte spans must be ascending and not overlap; got {got}")
        end = a + n
    if sum(n for _, n in got) != out.nbytes:
        raise ValueError(f"spans hold {sum(n for _, n in got)} bytes; out holds {out.nbytes}")
    return got


class LocalPackFiles:
    """The files of a pack folder on disk (:class:`PackFiles`)."""

    remote = False

    def __init__(self, root: Path | str) -> None:
        self.path = Path(root)
        self.root = str(self.path)

    def __repr__(self) -> str:
        return f"LocalPackFiles({self.root!r})"

    def where(self, name: str) -> str:
        return str(self.path / name)

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def size(self, name: str) -> int:
        return os.stat(self.path / name).st_size

    def sizes(self, folder: str) -> dict[str, int]:
        """``{file name: bytes}`` of the files in ``folder`` (empty if it is missing)."""
        try:
            with os.scandir(self.path / folder) as it:
                return {e.name: e.stat().st_size for e in it if e.is_file()}
        except FileNotFoundError:
            return {}

    def read_bytes(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def read_spans(self, name: str, spans: Sequence[tuple[int, int]], out: memoryview) -> None:
        """One pass forward through the file, one read per span, the kernel's read-ahead
        off (``POSIX_FADV_RANDOM``): only the spans are read from the disk, not the gaps
        between them nor, after a single span, up to the device's ``read_ahead_kb`` (8 MiB
        on the test machine) past it. The reads are large, so nothing is lost."""
        out = memoryview(out).cast("B")
        spans = check_spans(spans, out)
        path = self.path / name
        at = 0
        with open(path, "rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
            for offset, nbytes in spans:
                f.seek(offset)
                stop, got = at + nbytes, at
                while got < stop:
                    n = f.readinto(out[got:stop])
                    if not n:
                        raise IncompletePackError(
                            f"{path}: ends after {offset + got - at} bytes, expected at least "
                            f"{offset + nbytes}; the pack is damaged: rebuild it"
                        )
                    got += n
                at = stop


def load_npy(files: PackFiles, name: str) -> np.ndarray:
    """An ``.npy`` file of the pack as a read-only plain ndarray: memory-mapped on disk,
    read whole (one request) from object storage. FileNotFoundError if missing."""
    if isinstance(files, LocalPackFiles):
        path = files.path / name
        if not path.exists():
            raise FileNotFoundError(2, "No such file", str(path))
        return np.load(path, mmap_mode="r").view(np.ndarray)
    arr = np.load(io.BytesIO(files.read_bytes(name)), allow_pickle=False)
    arr.flags.writeable = False
    return arr


def load_npz(files: PackFiles, name: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Arrays ``keys`` of an ``.npz`` file of the pack (a small index), read whole.
    FileNotFoundError if missing."""
    source = files.path / name if isinstance(files, LocalPackFiles) else None
    data = source if source is not None else io.BytesIO(files.read_bytes(name))
    with np.load(data, allow_pickle=False) as npz:
        return {k: npz[k] for k in keys}
