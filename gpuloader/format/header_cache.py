"""Array headers of ray files, remembered between runs.

Building the sample index reads the ``origins`` header of every ray file (a zip open and a
few hundred inflated bytes each: two-thirds of the construction time on a small dataset).
:class:`HeaderCache` keeps the shape and dtype it read, keyed by the file's path, size,
mtime, ctime and inode, in one JSON file per ray dataset under the user's cache folder. A file
whose size, mtime, ctime or inode changed is read again (ctime cannot be set back, so a file
rewritten in place with its old size and mtime restored is still seen); one changed in the
last :data:`SETTLE_S` seconds is read but not remembered (its times may not yet tell two
writes apart): :func:`file_stamp`, which the stores' remembered value checks use too. Only
headers that passed every check are remembered, and the checks on the shape run on the
remembered value too: a cached entry never hides a damaged file that a fresh read would
report.

The same file remembers the ray tree's folder listings (the names of ``*_rays.npz`` in each
``level_<L>/<hh>/``), keyed by the folder's mtime, ctime and inode: a listing changes only
when an entry is added, removed or renamed, which moves the folder's times, so one ``stat``
replaces a ``scandir``. A folder that holds a symlinked ray file, or changed in the last
:data:`SETTLE_S` seconds, is listed every time. Within a process the parsed file is kept while
its own size, mtime and inode stay the same (a second construction parses nothing).

The folder is ``$GPULOADER_CACHE_DIR`` (``off`` or empty: no cache), else
``$XDG_CACHE_HOME/gpuloader``, else ``~/.cache/gpuloader``. A folder that cannot be written
only costs the speed-up.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from gpuloader.format.listing import npz_member_header

__all__ = ["SETTLE_S", "HeaderCache", "cache_folder", "file_stamp", "is_settled"]

SETTLE_S = 2.0
"""A file modified this recently is read, not remembered (coarse mtime granularity)."""

_VERSION = 3

#: cache file -> (its stamp, its parsed ``files`` and ``folders``): what this process read or
#: wrote last, reused while the file is unchanged
_LOADED: dict[str, tuple[tuple[int, ...], dict[str, list], dict[str, list]]] = {}


def file_stamp(path: Path | str) -> tuple[list[int], bool] | None:
    """``([size, mtime_ns, ctime_ns, inode], settled)`` of a file, None when it cannot be
    stat'ed; ``settled``: unchanged for :data:`SETTLE_S` seconds, so its stamp may be trusted
    to tell a later write apart."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino], is_settled(st)


def is_settled(st: os.stat_result) -> bool:
    """Whether a file (its ``stat`` or ``lstat``) has been unchanged for :data:`SETTLE_S`
    seconds: a later write then moves its times."""
    return time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > SETTLE_S * 1e9


