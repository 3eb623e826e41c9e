"""Steps every pack build shares, whatever its layout (rows or striped).

Reading one source file (:func:`read_source`) and a ray file's arrays with every check
(:func:`ray_arrays`), which bad files a skip run
leaves out (:func:`skippable`), running the jobs in worker processes (:func:`run_jobs`), the
atomic end of a build (:func:`fsync_tree`, :func:`swap_into_place`, :func:`safe_to_replace`),
what a build says about files left out (:func:`refuse_or_warn_left_out`) and its summary
(:func:`summary`). :func:`~gpuloader.stores.pack.build.pack_rays` runs them.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from gpuloader.errors import DamagedFileError, SkippedFileWarning, StalePackError
from gpuloader.format.npz_files import load_npz, npz_error
from gpuloader.format.validate import as_ray_dtypes, classify, validate_rays
from gpuloader.stores.pack.manifest import (
    MANIFEST,
    PACK_KEYS,
    manifest_rebuild,
    pack_layout,
    recorded_error,
)

__all__ = [
    "chunk_jobs",
    "fsync_tree",
    "ray_arrays",
    "read_source",
    "refuse_or_warn_left_out",
    "run_jobs",
    "safe_to_replace",
    "skippable",
    "summary",
    "swap_into_place",
]


def read_source(path: Path, size: int, mtime_ns: int) -> tuple[bytes, str]:
    """A source file's bytes and sha256, read once: ``(data, hex digest)``.

    Raises:
        FileNotFoundError: the file is gone.
        UnreadableFileError (a DamagedFileError): it cannot be read.
        StalePackError: its size or mtime differ from ``size``/``mtime_ns`` (pass 1's).
    """
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
    return data, hashlib.sha256(data).hexdigest()


def ray_arrays(path: Path, data: bytes, n: int, v: int) -> dict[str, np.ndarray]:
    """A ray file's arrays from its bytes, with every check: :data:`PACK_KEYS` -> on-disk
    dtypes (``origins`` (n, 3) float32 ... ``view_positions`` (v, 3) float32).

    Raises:
        DamagedFileError: any check of :mod:`gpuloader.format.validate` fails, or its row
            counts differ from the headers' ``n``/``v``.
    """
    # every check of gpuloader.format.validate: a bad file is never stored
    arrays = as_ray_dtypes(path, load_npz(path, PACK_KEYS, data=data))
    got_n = validate_rays(path, arrays)
    got_v = arrays["view_positions"].shape[0]
    if (got_n, got_v) != (n, v):
        raise DamagedFileError(
            f"{path}: holds {got_n} rays and {got_v} views but its headers said "
            f"{n} and {v}; the file is damaged: regenerate it or delete it"
        )
    return arrays


def skippable(exc: BaseException) -> bool:
    """A bad file that ``on_error="skip"`` leaves out (not a missing file, not a pack error)."""
    return classify(exc) in ("unreadable", "invalid", "damaged")


def safe_to_replace(out_dir: Path) -> bool:
    """An empty folder, a pack, or what an interrupted pack leaves (level_* and its files)."""
    if not out_dir.exists():
        return True
    if not out_dir.is_dir():
        return False
    names = {p.name for p in out_dir.iterdir()}
    if not names or MANIFEST in names:
        return True
    return all(n.startswith("level_") and (out_dir / n).is_dir() for n in names)


def chunk_jobs(entries: list[tuple], workers: int | None) -> list[list[tuple]]:
    """A level's file entries cut into jobs of up to 64 files (about 4 jobs per worker)."""
    chunk = max(1, min(64, len(entries) // (4 * max(1, workers or os.cpu_count() or 1))))
    return [entries[i : i + chunk] for i in range(0, len(entries), chunk)]


def run_jobs(
    fn: Callable[[tuple], list[tuple]], jobs: list[tuple], workers: int | None
) -> Iterable[list[tuple]]:
    """Results of ``fn`` (a module-level function) for every job, in completion order (a
    process pool when there are several workers and jobs, else this process)."""
    workers = int(workers or os.cpu_count() or 1)
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    with mp.get_context(method).Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(fn, jobs)


def fsync_tree(root: Path) -> None:
    """Flush the pack's files to disk before the manifest makes it count as whole."""
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an old ``out_dir`` is moved aside first, then removed."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def refuse_or_warn_left_out(manifest: dict[str, Any], out_dir: Path, skip: bool) -> None:
    """A pack that left bad files out: a warning per file (``skip``), or, for an
    ``on_error="raise"`` run, the first file's recorded error (called by ``pack_rays``: the
    warnings point at its caller)."""
    refused = manifest.get("refused") or {}  # folders or links of the tree (absolute paths)
    bad = manifest.get("bad_files") or {}
    if not bad and not refused:
        return
    root = Path(manifest["source_root"])
    if not skip:
        bad = {**refused, **bad}
        rel = min(bad)
        rebuild = manifest_rebuild(manifest, out_dir, root)
        raise recorded_error(
            str(root / rel),
            bad[rel],
            out_dir,
            f"(the existing pack left {len(bad)} bad file(s) out; repair them and rebuild it: "
            f"`{rebuild}`, or accept the gaps: `gpuloader pack ... --on-error skip`)",
            str(root / rel),
        )
    for path, rec in sorted(refused.items()):
        warnings.warn(
            f"gpuloader pack: left out {path}: {rec['message']}",
            SkippedFileWarning,
            stacklevel=3,
        )
    for _, rec in sorted(bad.items()):
        what = "the sample of a bad voxel file" if rec.get("voxel_file") else "a bad ray file"
        warnings.warn(
            f"gpuloader pack: left out {what}: {rec['message']}",
            SkippedFileWarning,
            stacklevel=3,
        )


def summary(manifest: dict[str, Any], out_dir: Path, seconds: float, up_to_date: bool) -> dict:
    """What ``pack_rays`` returns, from the pack's manifest (module doc of
    :mod:`gpuloader.stores.pack.build`)."""
    striped = pack_layout(manifest) == "striped"
    level_keys = ("files", "rays", "views", "stripes", "record_bytes") if striped else None
    out = {
        "out_dir": str(out_dir),
        "source_root": manifest["source_root"],
        "pack_id": manifest["pack_id"],
        "layout": pack_layout(manifest),
        "levels": {
            int(lv): {k: info[k] for k in level_keys or ("files", "rays", "views")}
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
    if striped:
        out["stripe_rays"] = int(manifest["stripe_rays"])
        out["seed"] = int(manifest["seed"])
        out["dataset_dir"] = manifest["dataset_dir"]
    return out
