"""Packs on object storage: fsspec URLs (``s3://bucket/prefix``, ``gs://...``) as pack paths.

Needs the ``s3`` extra (``pip install "gpuloader[s3]"``: fsspec + s3fs; gcsfs for ``gs://``).
Credentials and the endpoint come from fsspec's usual configuration (the environment,
``~/.aws``, or ``storage_options=``); nothing of them is stored in a pack.

Modules:
    urls.py     is_url, the filesystem of a URL (the extra's absence is a named error)
    faults.py   what fsspec/botocore/aiohttp raise, as gpuloader's named remote errors;
                which errors are transient; the bounded retry loop
    files.py    RemotePackFiles: PackFiles over a URL, concurrent range requests, retries
    cache.py    StripeCache: a local folder of fetched spans, bounded in bytes, LRU
    upload.py   upload_pack: a local pack to a URL, the manifest last

A StripeCache given to RemotePackFiles keys entries by ``root | version | name | spans``;
the version is ``RemotePackFiles.pack_id`` when the caller sets it (e.g. a hash of the
manifest), else the object's ETag (one HEAD per file per object).
"""

from gpuloader.stores.remote.cache import StripeCache
from gpuloader.stores.remote.faults import is_transient, remote_error, with_retries
from gpuloader.stores.remote.files import RemotePackFiles
from gpuloader.stores.remote.upload import upload_pack
from gpuloader.stores.remote.urls import filesystem, is_url, join

__all__ = [
    "RemotePackFiles",
    "StripeCache",
    "filesystem",
    "is_transient",
    "is_url",
    "join",
    "remote_error",
    "upload_pack",
    "with_retries",
]
