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
from gpuloader.stores.pack.build_steps import chunk_jobs, ray_arrays, read_source, skippable
from gpuloader.stores.pack.manifest import FORMAT_VERSION, INDEX, PACK_KEYS, error_record

__all__ = ["RowsWriter", "compact_level", "pack_job"]


def pack_job(job: tuple[str, str, list[tuple], bool]) -> list[tuple]:
    """Inflate one chunk of files of one level into the level's arrays (opened r+).

    ``job = (level_dir, source_root, files, skip)``; each file is
    ``(rel, size, mtime_ns, ray_start, n, view_start, v)``. Returns
    ``[(rel, sha256 or None, None or the error record of a bad file, None)]``; a bad file
    raises unless ``skip`` (then its slices are left unwritten and it is reported).
    """
    ldir, source_root, files, skip = job
    mm = {k: np.load(Path(ldir) / f"{k}.npy", mmap_mode="r+") for k in PACK_KEYS}
    out: list[tuple] = []
    try:
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
            for k in PACK_KEYS:
                if k == "view_positions":
                    mm[k][v0 : v0 + v] = arrays[k]
                else:
                    mm[k][r0 : r0 + n] = arrays[k]
            out.append((rel, digest, None, None))
        for a in mm.values():
            a.flush()
    finally:
        del mm
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
        a = np.lib.format.open_memmap(
            ldir / f"{key}.npy", mode="w+", dtype=f.disk, shape=(rows, *f.shape)
        )
        del a


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
