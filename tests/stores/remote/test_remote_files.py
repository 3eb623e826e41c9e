"""RemotePackFiles against a local S3 (moto): bytes equal to the local pack's, and every
fault (503s, short reads, hangs, a dead server, missing bucket/key, bad credentials) a
named error within a bounded time."""

from __future__ import annotations

import pickle
import threading
import time

import numpy as np
import pytest

from gpuloader.errors import (
    IncompletePackError,
    RemoteAccessDeniedError,
    RemoteNotFoundError,
    RemoteRetriesExhaustedError,
    RemoteTruncatedError,
    RemoteUnreachableError,
)
from gpuloader.stores.files import LocalPackFiles, PackFiles
from gpuloader.stores.remote import RemotePackFiles
from gpuloader.stores.remote.files import split_parts
from support.s3_server import PACK_FILES, free_port, storage_options

STRIPE = "level_0/stripe_0.bin"
FAST = {"part_bytes": 256 << 10, "max_concurrency": 4, "backoff_s": 0.01, "max_backoff_s": 0.02}


def random_spans(rng: np.random.Generator, size: int, k: int) -> list[tuple[int, int]]:
    """``k`` ascending, non-overlapping spans inside ``[0, size]`` (duplicated cut points
    make some empty or adjacent)."""
    cuts = np.sort(rng.choice(size + 1, 2 * k, replace=True))
    return [(int(a), int(b - a)) for a, b in zip(cuts[0::2], cuts[1::2], strict=True)]


def read(files: PackFiles, name: str, spans: list[tuple[int, int]]) -> bytes:
    out = bytearray(sum(n for _, n in spans))
    files.read_spans(name, spans, memoryview(out))
    return bytes(out)


@pytest.fixture
def files(s3, remote_pack) -> RemotePackFiles:
    return RemotePackFiles(remote_pack, s3.storage_options, **FAST)


def test_round_trip_equals_local(files, local_pack):
    local = LocalPackFiles(local_pack)
    assert isinstance(files, PackFiles) and files.remote
    assert files.read_bytes("manifest.json") == local.read_bytes("manifest.json")
    for name, n in PACK_FILES.items():
        assert files.size(name) == n
        assert files.exists(name)
    assert files.read_bytes("level_0/grids.npy") == local.read_bytes("level_0/grids.npy")
    assert not files.exists("level_0/stripe_9.bin")
    assert (
        files.sizes("level_0")
        == local.sizes("level_0")
        == {n.split("/")[1]: b for n, b in PACK_FILES.items()}
    )
    assert files.sizes("level_7") == {}
    assert files.sizes("") == local.sizes("") == {"manifest.json": 25}
    assert files.where(STRIPE) == files.root + "/" + STRIPE


@pytest.mark.parametrize("seed", range(4))
def test_read_spans_bit_for_bit(files, local_pack, seed):
    rng = np.random.default_rng(seed)
    local = LocalPackFiles(local_pack)
    size = PACK_FILES[STRIPE]
    spans = random_spans(rng, size, int(rng.integers(1, 12)))
    assert read(files, STRIPE, spans) == read(local, STRIPE, spans)
    whole = [(0, size)]  # ten parts of 256 KiB, four at a time
    assert read(files, STRIPE, whole) == local.read_bytes(STRIPE)


def test_parts_are_concurrent_ranged_gets(s3, remote_pack, local_pack, proxy):
    files = RemotePackFiles(remote_pack, proxy.storage_options, gap_bytes=0, **FAST)
    spans = [(10, 700_000), (900_000, 5), (1_000_000, 300_000)]
    assert read(files, STRIPE, spans) == read(LocalPackFiles(local_pack), STRIPE, spans)
    ranges = sorted(r for m, _, r in proxy.requests if m == "GET" and r)
    # 700_000 bytes = 3 parts of <= 256 KiB, then 1, then 2
    assert len(ranges) == 6 and proxy.count() == 6
    assert "bytes=10-262153" in ranges


@pytest.mark.parametrize("seed", range(20))
def test_split_parts_reads_every_span_and_little_else(seed):
    """Requests ascending, none longer than part_bytes nor of gap only, no gap between two
    spans of one request longer than gap_bytes; placing their pieces rebuilds the spans."""
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 200_000))
    blob = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    spans = random_spans(rng, size, int(rng.integers(1, 40)))
    part, gap = int(rng.integers(1, 50_000)), int(rng.choice([0, 1, 100, 10_000, 1 << 20]))
    parts = split_parts(spans, part, gap)
    out = bytearray(sum(n for _, n in spans))
    end = 0
    for offset, nbytes, pieces in parts:
        assert offset >= end and 0 < nbytes <= part
        end = offset + nbytes
        data = blob[offset : offset + nbytes]
        assert pieces[0][0] == 0 and pieces[-1][0] + pieces[-1][1] == nbytes
        for (p, n, _), (q, _, _) in zip(pieces, pieces[1:], strict=False):
            assert q - (p + n) <= gap  # the bytes read and dropped
        for p, n, at in pieces:
            out[at : at + n] = data[p : p + n]
    assert bytes(out) == b"".join(blob[a : a + n] for a, n in spans)
    if gap == 0:  # only adjacent spans share a request
        assert len(parts) >= len([1 for i, (a, n) in enumerate(spans) if n and (
            i == 0 or a != spans[i - 1][0] + spans[i - 1][1])])  # fmt: skip


