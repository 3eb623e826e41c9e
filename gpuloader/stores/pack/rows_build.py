"""Writing the ordinary (``layout="rows"``) pack: :class:`RowsWriter` for ``pack_rays``.

The files are those of :mod:`gpuloader.stores.pack.manifest`: per level one ``.npy`` array
per field (the ray files one after the other, in hash order) and ``index.npz`` (hashes,
offsets). :func:`~gpuloader.stores.pack.build.pack_rays` runs the build; a worker job
(:func:`pack_job`) inflates a chunk of files into their slices, and files left out as bad
are closed up by :func:`compact_level` (block copies). Byte for byte the pack it always was.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from gpuloader import schema
from gpuloader.errors import DamagedFileError
from gpuloader.format import layout
from gpuloader.stores.pack.build_steps import (
    chunk_jobs,
    new_npy,
    npy_data_offset,
    pack_of_tmp,
    pwrite_all,
    ray_arrays,
    read_source,
    skippable,
    writing,
)
from gpuloader.stores.pack.manifest import FORMAT_VERSION, INDEX, PACK_KEYS, error_record

__all__ = ["RowsWriter", "compact_level", "pack_job"]


def pack_job(job: tuple[str, str, list[tuple], bool]) -> list[tuple]:
    """Inflate one chunk of files of one level into the level's arrays (file writes).

    ``job = (level_dir, source_root, files, skip)``; each file is
    ``(rel, size, mtime_ns, ray_start, n, view_start, v)``. Returns
    ``[(rel, sha256 or None, None or the error record of a bad file, None)]``; a bad file
    raises unless ``skip`` (then its slices are left unwritten and it is reported).

    Raises:
        PackWriteError: a write failed (ENOSPC, EIO: named, with the pack folder).
    """
    ldir, source_root, files, skip = job
    out_dir = pack_of_tmp(Path(ldir).parent)
    fds: dict[str, int] = {}
    where: dict[str, tuple] = {}  # key -> (data offset, bytes per row, dtype)
    out: list[tuple] = []
    try:
        with writing(out_dir):
            for k in PACK_KEYS:
                path = Path(ldir) / f"{k}.npy"
                f = schema.field(k)
                row = np.dtype(f.disk).itemsize * int(np.prod(f.shape, dtype=np.int64))
                where[k] = (npy_data_offset(path), row, np.dtype(f.disk))
                fds[k] = os.open(path, os.O_WRONLY)
        for rel, size, mtime_ns, r0, n, v0, v in files:
            path = Path(source_root) / rel
            digest = None
            try:
                data, digest = read_source(path, size, mtime_ns)
                arrays = ray_arrays(path, data, n, v)
            except DamagedFileError as exc:
                if not (skip and skippable(exc)):
                    raise
                out.append((rel, digest, error_record(exc), None))
                continue
            with writing(out_dir):
                for k in PACK_KEYS:
                    at, row, dt = where[k]
                    start = v0 if k == "view_positions" else r0
                    pwrite_all(fds[k], np.asarray(arrays[k], dtype=dt), at + start * row)
            out.append((rel, digest, None, None))
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


class RowsWriter:
    """The ordinary layout (``layout="rows"``, the manifest module's files) for
    :func:`~gpuloader.stores.pack.build.pack_rays`: one array per field and level, files
    one after the other."""

    layout = "rows"
    version = FORMAT_VERSION
    job = staticmethod(pack_job)

    def __init__(self) -> None:
        self._levels: dict[int, tuple[list[tuple], np.ndarray, np.ndarray]] = {}

    def probe(self, level: int, hash_: str, path: Path) -> tuple:
        """Pass 1 adds nothing to a file's plan entry."""
        return ()

    def blame(self, exc: BaseException, level: int, hash_: str) -> dict[str, Any]:
        """Nothing to add to a bad file's record."""
        return {}

    def estimate_bytes(self, plan: dict[int, list[tuple]], skip: bool) -> int:
        """About the bytes the pack of ``plan`` (level -> the plan's ``(rel, n, v)``) takes
        on disk; with ``skip`` also room for the copy of the largest array (leaving bad
        files out rewrites an array)."""
        total = largest = 0
        for files in plan.values():
            n_rays = sum(int(f[1]) for f in files)
            n_views = sum(int(f[2]) for f in files)
            for key in PACK_KEYS:
                f = schema.field(key)
                rows = n_views if f.kind == "view" else n_rays
                size = 128 + rows * np.dtype(f.disk).itemsize * int(np.prod(f.shape))
                total += size
                largest = max(largest, size)
            total += 1024 + 320 * len(files)  # index.npz: hashes (U64), offsets
        return total + (largest if skip else 0)

    def level_jobs(
        self,
        ldir: Path,
        level: int,
        files: list[tuple],
        stats: dict[str, tuple[int, int]],
        root: Path,
        skip: bool,
        workers: int | None,
        pack_id: str,
    ) -> list[tuple]:
        """Make the level's arrays and index; the jobs that fill them (``files``: the
        plan's ``(rel, n, v)``)."""
        counts = np.array([[n, v] for _, n, v in files], dtype=np.int64).reshape(-1, 2)
        starts = np.concatenate([[[0, 0]], np.cumsum(counts, axis=0)[:-1]]).astype(np.int64)
        _new_level_arrays(ldir, counts)
        _write_index(ldir, files, starts, counts, pack_id)
        self._levels[level] = (files, starts, counts)
        entries = [
            (rel, *stats[rel], int(r0), int(n), int(v0), int(v))
            for (rel, n, v), (r0, v0) in zip(files, starts.tolist(), strict=True)
        ]
        return [(str(ldir), str(root), part, skip) for part in chunk_jobs(entries, workers)]

    def collect(self, rel: str, extra: Any) -> None:
        """Nothing kept from a job's result."""

    def finish_level(self, ldir: Path, level: int, keep: np.ndarray, pack_id: str) -> dict | None:
        """Leave the bad files' slices out (``keep``: (K,) bool); the level's
        ``level_info`` (None: no file kept)."""
        files, starts, counts = self._levels[level]
        if not keep.all():  # leave the bad files' slices out of the level's arrays
            files, starts, counts = compact_level(ldir, files, starts, counts, keep)
            if not files:
                return None
            _write_index(ldir, files, starts, counts, pack_id)
        n_rays, n_views = (int(x) for x in counts.sum(axis=0))
        sizes = {p.name: p.stat().st_size for p in sorted(ldir.iterdir())}
        return {"files": len(files), "rays": n_rays, "views": n_views, "file_bytes": sizes}

    def manifest_keys(self) -> dict[str, Any]:
        """None: a rows manifest is as it always was."""
        return {}


def _new_level_arrays(ldir: Path, counts: np.ndarray) -> None:
    """Empty level arrays for files of ``counts`` ((K, 2) rays, views) rows."""
    n_rays, n_views = (int(x) for x in counts.sum(axis=0))
    for key in PACK_KEYS:
        f = schema.field(key)
        rows = n_views if f.kind == "view" else n_rays
        new_npy(ldir / f"{key}.npy", f.disk, (rows, *f.shape))


def _write_index(
    ldir: Path, files: list[tuple], starts: np.ndarray, counts: np.ndarray, pack_id: str
) -> None:
    """Write ``ldir/index.npz``: hashes (K,) str, offsets (K, 4) int64 (ray start, ray count,
    view start, view count) from ``starts``/``counts`` (K, 2) int64, and ``pack_id``."""
    hashes = np.array([layout.parse_ray_filename(Path(f[0]))[1] for f in files])
    offsets = np.stack([starts[:, 0], counts[:, 0], starts[:, 1], counts[:, 1]], axis=1)
    np.savez(ldir / INDEX, hashes=hashes, offsets=offsets, pack_id=np.array(pack_id))


def compact_level(
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
        shape = (int(new_counts[:, col].sum()), *src.shape[1:])
        base = new_npy(dst_path, src.dtype, shape)
        row = src.dtype.itemsize * int(np.prod(src.shape[1:], dtype=np.int64))
        fd = os.open(dst_path, os.O_WRONLY)
        try:
            at = 0
            for s0, c in zip(
                starts[keep][:, col].tolist(), new_counts[:, col].tolist(), strict=True
            ):
                for i in range(0, c, block):
                    m = min(block, c - i)
                    pwrite_all(fd, src[s0 + i : s0 + i + m], base + (at + i) * row)
                at += c
        finally:
            os.close(fd)
        del src
        os.replace(dst_path, src_path)
    return kept, new_starts, new_counts
