"""What a folder looks like: a dataset root, a ray root, the folder holding both, or empty.

Used where a folder is given on the command line (``generate``'s OUT, ``info``/``verify``'s
DATASET_DIR and RAY_DIR) to tell a user who gave the wrong one which folder is which. Only
names are looked at (one ``os.scandir`` of the folder and, for :data:`PARENT`, of its
sub-folders); nothing is opened.

* :data:`DATASET`: holds ``splits.json``, ``registry.json``, ``objects/`` or ``subvolumes/``
  (and no ``level_<L>/`` folder);
* :data:`RAYS`: holds ``level_<L>/`` folders or ``processing_summary.json`` (and none of
  the dataset root's names);
* :data:`PARENT`: neither, but a sub-folder is a dataset root or a ray root (a generated
  OUT: ``dataset/`` and ``ray_dataset_hierarchical/``);
* :data:`EMPTY`, :data:`MISSING`, :data:`NOT_A_FOLDER`, :data:`UNREADABLE`, and
  :data:`OTHER` (anything else: a damaged root, or an unrelated folder).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DATASET",
    "EMPTY",
    "MISSING",
    "NOT_A_FOLDER",
    "OTHER",
    "PARENT",
    "RAYS",
    "UNREADABLE",
    "Folder",
    "describe",
    "folder_kind",
]

DATASET = "dataset root"
RAYS = "ray root"
PARENT = "parent"
EMPTY = "empty"
MISSING = "missing"
NOT_A_FOLDER = "not a folder"
UNREADABLE = "unreadable"
OTHER = "other"

#: Names only a voxel dataset root holds at its top.
DATASET_NAMES = frozenset({"splits.json", "registry.json", "objects", "subvolumes"})
#: ``level_<L>`` folders: the top of a ray root.
_LEVEL = re.compile(r"level_\d+$")
#: Sub-folder names tried first when looking one level down (the generator's).
_PREFERRED = ("dataset", "ray_dataset_hierarchical")
#: Sub-folders looked into at most (a home folder may hold thousands).
_MAX_LOOKED_INTO = 64


@dataclass(frozen=True)
class Folder:
    """What :func:`describe` found: ``kind`` and, for :data:`PARENT`, the roots inside."""

    path: Path
    kind: str
    dataset: Path | None = None
    rays: Path | None = None


def _names(path: Path) -> list[tuple[str, bool]] | None:
    """``(name, is_folder)`` of the visible entries of ``path``; None when it cannot be listed."""
    try:
        with os.scandir(path) as it:
            return [(e.name, e.is_dir()) for e in it if not e.name.startswith(".")]
    except OSError:
        return None


def _own_kind(names: list[tuple[str, bool]]) -> str:
    """DATASET, RAYS or OTHER from the names at the top of a folder."""
    has_dataset = any(name in DATASET_NAMES for name, _ in names)
    has_levels = any(is_dir and _LEVEL.match(name) for name, is_dir in names)
    has_summary = any(name == "processing_summary.json" for name, _ in names)
    if has_dataset and not has_levels:
        return DATASET
    if (has_levels or has_summary) and not has_dataset:
        return RAYS
    return OTHER


def folder_kind(path: Path | str) -> str:
    """The kind of ``path`` without looking into its sub-folders (never :data:`PARENT`)."""
    path = Path(path)
    if not path.exists():
        return MISSING
    if not path.is_dir():
        return NOT_A_FOLDER
    names = _names(path)
    if names is None:
        return UNREADABLE
    return EMPTY if not names else _own_kind(names)


def describe(path: Path | str) -> Folder:
    """What ``path`` is (see the module doc); a :data:`PARENT` names the roots it holds."""
    path = Path(path)
    kind = folder_kind(path)
    if kind != OTHER:
        return Folder(path, kind)
    names = _names(path) or []
    folders = sorted((n for n, is_dir in names if is_dir), key=lambda n: (n not in _PREFERRED, n))
    found: dict[str, Path] = {}
    for name in folders[:_MAX_LOOKED_INTO]:
        sub = folder_kind(path / name)
        if sub in (DATASET, RAYS) and sub not in found:
            found[sub] = path / name
    if not found:
        return Folder(path, OTHER)
    return Folder(path, PARENT, found.get(DATASET), found.get(RAYS))
