"""Steps every pack build shares, whatever its layout (rows or striped).

Reading one source file (:func:`read_source`) and a ray file's arrays with every check
(:func:`ray_arrays`), which bad files a skip run
leaves out (:func:`skippable`), running the jobs in worker processes (:func:`run_jobs`), the
atomic end of a build (:func:`fsync_tree`, :func:`swap_into_place`, :func:`safe_to_replace`),
what a build says about files left out (:func:`refuse_or_warn_left_out`) and its summary
(:func:`summary`). :func:`~gpuloader.stores.pack.build.pack_rays` runs them.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import hashlib
import multiprocessing as mp
import os
import shutil
import socket
import sys
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from gpuloader.errors import (
    DamagedFileError,
    GPULoaderError,
    PackError,
    PackSpaceError,
    PackWriteError,
    SkippedFileWarning,
    StalePackError,
)
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
    "check_free_space",
    "fsync_tree",
    "new_file",
    "new_npy",
    "npy_data_offset",
    "pack_of_tmp",
    "pwrite_all",
    "remove_stale_tmp",
    "tmp_folder",
    "write_error",
    "writing",
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


#: seconds between checks that the worker processes are alive while waiting for results
POLL_S = 1.0


def run_jobs(
    fn: Callable[[tuple], list[tuple]], jobs: list[tuple], workers: int | None
) -> Iterable[list[tuple]]:
    """Results of ``fn`` (a module-level function) for every job, in completion order (a
    process pool when there are several workers and jobs, else this process).

    A job's error is raised here (the other jobs are cancelled, the running ones finish);
    a worker that dies (a signal: SIGBUS, SIGKILL) raises :class:`PackError` at once rather
    than leaving the wait without an end.
    """
    workers = int(workers or os.cpu_count() or 1)
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context(method))
    interrupted = False
    try:
        pending = {pool.submit(fn, job) for job in jobs}
        while pending:
            done, pending = wait(pending, timeout=POLL_S, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
    except KeyboardInterrupt:
        interrupted = True
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        raise
    except BrokenProcessPool as exc:
        raise PackError(
            "gpuloader pack: a worker process died (killed by a signal: out of memory, or a "
            "bus error writing to a full disk?); nothing was kept: run it again, with "
            "--workers 1 to see the error"
        ) from exc
    finally:
        # cancel what has not started; running jobs finish (bounded: one chunk of files)
        pool.shutdown(wait=not interrupted, cancel_futures=True)


# Files are made at full size with posix_fallocate (a full disk fails there, ENOSPC) and
# filled with pwrite: a memory map written on a full disk dies of SIGBUS.


def pwrite_all(fd: int, data: Any, offset: int) -> None:
    """Write all of ``data`` (bytes or a contiguous array) at ``offset`` of ``fd``."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
    else:
        view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def new_file(path: Path, nbytes: int, header: bytes = b"") -> None:
    """Make ``path`` of ``len(header) + nbytes`` bytes, ``header`` first, the rest zeros,
    its blocks allocated (``posix_fallocate``; a sparse file where the file system has no
    fallocate)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(fd, header, 0)
        total = len(header) + int(nbytes)
        try:
            if total:
                os.posix_fallocate(fd, 0, total)
        except OSError as exc:
            if exc.errno not in (errno_codes.EOPNOTSUPP, errno_codes.EINVAL, errno_codes.ENOSYS):
                raise
            os.ftruncate(fd, total)
        except AttributeError:  # pragma: no cover - no posix_fallocate (macOS)
            os.ftruncate(fd, total)
    finally:
        os.close(fd)


def npy_header(dtype: Any, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.lib.format.open_memmap`` writes for ``dtype``/``shape``."""
    import io

    d = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": tuple(int(x) for x in shape),
    }
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:  # pragma: no cover - a header over 64 KiB
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def new_npy(path: Path, dtype: Any, shape: tuple[int, ...]) -> int:
    """Make a zero-filled ``.npy`` of ``dtype``/``shape`` at ``path`` (:func:`new_file`);
    returns the offset of its data."""
    header = npy_header(dtype, shape)
    new_file(path, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize, header)
    return len(header)


