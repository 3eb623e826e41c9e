"""Paths and small file helpers of the on-disk format (shared/format.md).

Two roots: the voxel side (``dataset/``) and the ray side (``ray_dataset_hierarchical/``).
Every other module asks this one where a file lives, so the layout is written down once.

Confinement: the format makes paths of object IDs and of names found under the roots, so
:func:`is_plain_name` tells a usable ID from a path, :class:`RootGuard` tells whether a path
really (through symlinks) lies inside its root, and :func:`walk_level_tree` lists the
``level_<L>/<hh>/`` files of a root, refusing folders it cannot list (a symlink loop, no
permission) and, unless allowed, links that lead outside the root.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gpuloader import schema
from gpuloader.errors import FileCheckError, OutsideRootError, UnreadableFileError
from gpuloader.format.npz_files import unreadable_error

#: Keys of a ray file that carry one row per ray.
RAY_ROW_KEYS: tuple[str, ...] = schema.RAY_FIELDS
#: Scalar provenance keys of a ray file.
RAY_SCALAR_KEYS: tuple[str, ...] = ("grid_shape", "voxel_size", "hash", "level", "sampling_mode")
#: dtype of each per-ray key, as written upstream.
RAY_DTYPES: dict[str, np.dtype] = schema.DISK_DTYPES
#: Keys of one subdivision_map.json record (one per octant at every level).
SUBDIVISION_RECORD_KEYS: tuple[str, ...] = (
    "object_id",
    "level",
    "octant_index",
    "position_x",
    "position_y",
    "position_z",
    "global_position_x",
    "global_position_y",
    "global_position_z",
    "hash",
    "is_empty",
)
#: Face ids: 0 -x, 1 +x, 2 -y, 3 +y, 4 -z, 5 +z.
FACE_NAMES: tuple[str, ...] = ("-x", "+x", "-y", "+y", "-z", "+z")


def object_name(object_id: int | str) -> str:
    """Object ID as written in folder names: ``7 -> "0007"``."""
    return f"{int(object_id):04d}" if not isinstance(object_id, str) else object_id


def object_dir(dataset_dir: Path, object_id: int | str) -> Path:
    return Path(dataset_dir) / "objects" / f"object_{object_name(object_id)}"


def level0_voxel_path(dataset_dir: Path, object_id: int | str) -> Path:
    """``dataset/objects/object_<ID>/level_0.npz``."""
    return object_dir(dataset_dir, object_id) / "level_0.npz"


def subvolume_voxel_path(dataset_dir: Path, level: int, hash_: str) -> Path:
    """``dataset/subvolumes/level_<L>/<hh>/<hash>.npz`` (L >= 1)."""
    # one parse of the joined text (the index builds one per file; pathlib joins cost more)
    return Path(f"{os.fspath(dataset_dir)}/subvolumes/level_{level}/{hash_[:2]}/{hash_}.npz")


def voxel_path(dataset_dir: Path, level: int, hash_: str) -> Path:
    """Voxel file of a sample; at level 0 ``hash_`` is the object ID (as upstream)."""
    if level == 0:
        return level0_voxel_path(dataset_dir, hash_)
    return subvolume_voxel_path(dataset_dir, level, hash_)


def ray_path(ray_dir: Path, level: int, hash_: str) -> Path:
    """``ray_dataset_hierarchical/level_<L>/<hh>/<hash or ID>_rays.npz``."""
    return Path(f"{os.fspath(ray_dir)}/level_{level}/{hash_[:2]}/{hash_}_rays.npz")


def parse_ray_filename(path: Path) -> tuple[int, str]:
    """``.../level_3/ab/abcd..._rays.npz -> (3, "abcd...")``."""
    path = Path(path)
    level = int(path.parent.parent.name.split("_", 1)[1])
    return level, path.name[: -len("_rays.npz")]


def is_plain_name(name: Any) -> bool:
    """Whether ``name`` is one plain path component: a non-empty str, not ``.`` or ``..``,
    without ``/``, ``\\`` or NUL (so ``object_<name>`` stays inside ``objects/``)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in ("/", "\\", "\0"))
    )


