"""A striped pack written to object storage: ``gpuloader pack RAY_DIR s3://bucket/prefix``.

:func:`pack_to_url` builds the pack in a local staging folder (``staging``, default the
system's temporary folder; it must hold the whole pack), uploads it with
:func:`~gpuloader.stores.remote.upload.upload_pack` (the remote ``manifest.json`` removed
first, every other file uploaded and its size checked, the manifest last: a half-written or
half-replaced pack is never served, since a pack without a manifest is refused), then removes
the staging folder. A remote pack that is up to date with RAY_DIR (the same layout options,
its recorded files unchanged: the fast check) is left as it is; one that differs needs
``force``. Only the striped layout is served from object storage.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from gpuloader.errors import IncompletePackError, PackError, StalePackError
from gpuloader.stores.pack.build import pack_rays
from gpuloader.stores.pack.build_steps import summary
from gpuloader.stores.pack.manifest import MANIFEST, check_pack, pack_layout, read_manifest
from gpuloader.stores.pack.striped_build import find_dataset_dir

__all__ = ["pack_to_url"]


def pack_to_url(
    ray_dataset_dir: Path | str,
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    staging: Path | str | None = None,
    force: bool = False,
    progress: bool = True,
    layout: str = "striped",
    stripe_rays: int = 512,
    seed: int = 0,
    dataset_dir: Path | str | None = None,
    **pack_kwargs: Any,
) -> dict[str, Any]:
    """Build a striped pack of ``ray_dataset_dir`` and upload it to ``url`` (module doc).

    Args:
        storage_options: fsspec options of the URL (credentials, endpoint).
        staging: the local folder the pack is built in first (default: the temporary folder).
        force: replace a remote pack that does not match.
        pack_kwargs: the rest of :func:`~gpuloader.stores.pack.build.pack_rays`'s arguments
            (levels, workers, on_error).

    Returns:
        :func:`pack_rays`'s summary, ``out_dir`` the URL (``up_to_date`` True when nothing
        was uploaded).

    Raises:
        PackError: the rows layout, or a remote pack that does not match (without ``force``).
        RemoteStoreError: the store cannot be reached or written (named, with the URL).
    """
    from gpuloader.stores.remote.files import RemotePackFiles

    if layout != "striped":
        raise PackError(
            f"{url}: object storage serves striped packs only (each epoch one range read per "
            "stripe); add --layout striped"
        )
    start = time.perf_counter()
    files = RemotePackFiles(url, storage_options)
    root = Path(ray_dataset_dir).resolve()
    levels = pack_kwargs.get("levels")
    level_list = None if levels is None else sorted({int(lv) for lv in levels})
    try:
        if not force and files.exists(MANIFEST):
            why = _remote_mismatch(files, url, root, level_list, stripe_rays, seed, dataset_dir)
            if why is None:
                return summary(read_manifest(url, files), url, time.perf_counter() - start, True)
            raise PackError(
                f"{url} already holds a ray pack that does not match ({why}); replace it: "
                f"add --force"
            )
        parent = Path(staging) if staging is not None else Path(tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".gpuloader-upload-", dir=parent))
        try:
            local = work / "pack"
            built = pack_rays(
                root,
                local,
                progress=progress,
                layout=layout,
                stripe_rays=stripe_rays,
                seed=seed,
                dataset_dir=dataset_dir,
                **pack_kwargs,
            )
            from gpuloader.stores.remote.upload import upload_pack

            upload_pack(local, url, storage_options, progress=progress)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        files.close()
    built["out_dir"] = url
    built["seconds"] = time.perf_counter() - start
    return built


def _remote_mismatch(
    files: Any,
    url: str,
    root: Path,
    level_list: list[int] | None,
    stripe_rays: int,
    seed: int,
    dataset_dir: Path | str | None,
) -> str | None:
    """None when the remote pack is up to date with ``root`` as asked, else why not."""
    try:
        manifest = read_manifest(url, files)
    except IncompletePackError as exc:
        return str(exc)
    if manifest["source_root"] != str(root) or manifest["levels"] != level_list:
        return f"it packs {manifest['source_root']} at levels {manifest['levels']}"
    wanted = ("striped", int(stripe_rays), int(seed), str(find_dataset_dir(root, dataset_dir)))
    got = (
        pack_layout(manifest),
        manifest.get("stripe_rays"),
        manifest.get("seed"),
        manifest.get("dataset_dir"),
    )
    if got != wanted:
        return f"layout {got[0]}, stripe_rays {got[1]}, seed {got[2]}, voxels from {got[3]}; " + (
            f"asked for stripe_rays {wanted[1]}, seed {wanted[2]}, voxels from {wanted[3]}"
        )
    try:
        check_pack(url, "fast", root, manifest, None, files)
    except StalePackError as exc:
        return exc.reason
    except IncompletePackError as exc:
        return str(exc)
    return None
