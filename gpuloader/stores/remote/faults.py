"""What fsspec/s3fs/botocore/aiohttp raise, as gpuloader's named remote errors, and the
bounded retry loop for the transient ones.

s3fs turns a botocore ``ClientError`` into a builtin (``FileNotFoundError`` for NoSuchKey /
NoSuchBucket / 404, ``PermissionError`` for AccessDenied / InvalidAccessKeyId / 403,
``OSError(EBUSY)`` for SlowDown / 503, ``OSError(EINVAL)`` for InvalidRange) with the
``ClientError`` as ``__cause__``; connection failures arrive as botocore
``EndpointConnectionError`` over aiohttp's ``ClientConnectorError`` over
``ConnectionRefusedError`` / ``socket.gaierror``; timeouts as ``ReadTimeoutError`` or
fsspec's ``FSTimeoutError``. :func:`classify` reads the whole ``__cause__`` /
``__context__`` chain, by class *name* (botocore and aiohttp are not imported here).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from gpuloader.errors import (
    RemoteAccessDeniedError,
    RemoteNotFoundError,
    RemoteRetriesExhaustedError,
    RemoteStoreError,
    RemoteTruncatedError,
    RemoteUnreachableError,
)
from gpuloader.stores.remote.urls import split_bucket

__all__ = ["ShortRead", "classify", "is_transient", "remote_error", "with_retries"]

T = TypeVar("T")

TRANSIENT = "transient"
UNREACHABLE = "unreachable"
NO_BUCKET = "no_bucket"
NO_KEY = "no_key"
DENIED = "denied"
TRUNCATED = "truncated"  # a short ranged read: transient
ENDS_EARLY = "ends_early"  # the object ends before the requested range starts: final
OTHER = "other"

_DENIED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
    "AccountProblem",
    "403",
    "401",
}
_TRANSIENT_CODES = {
    "SlowDown",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "XAmzContentSHA256Mismatch",
}
_REFUSED = {"ConnectionRefusedError", "gaierror", "ClientConnectorDNSError"}
_TRANSIENT_TYPES = {
    "FSTimeoutError",
    "TimeoutError",
    "timeout",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "SocketTimeoutError",
    "ServerTimeoutError",
    "ConnectionResetError",
    "ConnectionAbortedError",
    "BrokenPipeError",
    "ServerDisconnectedError",
    "ConnectionClosedError",
    "ClientPayloadError",
    "IncompleteReadError",
    "IncompleteRead",
    "ResponseStreamingError",
    "ResponseParserError",
}
_CONNECT = {"EndpointConnectionError", "ClientConnectorError", "ProxyConnectionError"}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}


class ShortRead(Exception):
    """A ranged read returned fewer bytes than asked (transient: retried, then
    :class:`RemoteTruncatedError`)."""

    def __init__(self, offset: int, expected: int, got: int) -> None:
        super().__init__(f"{got} of {expected} bytes at offset {offset}")
        self.offset, self.expected, self.got = offset, expected, got


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        todo += [e.__cause__, e.__context__]
    return out


def _names(e: BaseException) -> set[str]:
    return {k.__name__ for k in type(e).__mro__}


def _response(chain: list[BaseException]) -> tuple[str, int] | None:
    """(error code, HTTP status) of the first botocore ``ClientError`` in the chain."""
    for e in chain:
        r = getattr(e, "response", None)
        if isinstance(r, dict) and "Error" in r:
            code = str(r["Error"].get("Code", ""))
            status = int(r.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return code, status
    return None


def classify(exc: BaseException) -> str | None:
    """The kind of a remote failure (this module's constants), or None for an exception
    that is no remote failure (a bug: re-raised as it is)."""
    chain = _chain(exc)
    if any(isinstance(e, ShortRead) for e in chain):
        return TRUNCATED
    cr = _response(chain)
    if cr is not None:
        code, status = cr
        if code == "NoSuchBucket":
            return NO_BUCKET
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            return NO_KEY
        if code in _DENIED_CODES or status in (401, 403):
            return DENIED
        if code == "InvalidRange" or status == 416:
            return ENDS_EARLY
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return TRANSIENT
        return OTHER
    names = set().union(*(_names(e) for e in chain))
    if names & _REFUSED:
        return UNREACHABLE
    if names & _TRANSIENT_TYPES:
        return TRANSIENT
    if names & _CONNECT:
        return UNREACHABLE
    if names & _NO_CREDENTIALS:
        return DENIED
    if isinstance(exc, FileNotFoundError):
        return NO_BUCKET if "bucket" in str(exc).lower() else NO_KEY
    if isinstance(exc, PermissionError):
        return DENIED
    if isinstance(exc, OSError):
        return OTHER
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying may help (timeouts, 5xx / SlowDown, resets, short reads)."""
    return classify(exc) in (TRANSIENT, TRUNCATED)


def _detail(exc: BaseException) -> str:
    cr = _response(_chain(exc))
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    code = f" {cr[0]} (HTTP {cr[1]})" if cr else ""
    if not text and _names(exc) & _TRANSIENT_TYPES:
        text = "no answer within the timeout"
    return f"{type(exc).__name__}{code}: {text}" if text else f"{type(exc).__name__}{code}"


def remote_error(exc: BaseException, url: str, *, action: str = "read") -> RemoteStoreError | None:
    """The named error for ``exc`` met while ``action``-ing ``url`` (None: not a remote
    failure). The caller raises it ``from exc``."""
    if isinstance(exc, RemoteStoreError):
        return exc
    kind = classify(exc)
    if kind is None:
        return None
    bucket, key = split_bucket(url)
    why = _detail(exc)
    if kind == NO_BUCKET:
        return RemoteNotFoundError(
            f"{url}: the bucket {bucket!r} does not exist ({why}); check the URL's bucket name "
            "and the endpoint (storage_options client_kwargs endpoint_url / AWS_ENDPOINT_URL)",
            url=url,
        )
    if kind == NO_KEY:
        return RemoteNotFoundError(
            f"{url}: the bucket {bucket!r} has no object {key!r} ({why}); check the URL, and "
            "that the pack was uploaded whole (gpuloader.stores.remote.upload_pack)",
            url=url,
        )
    if kind == DENIED:
        return RemoteAccessDeniedError(
            f"{url}: access denied to {action} ({why}); check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or storage_options "
            "key/secret) and that they may access the bucket",
            url=url,
        )
    if kind == UNREACHABLE:
        return RemoteUnreachableError(
            f"{url}: the object store does not answer ({why}); check endpoint_url "
            "(storage_options client_kwargs / AWS_ENDPOINT_URL), that the server runs, "
            "and the network",
            url=url,
        )
    if kind == ENDS_EARLY:
        return RemoteTruncatedError(
            f"{url}: the object ends before the range asked for ({why}); the remote pack is "
            "damaged or older than its manifest: upload it again",
            url=url,
        )
    if kind == TRUNCATED:
        short = next(e for e in _chain(exc) if isinstance(e, ShortRead))
        return RemoteTruncatedError(
            f"{url}: a range read at offset {short.offset} returned {short.got} of "
            f"{short.expected} bytes; the remote object is shorter than the pack says or the "
            "connection cut it: upload the pack again if it persists",
            url=url,
        )
    return RemoteStoreError(
        f"{url}: {action} failed ({why}); check the URL, the endpoint and the credentials",
        url=url,
    )


def with_retries(
    fn: Callable[[], T],
    url: str,
    attempts: int = 5,
    backoff_s: float = 0.1,
    max_backoff_s: float = 2.0,
    *,
    action: str = "read",
    rng: random.Random | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn()``, retried on transient failures up to ``attempts`` times in all, waiting
    ``min(max_backoff_s, backoff_s * 2**i)`` times a jitter in [0.5, 1) between tries.

    Raises:
        RemoteRetriesExhaustedError: every attempt failed transiently (names the last error).
        RemoteTruncatedError: every attempt came back short.
        RemoteStoreError: (a subclass of) at once for a non-transient remote failure.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1; got {attempts}")
    rng = rng or random.Random()
    last: Exception | None = None
    for i in range(attempts):
        try:
            return fn()
        except RemoteStoreError:
            raise
        except Exception as e:
            kind = classify(e)
            if kind not in (TRANSIENT, TRUNCATED):
                err = remote_error(e, url, action=action)
                if err is None:
                    raise
                raise err from e
            last = e
        if i + 1 < attempts:
            sleep(min(max_backoff_s, backoff_s * 2**i) * (0.5 + 0.5 * rng.random()))
    assert last is not None
    if classify(last) == TRUNCATED:
        raise remote_error(last, url, action=action) from last  # type: ignore[misc]
    raise RemoteRetriesExhaustedError(
        f"{url}: {action} failed {attempts} times in a row with transient errors; last: "
        f"{_detail(last)}; check the object store's health and load (or raise attempts / "
        "timeout_s)",
        url=url,
    ) from last
