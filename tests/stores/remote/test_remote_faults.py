"""URLs, the extra's absence, and faults.py: which failures are which named error, which
are retried, and how long the retry loop waits."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from gpuloader.errors import (
    MissingExtraError,
    RemoteAccessDeniedError,
    RemoteNotFoundError,
    RemoteRetriesExhaustedError,
    RemoteStoreError,
    RemoteTruncatedError,
    RemoteUnreachableError,
)
from gpuloader.stores.remote import faults, filesystem, is_transient, is_url, join, with_retries

URL = "s3://bkt/packs/p0/level_0/stripe_0.bin"


def test_is_url_and_join():
    assert is_url("s3://bkt/p") and is_url("gs://b") and is_url("S3://B/x")
    assert not is_url("file:///tmp/p") and not is_url("/tmp/p") and not is_url("rel/p")
    assert not is_url(Path("s3://bkt/p")) and not is_url(None)
    assert join("s3://b/p/", "/level_0/x.bin") == "s3://b/p/level_0/x.bin"
    assert join("s3://b/p", "") == "s3://b/p"


def test_missing_fsspec(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)
    monkeypatch.setitem(sys.modules, "fsspec.core", None)
    with pytest.raises(MissingExtraError, match=r's3://b/p: .*pip install "gpuloader\[s3\]"'):
        filesystem("s3://b/p")


def test_missing_s3fs(monkeypatch):
    registry = pytest.importorskip("fsspec.registry")
    monkeypatch.delitem(registry._registry, "s3", raising=False)
    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(MissingExtraError, match=r"s3fs is not installed.*gpuloader\[s3\]") as e:
        filesystem("s3://b/p")
    assert isinstance(e.value, ImportError)


def test_unknown_protocol():
    pytest.importorskip("fsspec")
    with pytest.raises(RemoteStoreError, match="nosuchproto://b/p: no fsspec filesystem"):
        filesystem("nosuchproto://b/p")


def client_error(code: str, status: int, translate: bool) -> Exception:
    """A botocore ClientError as the server's answer makes it, or as s3fs passes it on."""
    botocore = pytest.importorskip("botocore.exceptions")
    err = botocore.ClientError(
        {
            "Error": {"Code": code, "Message": f"msg {code}"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "GetObject",
    )
    if not translate:
        return err
    return pytest.importorskip("s3fs.errors").translate_boto_error(err)


@pytest.mark.parametrize("translate", [False, True])
@pytest.mark.parametrize(
    "code,status,kind,match",
    [
        ("NoSuchBucket", 404, RemoteNotFoundError, "bucket 'bkt' does not exist"),
        ("NoSuchKey", 404, RemoteNotFoundError, "no object 'packs/p0/level_0/stripe_0.bin'"),
        ("404", 404, RemoteNotFoundError, "no object"),
        ("AccessDenied", 403, RemoteAccessDeniedError, "AccessDenied.*AWS_ACCESS_KEY_ID"),
        ("InvalidAccessKeyId", 403, RemoteAccessDeniedError, "InvalidAccessKeyId"),
        ("SignatureDoesNotMatch", 403, RemoteAccessDeniedError, "storage_options"),
        ("403", 403, RemoteAccessDeniedError, "credentials"),
        ("InvalidRange", 416, RemoteTruncatedError, "ends before the range"),
        ("SlowDown", 503, None, ""),
        ("503", 503, None, ""),
        ("InternalError", 500, None, ""),
        ("RequestTimeout", 400, None, ""),
    ],
)
def test_client_errors(code, status, kind, match, translate):
    err = client_error(code, status, translate)
    assert is_transient(err) == (kind is None)
    if kind is not None:
        got = faults.remote_error(err, URL)
        assert isinstance(got, kind) and got.url == URL
        assert str(got).startswith(URL + ": ") and re.search(match, str(got))


@pytest.mark.parametrize(
    "exc,transient",
    [
        (TimeoutError(), True),
        (ConnectionResetError(104, "reset"), True),
        (ConnectionAbortedError(), True),
        (faults.ShortRead(0, 10, 5), True),
        (ConnectionRefusedError(111, "refused"), False),
        (PermissionError("Forbidden"), False),
        (FileNotFoundError("bkt/x"), False),
    ],
)
def test_transient_kinds(exc, transient):
    assert is_transient(exc) == transient


def test_chain_is_read():
    try:
        try:
            raise ConnectionRefusedError(111, "Connect call failed")
        except OSError as inner:
            raise RuntimeError("EndpointConnectionError stand-in") from inner
    except RuntimeError as outer:
        err = faults.remote_error(outer, URL)
    assert isinstance(err, RemoteUnreachableError) and "endpoint_url" in str(err)


def flaky(errors: list[BaseException], calls: list[int]):
    def fn():
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return "ok"

    return fn


def test_retries_recover_with_bounded_waits():
    calls, waits = [], []
    errors = [TimeoutError("t"), ConnectionResetError(104, "r"), TimeoutError("t")]
    got = with_retries(flaky(errors, calls), URL, 4, 0.1, 0.15, sleep=waits.append)
    assert got == "ok" and len(calls) == 4 and len(waits) == 3
    assert 0.05 <= waits[0] <= 0.1 and 0.05 <= waits[1] <= 0.15 and waits[2] <= 0.15


def test_retries_exhausted():
    calls, waits = [], []
    with pytest.raises(RemoteRetriesExhaustedError) as e:
        with_retries(flaky([TimeoutError("slow")] * 9, calls), URL, 3, sleep=waits.append)
    msg = str(e.value).splitlines()[0]
    assert msg.startswith(URL) and "3 times" in msg and "TimeoutError: slow" in msg
    assert len(calls) == 3 and len(waits) == 2 and isinstance(e.value.__cause__, TimeoutError)


def test_short_reads_exhausted_are_truncation():
    calls = []
    with pytest.raises(RemoteTruncatedError, match="offset 7 returned 5 of 10"):
        with_retries(flaky([faults.ShortRead(7, 10, 5)] * 3, calls), URL, 3, sleep=lambda s: 0)
    assert len(calls) == 3


def test_final_errors_at_once():
    calls = []
    with pytest.raises(RemoteAccessDeniedError):
        with_retries(flaky([PermissionError("Forbidden")], calls), URL, 5, sleep=pytest.fail)
    with pytest.raises(TypeError, match="a bug"):  # not a remote failure: as it is
        with_retries(flaky([TypeError("a bug")], calls), URL, 5, sleep=pytest.fail)
    assert len(calls) == 2