class RootGuard:
    """Where paths under ``root`` really lead (symlinks followed); folders are resolved once.

    ``outside(path)`` is the resolved target of ``path`` when it lies outside the resolved
    root, else None. ``name`` says which root it is in messages (``"dataset"``).
    """

    def __init__(self, root: Path | str, name: str = "dataset") -> None:
        self.root = Path(root)
        self.name = name
        self.real = os.path.realpath(self.root)
        self._prefix = self.real.rstrip(os.sep) + os.sep
        self._dirs: dict[str, str] = {}
        self._dirs_inside: dict[str, bool] = {}  # folder -> its real path is inside the root
        self._asked: dict[str, int] = {}  # parent -> folders of it asked about
        self._links: dict[str, set[str] | bool] = {}  # parent -> names of its links

    def _inside(self, real: str) -> bool:
        return real == self.real or real.startswith(self._prefix)

    def outside(self, path: Path | str, is_link: bool | None = None) -> str | None:
        """The real target of ``path`` if it resolves outside the root (else None);
        ``is_link``: whether ``path`` is a symlink, when the caller's lstat already says."""
        text = os.fspath(path)
        parent, leaf = os.path.split(text)
        if os.path.islink(text) if is_link is None else is_link:
            real = os.path.realpath(text)
            return None if self._inside(real) else real
        inside = self._dirs_inside.get(parent)
        if inside is None:
            inside = self._dirs_inside[parent] = self._inside(self._real_dir(parent) + os.sep)
        if inside and leaf not in ("", ".", ".."):  # a plain name in a folder inside
            return None
        real = os.path.join(self._real_dir(parent), leaf)  # cached by the lookup above
        return None if self._inside(real) else real

    def _real_dir(self, folder: str) -> str:
        """``os.path.realpath(folder)``, built from the cached real parent when ``folder``'s
        last part is a plain name and not a link (one lstat instead of one per part)."""
        real = self._dirs.get(folder)
        if real is None:
            parent, leaf = os.path.split(folder)
            if (
                parent
                and parent != folder
                and leaf not in ("", ".", "..")
                and not self._is_link(folder, parent, leaf)
            ):
                real = os.path.join(self._real_dir(parent), leaf)
            else:
                real = os.path.realpath(folder)
            self._dirs[folder] = real
        return real

    def _is_link(self, folder: str, parent: str, leaf: str) -> bool:
        """``os.path.islink(folder)``; from the second folder asked of one parent, the
        parent is listed once instead (d_type: one ``scandir`` for its links, not one
        ``lstat`` per folder: a voxel tree has one folder per hash prefix)."""
        links = self._links.get(parent)
        if links is None:
            asked = self._asked[parent] = self._asked.get(parent, 0) + 1
            if asked < 2:
                return os.path.islink(folder)
            try:
                with os.scandir(parent) as it:
                    links = {e.name for e in it if e.is_symlink()}
            except OSError:
                links = False  # cannot be listed (searchable only): one lstat each
            self._links[parent] = links
        return leaf in links if links is not False else os.path.islink(folder)

    def error(self, path: Path | str, target: str) -> OutsideRootError:
        """The named error of ``path`` (a file or folder) that resolves to ``target``."""
        detail = f"resolves to {target}, outside the {self.name} root {self.root}"
        return OutsideRootError(
            f"{path}: {detail}; copy the file into the {self.name} folder instead of linking "
            "it, or allow links out of the roots explicitly (allow_outside=True)",
            path=path,
            detail=detail,
        )

    def check(self, path: Path | str) -> None:
        """Raise :meth:`error` when ``path`` resolves outside the root."""
        target = self.outside(path)
        if target is not None:
            raise self.error(path, target)


class FolderMemory(Protocol):
    """Remembered folder listings (:class:`~gpuloader.format.header_cache.HeaderCache`)."""

    def folder(self, path: str) -> tuple[list[str] | None, list[int] | None]: ...

    def remember_folder(self, path: str, stamp: list[int] | None, names: list[str]) -> None: ...


def folder_error(path: Path | str, exc: OSError) -> FileCheckError:
    """The named error of a folder of a level tree that cannot be listed."""
    got = unreadable_error(path, exc)
    reason = got.detail if got is not None else f"{type(exc).__name__}: {exc.strerror or exc}"
    detail = f"folder cannot be listed ({reason})"
    return UnreadableFileError(
        f"{path}: {detail}; the files under it cannot be read: fix or remove the folder "
        "(a symlink loop: point the link at the real folder)",
        path=path,
        detail=detail,
    )


