"""A local S3 for the object-storage tests: moto's server on 127.0.0.1 and a fault proxy.

``start_s3_server()`` starts moto (in-process, threaded, a free port) with one bucket;
:class:`FaultProxy` sits in front of it and can be switched at run time to answer 503
(``fail_next``), cut ranged GETs short (``truncate_next``), hold responses back
(``delay``) or refuse connections (``stop``); it counts what it forwards (``requests``).
``write_fake_pack`` makes a pack-shaped folder of random files. Dummy credentials travel
in ``storage_options``, not in the environment.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

REGION = "us-east-1"
KEY, SECRET = "testing-key", "testing-secret"

_SLOW_DOWN = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>"
)


def storage_options(endpoint_url: str, key: str = KEY, secret: str = SECRET) -> dict[str, Any]:
    """s3fs options for ``endpoint_url`` with the dummy credentials."""
    return {
        "key": key,
        "secret": secret,
        "client_kwargs": {"endpoint_url": endpoint_url, "region_name": REGION},
    }


@dataclass
class S3Server:
    """A running moto server with bucket ``bucket``."""

    endpoint_url: str
    bucket: str
    server: Any

    @property
    def storage_options(self) -> dict[str, Any]:
        return storage_options(self.endpoint_url)

    def url(self, prefix: str) -> str:
        """``s3://<bucket>/<prefix>``."""
        return f"s3://{self.bucket}/{prefix.strip('/')}"

    @contextmanager
    def auth_enforced(self) -> Iterator[None]:
        """moto checks credentials while inside (unknown keys: 403 InvalidAccessKeyId)."""
        from moto import settings

        before = settings.INITIAL_NO_AUTH_ACTION_COUNT
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        try:
            yield
        finally:
            settings.INITIAL_NO_AUTH_ACTION_COUNT = before

    def stop(self) -> None:
        self.server.stop()


def start_s3_server(bucket: str = "gpuloader-test") -> S3Server:
    """moto on 127.0.0.1 (a free port) holding the empty bucket ``bucket``."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Server(f"http://{host}:{port}", bucket, server)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options)
    fs.call_s3("create_bucket", Bucket=bucket)  # no LocationConstraint in us-east-1
    return s3


PACK_FILES = {
    "level_0/index.npz": 3_000,
    "level_0/grids.npy": 40_000,
    "level_0/stripe_0.bin": 2_500_000,
    "level_0/stripe_1.bin": 300_001,
}


def write_fake_pack(folder: Path, seed: int = 0) -> Path:
    """A pack-shaped folder: random bytes in the files of PACK_FILES, and a manifest."""
    rng = np.random.default_rng(seed)
    for name, n in PACK_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    (folder / "manifest.json").write_text(json.dumps({"version": 1, "seed": seed}))
    return folder


def free_port() -> int:
    """A port of 127.0.0.1 nothing listens on (closed again at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Faults:
    fail: int = 0
    fail_method: str | None = None
    truncate: int = 0
    delay_s: float = 0.0
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` (an ``http://host:port``).

    Faults, each for the next ``n`` requests it applies to: ``fail_next(n)`` answers
    503 SlowDown (without forwarding), ``truncate_next(n)`` cuts ranged GETs to half their
    bytes (consistent headers: the client sees a short body), ``delay(s)`` holds every
    response ``s`` seconds, ``stop()`` closes the port and every open connection.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.faults = _Faults()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.sockets: set[socket.socket] = set()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    @property
    def storage_options(self) -> dict[str, Any]:
        return storage_options(self.endpoint_url)

    @property
    def requests(self) -> list[tuple[str, str, str | None]]:
        """(method, path, Range header) of every request received, in order."""
        with self.lock:
            return list(self.faults.requests)

    def count(self, method: str | None = None, ranged: bool | None = None) -> int:
        return sum(
            1
            for m, _, r in self.requests
            if (method is None or m == method) and (ranged is None or (r is not None) == ranged)
        )

    def fail_next(self, n: int, method: str | None = None) -> None:
        """Answer 503 SlowDown to the next ``n`` requests (of ``method`` only, if given)."""
        with self.lock:
            self.faults.fail, self.faults.fail_method = n, method

    def truncate_next(self, n: int) -> None:
        with self.lock:
            self.faults.truncate = n

    def delay(self, seconds: float) -> None:
        with self.lock:
            self.faults.delay_s = seconds

    def stop(self) -> None:
        """Refuse new connections and drop the open ones (a dead server)."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        with self.lock:
            live = list(self.sockets)
        for s in live:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _take(self, method: str, path: str, rng: str | None) -> tuple[bool, bool, float]:
        with self.lock:
            f = self.faults
            f.requests.append((method, path, rng))
            fail = f.fail > 0 and f.fail_method in (None, method)
            f.fail -= fail
            cut = not fail and f.truncate > 0 and method == "GET" and rng is not None
            f.truncate -= cut
            return fail, cut, f.delay_s


def _read_body(rfile: Any, headers: Any) -> bytes:
    """The request body as sent (a chunked one kept chunked, to be forwarded raw)."""
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        raw = bytearray()
        while True:
            line = rfile.readline()
            raw += line
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    t = rfile.readline()
                    raw += t
                    if t in (b"\r\n", b"\n", b""):
                        return bytes(raw)
            raw += rfile.read(size + 2)
    return rfile.read(int(headers.get("Content-Length") or 0))


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        upstream_conn: http.client.HTTPConnection | None = None

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def setup(self) -> None:
            super().setup()
            with proxy.lock:
                proxy.sockets.add(self.connection)

        def finish(self) -> None:
            with proxy.lock:
                proxy.sockets.discard(self.connection)
            if self.upstream_conn is not None:
                self.upstream_conn.close()
            try:
                super().finish()
            except OSError:
                pass

        def _forward(self) -> None:
            body = _read_body(self.rfile, self.headers)
            fail, cut, delay_s = proxy._take(self.command, self.path, self.headers.get("Range"))
            if delay_s and proxy.stopped.wait(delay_s):
                self.close_connection = True
                return
            if fail:
                self._send(503, [("Content-Type", "application/xml")], _SLOW_DOWN)
                return
            if self.upstream_conn is None:
                self.upstream_conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
            conn = self.upstream_conn
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                conn.putheader(k, v)
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            headers = [
                (k, v)
                for k, v in resp.getheaders()
                if k.lower() not in ("transfer-encoding", "connection", "content-length")
            ]
            if cut and resp.status == 206 and len(data) > 1:
                data = data[: len(data) // 2]
                headers = [
                    (k, _shorter_range(v, len(data)) if k.lower() == "content-range" else v)
                    for k, v in headers
                ]
            length = int(resp.getheader("Content-Length") or 0) if self.command == "HEAD" else None
            self._send(resp.status, headers, data, length)

        def _send(self, status: int, headers: list, data: bytes, length: int | None = None) -> None:
            self.send_response_only(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data) if length is None else length))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

    return Handler


def _shorter_range(value: str, nbytes: int) -> str:
    """``bytes a-b/total`` with ``b`` moved so the range holds ``nbytes``."""
    m = re.match(r"bytes (\d+)-(\d+)/(\S+)", value)
    if not m:
        return value
    start = int(m.group(1))
    return f"bytes {start}-{start + nbytes - 1}/{m.group(3)}"
