"""What a resumed run keeps: every existing file is checked, and a bad one is rewritten.

A run into a folder holding a run of the same config (:func:`~gpuloader.generate.writer.
prepare_output`) skips the files that are already there, but only those that pass a check:

* **voxel files** (``level_0.npz``, sub-volume grids): the grid is rebuilt on every run anyway,
  so the file must hold exactly it: its bytes equal the deterministic npz of the grid (one
  compare), or else its ``voxels`` array opens and equals the grid (a file written by an
  older version of the writer).
* **ray files**: their SHA-256 is recorded when they are written, in
  ``OUT/generation_checksums.json`` (:data:`CHECKSUMS`, with each file's ray and hit counts).
  A file whose bytes hash to its record is kept without being inflated (about 1 GB/s of
  hashing, spread over the workers). A file without a record (written before an interrupted
  run could save the records, or by an older writer) gets every check the readers run
  (:func:`~gpuloader.format.npz_files.load_npz` and
  :func:`~gpuloader.format.validate.validate_rays`, plus its ``hash``/``level`` scalars) and is
  recorded when it passes. A file whose hash differs from its record is rewritten: the
  writer is deterministic, so the rewrite restores the bytes first written.

A file that fails is rewritten and named in the summary's ``rewritten`` list (file and
reason); ``gpuloader generate`` prints one line for each. So the advice of a damaged file's
error (:data:`~gpuloader.format.npz_files.FIX`: rerun the same command into the same OUT)
works: the same command repairs the dataset.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from gpuloader.errors import FileCheckError
from gpuloader.format import layout
from gpuloader.format.npz_files import load_npz
from gpuloader.format.validate import RAY_KEYS, validate_rays

__all__ = [
    "CHECKSUMS",
    "Record",
    "check_ray_file",
    "check_voxel_file",
    "load_records",
    "reason",
    "save_records",
    "sha256_bytes",
]

#: Beside generation_config.json: ``{"sha256": {ray file relative to OUT: [sha, rays, hits]}}``.
CHECKSUMS = "generation_checksums.json"
#: One ray file's record: (SHA-256 hex of its bytes, rays, hits).
Record = tuple[str, int, int]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_records(out: Path) -> dict[str, Record]:
    """The ray file records of ``out`` (empty when absent or unreadable: every file is checked)."""
    try:
        doc = layout.read_json(out / CHECKSUMS)
        table = doc["sha256"]
        return {str(k): (str(v[0]), int(v[1]), int(v[2])) for k, v in table.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return {}


def save_records(out: Path, records: dict[str, Record]) -> None:
    layout.atomic_write_json(
        out / CHECKSUMS, {"sha256": {k: list(v) for k, v in sorted(records.items())}}
    )


def reason(exc: BaseException) -> str:
    """A check's failure in a few words, without the file name or the advice."""
    if isinstance(exc, FileCheckError) and exc.detail:
        where = repr(exc.key) if exc.key else ""
        if exc.row is not None:
            where += f" row {exc.row}"
        return f"{where}: {exc.detail}" if where else str(exc.detail)
    if isinstance(exc, OSError):
        return f"cannot be read ({exc.strerror or exc})"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def check_voxel_file(path: Path, grid: np.ndarray, data: bytes) -> str | None:
    """None when ``path`` holds ``grid`` (its bytes are ``data``, or its ``voxels`` equal it);
    else why not."""
    try:
        if path.read_bytes() == data:
            return None
        found = load_npz(path, ("voxels",))["voxels"]
    except (FileCheckError, OSError) as exc:
        return reason(exc)
    if found.shape != grid.shape or not np.array_equal(found != 0, grid):
        return f"'voxels' {found.shape} {found.dtype} is not the grid of this config"
    return None


def _scalar(arrays: dict[str, np.ndarray], key: str) -> Any:
    value = arrays.get(key)
    return None if value is None or np.ndim(value) != 0 else value.item()


def _full_check(path: Path, level: int, key: str) -> tuple[Record | None, str | None]:
    """Every reader's check of a ray file, and its ``hash``/``level`` scalars (when present)."""
    try:
        arrays = load_npz(path, RAY_KEYS, optional=("hash", "level"))
        n = validate_rays(path, arrays)
    except (FileCheckError, OSError) as exc:
        return None, reason(exc)
    got_key, got_level = _scalar(arrays, "hash"), _scalar(arrays, "level")
    if (got_key is not None and str(got_key) != key) or (
        got_level is not None and int(got_level) != level
    ):
        return None, f"holds the rays of level {got_level}, {got_key!r}, not of this file"
    return ("", n, int(np.count_nonzero(arrays["hits"]))), None


def check_ray_file(
    path: Path, level: int, key: str, record: Record | None
) -> tuple[Record | None, str | None]:
    """Check an existing ray file: ``(its record, None)`` when it may be kept, else
    ``(None, why not)``.

    With ``record``: the file's SHA-256 must be the recorded one (nothing is inflated; on a
    mismatch the full check runs only to say what is wrong). Without: the full check.
    """
    try:
        sha = layout.sha256_file(path)
    except OSError as exc:
        return None, reason(exc)
    if record is not None and sha == record[0]:
        return record, None
    found, why = _full_check(path, level, key)
    if record is not None:  # changed since written: rewrite, even when it passes
        return None, why or "its bytes differ from those written (SHA-256 recorded then)"
    return (None, why) if found is None else ((sha, found[1], found[2]), None)
