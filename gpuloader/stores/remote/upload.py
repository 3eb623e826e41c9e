"""upload_pack: a finished local pack folder to an fsspec URL, the manifest last.

Order: the remote ``manifest.json`` is deleted first (a reader never takes a half-replaced
pack for a whole one), then every other file is uploaded (concurrently) and its remote
size checked against the local one, then ``manifest.json``. An interrupted upload leaves
no remote manifest, which readers report as an incomplete pack. Timeouts and retries are
those of :func:`files.bounded_filesystem` (``timeout_s`` bounds each request's connect and
read waits; a whole file's upload, possibly multipart, is retried ``attempts`` times).
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from pathlib import Path
from typing import Any

from gpuloader.errors import IncompletePackError, RemoteTruncatedError
from gpuloader.stores.remote.faults import NO_KEY, classify, with_retries
from gpuloader.stores.remote.files import bounded_filesystem
from gpuloader.stores.remote.urls import join

__all__ = ["MANIFEST", "upload_pack"]

MANIFEST = "manifest.json"


def _local_files(local: Path) -> list[tuple[str, Path]]:
    """(name relative to the pack, path) of every file but the manifest, sorted."""
    return sorted(
        (p.relative_to(local).as_posix(), p)
        for p in local.rglob("*")
        if p.is_file() and p.relative_to(local).as_posix() != MANIFEST
    )


def upload_pack(
    local_dir: Path | str,
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    progress: bool = True,
    max_concurrency: int = 8,
    attempts: int = 5,
    timeout_s: float = 60.0,
) -> None:
    """Upload the pack folder ``local_dir`` (holding ``manifest.json``) to ``url``.

    Raises:
        IncompletePackError: ``local_dir`` has no ``manifest.json`` (an unfinished pack).
        RemoteTruncatedError: a remote file's size differs from the local one after upload.
        RemoteStoreError: (subclasses) denied, unreachable, no such bucket, retries spent.
        FileNotFoundError / PermissionError: a local file cannot be read.
    """
    local = Path(local_dir)
    if not (local / MANIFEST).is_file():
        raise IncompletePackError(
            f"{local}: no {MANIFEST}, so this is no finished pack (an interrupted build?); "
            "build the pack again, then upload it"
        )
    if max_concurrency < 1:
        raise ValueError(f"upload_pack max_concurrency must be >= 1; got {max_concurrency}")
    fs, base = bounded_filesystem(url, storage_options, timeout_s, max_concurrency)
    base = base.rstrip("/")
    files = _local_files(local)
    total = sum(p.stat().st_size for _, p in files) + (local / MANIFEST).stat().st_size

    def retry(fn: Any, name: str, action: str) -> Any:
        return with_retries(fn, join(url, name), attempts, action=action)

    def remove_manifest() -> None:
        try:
            fs.rm_file(f"{base}/{MANIFEST}")
        except FileNotFoundError as e:  # none there yet (a missing bucket is an error)
            if classify(e) != NO_KEY:
                raise

    retry(remove_manifest, MANIFEST, "delete")
    bar = _bar(total, url, progress)
    try:
        if files:
            pool = cf.ThreadPoolExecutor(min(max_concurrency, len(files)))
            try:
                jobs = [pool.submit(_put, fs, base, url, n, p, retry, bar) for n, p in files]
                for job in cf.as_completed(jobs):
                    job.result()
            finally:  # on an error, the files not started yet are not sent
                pool.shutdown(wait=True, cancel_futures=True)
        _put(fs, base, url, MANIFEST, local / MANIFEST, retry, bar)
    finally:
        bar.close()


def _put(fs: Any, base: str, url: str, name: str, path: Path, retry: Any, bar: Any) -> None:
    """One file up (retried), then its remote size checked."""
    remote = f"{base}/{name}"
    with open(path, "rb"):  # a local file we cannot read: its own error, not a remote one
        pass
    retry(lambda: fs.put_file(str(path), remote), name, "upload")
    fs.invalidate_cache(remote)
    want = path.stat().st_size
    got = retry(lambda: fs.size(remote), name, "check the upload of")
    if got != want:
        raise RemoteTruncatedError(
            f"{join(url, name)}: holds {got} bytes after the upload, the local {path} "
            f"{want}; upload the pack again",
            url=join(url, name),
        )
    bar.update(want)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, url: str, progress: bool) -> Any:
    """A tqdm bar in bytes (thread-safe updates), or a stand-in."""
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"upload {url}")
    lock = threading.Lock()

    class Bar:
        def update(self, n: int) -> None:
            with lock:
                bar.update(n)

        def close(self) -> None:
            bar.close()

    return Bar()
