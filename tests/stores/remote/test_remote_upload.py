"""upload_pack: every file up and checked, the remote manifest deleted first and put last."""

from __future__ import annotations

import shutil

import pytest

from gpuloader.errors import IncompletePackError, RemoteNotFoundError, RemoteRetriesExhaustedError
from gpuloader.stores.files import LocalPackFiles
from gpuloader.stores.remote import RemotePackFiles, upload_pack
from support.s3_server import PACK_FILES, write_fake_pack


def test_manifest_deleted_first_put_last(s3, proxy, tmp_path):
    local = write_fake_pack(tmp_path / "pack", seed=1)
    url = s3.url("up/order")
    upload_pack(local, url, proxy.storage_options, progress=True, max_concurrency=3)
    log = [(m, p.split("/up/order/")[-1]) for m, p, _ in proxy.requests]
    assert log[0] == ("DELETE", "manifest.json")
    puts = [p for m, p in log if m == "PUT"]
    assert sorted(puts[:-1]) == sorted(PACK_FILES) and puts[-1] == "manifest.json"
    files = RemotePackFiles(url, s3.storage_options)
    for name in [*PACK_FILES, "manifest.json"]:
        assert files.read_bytes(name) == LocalPackFiles(local).read_bytes(name)


def test_interrupted_upload_leaves_no_manifest(s3, proxy, tmp_path):
    url = s3.url("up/interrupted")
    upload_pack(write_fake_pack(tmp_path / "old", seed=2), url, s3.storage_options, progress=False)
    files = RemotePackFiles(url, s3.storage_options)
    assert files.exists("manifest.json")
    proxy.fail_next(10**6, method="PUT")  # the DELETE goes through, no file does
    with pytest.raises(RemoteRetriesExhaustedError, match="upload"):
        upload_pack(
            write_fake_pack(tmp_path / "new", seed=3),
            url,
            proxy.storage_options,
            progress=False,
            attempts=1,
        )
    assert not files.exists("manifest.json")
    assert files.exists("level_0/stripe_0.bin")  # the old data stays; no manifest serves it


def test_unfinished_local_pack(s3, tmp_path):
    local = write_fake_pack(tmp_path / "pack")
    (local / "manifest.json").unlink()
    with pytest.raises(IncompletePackError, match=f"{local}: no manifest.json"):
        upload_pack(local, s3.url("up/never"), s3.storage_options, progress=False)


def test_missing_bucket(s3, tmp_path):
    local = write_fake_pack(tmp_path / "pack")
    shutil.rmtree(local / "level_0")
    with pytest.raises(RemoteNotFoundError, match="bucket 'nope-bucket' does not exist"):
        upload_pack(local, "s3://nope-bucket/p", s3.storage_options, progress=False)
