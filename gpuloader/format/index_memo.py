"""Sample indexes remembered within a process: a repeated construction of one dataset checks
the stamps of what the first one read instead of reading it again.

What :func:`~gpuloader.format.index.build_index` returns depends only on what it read:
``metadata.json`` and ``splits.json``, the ray tree's folders (the root, each ``level_<L>/``,
each ``level_<L>/<hh>/``), each kept ray file's header, each kept voxel file (an ``lstat``)
and one voxel header per level, the folders above the voxel files (the dataset root,
``objects/``, ``subvolumes/``, ``subvolumes/level_<L>/``) and ``processing_summary.json``
(or its absence). A file added, removed, renamed, rewritten or made a link, or a
permission changed, moves the stamp (size, mtime, ctime, inode, and for an ``lstat`` the
mode) of the file or of its folder.

A build is remembered only when it recorded no error and warned nothing, read no
subdivision map, met no symlinked ray or voxel file, and every stamp had settled (unchanged
for :data:`~gpuloader.format.header_cache.SETTLE_S` seconds, so a later write moves it). The
next build with the same arguments (the roots as their real paths) stats each input again:
all unchanged, it returns a copy of the samples; any difference builds afresh. The header
cache's switch turns this off too (``GPULOADER_CACHE_DIR=off``). At most :data:`MAX_INDEXES`
indexes are kept, the least recently used dropped first.
"""

from __future__ import annotations

import os
import stat
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from gpuloader.format import header_cache
from gpuloader.format.completeness import SUMMARY
from gpuloader.format.header_cache import is_settled

__all__ = ["MAX_INDEXES", "Inputs", "recall", "remember", "memo_key"]

#: indexes kept per process
MAX_INDEXES = 32

#: a stamp: (size, mtime_ns, ctime_ns, inode[, mode]); None: the path did not exist
Stamp = tuple[int, ...] | None

_MEMO: OrderedDict[tuple, tuple[list[dict[str, Any]], tuple[tuple[str, bool, Stamp], ...]]]
_MEMO = OrderedDict()


def memo_key(
    dataset_dir: os.PathLike | str,
    ray_dataset_dir: os.PathLike | str,
    split: str,
    levels: Sequence[int] | None,
    include_empty: bool,
    isolation: str,
    allow_outside: bool,
) -> tuple:
    """The arguments a build depends on: the roots as given (the samples' paths are spelt
    so), with the working folder where one is relative, and resolved (a root link moved
    elsewhere is another dataset)."""
    wanted = None if levels is None else tuple(sorted({int(lv) for lv in levels}))
    given = (os.fspath(dataset_dir), os.fspath(ray_dataset_dir))
    relative = not all(os.path.isabs(g) for g in given)
    return (
        *given,
        os.getcwd() if relative else None,
        os.path.realpath(dataset_dir),
        os.path.realpath(ray_dataset_dir),
        split,
        wanted,
        bool(include_empty),
        isolation,
        bool(allow_outside),
    )


def _stamp(path: str, follow: bool) -> tuple[Stamp, bool]:
    """``(stamp, settled)`` of ``path`` now: ``file_stamp``'s (``os.stat``), or with
    ``follow`` False the ``lstat`` with the mode; ``(None, True)`` when it does not exist."""
    if follow:
        got = header_cache.file_stamp(path)
        return (None, True) if got is None else (tuple(got[0]), got[1])
    try:
        st = os.lstat(path)
    except OSError:
        return None, True
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode), is_settled(st)


class Inputs:
    """What one build read, with stamps; :attr:`usable` turns False at the first input that
    rules remembering out (unsettled, a link, an error), or at once by :meth:`refuse`."""

    def __init__(self) -> None:
        self.stamps: dict[str, tuple[bool, Stamp]] = {}
        self.usable = True

    def refuse(self) -> None:
        """This build is not to be remembered."""
        self.usable = False

    def add(self, path: str, stamp: Stamp, settled: bool, follow: bool = True) -> None:
        """An input and the stamp it had when read (a file that is missing: None)."""
        if not self.usable:
            return
        if not settled:
            self.usable = False
            return
        self.stamps[path] = (follow, stamp)

    def stat(self, paths: Iterable[str]) -> None:
        """Inputs stamped now (``os.stat``; a missing one recorded as absent)."""
        for p in paths:
            self.add(p, *_stamp(p, True))

    def add_lstat(self, path: str, st: os.stat_result) -> None:
        """A voxel file by its ``lstat``: a link rules remembering out (its target may move
        without the link)."""
        if not self.usable:
            return
        if stat.S_ISLNK(st.st_mode):
            self.usable = False
            return
        stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode)
        self.add(path, stamp, is_settled(st), follow=False)

    def add_seen(self, seen: dict[str, list[int] | None]) -> None:
        """The header cache's stamps of the files and folders it was asked about (None: not
        settled, or a folder it did not learn)."""
        for path, got in seen.items():
            self.add(path, None if got is None else tuple(got), got is not None)

    def note_build(
        self,
        seen: dict[str, list[int] | None],
        dataset_dir: os.PathLike | str,
        ray_dataset_dir: os.PathLike | str,
        voxel_paths: Iterable[os.PathLike | str],
    ) -> None:
        """Stamp, at the end of a build, what it read besides the voxel files' ``lstat``
        (module doc): the header cache's files and folders (``seen``), the JSON files, the
        ray tree's root and level folders, the tracer's summary, the folders above the
        voxel files."""
        self.add_seen(seen)
        if not self.usable:
            return
        root, data = os.fspath(ray_dataset_dir), os.fspath(dataset_dir)
        try:
            with os.scandir(root) as it:
                levels = [e.path for e in it if e.name.startswith("level_")]
        except OSError:
            self.usable = False
            return
        above = {os.path.dirname(os.path.dirname(os.fspath(v))) for v in voxel_paths}
        self.stat([root, *levels, os.path.join(root, SUMMARY)])
        self.stat([data, *(os.path.join(data, n) for n in ("metadata.json", "splits.json"))])
        self.stat([os.path.join(data, "objects"), os.path.join(data, "subvolumes"), *above])


def remember(key: tuple, samples: list[dict[str, Any]], inputs: Inputs) -> None:
    """Keep ``samples`` for ``key`` when ``inputs`` allow it."""
    if not inputs.usable or not inputs.stamps:
        _MEMO.pop(key, None)
        return
    deps = tuple((p, follow, s) for p, (follow, s) in inputs.stamps.items())
    _MEMO[key] = (_copy(samples), deps)
    _MEMO.move_to_end(key)
    while len(_MEMO) > MAX_INDEXES:
        _MEMO.popitem(last=False)


def recall(key: tuple) -> list[dict[str, Any]] | None:
    """A copy of the samples remembered for ``key`` when every input's stamp is unchanged;
    else None (and the entry is dropped)."""
    got = _MEMO.get(key)
    if got is None:
        return None
    samples, deps = got
    for path, follow, stamp in deps:
        if _stamp(path, follow)[0] != stamp:
            del _MEMO[key]
            return None
    _MEMO.move_to_end(key)
    return _copy(samples)


def _copy(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Samples whose dicts and ``object_ids`` lists a caller may change (paths are
    immutable)."""
    return [{**s, "object_ids": list(s["object_ids"])} for s in samples]