def cache_folder() -> Path | None:
    """The user's gpuloader cache folder, or None when ``GPULOADER_CACHE_DIR`` is off."""
    env = os.environ.get("GPULOADER_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "gpuloader" if xdg else Path.home() / ".cache" / "gpuloader"


class HeaderCache:
    """``(shape, dtype)`` of npz members under one ray dataset, remembered across runs.

    Use :meth:`header` as :func:`~gpuloader.format.listing.npz_member_header`, then
    :meth:`save` once.
    """

    def __init__(self, ray_dataset_dir: Path | str) -> None:
        root = cache_folder()
        self.file: Path | None = None
        self._entries: dict[str, list] = {}
        self._folders: dict[str, list] = {}  # folder -> [*file_stamp, names]
        self._changed = False
        #: every file and folder asked about -> its stamp (None: not settled, or a folder not
        #: learnt); what a remembered index checks (:mod:`gpuloader.format.index_memo`)
        self.seen: dict[str, list[int] | None] = {}
        if root is None:
            return
        base = str(Path(ray_dataset_dir).resolve())
        digest = hashlib.sha1(base.encode()).hexdigest()[:16]
        self.file = root / "headers" / f"{digest}.json"
        self._root = base
        stamp = _own_stamp(self.file)
        known = _LOADED.get(str(self.file))
        if stamp is not None and known is not None and known[0] == stamp:
            self._entries, self._folders = known[1], known[2]
            return
        try:
            data = json.loads(self.file.read_text())
            if data.get("version") == _VERSION and data.get("root") == base:
                self._entries = dict(data["files"])
                self._folders = dict(data.get("folders") or {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self._entries, self._folders = {}, {}  # none yet, or unreadable: start afresh
        if stamp is not None:
            _LOADED[str(self.file)] = (stamp, self._entries, self._folders)

    def header(self, path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of ``key`` in ``path``: remembered when the file is unchanged.

        Raises what :func:`~gpuloader.format.listing.npz_member_header` raises.
        """
        if self.file is None:
            return npz_member_header(path, key)
        got = file_stamp(path)
        if got is None:
            return npz_member_header(path, key)  # raises the named error
        stamp, settled = got
        name = os.fspath(path)
        if not name.startswith(os.sep):
            name = os.path.abspath(name)
        self.seen[name] = stamp if settled else None
        entry = self._entries.get(name)
        if not (isinstance(entry, list) and entry[:4] == stamp and isinstance(entry[4], dict)):
            entry = None
        remembered = _decode(entry[4].get(key)) if entry is not None else None
        if remembered is not None:
            return remembered
        shape, dtype = npz_member_header(path, key)
        if settled:
            if entry is None:
                entry = [*stamp, {}]
                self._entries[name] = entry
            entry[4][key] = [list(shape), dtype.str]
            self._changed = True
        return shape, dtype

    def save(self) -> None:
        """Write what was learnt (atomically); a folder that cannot be written is skipped."""
        if self.file is None or not self._changed:
            return
        payload = {
            "version": _VERSION,
            "root": self._root,
            "files": self._entries,
            "folders": self._folders,
        }
        tmp = self.file.with_name(f"{self.file.name}.{os.getpid()}.tmp")
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(payload, separators=(",", ":")))
            os.replace(tmp, self.file)
            stamp = _own_stamp(self.file)
            if stamp is not None:
                _LOADED[str(self.file)] = (stamp, self._entries, self._folders)
        except OSError:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # the folder itself is missing or not a folder
        self._changed = False

    def folder(self, path: str) -> tuple[list[str] | None, list[int] | None]:
        """``(names, stamp)`` of folder ``path``: the names remembered for it (None when
        unknown or the folder changed since), and the stamp to pass to
        :meth:`remember_folder` after listing it (None: not to be remembered, it changed in
        the last :data:`SETTLE_S` seconds, cannot be stat'ed, or there is no cache)."""
        if self.file is None:
            return None, None
        got = file_stamp(path)
        if got is None:
            return None, None
        stamp, settled = got
        entry = self._folders.get(path)
        if isinstance(entry, list) and len(entry) == 5 and entry[:4] == stamp:
            names = entry[4]
            if isinstance(names, list) and all(isinstance(n, str) for n in names):
                self.seen[path] = stamp
                return names, None
        self.seen[path] = None  # until it is learnt (remember_folder)
        return None, (stamp if settled else None)

    def remember_folder(self, path: str, stamp: list[int] | None, names: list[str]) -> None:
        """Remember ``names`` as the listing of folder ``path`` taken after ``stamp`` (from
        :meth:`folder`; None: nothing is remembered)."""
        if stamp is None or self.file is None:
            return
        self.seen[path] = stamp
        self._folders[path] = [*stamp, list(names)]
        self._changed = True


def _own_stamp(file: Path) -> tuple[int, ...] | None:
    """The cache file's own :func:`file_stamp` (its last write need not have settled: this
    process wrote or read it), None when it cannot be stat'ed."""
    got = file_stamp(file)
    return None if got is None else tuple(got[0])


@functools.lru_cache(maxsize=64)
def _dtype(text: str) -> np.dtype:
    """``np.dtype(text)``, made once per text."""
    return np.dtype(text)


def _decode(value: object) -> tuple[tuple[int, ...], np.dtype] | None:
    """A remembered ``[shape, dtype.str]``, or None when absent or malformed."""
    try:
        shape, dtype = value  # type: ignore[misc]
        return tuple(map(int, shape)), _dtype(dtype)
    except (TypeError, ValueError):
        return None