def test_spans_close_together_are_one_request(s3, remote_pack, local_pack, proxy):
    spans = [(10, 1000), (5000, 1000), (600_000, 100)]
    want = read(LocalPackFiles(local_pack), STRIPE, spans)
    for gap, count in ((1 << 20, 2), (0, 3)):
        before = len(proxy.requests)
        files = RemotePackFiles(remote_pack, proxy.storage_options, gap_bytes=gap, **FAST)
        assert read(files, STRIPE, spans) == want
        ranges = sorted(r for m, _, r in proxy.requests[before:] if m == "GET" and r)
        assert len(ranges) == count, ranges  # 256 KiB parts: the long gap skipped
        if gap:  # the first two spans and the 4 KB between them in one GET
            assert "bytes=10-5999" in ranges and "bytes=600000-600099" in ranges


def test_pickles_without_filesystem(files, local_pack):
    spans = [(5, 1000), (300_000, 400_000)]
    want = read(LocalPackFiles(local_pack), STRIPE, spans)
    assert read(pickle.loads(pickle.dumps(files)), STRIPE, spans) == want
    assert read(files, STRIPE, spans) == want  # now with a filesystem and a pool
    blob = pickle.dumps(files)
    assert b"S3FileSystem" not in blob and b"ThreadPool" not in blob
    assert read(pickle.loads(blob), STRIPE, spans) == want


def test_503_recovered_within_attempts(remote_pack, local_pack, proxy):
    files = RemotePackFiles(remote_pack, proxy.storage_options, attempts=4, **FAST)
    proxy.fail_next(3)
    spans = [(0, 600_000)]
    assert read(files, STRIPE, spans) == read(LocalPackFiles(local_pack), STRIPE, spans)
    assert proxy.count() == 3 + 3  # the three refused tries, then three parts
    proxy.fail_next(2)
    assert files.read_bytes("manifest.json").startswith(b"{")


def test_503_exhausted(remote_pack, proxy):
    files = RemotePackFiles(remote_pack, proxy.storage_options, attempts=3, **FAST)
    proxy.fail_next(10**6)
    with pytest.raises(RemoteRetriesExhaustedError) as e:
        read(files, STRIPE, [(0, 1000)])
    msg = str(e.value).splitlines()[0]
    assert files.where(STRIPE) in msg and "3 times" in msg and "SlowDown" in msg
    assert proxy.count() == 3 and isinstance(e.value, TimeoutError)
    with pytest.raises(RemoteRetriesExhaustedError, match="manifest.json"):
        files.size("manifest.json")


def test_truncated_part_retried(remote_pack, local_pack, proxy):
    files = RemotePackFiles(remote_pack, proxy.storage_options, **FAST)
    proxy.truncate_next(2)
    spans = [(100, 500_000), (600_000, 3)]
    assert read(files, STRIPE, spans) == read(LocalPackFiles(local_pack), STRIPE, spans)
    assert proxy.count("GET") == 3 + 2


def test_truncated_every_try(remote_pack, proxy):
    files = RemotePackFiles(remote_pack, proxy.storage_options, attempts=2, **FAST)
    proxy.truncate_next(10**6)
    with pytest.raises(RemoteTruncatedError) as e:
        read(files, STRIPE, [(1000, 4000)])
    msg = str(e.value).splitlines()[0]
    assert files.where(STRIPE) in msg and "offset 1000" in msg and "2000 of 4000" in msg
    assert isinstance(e.value, IncompletePackError)


def test_object_ends_before_span(files):
    size = PACK_FILES[STRIPE]
    with pytest.raises(RemoteTruncatedError, match="ends before"):  # 416, not retried
        read(files, STRIPE, [(size + 10, 5)])
    with pytest.raises(RemoteTruncatedError, match="returned 5 of 10"):  # short 206
        read(files, STRIPE, [(size - 5, 10)])


def test_hang_is_bounded(remote_pack, proxy):
    files = RemotePackFiles(remote_pack, proxy.storage_options, attempts=2, timeout_s=0.3, **FAST)
    proxy.delay(30)
    t = time.monotonic()
    with pytest.raises(RemoteRetriesExhaustedError, match="2 times.*[Tt]imeout"):
        read(files, STRIPE, [(0, 600_000)])
    assert time.monotonic() - t < 3


