"""A one-time packed ray cache: uncompressed, memory-mapped, contiguous per level.

The npz ray files cost about 7 ms of zlib per file per core, however few rows a sample
needs (design decision 7). :func:`pack_rays` inflates every ray file once into plain
``.npy`` arrays, one set per level, and :class:`PackedRayStore` serves
``read(sample, rows)`` from them as a gather of ``rows`` (the :class:`RayStore` protocol
of :mod:`gpuloader.stores.npz`), returning exactly what :class:`NpzRayStore` returns.

Layout of a pack folder::

    manifest.json                 written last: format, pack_id, source root, source files
                                  (relative path, size, mtime_ns, sha256), per-level totals,
                                  on_error and bad_files (files left out, see below)
    level_<L>/origins.npy         (N_L, 3) float32   rays of every file of level L, file
    level_<L>/directions.npy      (N_L, 3) float32   after file in hash order
    level_<L>/distances.npy       (N_L,)   float32
    level_<L>/hits.npy            (N_L,)   uint8
    level_<L>/face_ids.npy        (N_L,)   int32
    level_<L>/view_ids.npy        (N_L,)   int32
    level_<L>/view_positions.npy  (V_L, 3) float32   views of every file, same order
    level_<L>/index.npz           hashes (K,) str; offsets (K, 4) int64 =
                                  (ray start, ray count, view start, view count); pack_id

A pack is built in a hidden temporary folder beside ``out_dir`` and renamed into place
when whole, so an interrupted run never leaves a folder that passes for a pack; a folder
without ``manifest.json`` is refused.

Staleness: ``check="fast"`` compares the manifest's file list, sizes and mtimes with the
ray tree when the store is opened; ``"full"`` also re-hashes every source file;
``"none"`` trusts the pack (the source may even be gone). A stale pack raises
:class:`StalePackError` naming the first changed files and the command that rebuilds it.

Bad ray files (``on_error``): with ``"raise"`` (default) the first bad file stops the build
with its named error (:mod:`gpuloader.format.validate`) and no pack is left. With ``"skip"``
every bad file (every check ``pack`` runs, unreadable files and symlink loops included) is
left out of the level arrays and recorded in the manifest's ``bad_files`` (relative path ->
level, hash, error class name, the error's first line); a ``SkippedFileWarning`` (of
:mod:`gpuloader.dataset.hierarchical`) names each. It stays a source file of the manifest (size,
mtime, sha256 when readable), so repairing it makes the pack stale. :class:`PackedRayStore`
raises the recorded error class for such a sample (``bad`` lists them ahead of time), which
a dataset with ``on_error='skip'`` replaces like any bad file. An up-to-date pack that left
files out is kept by a later ``on_error="skip"`` run; an ``on_error="raise"`` run refuses
it, raising the first left-out file's recorded error (a raise-mode pack never holds a gap).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import multiprocessing as mp
import os
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from gpuloader import errors as _errors
from gpuloader.errors import (
    DamagedFileError,
    DatasetLayoutError,
    FileCheckError,
    IncompletePackError,
    PackError,
    SampleNotInPackError,
    SkippedFileWarning,
    StalePackError,
)
from gpuloader.format import layout
from gpuloader.format.index import npz_member_header, scan_ray_tree
from gpuloader.format.layout import RAY_ROW_KEYS
from gpuloader.format.validate import (
    as_ray_dtypes,
    check_ray_values,
    classify,
    load_npz,
    npz_error,
    validate_rays,
)
from gpuloader.stores.npz import NpzRayStore, RayStore, chunk_span

__all__ = [
    "FORMAT_VERSION",
    "IncompletePackError",
    "PackError",
    "PackedRayStore",
    "SampleNotInPackError",
    "StalePackError",
    "check_pack",
    "open_ray_store",
    "pack_rays",
    "read_manifest",
]

FORMAT_NAME = "gpuloader-ray-pack"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.npz"
#: Arrays of a level, in the order NpzRayStore returns them.
PACK_KEYS: tuple[str, ...] = tuple(NpzRayStore.keys)
Check = Literal["fast", "full", "none"]
OnError = Literal["raise", "skip"]
_SHOW = 5  # changed files named in a staleness message


# ------------------------------------------------------------------------------ helpers


def _level_dir(root: Path, level: int) -> Path:
    return Path(root) / f"level_{int(level)}"


def _rel(root: Path, path: Path) -> str:
    return Path(path).relative_to(root).as_posix()


def _rebuild_command(source: Any, pack_dir: Any, levels: Sequence[int] | None) -> str:
    cmd = f"gpuloader pack {source} {pack_dir} --force"
    if levels is not None:
        cmd += " --levels " + " ".join(str(lv) for lv in levels)
    return cmd


def _source_files(root: Path, levels: set[int] | None) -> list[tuple[int, str, Path]]:
    """Ray files of ``root`` at ``levels`` (None: all): sorted ``(level, hash, path)``.

    Raises:
        DatasetLayoutError: ``root`` is missing, or one (level, hash) has two files.
    """
    found = [t for t in scan_ray_tree(root) if levels is None or t[0] in levels]
    for (lv, h, p), (lv2, h2, p2) in zip(found, found[1:], strict=False):
        if (lv, h) == (lv2, h2):
            raise DatasetLayoutError(
                f"two ray files for level {lv}, hash {h}: {p} and {p2}; a file is misplaced "
                f"(the folder must be {h[:2]}/): remove the wrong one"
            )
    return found


def _stat(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def _stat_any(path: Path) -> tuple[int, int]:
    """:func:`_stat`, or the link's own size and mtime where the target cannot be reached
    (a symlink loop, a dangling link); OSError only when there is nothing at ``path``."""
    try:
        return _stat(path)
    except OSError:
        st = os.lstat(path)
        return int(st.st_size), int(st.st_mtime_ns)


def _readable(path: Path) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def _error_record(exc: BaseException) -> dict[str, Any]:
    """What the manifest keeps of a bad file's error (plain JSON; no traceback)."""
    text = str(exc)
    return {
        "error": type(exc).__name__,
        "message": text.splitlines()[0] if text else type(exc).__name__,
        "key": getattr(exc, "key", None),
        "row": getattr(exc, "row", None),
        "detail": getattr(exc, "detail", None),
    }


