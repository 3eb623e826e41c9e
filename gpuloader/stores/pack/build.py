"""Building a ray pack: :func:`pack_rays` inflates every ray file once into plain arrays.

The npz ray files cost about 7 ms of zlib per file per core, however few rows a sample
needs (design decision 7), so a pack holds them as ``.npy`` arrays, one set per level (the
layout of :mod:`gpuloader.stores.pack.manifest`). Two passes: the npy headers give every
file's row counts, then worker processes inflate chunks of files into their slices of the
level arrays. The pack is built in a hidden folder beside ``out_dir``, flushed to disk,
given its ``manifest.json`` last and renamed into place, so an interrupted run never leaves
a folder that passes for a pack.

Bad ray files (``on_error``): with ``"raise"`` (default) the first bad file stops the build
with its named error (:mod:`gpuloader.format.validate`) and no pack is left. With ``"skip"``
every bad file (every check ``pack`` runs, unreadable files and symlink loops included) is
left out of the level arrays and recorded in the manifest's ``bad_files`` (relative path ->
level, hash, error class name, the error's first line); a ``SkippedFileWarning`` names each.
It stays a source file of the manifest (size, mtime, sha256 when readable), so repairing it
makes the pack stale; reading it from the pack raises the recorded error class. An
up-to-date pack that left files out is kept by a later ``on_error="skip"`` run; an
``on_error="raise"`` run refuses it, raising the first left-out file's recorded error (a
raise-mode pack never holds a gap).
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

from gpuloader import schema
from gpuloader.errors import (
    DamagedFileError,
    DatasetLayoutError,
    IncompletePackError,
    PackError,
    SkippedFileWarning,
    StalePackError,
)
from gpuloader.format import layout
from gpuloader.format.index import npz_member_header
from gpuloader.format.validate import as_ray_dtypes, classify, load_npz, npz_error, validate_rays
from gpuloader.stores.pack.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX,
    MANIFEST,
    PACK_KEYS,
    check_pack,
    error_record,
    file_stat,
    file_stat_any,
    is_readable,
    level_dir,
    read_manifest,
    rebuild_command,
    recorded_error,
    relative_name,
    sha256_file,
    source_files,
)

__all__ = ["OnError", "pack_rays"]

OnError = Literal["raise", "skip"]


# ------------------------------------------------------------------------------ packing


def _pack_job(job: tuple[str, str, list[tuple], bool]) -> list[tuple]:
    """Inflate one chunk of files of one level into the level's arrays (opened r+).

    ``job = (level_dir, source_root, files, skip)``; each file is
    ``(rel, size, mtime_ns, ray_start, n, view_start, v)``. Returns
    ``[(rel, sha256 or None, None or the error record of a bad file)]``; a bad file raises
    unless ``skip`` (then its slices are left unwritten and it is reported).
    """
    ldir, source_root, files, skip = job
    mm = {k: np.load(Path(ldir) / f"{k}.npy", mmap_mode="r+") for k in PACK_KEYS}
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
                out.append((rel, digest, error_record(exc)))
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
            rebuild = rebuild_command(root, out_dir, level_list)
            fix = "" if rebuild in why else f"; replace it: `{rebuild}`"
            raise PackError(f"{out_dir} already holds a ray pack that does not match ({why}){fix}")
        if not _safe_to_replace(out_dir):
            raise PackError(
                f"{out_dir}: exists and is not a ray pack; choose an empty or new folder"
            )
        if not force and any(out_dir.iterdir()):
            raise PackError(
                f"{out_dir}: holds an incomplete ray pack (an interrupted run?); replace it: "
                f"`{rebuild_command(root, out_dir, level_list)}`"
            )

    found = source_files(root, level_set)
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
        rel = relative_name(root, path)
        where[rel] = (int(level), str(hash_))
        try:
            try:
                stats[rel] = file_stat(path)
            except OSError as exc:  # a symlink loop, no permission
                err = npz_error(path, exc)
                if not skip:
                    raise err from exc
                stats[rel] = file_stat_any(path)  # the link itself; raises if nothing is there
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
            bad[rel] = {"level": level, "hash": hash_, **error_record(exc)}
            digests[rel] = sha256_file(path) if is_readable(path) else None
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
            ldir = level_dir(tmp, level)
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
            ldir = level_dir(tmp, level)
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
        f = schema.field(key)
        rows = n_views if f.kind == "view" else n_rays
        a = np.lib.format.open_memmap(
            ldir / f"{key}.npy", mode="w+", dtype=f.disk, shape=(rows, *f.shape)
        )
        del a


def _write_index(
    ldir: Path, files: list[tuple], starts: np.ndarray, counts: np.ndarray, pack_id: str
) -> None:
    """Write ``ldir/index.npz``: hashes (K,) str, offsets (K, 4) int64 (ray start, ray count,
    view start, view count) from ``starts``/``counts`` (K, 2) int64, and ``pack_id``."""
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
        rebuild = rebuild_command(root, out_dir, manifest["levels"])
        raise recorded_error(
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
    """Results of :func:`_pack_job` for every job, in completion order (a process pool when
    there are several workers and jobs, else this process)."""
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
    """The summary :func:`pack_rays` returns, from the pack's manifest."""
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
