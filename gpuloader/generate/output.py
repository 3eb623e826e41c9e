"""The output folder of a run (resume, refuse or replace) and the deterministic npz writer.

:func:`prepare_output` decides what a run into OUT does: resume a run of the same config
(``OUT/generation_config.json`` holds its identity), refuse another config's dataset, a
dataset not written here, or an OUT that is a dataset or ray root itself (the run would nest
a dataset inside it), unless ``overwrite``. :func:`npz_bytes` is ``savez_compressed`` whose
bytes are a pure function of the arrays (what lets a resumed run compare a voxel file with
the grid it should hold).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from gpuloader.errors import GenerationError
from gpuloader.format import layout
from gpuloader.generate import folders, resume

__all__ = [
    "DATASET_DIR",
    "FORMAT_VERSION",
    "MANIFEST",
    "NPZ_COMPRESSLEVEL",
    "RAY_DIR",
    "manifest_matches",
    "npz_bytes",
    "prepare_output",
    "refuse_a_root",
    "save_npz",
]

MANIFEST = "generation_config.json"
DATASET_DIR = "dataset"
RAY_DIR = "ray_dataset_hierarchical"
FORMAT_VERSION = 1
NPZ_COMPRESSLEVEL = 1


# ---------------------------------------------------------------- output folder


def refuse_a_root(out: Path) -> None:
    """Refuse an OUT that is a dataset root or a ray root (of any dataset, ours or not).

    Raises:
        GenerationError: naming the folder, what it is and the folder to give instead.
    """
    kind = folders.folder_kind(out)
    if out.name in (DATASET_DIR, RAY_DIR) and (out.parent / MANIFEST).is_file():
        kind = folders.DATASET if out.name == DATASET_DIR else folders.RAYS
    if kind not in (folders.DATASET, folders.RAYS):
        return
    what = "a voxel dataset root" if kind == folders.DATASET else "a ray root"
    ours = (out.parent / MANIFEST).is_file()
    instead = (
        f"give {out.parent} (the OUT of that run) or a new folder" if ours else "give a new folder"
    )
    raise GenerationError(
        f"output folder {out} is {what}; OUT is the folder that holds {DATASET_DIR}/ and "
        f"{RAY_DIR}/ (writing here would nest a dataset inside it): {instead}"
    )


def manifest_matches(out: Path, identity: dict) -> bool | None:
    """Whether ``out``'s generation_config.json is that of ``identity`` (None: there is none)."""
    manifest = out / MANIFEST
    if not manifest.exists():
        return None
    try:
        found = layout.read_json(manifest)
    except (OSError, ValueError):
        return False
    return found == {"generator": "gpuloader", "format_version": FORMAT_VERSION, "config": identity}


def prepare_output(out: Path, identity: dict, overwrite: bool) -> bool:
    """Create/check ``out``; return True when resuming a same-config run.

    Raises:
        GenerationError: ``out`` cannot be written, is a dataset or ray root itself, or
            holds another config's dataset (or one not written here) without ``overwrite``.
    """
    refuse_a_root(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GenerationError(
            f"cannot create output folder {out} ({exc.strerror or exc}); "
            "choose a folder you can write to"
        ) from exc
    if not out.is_dir():
        raise GenerationError(f"output path {out} is not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise GenerationError(
            f"output folder {out} is not writable ({exc.strerror or exc}); "
            "choose a folder you can write to or fix its permissions"
        ) from exc
    manifest = out / MANIFEST
    roots = [out / DATASET_DIR, out / RAY_DIR]
    expected = {"generator": "gpuloader", "format_version": FORMAT_VERSION, "config": identity}
    resuming = False
    same = manifest_matches(out, identity)
    if same is not None:
        if same and not overwrite:
            resuming = True
        elif not overwrite:
            raise GenerationError(
                f"output folder {out} holds a dataset generated with a different config "
                f"(see {manifest}); pick another folder or pass --overwrite to replace it"
            )
    elif any(r.exists() for r in roots) and not overwrite:
        raise GenerationError(
            f"output folder {out} already holds {DATASET_DIR}/ or {RAY_DIR}/ not written by "
            f"this generator (no {MANIFEST}); pick another folder or pass --overwrite"
        )
    if overwrite:
        for r in roots:
            shutil.rmtree(r, ignore_errors=True)
        manifest.unlink(missing_ok=True)
        (out / resume.CHECKSUMS).unlink(missing_ok=True)
    layout.atomic_write_json(manifest, expected)
    return resuming


# ---------------------------------------------------------------- npz


def npz_bytes(**arrays: Any) -> bytes:
    """An .npz (zip + deflate, one ``<key>.npy`` per array, as ``numpy.savez_compressed``).

    Two differences that ``numpy.load`` cannot see: every zip entry carries a fixed
    1980-01-01 timestamp (numpy stamps the current time), so the bytes are a pure function
    of the arrays; and deflate runs at level ``NPZ_COMPRESSLEVEL`` = 1 instead of 6, which
    halves the time to write a ray file for about 1% more bytes (float rays barely compress).
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, mode="w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, value in arrays.items():
            data = io.BytesIO()
            np.lib.format.write_array(data, np.asanyarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data.getvalue(), compresslevel=NPZ_COMPRESSLEVEL)
    return buf.getvalue()


def save_npz(path: Path, **arrays: Any) -> None:
    """Atomic, deterministic ``savez_compressed`` (through ``layout.atomic_write_bytes``)."""
    layout.atomic_write_bytes(path, npz_bytes(**arrays))
