"""StripeCache: fetched byte spans of remote packs in a local folder, bounded in bytes, LRU.

One file per entry, named by the sha256 of its key; an entry's mtime is its last use
(set on put and on every hit), so the order survives restarts and is shared by every
process of a node using the same folder. Writes go to a temporary file first and are
``os.replace``-d into place: a reader sees a whole entry or none, and two processes
putting the same key both succeed (the last one's file stays, with the same bytes).
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

__all__ = ["StripeCache"]

_SUFFIX = ".bin"
_TMP = ".tmp-"
_STALE_TMP_S = 3600.0  # temporary files older than this were left by a crashed process


class StripeCache:
    """A folder of cached spans holding at most ``max_bytes`` bytes of entries.

    Args:
        folder: created if missing; may be shared by processes on one node.
        max_bytes: the bound on the entries' total bytes (> 0); an entry larger than it is
            not stored.
    """

    def __init__(self, folder: Path | str, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(
                f"StripeCache max_bytes must be a positive int (bytes); got {max_bytes!r}"
            )
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"StripeCache({str(self.folder)!r}, max_bytes={self.max_bytes})"

    def path(self, key: str) -> Path:
        """The entry file of ``key``."""
        return self.folder / (hashlib.sha256(key.encode()).hexdigest() + _SUFFIX)

    def get(self, key: str, out: memoryview) -> bool:
        """Fill ``out`` (writable bytes) with entry ``key`` and mark it used; False (``out``
        untouched or partly written) when there is no entry of exactly ``out.nbytes``."""
        out = memoryview(out).cast("B")
        path = self.path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                if os.fstat(f.fileno()).st_size != out.nbytes:
                    return False
                got = 0
                while got < out.nbytes:
                    n = f.readinto(out[got:])
                    if not n:
                        return False
                    got += n
        except FileNotFoundError:
            return False
        _touch(path)
        return True

    def put(self, key: str, data: bytes | bytearray | memoryview) -> bool:
        """Store ``data`` as entry ``key`` (atomically), then evict the least recently used
        entries until the total is at most ``max_bytes``. False: larger than ``max_bytes``,
        not stored."""
        view = memoryview(data).cast("B")
        if view.nbytes > self.max_bytes:
            return False
        path = self.path(key)
        tmp = self.folder / f"{_TMP}{path.stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(view)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        _touch(path)
        self._evict(keep=path)
        return True

    @property
    def total_bytes(self) -> int:
        """Bytes of all entries now in the folder."""
        return sum(size for _, _, size in self._entries())

    def _entries(self) -> list[tuple[int, str, int]]:
        """(mtime ns, name, bytes) of every entry; stale temporary files are removed."""
        out = []
        now = time.time()
        with os.scandir(self.folder) as it:
            for e in it:
                try:
                    st = e.stat()
                    if e.name.endswith(_SUFFIX) and not e.name.startswith(_TMP):
                        out.append((st.st_mtime_ns, e.name, st.st_size))
                    elif e.name.startswith(_TMP) and now - st.st_mtime > _STALE_TMP_S:
                        os.unlink(e.path)
                except FileNotFoundError:  # another process evicted or renamed it
                    continue
        return out

    def _evict(self, keep: Path) -> None:
        entries = sorted(self._entries())
        total = sum(size for _, _, size in entries)
        for _, name, size in entries:
            if total <= self.max_bytes:
                break
            if name == keep.name:
                continue
            try:
                os.unlink(self.folder / name)
            except FileNotFoundError:
                pass
            total -= size


def _touch(path: Path) -> None:
    """Set the mtime to now with ns resolution (the kernel's own stamps are coarser)."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except FileNotFoundError:  # evicted meanwhile by another process
        pass