def _recorded_error(
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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(pack_dir: Path | str) -> dict[str, Any]:
    """``pack_dir/manifest.json``, checked for format and version.

    Raises:
        IncompletePackError: no manifest (not a pack, or an interrupted build), unreadable,
            or another format version.
    """
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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IncompletePackError(
            f"{path}: pack format version {manifest.get('format_version')}, this gpuloader "
            f"reads version {FORMAT_VERSION}; rebuild it with "
            f"`{_rebuild_command(manifest.get('source_root'), pack_dir, manifest.get('levels'))}`"
        )
    return manifest


def _check_array_files(pack_dir: Path, manifest: dict[str, Any]) -> None:
    """Every array and index file of the manifest exists with the size it was written with."""
    for level, info in manifest["level_info"].items():
        ldir = _level_dir(pack_dir, int(level))
        for name, size in info["file_bytes"].items():
            p = ldir / name
            try:
                got = p.stat().st_size
            except FileNotFoundError:
                got = None
            if got != size:
                state = "missing" if got is None else f"{got} bytes, expected {size}"
                raise IncompletePackError(
                    f"{p}: {state}; the pack is damaged: rebuild it with "
                    f"`{_rebuild_command(manifest['source_root'], pack_dir, manifest['levels'])}`"
                )


def check_pack(
    pack_dir: Path | str,
    check: Check = "fast",
    ray_dataset_dir: Path | str | None = None,
    manifest: dict[str, Any] | None = None,
) -> dict[str, list[str]]:
    """Compare a pack with its ray tree; raise :class:`StalePackError` if they differ.

    Args:
        pack_dir: the pack folder.
        check: "fast" (file list, sizes, mtimes), "full" (also sha256 of each file) or
            "none" (only the pack's own files).
        ray_dataset_dir: the ray tree (default: the manifest's source root).
        manifest: the already-read manifest (read here if None).

    Returns:
        ``{"changed": [...], "missing": [...], "new": [...]}``, all empty (else it raises).

    Raises:
        IncompletePackError: no manifest, or pack arrays missing or truncated.
        StalePackError: the ray tree is gone or differs from the manifest.
    """
    pack_dir = Path(pack_dir)
    manifest = read_manifest(pack_dir) if manifest is None else manifest
    _check_array_files(pack_dir, manifest)
    diff: dict[str, list[str]] = {"changed": [], "missing": [], "new": []}
    if check == "none":
        return diff
    if check not in ("fast", "full"):
        raise ValueError(f"check must be 'fast', 'full' or 'none'; got {check!r}")
    root = Path(ray_dataset_dir if ray_dataset_dir is not None else manifest["source_root"])
    levels = manifest["levels"]
    rebuild = _rebuild_command(root, pack_dir, levels)
    if not root.is_dir():
        reason = f"ray pack {pack_dir}: its source ray tree {root} is not there"
        raise StalePackError(
            f"{reason}; pass the folder it now lives in as the ray dataset folder, or turn "
            "the pack's staleness check off (check 'none') to use the pack alone",
            reason,
        )
    recorded: dict[str, list] = manifest["files"]
    bad: dict[str, Any] = manifest.get("bad_files") or {}
    current = _source_files(root, None if levels is None else set(levels))
    seen: set[str] = set()
    for _, _, path in current:
        rel = _rel(root, path)
        seen.add(rel)
        rec = recorded.get(rel)
        if rec is None:
            diff["new"].append(rel)
            continue
        size, mtime_ns = _stat_any(path)
        hashed = rec[2] is not None  # None: a left-out file that could not be read
        if size != rec[0]:
            diff["changed"].append(f"{rel} (size {rec[0]} -> {size})")
        elif mtime_ns != rec[1]:
            if check == "full" and hashed and _sha256_file(path) == rec[2]:
                continue  # touched, same bytes
            diff["changed"].append(f"{rel} (modified {_fmt_ns(rec[1])} -> {_fmt_ns(mtime_ns)})")
        elif not hashed:
            if rel in bad and _readable(path):  # e.g. its permissions were fixed
                diff["changed"].append(f"{rel} (unreadable when packed, readable now)")
        elif check == "full" and _sha256_file(path) != rec[2]:
            diff["changed"].append(f"{rel} (content differs, same size and mtime)")
    diff["missing"] = sorted(set(recorded) - seen)
    if any(diff.values()):
        parts = []
        for kind in ("changed", "missing", "new"):
            items = diff[kind]
            if items:
                more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
                parts.append(f"{len(items)} {kind}: " + ", ".join(items[:_SHOW]) + more)
        reason = (
            f"ray pack {pack_dir} is stale: the ray files under {root} changed since it was "
            f"built ({'; '.join(parts)})"
        )
        raise StalePackError(
            f"{reason}. Rebuild it: `{rebuild}` (or, to use it as it is, turn its staleness "
            "check off: check 'none')",
            reason,
        )
    return diff


def _fmt_ns(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------ packing


def _pack_job(job: tuple[str, str, list[tuple], bool]) -> list[tuple]:
    """Inflate one chunk of files of one level into the level's arrays (opened r+).

    ``job = (level_dir, source_root, files, skip)``; each file is
    ``(rel, size, mtime_ns, ray_start, n, view_start, v)``. Returns
    ``[(rel, sha256 or None, None or the error record of a bad file)]``; a bad file raises
    unless ``skip`` (then its slices are left unwritten and it is reported).
    """
    level_dir, source_root, files, skip = job
    mm = {k: np.load(Path(level_dir) / f"{k}.npy", mmap_mode="r+") for k in PACK_KEYS}
    out: list[tuple] = []
    try:
        for rel, size, mtime_ns, r0, n, v0, v in files:
            path = Path(source_root) / rel
            digest = None
            try:
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                        st = os.fstat(f.fileno())
                except FileNotFoundError:
                    raise
                except OSError as exc:
                    raise npz_error(path, exc) from exc
                if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                    raise StalePackError(
                        f"{path}: changed while it was being packed; run `gpuloader pack` again"
                    )
                digest = hashlib.sha256(data).hexdigest()
                # every check of gpuloader.format.validate: a bad file is never stored
                arrays = as_ray_dtypes(path, load_npz(path, PACK_KEYS, data=data))
                got_n = validate_rays(path, arrays)
                got_v = arrays["view_positions"].shape[0]
                if (got_n, got_v) != (n, v):
                    raise DamagedFileError(
                        f"{path}: holds {got_n} rays and {got_v} views but its headers said "
                        f"{n} and {v}; the file is damaged: regenerate it or delete it"
                    )
            except DamagedFileError as exc:
                if not (skip and _skippable(exc)):
                    raise
                out.append((rel, digest, _error_record(exc)))
                continue
            for k in PACK_KEYS:
                if k == "view_positions":
                    mm[k][v0 : v0 + v] = arrays[k]
                else:
                    mm[k][r0 : r0 + n] = arrays[k]
            out.append((rel, digest, None))
        for a in mm.values():
            a.flush()
    finally:
        del mm
    return out


def _skippable(exc: BaseException) -> bool:
    """A bad file that ``on_error="skip"`` leaves out (not a missing file, not a pack error)."""
    return classify(exc) in ("unreadable", "invalid", "damaged")


def _safe_to_replace(out_dir: Path) -> bool:
    """An empty folder, a pack, or what an interrupted pack leaves (level_* and its files)."""
    if not out_dir.exists():
        return True
    if not out_dir.is_dir():
        return False
    names = {p.name for p in out_dir.iterdir()}
    if not names or MANIFEST in names:
        return True
    return all(n.startswith("level_") and (out_dir / n).is_dir() for n in names)


def pack_rays(
    ray_dataset_dir: Path | str,
    out_dir: Path | str,
    levels: Sequence[int] | None = None,
    progress: bool = True,
    workers: int | None = None,
    force: bool = False,
    on_error: OnError = "raise",
) -> dict[str, Any]:
    """Inflate every ray file of ``ray_dataset_dir`` (at ``levels``) into a pack in ``out_dir``.

    Built in a temporary folder beside ``out_dir`` and renamed into place when whole. An
    ``out_dir`` holding an up-to-date pack of the same source and levels is kept (nothing
    is read); a stale one, or a folder an interrupted run left, needs ``force=True``. Any
    other non-empty folder is never replaced.

    Args:
        ray_dataset_dir: ray dataset root (level_<L>/<hh>/<hash>_rays.npz).
        out_dir: pack folder to write.
        levels: pack only these levels (None: all).
        progress: show tqdm bars.
        workers: processes inflating files (None: all cores; 1: this process).
        force: replace a stale or interrupted pack in ``out_dir``.
        on_error: "raise" (the first bad ray file stops the build, naming it; no pack is
            written) or "skip" (bad files are left out, recorded in the manifest and named
            by a ``SkippedFileWarning`` each; see the module doc). "raise" also refuses an
            up-to-date pack that left files out, raising the first one's recorded error.

    Returns:
        Summary: out_dir, source_root, pack_id, levels ``{L: {files, rays, views}}``,
        files (packed), rays, bytes, seconds, up_to_date (True: an existing pack was kept),
        bad (the files left out: ``[{file, level, hash, error, message}]``, sorted).

    Raises:
        PackError: ``out_dir`` holds something else, or a stale pack without ``force``.
        DatasetLayoutError, DamagedFileError: a missing tree or a damaged ray file (named;
            with "skip": only when no ray file is good).
    """
    start = time.perf_counter()
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip'; got {on_error!r}")
    skip = on_error == "skip"
    root = Path(ray_dataset_dir).resolve()
    out_dir = Path(out_dir).absolute()
    level_set = None if levels is None else {int(lv) for lv in levels}
    level_list = None if level_set is None else sorted(level_set)
    inside = (
        out_dir.resolve().relative_to(root).parts
        if out_dir.resolve().is_relative_to(root)
        else None
    )
    if inside is not None and (not inside or inside[0].startswith("level_")):
        raise PackError(f"{out_dir}: the pack cannot be written into the ray tree {root}")
    if out_dir.exists():
        if (out_dir / MANIFEST).is_file() and not force:
            try:
                manifest = read_manifest(out_dir)
                same = manifest["source_root"] == str(root) and manifest["levels"] == level_list
                if same:
                    check_pack(out_dir, "fast", root, manifest)
                    _refuse_or_warn_left_out(manifest, out_dir, skip)
                    return _summary(manifest, out_dir, time.perf_counter() - start, True)
                why = f"it packs {manifest['source_root']} at levels {manifest['levels']}"
            except StalePackError as exc:
                why = exc.reason
            except IncompletePackError as exc:
                why = str(exc)
            rebuild = _rebuild_command(root, out_dir, level_list)
            fix = "" if rebuild in why else f"; replace it: `{rebuild}`"
            raise PackError(f"{out_dir} already holds a ray pack that does not match ({why}){fix}")
        if not _safe_to_replace(out_dir):
            raise PackError(
                f"{out_dir}: exists and is not a ray pack; choose an empty or new folder"
            )
        if not force and any(out_dir.iterdir()):
            raise PackError(
                f"{out_dir}: holds an incomplete ray pack (an interrupted run?); replace it: "
                f"`{_rebuild_command(root, out_dir, level_list)}`"
            )

    found = _source_files(root, level_set)
    if not found:
        raise DatasetLayoutError(
            f"{root}: no *_rays.npz files"
            + (f" at levels {level_list}" if level_list is not None else "")
            + "; point RAY_DIR at the ray dataset root (it holds level_<L>/)"
        )

    # Pass 1: sizes, mtimes and row counts from the npy headers (nothing inflated).
    plan: dict[int, list[tuple]] = {}
    stats: dict[str, tuple[int, int]] = {}
    bad: dict[str, dict[str, Any]] = {}  # rel -> record (on_error="skip")
    digests: dict[str, str | None] = {}
    where: dict[str, tuple[int, str]] = {}
    for level, hash_, path in tqdm(found, desc="headers", unit="file", disable=not progress):
        rel = _rel(root, path)
        where[rel] = (int(level), str(hash_))
        try:
            try:
                stats[rel] = _stat(path)
            except OSError as exc:  # a symlink loop, no permission
                err = npz_error(path, exc)
                if not skip:
                    raise err from exc
                stats[rel] = _stat_any(path)  # the link itself; raises if nothing is there
                raise err from exc
            shape, _ = npz_member_header(path, "origins")
            vshape, _ = npz_member_header(path, "view_positions")
            if len(shape) != 2 or shape[1] != 3 or len(vshape) != 2 or vshape[1] != 3:
                raise DamagedFileError(
                    f"{path}: 'origins' {shape} / 'view_positions' {vshape}, expected (N, 3) "
                    "and (V, 3); regenerate it or delete it"
                )
        except DamagedFileError as exc:
            if not (skip and _skippable(exc)):
                raise
            bad[rel] = {"level": level, "hash": hash_, **_error_record(exc)}
            digests[rel] = _sha256_file(path) if _readable(path) else None
            continue
        plan.setdefault(level, []).append((rel, shape[0], vshape[0]))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    pack_id = uuid.uuid4().hex
    try:
        tmp.mkdir()
        jobs: list[tuple] = []
        level_info: dict[str, dict[str, Any]] = {}
        layouts: dict[int, tuple[list[tuple], np.ndarray, np.ndarray]] = {}
        for level, files in sorted(plan.items()):
            ldir = _level_dir(tmp, level)
            ldir.mkdir()
            counts = np.array([[n, v] for _, n, v in files], dtype=np.int64).reshape(-1, 2)
            starts = np.concatenate([[[0, 0]], np.cumsum(counts, axis=0)[:-1]]).astype(np.int64)
            _new_level_arrays(ldir, counts)
            _write_index(ldir, files, starts, counts, pack_id)
            layouts[level] = (files, starts, counts)
            entries = [
                (rel, *stats[rel], int(r0), int(n), int(v0), int(v))
                for (rel, n, v), (r0, v0) in zip(files, starts.tolist(), strict=True)
            ]
            chunk = max(1, min(64, len(entries) // (4 * max(1, workers or os.cpu_count() or 1))))
            for i in range(0, len(entries), chunk):
                jobs.append((str(ldir), str(root), entries[i : i + chunk], skip))

        # Pass 2: inflate every file into its slices.
        bar = tqdm(
            total=len(found) - len(bad), desc="packing rays", unit="file", disable=not progress
        )
        with bar:
            for done in _run(jobs, workers):
                for rel, digest, error in done:
                    digests[rel] = digest
                    if error is not None:
                        lv, h = where[rel]
                        bad[rel] = {"level": lv, "hash": h, **error}
                bar.update(len(done))
        if len(bad) == len(found):
            first = min(bad)
            raise DamagedFileError(
                f"{bad[first]['message']}\n(all {len(found)} ray files of {root} are bad; "
                "nothing to pack)"
            )

        total_bytes = 0
        for level, (files, starts, counts) in layouts.items():
            ldir = _level_dir(tmp, level)
            keep = np.array([rel not in bad for rel, _, _ in files], dtype=bool)
            if not keep.all():  # leave the bad files' slices out of the level's arrays
                files, starts, counts = _compact_level(ldir, files, starts, counts, keep)
                if not files:
                    shutil.rmtree(ldir)
                    continue
                _write_index(ldir, files, starts, counts, pack_id)
            n_rays, n_views = (int(x) for x in counts.sum(axis=0))
            sizes = {p.name: p.stat().st_size for p in sorted(ldir.iterdir())}
            level_info[str(level)] = {
                "files": len(files),
                "rays": n_rays,
                "views": n_views,
                "file_bytes": sizes,
            }
            total_bytes += sum(sizes.values())
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "pack_id": pack_id,
            "created": dt.datetime.now().isoformat(timespec="seconds"),
            "source_root": str(root),
            "levels": level_list,
            "on_error": on_error,
            "totals": {
                "files": sum(i["files"] for i in level_info.values()),
                "bad_files": len(bad),
                "rays": sum(i["rays"] for i in level_info.values()),
                "views": sum(i["views"] for i in level_info.values()),
                "bytes": total_bytes,
            },
            "level_info": level_info,
            "files": {rel: [*stats[rel], digests[rel]] for rel in sorted(stats)},
            "bad_files": {rel: bad[rel] for rel in sorted(bad)},
        }
        _fsync_tree(tmp)
        layout.atomic_write_json(tmp / MANIFEST, manifest)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _refuse_or_warn_left_out(manifest, out_dir, skip)
    return _summary(manifest, out_dir, time.perf_counter() - start, False)


def _new_level_arrays(ldir: Path, counts: np.ndarray) -> None:
    """Empty level arrays for files of ``counts`` ((K, 2) rays, views) rows."""
    n_rays, n_views = (int(x) for x in counts.sum(axis=0))
    for key in PACK_KEYS:
        rows = n_views if key == "view_positions" else n_rays
        shape = (rows, 3) if key in ("origins", "directions", "view_positions") else (rows,)
        a = np.lib.format.open_memmap(
            ldir / f"{key}.npy", mode="w+", dtype=layout.RAY_DTYPES[key], shape=shape
        )
        del a


def _write_index(
    ldir: Path, files: list[tuple], starts: np.ndarray, counts: np.ndarray, pack_id: str
) -> None:
    hashes = np.array([layout.parse_ray_filename(Path(rel))[1] for rel, _, _ in files])
    offsets = np.stack([starts[:, 0], counts[:, 0], starts[:, 1], counts[:, 1]], axis=1)
    np.savez(ldir / INDEX, hashes=hashes, offsets=offsets, pack_id=np.array(pack_id))


def _compact_level(
    ldir: Path, files: list[tuple], starts: np.ndarray, counts: np.ndarray, keep: np.ndarray
) -> tuple[list[tuple], np.ndarray, np.ndarray]:
    """Rewrite a level's arrays with only the ``keep`` files' slices, in the same order;
    returns the kept ``(files, starts, counts)``. Copies in blocks (bounded memory)."""
    kept = [f for f, k in zip(files, keep, strict=True) if k]
    new_counts = counts[keep].reshape(-1, 2)
    new_starts = np.concatenate([[[0, 0]], np.cumsum(new_counts, axis=0)[:-1]]).astype(np.int64)
    new_starts = new_starts[: len(kept)].reshape(-1, 2)
    if not kept:
        return kept, new_starts, new_counts
    block = 1 << 20  # rows per copy
    for key in PACK_KEYS:
        col = 1 if key == "view_positions" else 0
        src_path, dst_path = ldir / f"{key}.npy", ldir / f".{key}.compact.npy"
        src = np.load(src_path, mmap_mode="r")
        dst = np.lib.format.open_memmap(
            dst_path,
            mode="w+",
            dtype=src.dtype,
            shape=(int(new_counts[:, col].sum()), *src.shape[1:]),
        )
        at = 0
        for s0, c in zip(starts[keep][:, col].tolist(), new_counts[:, col].tolist(), strict=True):
            for i in range(0, c, block):
                m = min(block, c - i)
                dst[at + i : at + i + m] = src[s0 + i : s0 + i + m]
            at += c
        dst.flush()
        del src, dst
        os.replace(dst_path, src_path)
    return kept, new_starts, new_counts


def _refuse_or_warn_left_out(manifest: dict[str, Any], out_dir: Path, skip: bool) -> None:
    """A pack that left bad files out: a warning per file (``skip``), or, for an
    ``on_error="raise"`` run, the first file's recorded error."""
    bad = manifest.get("bad_files") or {}
    if not bad:
        return
    root = Path(manifest["source_root"])
    if not skip:
        rel = min(bad)
        rebuild = _rebuild_command(root, out_dir, manifest["levels"])
        raise _recorded_error(
            str(root / rel),
            bad[rel],
            out_dir,
            f"(the existing pack left {len(bad)} bad file(s) out; repair them and rebuild it: "
            f"`{rebuild}`, or accept the gaps: `gpuloader pack ... --on-error skip`)",
            str(root / rel),
        )
    for _, rec in sorted(bad.items()):
        warnings.warn(
            f"gpuloader pack: left out a bad ray file: {rec['message']}",
            SkippedFileWarning,
            stacklevel=3,
        )


def _run(jobs: list[tuple], workers: int | None) -> Iterable[list[tuple]]:
    workers = int(workers or os.cpu_count() or 1)
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_pack_job, jobs)
        return
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    with mp.get_context(method).Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(_pack_job, jobs)


def _fsync_tree(root: Path) -> None:
    """Flush the pack's files to disk before the manifest makes it count as whole."""
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an old ``out_dir`` is moved aside first, then removed."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _summary(manifest: dict[str, Any], out_dir: Path, seconds: float, up_to_date: bool) -> dict:
    return {
        "out_dir": str(out_dir),
        "source_root": manifest["source_root"],
        "pack_id": manifest["pack_id"],
        "levels": {
            int(lv): {k: info[k] for k in ("files", "rays", "views")}
            for lv, info in sorted(manifest["level_info"].items(), key=lambda t: int(t[0]))
        },
        **manifest["totals"],
        "seconds": seconds,
        "up_to_date": up_to_date,
        "bad": [
            {"file": str(Path(manifest["source_root"]) / rel), **rec}
            for rel, rec in sorted((manifest.get("bad_files") or {}).items())
        ],
    }


# ------------------------------------------------------------------------------ reading


class _Level:
    """One level of an open pack: ``row`` (hash -> index row), ``offsets`` (K, 4) int64 and
    the arrays as read-only memory maps (plain ndarray views)."""

    def __init__(self, pack_dir: Path, level: int, pack_id: str) -> None:
        ldir = _level_dir(pack_dir, level)
        try:
            with np.load(ldir / INDEX, allow_pickle=False) as idx:
                hashes, offsets, got_id = idx["hashes"], idx["offsets"], str(idx["pack_id"])
            if got_id != pack_id:
                raise StalePackError(
                    f"ray pack {pack_dir} was rebuilt while in use (pack id {got_id}, opened "
                    f"as {pack_id}); open the store again"
                )
            self.arrays = {
                k: np.load(ldir / f"{k}.npy", mmap_mode="r").view(np.ndarray) for k in PACK_KEYS
            }
        except FileNotFoundError as exc:
            raise IncompletePackError(
                f"{ldir}: {exc.filename} is missing; the pack is damaged: rebuild it "
                f"(gpuloader pack RAY_DIR {pack_dir} --force)"
            ) from exc
        self.offsets = offsets.astype(np.int64, copy=False)
        self.row = {str(h): i for i, h in enumerate(hashes.tolist())}


class PackedRayStore:
    """Reads rays from a pack written by :func:`pack_rays` (the RayStore protocol).

    ``read(sample, rows)`` returns exactly what :class:`~gpuloader.stores.npz.NpzRayStore`
    returns for the same sample and rows: fresh, writable arrays with the on-disk dtypes
    (``origins``/``directions`` (k, 3) float32, ``distances`` (k,) float32, ``hits`` (k,)
    uint8, ``face_ids``/``view_ids`` (k,) int32, ``view_positions`` (V, 3) float32).

    The manifest is read and checked when the store is made; the arrays are memory-mapped
    on first use in each process, and pickling drops them, so the store travels cheaply
    into DataLoader and DALI worker processes.

    Args:
        pack_dir: the pack folder.
        check: "fast" (compare file list, sizes and mtimes with the ray tree), "full" (also
            the files' sha256) or "none".
        ray_dataset_dir: the ray tree to check against (default: the one packed).

    Attributes:
        bad: ``{(level, hash): (file, message)}`` of every ray file the pack left out as bad
            (``pack_rays(..., on_error="skip")``): the source file's path (under
            ``ray_dataset_dir`` when given) and the first line of its error when packed.
            ``read``/``locate`` of such a sample raise :meth:`bad_error`.

    Raises:
        IncompletePackError: not a complete pack. StalePackError: the ray tree changed.
    """

    keys: tuple[str, ...] = PACK_KEYS

    def __init__(
        self,
        pack_dir: Path | str,
        check: Check = "fast",
        ray_dataset_dir: Path | str | None = None,
    ) -> None:
        self.pack_dir = Path(pack_dir)
        self.check = check
        manifest = read_manifest(self.pack_dir)
        check_pack(self.pack_dir, check, ray_dataset_dir, manifest)
        self.pack_id: str = manifest["pack_id"]
        self.source_root = Path(manifest["source_root"])
        self.levels: list[int] = sorted(int(lv) for lv in manifest["level_info"])
        self.packed_levels: list[int] | None = manifest["levels"]
        self.totals: dict[str, int] = dict(manifest["totals"])
        self._open: dict[int, _Level] = {}
        root = Path(ray_dataset_dir) if ray_dataset_dir is not None else self.source_root
        #: (level, hash) -> (relative path, manifest record) of the files left out as bad
        self._bad: dict[tuple[int, str], tuple[str, dict[str, Any]]] = {
            (int(rec["level"]), str(rec["hash"])): (rel, rec)
            for rel, rec in (manifest.get("bad_files") or {}).items()
        }
        self.bad: dict[tuple[int, str], tuple[str, str]] = {
            key: (str(root / rel), str(rec["message"])) for key, (rel, rec) in self._bad.items()
        }

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}  # memory maps are reopened in the receiving process
        return state

    def __repr__(self) -> str:
        bad = f", bad={len(self.bad)}" if self.bad else ""
        return (
            f"PackedRayStore({str(self.pack_dir)!r}, levels={self.levels}, "
            f"files={self.totals.get('files')}, rays={self.totals.get('rays')}{bad})"
        )

    def bad_error(self, level: int, hash_: str) -> DamagedFileError:
        """The error a read of left-out sample (level, hash) raises (see ``bad``): the
        recorded class (e.g. NonFiniteValueError; DamagedFileError if unknown), whose first
        line names the source file, says it was left out when packed and repeats the
        original first line. KeyError if the sample was not left out."""
        key = (int(level), str(hash_))
        rel, rec = self._bad[key]
        return _recorded_error(
            self.bad[key][0],
            rec,
            self.pack_dir,
            "(repair or regenerate the file, then rebuild the pack: "
            f"`{_rebuild_command(self.source_root, self.pack_dir, self.packed_levels)}`)",
            str(self.source_root / rel),
        )

    def close(self) -> None:
        """Drop the memory maps (they are reopened on the next read)."""
        self._open.clear()

    def _level(self, level: int) -> _Level | None:
        """The open level (memory-mapped on first use), or None if it is not packed."""
        got = self._open.get(level)
        if got is None and level in self.levels:
            got = self._open[level] = _Level(self.pack_dir, level, self.pack_id)
        return got

    def _missing(self, level: int, hash_: str) -> SampleNotInPackError:
        what = (
            f"level {level} is not packed (levels {self.levels})"
            if level not in self.levels
            else f"no hash {hash_} at level {level}"
        )
        levels = self.packed_levels
        if levels is not None:
            levels = sorted({*levels, level})
        return SampleNotInPackError(
            f"ray pack {self.pack_dir} has no sample level {level}, hash {hash_} ({what}); "
            f"re-run `{_rebuild_command(self.source_root, self.pack_dir, levels)}` so that it "
            "covers every ray file of the dataset"
        )

    def locate(self, sample: dict[str, Any]) -> tuple[_Level, int, int, int, int]:
        """``(level arrays, ray start, ray count, view start, view count)`` of a sample."""
        level, hash_ = int(sample["level"]), str(sample["hash"])
        if (level, hash_) in self._bad:
            raise self.bad_error(level, hash_)
        lv = self._level(level)
        i = None if lv is None else lv.row.get(hash_)
        if i is None:
            raise self._missing(level, hash_)
        r0, n, v0, v = (int(x) for x in lv.offsets[i])
        return lv, r0, n, v0, v

    def read(self, sample: dict[str, Any], rows: np.ndarray | None) -> dict[str, np.ndarray]:
        """Rays of ``sample`` (``rows``: (k,) int indices into its N rays, None: all; a chunk's
        rows count from its ``ray_offset``)."""
        lv, r0, n, v0, v = self.locate(sample)
        expected = sample.get("file_num_rays", sample.get("num_rays"))
        if expected is not None and int(expected) != n:
            raise StalePackError(
                f"ray pack {self.pack_dir}: level {sample['level']}, hash {sample['hash']} "
                f"has {n} rays in the pack and {expected} in {sample.get('ray_path')}; rebuild "
                f"it: `{_rebuild_command(self.source_root, self.pack_dir, None)}`"
            )
        off, n = chunk_span(sample, n)
        r0 += off
        arrays = lv.arrays
        out: dict[str, np.ndarray] = {}
        if rows is None:
            for k in RAY_ROW_KEYS:
                out[k] = arrays[k][r0 : r0 + n].copy()
        else:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.size and (rows.min() < 0 or rows.max() >= n):
                raise IndexError(
                    f"{sample.get('ray_path')}: ray rows out of range [0, {n}): "
                    f"min {rows.min()}, max {rows.max()}"
                )
            # np.take on the mapped level: ~2x faster than fancy indexing, ~3x faster than
            # a sorted gather + un-permute (512 of 48,000 rows, page cache warm).
            idx = rows + r0
            for k in RAY_ROW_KEYS:
                out[k] = np.take(arrays[k], idx, axis=0)
        out["view_positions"] = arrays["view_positions"][v0 : v0 + v].copy()
        file_rows = np.arange(off, off + n) if rows is None else rows + off
        check_ray_values(sample.get("ray_path"), out, file_rows)  # the rows gathered only
        return out


def open_ray_store(
    ray_dataset_dir: Path | str,
    pack_dir: Path | str | None = None,
    check: Check = "fast",
) -> RayStore:
    """The ray store for a dataset: the pack in ``pack_dir`` (checked against
    ``ray_dataset_dir``), or the npz files when ``pack_dir`` is None."""
    if pack_dir is None:
        return NpzRayStore()
    return PackedRayStore(pack_dir, check=check, ray_dataset_dir=ray_dataset_dir)
