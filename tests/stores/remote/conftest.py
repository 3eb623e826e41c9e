"""Fixtures of the object-storage tests: one moto server per session (127.0.0.1), a fault
proxy per test, and a small pack uploaded once."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.s3_server import FaultProxy, S3Server, start_s3_server, write_fake_pack


@pytest.fixture(scope="session")
def s3() -> S3Server:
    """moto on 127.0.0.1 with an empty bucket (skips without s3fs / moto[server])."""
    pytest.importorskip("s3fs", reason="the s3 extra (fsspec + s3fs) is not installed")
    pytest.importorskip("moto.server", reason="moto[server] is not installed (the dev extra)")
    server = start_s3_server()
    yield server
    server.stop()


@pytest.fixture
def proxy(s3: S3Server) -> FaultProxy:
    p = FaultProxy(s3.endpoint_url)
    yield p
    p.stop()


@pytest.fixture(scope="session")
def local_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_pack(tmp_path_factory.mktemp("pack"))


@pytest.fixture(scope="session")
def remote_pack(s3: S3Server, local_pack: Path) -> str:
    """The URL of ``local_pack`` uploaded (read-only!)."""
    from gpuloader.stores.remote import upload_pack

    url = s3.url("packs/p0")
    upload_pack(local_pack, url, s3.storage_options, progress=False)
    return url
