"""RemotePackFiles: the files of a pack under an fsspec URL (:class:`PackFiles`).

Every call is bounded. One attempt (one request, or one ranged GET of at most
``part_bytes``) may take at most ``timeout_s``; transient failures are retried
``attempts`` times in all (:func:`faults.with_retries`); the futures of one
:meth:`RemotePackFiles.read_spans` are waited for at most the sum of those bounds.
For ``s3://`` the layers below are set not to retry on their own (ours is the only
retry loop) and to time out: botocore ``config_kwargs`` ``connect_timeout =
min(timeout_s, 10)``, ``read_timeout = timeout_s``, ``retries = {"total_max_attempts": 1}``,
``max_pool_connections >= max_concurrency``; the s3fs instance's own ``retries = 1``; and
fsspec's ``timeout=`` (``asyncio.wait_for``) bounds each whole call. Values given in
``storage_options["config_kwargs"]`` win.

The object pickles without its filesystem, thread pool and lock (it travels into worker
processes); they are made again on first use in each process (a fork is noticed too).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
from collections.abc import Sequence
from typing import Any

from gpuloader.errors import RemoteRetriesExhaustedError
from gpuloader.stores.files import check_spans
from gpuloader.stores.remote.cache import StripeCache
from gpuloader.stores.remote.faults import NO_KEY, ShortRead, classify, with_retries
from gpuloader.stores.remote.urls import filesystem, is_url, join

__all__ = [
    "DEFAULT_GAP_BYTES",
    "DEFAULT_PART_BYTES",
    "RemotePackFiles",
    "bounded_filesystem",
    "split_parts",
]

DEFAULT_PART_BYTES = 8 << 20
#: spans this close are fetched as one range (the bytes between read and dropped)
DEFAULT_GAP_BYTES = 1 << 20
_S3 = ("s3", "s3a")
_UNPICKLED = ("_fs", "_path", "_pool", "_lock", "_pid")


def bounded_filesystem(
    url: str, storage_options: dict[str, Any] | None, timeout_s: float, max_concurrency: int
) -> tuple[Any, str]:
    """``(fs, path)`` of ``url``, whose s3 layers time out after ``timeout_s`` and do not
    retry (see the module's docstring). fsspec's instance cache is keyed by the options,
    ours included, so the instance whose ``retries`` we lower is shared only by callers of
    this function with the same options."""
    opts = dict(storage_options or {})
    s3 = url.split("://", 1)[0].lower() in _S3
    if s3:
        cfg = dict(opts.get("config_kwargs") or {})
        cfg.setdefault("connect_timeout", min(timeout_s, 10.0))
        cfg.setdefault("read_timeout", timeout_s)
        cfg.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
        cfg.setdefault("max_pool_connections", max(10, max_concurrency))
        opts["config_kwargs"] = cfg
    fs, path = filesystem(url, opts)
    if s3 and hasattr(fs, "retries"):
        fs.retries = 1  # s3fs's own retry loop: one try (ours retries)
    return fs, path


#: a piece of a request: (offset in the request's bytes, nbytes, offset in out)
Piece = tuple[int, int, int]


def split_parts(
    spans: Sequence[tuple[int, int]], part_bytes: int, gap_bytes: int = 0
) -> list[tuple[int, int, list[Piece]]]:
    """The ranged GETs that read ``spans`` (ascending, not overlapping; one after the other
    in ``out``): ``(file offset, nbytes, pieces)`` each, ``pieces`` saying where its bytes
    go. A request of at most ``part_bytes`` takes the following spans while the bytes
    between them are at most ``gap_bytes`` (read and dropped: a request costs far more than a
    few KB on an object store); a longer span is cut into requests of ``part_bytes``."""
    parts: list[tuple[int, int, list[Piece]]] = []
    cur: list[Any] | None = None  # [start, end, pieces] of the request being filled
    at = 0
    for offset, nbytes in spans:
        pos = 0
        while pos < nbytes:
            a = offset + pos
            if cur is not None and a - cur[1] <= gap_bytes and a - cur[0] < part_bytes:
                take = min(nbytes - pos, part_bytes - (a - cur[0]))
                cur[2].append((a - cur[0], take, at + pos))
                cur[1] = a + take
            else:
                if cur is not None:
                    parts.append((cur[0], cur[1] - cur[0], cur[2]))
                take = min(nbytes - pos, part_bytes)
                cur = [a, a + take, [(0, take, at + pos)]]
            pos += take
        at += nbytes
    if cur is not None:
        parts.append((cur[0], cur[1] - cur[0], cur[2]))
    return parts


class RemotePackFiles:
    """The files of the pack at ``url`` (``s3://bucket/prefix``), read with range requests.

    Args:
        url: the pack's folder as an fsspec URL.
        storage_options: passed to fsspec (s3fs: ``key``, ``secret``, ``client_kwargs``
            (``endpoint_url``, ``region_name``), ``config_kwargs``, ``anon``...).
        part_bytes: the most bytes one ranged GET asks for.
        gap_bytes: spans at most this far apart are fetched as one range, the bytes between
            them read and dropped (fewer requests: the samples of one split lie between
            others' in a stripe file); 0: only adjacent spans are joined.
        max_concurrency: range requests in flight at once (one read_spans call).
        attempts: tries per request (transient errors: timeouts, 5xx, resets, short reads).
        timeout_s: the longest one try may take.
        cache: a :class:`StripeCache` for :meth:`read_spans` (None: no cache).
        pack_id: the version of the pack the cache keys name, e.g. a hash of its manifest;
            None: each file's ETag (one HEAD per file per object, remembered). Cache key:
            ``root | version | name | spans``.
    """

    remote = True

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        part_bytes: int = DEFAULT_PART_BYTES,
        gap_bytes: int = DEFAULT_GAP_BYTES,
        max_concurrency: int = 8,
        attempts: int = 5,
        timeout_s: float = 60.0,
        cache: StripeCache | None = None,
        pack_id: str | None = None,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
    ) -> None:
        if not is_url(url):
            raise ValueError(
                f"RemotePackFiles needs an fsspec URL (s3://bucket/prefix); got {url!r}"
            )
        for arg, value in (
            ("part_bytes", part_bytes),
            ("max_concurrency", max_concurrency),
            ("attempts", attempts),
        ):
            if int(value) < 1:
                raise ValueError(f"RemotePackFiles {arg} must be >= 1; got {value!r}")
        if int(gap_bytes) < 0:
            raise ValueError(f"RemotePackFiles gap_bytes must be >= 0; got {gap_bytes!r}")
        if not timeout_s > 0:
            raise ValueError(f"RemotePackFiles timeout_s must be > 0 seconds; got {timeout_s!r}")
        self.root = url.rstrip("/")
        self.protocol = self.root.split("://", 1)[0].lower()
        self.storage_options = dict(storage_options or {})
        self.part_bytes = int(part_bytes)
        self.gap_bytes = int(gap_bytes)
        self.max_concurrency = int(max_concurrency)
        self.attempts = int(attempts)
        self.timeout_s = float(timeout_s)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.cache = cache
        self.pack_id = pack_id
        self._versions: dict[str, str] = {}
        self._fs: Any = None
        self._path = ""
        self._pool: cf.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        #: bytes received and GET requests sent by this object (this process), all tries
        self.fetched_bytes = 0
        self.requests = 0

    def __repr__(self) -> str:
        return f"RemotePackFiles({self.root!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in _UNPICKLED:
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fs, self._path, self._pool = None, "", None
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def close(self) -> None:
        """Stop the thread pool (a later read starts a new one)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- the filesystem, made lazily in each process ------------------------------------

    def _filesystem(self) -> tuple[Any, str]:
        self._check_process()
        with self._lock:
            if self._fs is None:
                fs, path = bounded_filesystem(
                    self.root, self.storage_options, self.timeout_s, self.max_concurrency
                )
                self._fs, self._path = fs, path.rstrip("/")
            return self._fs, self._path

    def _executor(self) -> cf.ThreadPoolExecutor:
        self._check_process()
        with self._lock:
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(
                    self.max_concurrency, thread_name_prefix="gpuloader-remote"
                )
            return self._pool

    def _check_process(self) -> None:
        """After a fork the parent's filesystem and threads are unusable: start afresh."""
        if self._pid != os.getpid():
            self._fs, self._path, self._pool = None, "", None
            self._lock = threading.Lock()
            self._pid = os.getpid()

    def _call(self, method: str, name: str, **kwargs: Any) -> Any:
        """``fs.<method>(path of name, **kwargs)`` once, bounded by ``timeout_s``."""
        fs, base = self._filesystem()
        if getattr(fs, "async_impl", False):
            kwargs["timeout"] = self.timeout_s  # fsspec's sync(): asyncio.wait_for
        return getattr(fs, method)(f"{base}/{name.lstrip('/')}", **kwargs)

    def _retry(self, fn: Any, name: str, action: str) -> Any:
        return with_retries(
            fn,
            self.where(name),
            self.attempts,
            self.backoff_s,
            self.max_backoff_s,
            action=action,
        )

    # -- PackFiles -----------------------------------------------------------------------

    def where(self, name: str) -> str:
        return join(self.root, name)

    def exists(self, name: str) -> bool:
        return bool(self._retry(lambda: self._call("exists", name), name, "check"))

    def size(self, name: str) -> int:
        return int(self._retry(lambda: self._call("size", name), name, "stat"))

    def sizes(self, folder: str) -> dict[str, int]:
        """``{file name: bytes}`` of the files directly in ``folder`` (one listing; empty
        if there are none)."""

        def once() -> dict[str, int]:
            kw = {"refresh": True} if self.protocol in _S3 else {}
            try:
                entries = self._call("ls", folder.strip("/"), detail=True, **kw)
            except FileNotFoundError as e:
                if classify(e) == NO_KEY:
                    return {}
                raise
            return {
                str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: int(e["size"])
                for e in entries
                if e.get("type") == "file"
            }

        return self._retry(once, folder, "list")

    def read_bytes(self, name: str) -> bytes:
        """The whole object in one GET (RemoteNotFoundError, a FileNotFoundError, if
        missing)."""
        kw = {"max_concurrency": 1} if self.protocol in _S3 else {}

        def once() -> bytes:
            data = self._call("cat_file", name, **kw)
            self._count(len(data))
            return data

        return bytes(self._retry(once, name, "read"))

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.fetched_bytes += int(nbytes)
            self.requests += 1

    def read_spans(self, name: str, spans: Sequence[tuple[int, int]], out: memoryview) -> None:
        """The spans into ``out`` (see :class:`PackFiles`): from the cache when it holds
        them, else with concurrent ranged GETs of at most ``part_bytes`` (then cached).

        Raises:
            RemoteTruncatedError: a part came back short on every try, or the object ends
                before a span starts (both are IncompletePackError).
            RemoteRetriesExhaustedError: transient errors past the tries, or the parts did
                not finish within their bound.
            RemoteStoreError: (subclasses) not found, access denied, unreachable.
        """
        out = memoryview(out).cast("B")
        got = check_spans(spans, out)
        if out.nbytes == 0:
            return
        key = self._cache_key(name, got) if self.cache is not None else None
        if key is not None and self.cache.get(key, out):  # type: ignore[union-attr]
            return
        parts = split_parts(got, self.part_bytes, self.gap_bytes)
        if len(parts) == 1:
            self._fetch(name, *parts[0], out, None)
        else:
            self._fetch_all(name, parts, out)
        if key is not None:
            self.cache.put(key, out)  # type: ignore[union-attr]

    def _cache_key(self, name: str, spans: list[tuple[int, int]]) -> str:
        version = self.pack_id
        if version is None:
            version = self._versions.get(name)
            if version is None:
                info = self._retry(lambda: self._call("info", name), name, "stat")
                tags = ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified")
                version = next((str(info[k]) for k in tags if k in info), str(info.get("size")))
                self._versions[name] = version
        return f"{self.root}|{version}|{name}|" + ",".join(f"{a}+{n}" for a, n in spans)

    def _fetch(
        self,
        name: str,
        offset: int,
        nbytes: int,
        pieces: list[Piece],
        out: memoryview,
        gate: _Gate | None,
    ) -> None:
        """One part: a ranged GET (retried), its length checked, its ``pieces`` copied to
        ``out`` (:func:`split_parts`)."""

        def once() -> bytes:
            data = self._call("cat_file", name, start=offset, end=offset + nbytes)
            self._count(len(data))
            if len(data) != nbytes:
                raise ShortRead(offset, nbytes, len(data))
            return data

        data = memoryview(self._retry(once, name, "read"))

        def place() -> None:
            for p, n, at in pieces:
                out[at : at + n] = data[p : p + n]

        if gate is None:
            place()
            return
        with gate.lock:
            if not gate.closed:
                place()

    def _bound_s(self, nparts: int) -> float:
        """How long ``nparts`` parts may take at most, every try and wait included."""
        per_part = self.attempts * (self.timeout_s + self.max_backoff_s)
        rounds = -(-nparts // self.max_concurrency)
        return rounds * per_part + 1.0

    def _fetch_all(self, name: str, parts: list[tuple[int, int, int]], out: memoryview) -> None:
        pool = self._executor()
        gate = _Gate()
        futures = [pool.submit(self._fetch, name, *p, out, gate) for p in parts]
        bound = self._bound_s(len(parts))
        try:
            done, pending = cf.wait(futures, timeout=bound, return_when=cf.FIRST_EXCEPTION)
            for f in futures:
                if f in done and f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]
            if pending:
                raise RemoteRetriesExhaustedError(
                    f"{self.where(name)}: {len(pending)} of {len(parts)} range reads did not "
                    f"finish within {bound:.1f} s; check the object store's health (or raise "
                    "timeout_s)",
                    url=self.where(name),
                )
        finally:
            with gate.lock:  # no part writes into out after we return or raise
                gate.closed = True
            for f in futures:
                f.cancel()


class _Gate:
    """Closed when a read_spans call returns: late parts then do not write into ``out``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed = False
