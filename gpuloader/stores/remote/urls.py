"""fsspec URLs as pack paths: which strings are URLs, the filesystem of one, names under one.

fsspec (and the protocol's implementation, s3fs for ``s3://``) is imported only here and
only when a URL is opened, so gpuloader without the ``s3`` extra works on local packs.
"""

from __future__ import annotations

import re
from typing import Any

from gpuloader.errors import MissingExtraError, RemoteStoreError

__all__ = ["INSTALL_HINT", "filesystem", "is_url", "join", "split_bucket"]

INSTALL_HINT = 'pip install "gpuloader[s3]"'

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def is_url(x: object) -> bool:
    """True for a ``str`` of the form ``<protocol>://...`` other than ``file://``; paths
    (``pathlib`` objects) are never URLs."""
    if not isinstance(x, str):
        return False
    m = _URL.match(x)
    return m is not None and m.group(1).lower() != "file"


def join(url: str, name: str) -> str:
    """``url`` and the ``/``-separated relative ``name`` joined with exactly one ``/``."""
    name = name.lstrip("/")
    return url.rstrip("/") + "/" + name if name else url.rstrip("/")


def split_bucket(url: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``proto://bucket/key`` (``key`` may be empty)."""
    rest = _URL.sub("", url, count=1)
    bucket, _, key = rest.partition("/")
    return bucket, key


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """``(fs, path)``: the fsspec filesystem serving ``url`` and the path in it.

    Raises:
        MissingExtraError: fsspec, or the protocol's implementation (s3fs), is missing.
        RemoteStoreError: no fsspec filesystem knows the URL's protocol.
    """
    protocol = url.split("://", 1)[0].lower()
    try:
        import fsspec.core
    except ImportError as e:
        raise MissingExtraError(
            f"{url}: reading packs from object storage needs fsspec, which is not installed; "
            f"install the extra: {INSTALL_HINT}"
        ) from e
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as e:
        need = "s3fs" if protocol in ("s3", "s3a") else f"the fsspec filesystem for {protocol}://"
        raise MissingExtraError(
            f"{url}: {need} is not installed ({e}); install the extra: {INSTALL_HINT}"
            + ("" if protocol in ("s3", "s3a") else f" and the package fsspec names for {protocol}")
        ) from e
    except ValueError as e:
        if "protocol" not in str(e).lower():
            raise
        raise RemoteStoreError(
            f"{url}: no fsspec filesystem for the protocol {protocol!r} ({e}); use s3://... "
            "(or another protocol fsspec knows) or a local folder",
            url=url,
        ) from e