def npy_data_offset(path: Path) -> int:
    """The offset of an ``.npy`` file's data (after its header)."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else None
        (read or np.lib.format.read_array_header_2_0)(f)
        return f.tell()


SPACE_ERRNOS = (errno_codes.ENOSPC, errno_codes.EDQUOT, errno_codes.EFBIG)


def write_error(out_dir: Path, exc: OSError) -> PackWriteError:
    """The named error of a failed write of the pack ``out_dir`` (its partial files are
    removed by the caller): :class:`PackSpaceError` for ENOSPC/EDQUOT/EFBIG."""
    what = exc.strerror or str(exc)
    where = f" (writing {exc.filename})" if exc.filename else ""
    space = exc.errno in SPACE_ERRNOS
    fix = (
        f"free space on {out_dir.parent}'s disk or choose another OUT"
        if space
        else f"check the disk of {out_dir.parent}"
    )
    cls = PackSpaceError if space else PackWriteError
    return cls(
        f"{out_dir}: cannot write the pack: [Errno {exc.errno}] {what}{where}; the partial "
        f"pack was removed: {fix}",
        folder=out_dir,
        errno=exc.errno,
    )


@contextlib.contextmanager
def writing(out_dir: Path) -> Iterator[None]:
    """Turn an ``OSError`` of the body (not a named error) into :func:`write_error`."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, GPULoaderError):
            raise
        raise write_error(out_dir, exc) from exc


def check_free_space(out_dir: Path, needed: int) -> None:
    """Refuse a pack of about ``needed`` bytes when ``out_dir``'s disk has less free.

    Raises:
        PackSpaceError: naming the folder, the bytes needed and free.
    """
    free = int(shutil.disk_usage(out_dir.parent).free)
    if needed > free:
        raise PackSpaceError(
            f"{out_dir}: not enough free space for the pack: it needs about {needed:,} bytes "
            f"({needed / 2**20:,.1f} MiB) and {out_dir.parent} has {free:,} bytes "
            f"({free / 2**20:,.1f} MiB) free; nothing was written: free space or choose "
            "another OUT",
            folder=out_dir,
            needed=needed,
            free=free,
        )


OWNER = ".owner"  # inside a temporary folder: "<host> <pid>" (removed before the swap)


def tmp_folder(out_dir: Path) -> Path:
    """A new temporary folder's path beside ``out_dir``: ``.<name>.tmp-<pid>-<id>``."""
    return out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def pack_of_tmp(tmp: Path) -> Path:
    """The pack folder a :func:`tmp_folder` is built for."""
    return tmp.parent / tmp.name[1:].rsplit(".tmp-", 1)[0]


def make_tmp(tmp: Path) -> None:
    """Create ``tmp`` and record its owner (this host and process) in it."""
    tmp.mkdir()
    (tmp / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")


def remove_stale_tmp(out_dir: Path) -> list[Path]:
    """Remove the temporary folders of earlier runs for ``out_dir`` whose process is gone
    (of this host; folders without a recorded pid are left); returns those removed."""
    prefix = f".{out_dir.name}.tmp-"
    removed: list[Path] = []
    try:
        entries = list(os.scandir(out_dir.parent))
    except OSError:
        return removed
    for e in entries:
        if not e.name.startswith(prefix) or not e.is_dir(follow_symlinks=False):
            continue
        pid_text = e.name[len(prefix) :].partition("-")[0]
        if not (pid_text.isascii() and pid_text.isdigit()) or "-" not in e.name[len(prefix) :]:
            continue  # an older run's name without a pid: not known to be stale
        try:
            host = (Path(e.path) / OWNER).read_text().split()[0]
        except (OSError, IndexError):
            host = None
        if host is not None and host != socket.gethostname():
            continue
        if _alive(int(pid_text)):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(Path(e.path))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


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
