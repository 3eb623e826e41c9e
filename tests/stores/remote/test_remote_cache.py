"""StripeCache (bounded, LRU by mtime, atomic, shared by processes) and RemotePackFiles
reading through it (a hit sends no request)."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from gpuloader.stores.files import LocalPackFiles
from gpuloader.stores.remote import RemotePackFiles, StripeCache

STRIPE = "level_0/stripe_0.bin"


def get(cache: StripeCache, key: str, n: int) -> bytes | None:
    out = bytearray(n)
    return bytes(out) if cache.get(key, memoryview(out)) else None


def test_put_get(tmp_path):
    cache = StripeCache(tmp_path / "c", 1000)
    assert get(cache, "a", 3) is None
    assert cache.put("a", b"abc")
    assert get(cache, "a", 3) == b"abc"
    assert get(cache, "a", 4) is None  # another size: a miss
    assert cache.put("a", b"xyz") and get(cache, "a", 3) == b"xyz"
    assert cache.total_bytes == 3 and len(os.listdir(tmp_path / "c")) == 1
    assert get(StripeCache(tmp_path / "c", 10), "a", 3) == b"xyz"  # survives a restart


def test_bounded_lru(tmp_path):
    cache = StripeCache(tmp_path, 120)
    for k in "abc":
        cache.put(k, k.encode() * 40)
    assert get(cache, "a", 40) == b"a" * 40  # a is now the most recent
    cache.put("d", b"d" * 40)
    assert cache.total_bytes == 120
    assert get(cache, "b", 40) is None  # the least recently used went
    assert all(get(cache, k, 40) == k.encode() * 40 for k in "acd")
    cache.put("e", b"e" * 100)
    assert cache.total_bytes <= 120 and get(cache, "e", 100) == b"e" * 100
    assert not cache.put("big", b"x" * 121) and get(cache, "big", 121) is None
    assert cache.total_bytes <= 120


@pytest.mark.parametrize("bad", [0, -5, 1.5, None])
def test_bad_max_bytes(tmp_path, bad):
    with pytest.raises(ValueError, match="max_bytes.*" + repr(bad).replace(".", r"\.")):
        StripeCache(tmp_path, bad)


def _hammer(folder: str, seed: int) -> None:
    cache = StripeCache(folder, 10_000)
    data = bytes([seed]) * 0 + b"same-bytes" * 300
    for _ in range(60):
        cache.put("shared", data)
        out = bytearray(len(data))
        assert not cache.get("shared", memoryview(out)) or bytes(out) == data


def test_two_processes_put_same_key(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), i)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(20)
    assert [p.exitcode for p in procs] == [0, 0]
    assert get(StripeCache(tmp_path, 10_000), "shared", 3000) == b"same-bytes" * 300
    assert os.listdir(tmp_path) == [StripeCache(tmp_path, 1).path("shared").name]


def read(files, spans) -> bytes:
    out = bytearray(sum(n for _, n in spans))
    files.read_spans(STRIPE, spans, memoryview(out))
    return bytes(out)


def test_hit_sends_no_request(remote_pack, local_pack, proxy, tmp_path):
    cache = StripeCache(tmp_path, 4 << 20)
    opts = {"part_bytes": 256 << 10, "cache": cache}
    files = RemotePackFiles(remote_pack, proxy.storage_options, **opts)
    spans = [(3, 300_000), (1_000_000, 50_000)]
    want = read(LocalPackFiles(local_pack), spans)
    assert read(files, spans) == want
    assert proxy.count("GET") == 3 and proxy.count("HEAD") == 1  # the ETag: the version
    assert read(files, spans) == want
    assert proxy.count() == 4  # a hit: nothing more
    other = RemotePackFiles(remote_pack, proxy.storage_options, pack_id="v1", **opts)
    assert read(other, spans) == want and proxy.count() == 4 + 3  # another version: a miss
    assert read(other, spans) == want and proxy.count() == 7
    assert read(other, spans[:1]) == want[:300_000] and proxy.count() == 9  # other spans
    assert cache.total_bytes == 2 * len(want) + 300_000