def walk_level_tree(
    root: Path | str,
    suffix: str,
    errors: list[tuple[str, BaseException]] | None = None,
    allow_outside: bool = False,
    what: str = "ray tree",
    remembered: FolderMemory | None = None,
    as_text: bool = False,
) -> list[tuple[int, str, Path]] | list[tuple[int, str, str]]:
    """Files ``root/level_<L>/<hh>/<name><suffix>`` (not hidden): sorted ``(level, name,
    path)``. Only names are read (``os.scandir``); files are not opened. ``remembered``
    (a :class:`~gpuloader.format.header_cache.HeaderCache`) gives the names of an unchanged
    ``<hh>`` folder without listing it, and learns the others (those holding no symlink).
    ``as_text``: paths as ``str`` (the caller makes a ``Path`` of only those it keeps).

    A folder that cannot be listed (a symlink loop, no permission) and, unless
    ``allow_outside``, a folder or file that a symlink leads outside ``root``: with
    ``errors`` None the named error is raised (:class:`UnreadableFileError`,
    :class:`OutsideRootError`); with a list it is left out and ``(path, error)`` appended.
    Entries whose names are not of the tree (``notes.txt``, ``level_x``) are ignored;
    ``what`` names the root in messages.
    """
    root = Path(root)
    guard = None if allow_outside else RootGuard(root, what)

    def refuse(exc: FileCheckError) -> None:
        if errors is None:
            raise exc
        errors.append((str(exc.path), exc))

    def usable(entry: os.DirEntry, want_dir: bool) -> bool:
        try:
            if want_dir and not entry.is_dir():
                return False
        except OSError as exc:  # a symlink loop (is_dir follows links)
            refuse(folder_error(entry.path, exc))
            return False
        if guard is not None and entry.is_symlink():
            target = guard.outside(entry.path)
            if target is not None:
                refuse(guard.error(entry.path, target))
                return False
        return True

    def listing(path: str) -> list[os.DirEntry] | None:
        """The entries of ``path``; None when it cannot be listed (refused)."""
        try:
            with os.scandir(path) as it:
                return list(it)
        except OSError as exc:
            if path == str(root):
                raise folder_error(path, exc) from exc
            refuse(folder_error(path, exc))
            return None

    found_text: list[tuple[int, str, str]] = []
    cut = -len(suffix)
    for top in sorted(listing(str(root)) or (), key=lambda e: e.name):
        level_text = top.name[len("level_") :]
        if not (top.name.startswith("level_") and level_text.isascii() and level_text.isdigit()):
            continue
        if not usable(top, True):
            continue
        level = int(level_text)
        for prefix in sorted(listing(top.path) or (), key=lambda e: e.name):
            if not usable(prefix, True):
                continue
            names, stamp = remembered.folder(prefix.path) if remembered else (None, None)
            if names is not None:  # unchanged since it was listed: plain files only
                base = prefix.path + os.sep
                found_text.extend((level, n[:cut], base + n) for n in names)
                continue
            entries = listing(prefix.path)
            plain: list[str] | None = [] if entries is not None else None  # None: not learnt
            for f in entries or ():
                name = f.name
                if name.startswith(".") or not name.endswith(suffix):
                    continue
                link = f.is_symlink()
                if link:
                    plain = None  # a link's target may change: list this folder every time
                elif plain is not None:
                    plain.append(name)
                # a plain file needs no check (d_type says it is no link): the common case
                if (guard is None or not link) or usable(f, False):
                    found_text.append((level, name[:cut], f.path))
            if remembered is not None and plain is not None:
                remembered.remember_folder(prefix.path, stamp, plain)
    found_text.sort()
    if as_text:
        return found_text
    return [(lv, name, Path(path)) for lv, name, path in found_text]


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@functools.cache
def _file_mode() -> int:
    """The mode ``open()`` would give a new file (mkstemp alone gives 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never half a file.

    A file that already holds exactly ``data`` is left as it is: a resumed run that changes
    nothing moves no stamp (the index memo and header cache of readers stay valid)."""
    path = Path(path)
    if _holds(path, data):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _holds(path: Path, data: bytes) -> bool:
    """Whether ``path`` is a regular file (not a link) whose bytes are ``data``."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size != len(data):
            return False
        with open(path, "rb") as f:
            return f.read(len(data) + 1) == data
    except OSError:
        return False


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_savez_compressed(path: Path, **arrays: Any) -> None:
    """``numpy.savez_compressed`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
