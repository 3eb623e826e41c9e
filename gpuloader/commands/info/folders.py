"""The two folders ``info`` and ``verify`` read, checked before any file is: the right way round.

A user who gives the ray root where the dataset root goes (or the reverse), the folder that
holds both (``demo_data``), or an empty folder gets one line saying which folder looks like
what and the command line to use, instead of a list of missing files. Folders that look like
neither (a damaged root) pass: the command itself reports what is wrong inside them.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from gpuloader.errors import DatasetLayoutError
from gpuloader.generate.folders import (
    DATASET,
    EMPTY,
    MISSING,
    NOT_A_FOLDER,
    PARENT,
    RAYS,
    Folder,
    describe,
)

__all__ = ["check_roots", "default_ray_dir"]

_LOOKS = {
    DATASET: "a dataset root (it holds splits.json, objects/)",
    RAYS: "a ray root (it holds level_<L>/ folders)",
    EMPTY: "an empty folder",
}


def _call(command: str, ds: Path, rays: Path) -> str:
    return f"`gpuloader {command} {shlex.quote(str(ds))} {shlex.quote(str(rays))}`"


def _hint(command: str, *folders: Folder) -> str:
    """``; call `...``` with the roots of the first folder (or its parent) that holds both."""
    for f in folders:
        for candidate in (f, describe(f.path.parent) if f.path.parent != f.path else None):
            if candidate is not None and candidate.kind == PARENT:
                if candidate.dataset is not None and candidate.rays is not None:
                    return f"; call {_call(command, candidate.dataset, candidate.rays)}"
    example = "OUT/dataset OUT/ray_dataset_hierarchical"
    return f"; call `gpuloader {command} DATASET_DIR RAY_DIR` (e.g. {example})"


def default_ray_dir(dataset_dir: Path | str) -> Path:
    """RAY_DIR when only DATASET_DIR is given: ``ray_dataset_hierarchical`` beside it."""
    return Path(dataset_dir).parent / "ray_dataset_hierarchical"


def _missing(f: Folder, arg: str) -> DatasetLayoutError | None:
    if f.kind not in (MISSING, NOT_A_FOLDER):
        return None
    what = "does not exist" if f.kind == MISSING else "is not a folder"
    return DatasetLayoutError(f"{f.path} {what}; check the {arg} argument")


def check_roots(dataset_dir: Path | str, ray_dir: Path | str, command: str) -> None:
    """Refuse a DATASET_DIR / RAY_DIR pair that is clearly not (dataset root, ray root).

    Raises:
        DatasetLayoutError: one line naming each misplaced folder, what it looks like and
            the command to run: swapped roots, the folder holding both, an empty folder,
            a root given for the other, a missing path or a file.
    """
    ds, rd = describe(dataset_dir), describe(ray_dir)
    if ds.kind == DATASET and rd.kind == RAYS:
        return
    problem = _missing(ds, "DATASET_DIR")
    if problem is not None:
        raise problem
    for f, arg in ((ds, "DATASET_DIR"), (rd, "RAY_DIR")):
        if f.kind == PARENT and f.dataset is not None and f.rays is not None:
            raise DatasetLayoutError(
                f"{arg} {f.path} is not a root but holds a dataset one level down "
                f"({f.dataset} and {f.rays}); call {_call(command, f.dataset, f.rays)}"
            )
    problem = _missing(rd, "RAY_DIR")
    if problem is not None:
        raise problem
    if ds.kind == RAYS and rd.kind == DATASET:
        raise DatasetLayoutError(
            f"DATASET_DIR {ds.path} looks like {_LOOKS[RAYS]} and RAY_DIR {rd.path} like "
            f"{_LOOKS[DATASET]}: they are swapped; call {_call(command, rd.path, ds.path)}"
        )
    if ds.kind == PARENT and ds.dataset is not None:
        raise DatasetLayoutError(
            f"DATASET_DIR {ds.path} is not a dataset root but holds one one level down "
            f"({ds.dataset}); call {_call(command, ds.dataset, rd.path)}"
        )
    if rd.kind == PARENT and rd.rays is not None:
        raise DatasetLayoutError(
            f"RAY_DIR {rd.path} is not a ray root but holds one one level down "
            f"({rd.rays}); call {_call(command, ds.path, rd.rays)}"
        )
    want = {"DATASET_DIR": DATASET, "RAY_DIR": RAYS}
    for f, arg in ((ds, "DATASET_DIR"), (rd, "RAY_DIR")):
        if f.kind in _LOOKS and f.kind != want[arg]:
            looks = "is" if f.kind == EMPTY else "looks like"
            raise DatasetLayoutError(
                f"{arg} {f.path} {looks} {_LOOKS[f.kind]}, not {_LOOKS[want[arg]]}"
                f"{_hint(command, ds, rd)}"
            )