def test_server_stopped_mid_read(remote_pack, proxy):
    files = RemotePackFiles(remote_pack, proxy.storage_options, attempts=3, timeout_s=2, **FAST)
    proxy.delay(0.5)
    threading.Timer(0.2, proxy.stop).start()
    t = time.monotonic()
    with pytest.raises((RemoteUnreachableError, RemoteRetriesExhaustedError)) as e:
        read(files, STRIPE, [(0, 900_000)])
    assert time.monotonic() - t < 4
    assert files.root in str(e.value)
    with pytest.raises(RemoteUnreachableError, match="endpoint_url"):  # refused: at once
        files.read_bytes("manifest.json")


def test_unreachable_endpoint(remote_pack):
    so = storage_options(f"http://127.0.0.1:{free_port()}")
    files = RemotePackFiles(remote_pack, so, **{**FAST, "backoff_s": 5, "max_backoff_s": 5})
    files._filesystem()  # made before the clock starts
    t = time.monotonic()
    with pytest.raises(RemoteUnreachableError) as e:
        files.read_bytes("manifest.json")
    msg = str(e.value).splitlines()[0]
    assert remote_pack + "/manifest.json" in msg and "AWS_ENDPOINT_URL" in msg
    assert isinstance(e.value, ConnectionError) and time.monotonic() - t < 2.4  # no retry
    with pytest.raises(RemoteUnreachableError):
        read(files, STRIPE, [(0, 10), (600_000, 600_000)])


def test_missing_bucket(s3):
    files = RemotePackFiles("s3://no-such-bucket/p", s3.storage_options, **FAST)
    for call in (lambda: files.read_bytes("manifest.json"), lambda: files.size("a.bin")):
        with pytest.raises(RemoteNotFoundError, match="bucket 'no-such-bucket' does not exist"):
            call()
    with pytest.raises(FileNotFoundError):
        read(files, STRIPE, [(0, 10)])


def test_missing_key(files):
    for call in (
        lambda: files.read_bytes("level_0/nope.npz"),
        lambda: files.size("level_0/nope.npz"),
        lambda: read(files, "level_0/nope.npz", [(0, 10)]),
    ):
        with pytest.raises(RemoteNotFoundError, match="has no object 'packs/p0/level_0/nope.npz'"):
            call()
    assert not files.exists("level_0/nope.npz")


@pytest.fixture(scope="module")
def iam_user(s3):
    """(access key id, secret) of a moto IAM user with no policy."""
    boto3 = pytest.importorskip("boto3")
    iam = boto3.client(
        "iam",
        endpoint_url=s3.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="y",
    )
    iam.create_user(UserName="reader")
    k = iam.create_access_key(UserName="reader")["AccessKey"]
    return k["AccessKeyId"], k["SecretAccessKey"]


@pytest.mark.parametrize("creds", ["unknown", "wrong_secret", "no_policy"])
def test_wrong_credentials(s3, remote_pack, iam_user, creds):
    """moto checks signatures once auth is on (settings.INITIAL_NO_AUTH_ACTION_COUNT = 0)."""
    key, secret = {
        "unknown": ("AKIANOTKNOWN", "nope"),
        "wrong_secret": (iam_user[0], "not-the-secret"),
        "no_policy": iam_user,
    }[creds]
    code = {"unknown": "InvalidAccessKeyId", "wrong_secret": "SignatureDoesNotMatch"}
    files = RemotePackFiles(remote_pack, storage_options(s3.endpoint_url, key, secret), **FAST)
    with s3.auth_enforced():
        with pytest.raises(RemoteAccessDeniedError) as e:
            files.read_bytes("manifest.json")
        with pytest.raises(PermissionError):
            read(files, STRIPE, [(0, 10)])
    msg = str(e.value).splitlines()[0]
    assert code.get(creds, "AccessDenied") in msg and "AWS_ACCESS_KEY_ID" in msg


def test_parts_waited_with_a_bound(remote_pack, proxy, monkeypatch):
    files = RemotePackFiles(remote_pack, proxy.storage_options, timeout_s=5, **FAST)
    monkeypatch.setattr(files, "_bound_s", lambda nparts: 0.3)
    proxy.delay(0.6)
    out = bytearray(600_000)
    t = time.monotonic()
    with pytest.raises(RemoteRetriesExhaustedError, match="3 range reads did not finish"):
        files.read_spans(STRIPE, [(0, 600_000)], memoryview(out))
    assert time.monotonic() - t < 1.5
    files._pool.shutdown(wait=True)  # the late parts arrive: none may write into out now
    assert proxy.count("GET") == 3 and out == bytearray(600_000)


def _read_in_child(files: RemotePackFiles, want: bytes, q) -> None:
    q.put(read(files, STRIPE, [(0, 600_000)]) == want)


def test_usable_after_fork(files, local_pack):
    import multiprocessing as mp

    want = read(LocalPackFiles(local_pack), STRIPE, [(0, 600_000)])
    assert read(files, STRIPE, [(0, 600_000)]) == want  # filesystem and pool made here
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_read_in_child, args=(files, want, q))
    p.start()
    p.join(20)
    assert p.exitcode == 0 and q.get(timeout=1)
