"""The ray pack's format: constants, layout, manifest, source files and the staleness check.

A pack is an uncompressed, memory-mapped copy of a ray tree (:mod:`~gpuloader.stores.pack.build`
writes it, :mod:`~gpuloader.stores.pack.store` reads it). Layout of a pack folder::

    manifest.json                 written last: format, pack_id, source root, source files
                                  (relative path, size, mtime_ns, sha256), per-level totals,
                                  on_error, bad_files (files left out as bad) and
                                  refused (folders or links of the tree left out)
    level_<L>/origins.npy         (N_L, 3) float32   rays of every file of level L, file
    level_<L>/directions.npy      (N_L, 3) float32   after file in hash order
    level_<L>/distances.npy       (N_L,)   float32
    level_<L>/hits.npy            (N_L,)   uint8
    level_<L>/face_ids.npy        (N_L,)   int32
    level_<L>/view_ids.npy        (N_L,)   int32
    level_<L>/view_positions.npy  (V_L, 3) float32   views of every file, same order
    level_<L>/index.npz           hashes (K,) str; offsets (K, 4) int64 =
                                  (ray start, ray count, view start, view count); pack_id

A folder without ``manifest.json`` is refused (:func:`read_manifest`). That is the ``"rows"``
layout (format version 1; its manifest has no ``layout`` key). A pack built with
``layout="striped"`` (format version 2, ``"layout": "striped"``) holds the same rays as
stripes plus the voxel grids; its files are described in :mod:`gpuloader.stores.pack.striped`.
Its manifest also records ``stripe_rays``, ``seed``, ``dataset_dir`` (the voxel side) and
``voxel_files`` (relative path -> size, mtime_ns, sha256), which the staleness check compares
as it does the ray files.

Staleness (:func:`check_pack`): ``check="fast"`` compares the manifest's file list, sizes and
mtimes with the ray tree; ``"full"`` also re-hashes every source file; ``"none"`` trusts the
pack (the source may even be gone). A stale pack raises :class:`StalePackError` naming the
first changed files and the command that rebuilds it. The fast check (a store's default on
open) cannot see a file rewritten to the same size with its mtime set back (``touch -d``,
``cp -p``, a clock reset); ``gpuloader pack`` on an existing pack runs the fast and then the
full check, so it calls a pack up to date only when content matches too.

A bad file a pack left out (``on_error="skip"``) keeps its error in the manifest as a plain
record (:func:`error_record`); :func:`recorded_error` makes the named error again from it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from gpuloader import errors as _errors
from gpuloader import schema
from gpuloader.errors import (
    DamagedFileError,
    DatasetLayoutError,
    FileCheckError,
    IncompletePackError,
    StalePackError,
)
from gpuloader.format import layout
from gpuloader.format.layout import sha256_file
from gpuloader.format.listing import scan_ray_tree
from gpuloader.stores.files import LocalPackFiles, PackFiles

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX",
    "LAYOUTS",
    "MANIFEST",
    "PACK_KEYS",
    "STRIPED_FORMAT_VERSION",
    "Check",
    "Layout",
    "check_pack",
    "error_record",
    "file_stat",
    "file_stat_any",
    "is_readable",
    "level_dir",
    "manifest_rebuild",
    "pack_layout",
    "read_manifest",
    "rebuild_command",
    "recorded_error",
    "relative_name",
    "sha256_file",
    "source_files",
]

FORMAT_NAME = "gpuloader-ray-pack"
FORMAT_VERSION = 1
#: format version of a striped pack (``"layout": "striped"`` in its manifest)
STRIPED_FORMAT_VERSION = 2
#: the layouts of a pack: ``"rows"`` (row arrays, version 1) and ``"striped"`` (version 2)
LAYOUTS: tuple[str, ...] = ("rows", "striped")
_VERSION_OF = {"rows": FORMAT_VERSION, "striped": STRIPED_FORMAT_VERSION}
MANIFEST = "manifest.json"
INDEX = "index.npz"
#: Arrays of a level: the per-ray fields in batch order, then ``view_positions`` (the order
#: NpzRayStore returns them).
PACK_KEYS: tuple[str, ...] = schema.SAMPLE_FIELDS
Check = Literal["fast", "full", "none"]
Layout = Literal["rows", "striped"]
_SHOW = 5  # changed files named in a staleness message


# ------------------------------------------------------------------------------ paths, files


def level_dir(root: Path, level: int) -> Path:
    """The folder of level ``level`` in pack ``root``: ``root/level_<L>``."""
    return Path(root) / f"level_{int(level)}"


def relative_name(root: Path, path: Path) -> str:
    """``path`` relative to ``root``, with ``/`` (a manifest's file key)."""
    return Path(path).relative_to(root).as_posix()


def rebuild_command(
    source: Any,
    pack_dir: Any,
    levels: Sequence[int] | None,
    layout: str = "rows",
    stripe_rays: int | None = None,
    seed: int | None = None,
    dataset_dir: Any = None,
) -> str:
    """The ``gpuloader pack ... --force`` command that rebuilds ``pack_dir`` from ``source``
    (a striped pack's adds ``--layout striped --stripe-rays W``, then ``--seed`` and
    ``--dataset-dir`` where given)."""
    cmd = f"gpuloader pack {source} {pack_dir} --force"
    if levels is not None:
        cmd += " --levels " + " ".join(str(lv) for lv in levels)
    if layout != "rows":
        cmd += f" --layout {layout}"
        if stripe_rays is not None:
            cmd += f" --stripe-rays {int(stripe_rays)}"
        if seed:
            cmd += f" --seed {int(seed)}"
        if dataset_dir is not None:
            cmd += f" --dataset-dir {dataset_dir}"
    return cmd


def pack_layout(manifest: dict[str, Any]) -> str:
    """The layout of a pack from its manifest: ``"rows"`` (no ``layout`` key) or
    ``"striped"``."""
    return str(manifest.get("layout", "rows"))


def manifest_rebuild(
    manifest: dict[str, Any], pack_dir: Any, source: Any = None, dataset_dir: Any = None
) -> str:
    """:func:`rebuild_command` of the pack ``manifest`` describes (its layout and options;
    ``source``/``dataset_dir``: where the ray tree / voxel side now are, default recorded)."""
    striped = pack_layout(manifest) == "striped"
    return rebuild_command(
        manifest.get("source_root") if source is None else source,
        pack_dir,
        manifest.get("levels"),
        pack_layout(manifest),
        manifest.get("stripe_rays"),
        manifest.get("seed"),
        (manifest.get("dataset_dir") if dataset_dir is None else dataset_dir) if striped else None,
    )


def source_files(
    root: Path,
    levels: set[int] | None,
    errors: list[tuple[str, BaseException]] | None = None,
    allow_outside: bool = False,
) -> list[tuple[int, str, Path]]:
    """Ray files of ``root`` at ``levels`` (None: all): sorted ``(level, hash, path)``;
    ``errors``, ``allow_outside`` as :func:`~gpuloader.format.listing.scan_ray_tree` takes them.

    Raises:
        DatasetLayoutError: ``root`` is missing, or one (level, hash) has two files.
        UnreadableFileError, OutsideRootError: a refused folder or file (without ``errors``).
    """
    found = [
        t for t in scan_ray_tree(root, errors, allow_outside) if levels is None or t[0] in levels
    ]
    for (lv, h, p), (lv2, h2, p2) in zip(found, found[1:], strict=False):
        if (lv, h) == (lv2, h2):
            raise DatasetLayoutError(
                f"two ray files for level {lv}, hash {h}: {p} and {p2}; a file is misplaced "
                f"(the folder must be {h[:2]}/): remove the wrong one"
            )
    return found


def file_stat(path: Path) -> tuple[int, int]:
    """``(size, mtime_ns)`` of ``path`` (following links; OSError if it cannot be reached)."""
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def file_stat_any(path: Path) -> tuple[int, int]:
    """:func:`file_stat`, or the link's own size and mtime where the target cannot be reached
    (a symlink loop, a dangling link); OSError only when there is nothing at ``path``."""
    try:
        return file_stat(path)
    except OSError:
        st = os.lstat(path)
        return int(st.st_size), int(st.st_mtime_ns)


def is_readable(path: Path) -> bool:
    """Whether ``path`` can be opened for reading."""
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------ recorded errors


def error_record(exc: BaseException) -> dict[str, Any]:
    """What the manifest keeps of a bad file's error (plain JSON; no traceback): ``error``
    (class name), ``message`` (first line), ``key``, ``row``, ``detail``."""
    text = str(exc)
    return {
        "error": type(exc).__name__,
        "message": text.splitlines()[0] if text else type(exc).__name__,
        "key": getattr(exc, "key", None),
        "row": getattr(exc, "row", None),
        "detail": getattr(exc, "detail", None),
    }


def recorded_error(
    file: str, record: dict[str, Any], pack_dir: Path, fix: str, packed_as: str | None = None
) -> DamagedFileError:
    """The named error of a file a pack left out, re-created from its manifest record.

    Its class is the recorded one (from :mod:`gpuloader.errors`; DamagedFileError when that
    is not a damage error), so :func:`~gpuloader.format.validate.classify` calls it a bad
    file. First line: ``<file>: left out of ray pack <dir> ...: <original first line>``
    (``packed_as``, the file's name when it was packed, is not repeated).
    """
    cls = getattr(_errors, str(record.get("error")), None)
    if not (isinstance(cls, type) and issubclass(cls, DamagedFileError)):
        cls = DamagedFileError
    original = str(record.get("message", ""))
    for prefix in (f"{file}: ", f"{packed_as}: "):
        if original.startswith(prefix):
            original = original[len(prefix) :]
            break
    message = (
        f"{file}: left out of ray pack {pack_dir} when it was packed (on_error='skip'): "
        f"{record.get('error')}: {original}\n{fix}"
    )
    if issubclass(cls, FileCheckError):
        return cls(
            message,
            path=file,
            key=record.get("key"),
            row=record.get("row"),
            detail=record.get("detail"),
        )
    return cls(message)


# ------------------------------------------------------------------------------ manifest, staleness


def read_manifest(pack_dir: Path | str, files: PackFiles | None = None) -> dict[str, Any]:
    """``pack_dir/manifest.json``, checked for format and version (``files``: how to read the
    pack's files, e.g. a remote pack's; default: the folder on disk).

    Raises:
        IncompletePackError: no manifest (not a pack, or an interrupted build), unreadable,
            or another format version.
        RemoteStoreError: a remote pack that cannot be read (named by its URL).
    """
    if files is not None and files.remote:
        path: Any = files.where(MANIFEST)
        try:
            raw = files.read_bytes(MANIFEST)
        except FileNotFoundError as exc:
            raise IncompletePackError(
                f"{pack_dir}: has no manifest.json; it is not a complete ray pack (an "
                "interrupted upload?): upload it with `gpuloader pack RAY_DIR "
                f"{pack_dir} --force`"
            ) from exc
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise IncompletePackError(
                f"{path}: unreadable ({type(exc).__name__}: {exc}); upload the pack again"
            ) from exc
    else:
        pack_dir = Path(pack_dir)
        path = pack_dir / MANIFEST
        if not path.is_file():
            what = "does not exist" if not pack_dir.exists() else "has no manifest.json"
            raise IncompletePackError(
                f"{pack_dir}: {what}; it is not a complete ray pack (an interrupted "
                "`gpuloader pack`?): build it with `gpuloader pack RAY_DIR "
                f"{pack_dir} --force`"
            )
        try:
            manifest = layout.read_json(path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise IncompletePackError(
                f"{path}: unreadable ({type(exc).__name__}: {exc}); rebuild the pack with "
                f"`gpuloader pack RAY_DIR {pack_dir} --force`"
            ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise IncompletePackError(
            f"{path}: not a gpuloader ray pack manifest; rebuild it with "
            f"`gpuloader pack RAY_DIR {pack_dir} --force`"
        )
    layout_name = pack_layout(manifest)
    if layout_name not in _VERSION_OF:
        raise IncompletePackError(
            f"{path}: unknown pack layout {layout_name!r} (this gpuloader reads "
            f"{', '.join(LAYOUTS)}); rebuild it with `gpuloader pack RAY_DIR {pack_dir} --force`"
        )
    readable = _VERSION_OF[layout_name]
    if manifest.get("format_version") != readable:
        raise IncompletePackError(
            f"{path}: pack format version {manifest.get('format_version')}, this gpuloader "
            f"reads version {readable}"
            + ("" if layout_name == "rows" else f" for layout {layout_name!r}")
            + f"; rebuild it with `{manifest_rebuild(manifest, pack_dir)}`"
        )
    return manifest


def _check_array_files(
    pack_dir: Any, manifest: dict[str, Any], files: PackFiles | None = None
) -> None:
    """Every array and index file of the manifest exists with the size it was written with."""
    files = LocalPackFiles(pack_dir) if files is None else files
    for level, info in manifest["level_info"].items():
        folder = level_dir(Path("."), int(level)).name
        listed = files.sizes(folder) if hasattr(files, "sizes") else None
        for name, size in info["file_bytes"].items():
            rel = f"{folder}/{name}"
            if listed is not None:
                got = listed.get(name)
            else:
                try:
                    got = files.size(rel)
                except FileNotFoundError:
                    got = None
            if got != size:
                state = "missing" if got is None else f"{got} bytes, expected {size}"
                raise IncompletePackError(
                    f"{files.where(rel)}: {state}; the pack is damaged: rebuild it with "
                    f"`{manifest_rebuild(manifest, pack_dir)}`"
                )


def check_pack(
    pack_dir: Path | str,
    check: Check = "fast",
    ray_dataset_dir: Path | str | None = None,
    manifest: dict[str, Any] | None = None,
    dataset_dir: Path | str | None = None,
    files: PackFiles | None = None,
) -> dict[str, list[str]]:
    """Compare a pack with its ray tree; raise :class:`StalePackError` if they differ.

    Args:
        pack_dir: the pack folder.
        check: "fast" (file list, sizes, mtimes), "full" (also sha256 of each file) or
            "none" (only the pack's own files).
        ray_dataset_dir: the ray tree (default: the manifest's source root).
        manifest: the already-read manifest (read here if None).
        dataset_dir: a striped pack's voxel side (default: the manifest's ``dataset_dir``);
            its recorded voxel files are compared as the ray files are.
        files: how the pack's files are read (default: the folder on disk; a remote
            pack's :class:`~gpuloader.stores.files.PackFiles`).

    Returns:
        ``{"changed": [...], "missing": [...], "new": [...]}``, all empty (else it raises).

    Raises:
        IncompletePackError: no manifest, or pack arrays missing or truncated.
        StalePackError: the ray tree (or a striped pack's voxel side) is gone or differs
            from the manifest.
    """
    if files is None or not files.remote:
        pack_dir = Path(pack_dir)
    manifest = read_manifest(pack_dir, files) if manifest is None else manifest
    _check_array_files(pack_dir, manifest, files)
    diff: dict[str, list[str]] = {"changed": [], "missing": [], "new": []}
    if check == "none":
        return diff
    if check not in ("fast", "full"):
        raise ValueError(f"check must be 'fast', 'full' or 'none'; got {check!r}")
    root = Path(ray_dataset_dir if ray_dataset_dir is not None else manifest["source_root"])
    levels = manifest["levels"]
    striped = pack_layout(manifest) == "striped"
    vroot = Path(dataset_dir if dataset_dir is not None else manifest.get("dataset_dir", "."))
    rebuild = (
        manifest_rebuild(manifest, pack_dir, root, vroot)
        if striped
        else rebuild_command(root, pack_dir, levels)
    )
    if not root.is_dir():
        reason = f"ray pack {pack_dir}: its source ray tree {root} is not there"
        raise StalePackError(
            f"{reason}; pass the folder it now lives in as the ray dataset folder, or turn "
            "the pack's staleness check off (check 'none') to use the pack alone",
            reason,
        )
    if striped and not vroot.is_dir():
        reason = f"ray pack {pack_dir}: its source voxel dataset {vroot} is not there"
        raise StalePackError(
            f"{reason}; pass the folder it now lives in as the dataset folder (dataset_dir), "
            "or turn the pack's staleness check off (check 'none') to use the pack alone",
            reason,
        )
    recorded: dict[str, list] = manifest["files"]
    bad: dict[str, Any] = manifest.get("bad_files") or {}
    # a folder that cannot be listed, or a link out of the tree: its files read as missing
    current = source_files(root, None if levels is None else set(levels), [])
    seen: set[str] = set()
    for _, _, path in current:
        rel = relative_name(root, path)
        seen.add(rel)
        rec = recorded.get(rel)
        if rec is None:
            diff["new"].append(rel)
            continue
        change = _change(rel, path, rec, check, rel in bad)
        if change is not None:
            diff["changed"].append(change)
    diff["missing"] = sorted(set(recorded) - seen)
    n_ray_diffs = sum(len(v) for v in diff.values())
    if striped:  # the voxel files of the packed samples (no "new": rays make a sample)
        for rel, rec in (manifest.get("voxel_files") or {}).items():
            path = vroot / rel
            if not os.path.lexists(path):
                diff["missing"].append(rel)
                continue
            change = _change(rel, path, rec, check, True)
            if change is not None:
                diff["changed"].append(change)
    if any(diff.values()):
        parts = []
        for kind in ("changed", "missing", "new"):
            items = diff[kind]
            if items:
                more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
                parts.append(f"{len(items)} {kind}: " + ", ".join(items[:_SHOW]) + more)
        what = f"the ray files under {root}"
        if sum(len(v) for v in diff.values()) > n_ray_diffs:
            what = f"the ray files under {root} or the voxel files under {vroot}"
        reason = (
            f"ray pack {pack_dir} is stale: {what} changed since it was built ({'; '.join(parts)})"
        )
        raise StalePackError(
            f"{reason}. Rebuild it: `{rebuild}` (or, to use it as it is, turn its staleness "
            "check off: check 'none')",
            reason,
        )
    return diff


def _change(rel: str, path: Path, rec: list, check: str, was_bad: bool) -> str | None:
    """How source file ``rel`` (at ``path``) differs from its manifest record ``rec``
    (size, mtime_ns, sha256 or None when it was unreadable), or None when it does not.
    ``was_bad``: the pack left it out as bad (an unreadable one turning readable counts)."""
    size, mtime_ns = file_stat_any(path)
    hashed = rec[2] is not None  # None: a left-out file that could not be read
    if size != rec[0]:
        return f"{rel} (size {rec[0]} -> {size})"
    if mtime_ns != rec[1]:
        if check == "full" and hashed and sha256_file(path) == rec[2]:
            return None  # touched, same bytes
        return f"{rel} (modified {_fmt_ns(rec[1])} -> {_fmt_ns(mtime_ns)})"
    if not hashed:
        if was_bad and is_readable(path):  # e.g. its permissions were fixed
            return f"{rel} (unreadable when packed, readable now)"
        return None
    if check == "full" and sha256_file(path) != rec[2]:
        return f"{rel} (content differs, same size and mtime)"
    return None


def _fmt_ns(ns: int) -> str:
    """A file time in ns since the epoch, as local ISO time to the second."""
    return dt.datetime.fromtimestamp(ns / 1e9).isoformat(timespec="seconds")
