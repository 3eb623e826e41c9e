"""Is the ray dataset whole? A generator or ray tracer stopped mid-way (killed, a full disk)
leaves fewer ray files than the voxel side describes, and no ``processing_summary.json`` (the
tracer writes it last). Such a dataset would load as a smaller one without a word.

:func:`missing_ray_files` compares the ray files found with what the dataset says should
exist:

* with ``processing_summary.json``: its ``processed`` count (ray files the tracer wrote or
  found) against the files found; the tracer's own ``min_level``/``max_level`` made the rest
  legitimately absent.
* without it: every object of ``splits.json`` (level 0) and every sub-volume hash of its
  ``hash_object_usage`` that is not trivial (all-empty grids get no ray file) needs a ray
  file; those without one are named.

:func:`warn_if_incomplete` turns a shortfall into one
:class:`~gpuloader.errors.IncompleteDatasetWarning` naming the ray root, how many files are
missing, a few of them, and how to finish the dataset. The check reads only what the index
has already read (the names of the ray tree's files and ``splits.json``) and the summary.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuloader.errors import IncompleteDatasetWarning
from gpuloader.format import layout

__all__ = ["Shortfall", "missing_ray_files", "warn_if_incomplete"]

SUMMARY = "processing_summary.json"
RAYS = "_rays.npz"
#: missing files named in a message; the rest are counted
SHOWN = 3


@dataclass
class Shortfall:
    """What a ray dataset lacks. ``expected``/``found``: ray file counts; ``examples``: a few
    missing ones (object ID or sub-volume hash); ``has_summary``: whether the tracer's
    ``processing_summary.json`` exists."""

    ray_root: Path
    expected: int
    found: int
    has_summary: bool
    examples: list[str] = field(default_factory=list)

    @property
    def missing(self) -> int:
        return self.expected - self.found

    def message(self) -> str:
        """One paragraph: what is missing, what loading does, how to finish the dataset."""
        shown = ", ".join(self.examples[:SHOWN])
        more = f" (e.g. {shown})" if shown else ""
        why = (
            f"its {SUMMARY} records {self.expected} ray files"
            if self.has_summary
            else f"it has no {SUMMARY} (the ray tracer writes it last: it did not finish)"
        )
        return (
            f"{self.ray_root}: incomplete ray dataset: {why}; {self.missing} of "
            f"{self.expected} ray files are missing{more}. Loading the {self.found} present "
            "as a smaller dataset. Finish it: run the same `gpuloader generate` command again "
            "(it resumes), or re-run the ray tracer that made it; `gpuloader verify` lists "
            "what is missing"
        )


def _summary(ray_root: Path) -> Mapping[str, Any] | None:
    """The tracer's summary, or None when it is missing or unreadable (then treated as
    missing: the counts of ``splits.json`` decide)."""
    try:
        doc = layout.read_json(ray_root / SUMMARY)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _key(path: Path) -> tuple[int, str] | None:
    """``(level, hash)`` of a path ``level_<L>/<hh>/<hash>_rays.npz``, or None."""
    level = path.parent.parent.name
    if not (path.name.endswith(RAYS) and level.startswith("level_") and level[6:].isdigit()):
        return None
    return int(level[6:]), path.name[: -len(RAYS)]


def missing_ray_files(
    ray_root: Path,
    splits: Mapping[str, Any],
    found: Iterable[tuple[int, str]],
    refused: Iterable[Path] = (),
) -> Shortfall | None:
    """The shortfall of ``ray_root`` given the ``(level, hash)`` of every ray file found
    there and ``splits`` (``splits.json``), or None when nothing is missing. ``refused``:
    ray files present but refused (on_error='skip' names them elsewhere): not missing; a
    refused folder (its files unknown) makes the answer None."""
    ray_root = Path(ray_root)
    found_keys = {(int(lv), str(h)) for lv, h in found}
    refused_keys = [_key(Path(p)) for p in refused]
    if None in refused_keys:  # a refused folder: what it holds is unknown, and named already
        return None
    found_keys |= set(refused_keys)  # type: ignore[arg-type]
    summary = _summary(ray_root)
    if summary is not None:
        processed = summary.get("processed")
        if not isinstance(processed, int) or isinstance(processed, bool):
            return None  # a summary without the count: nothing to compare
        if len(found_keys) >= processed:
            return None
        return Shortfall(ray_root, processed, len(found_keys), True)
    objects = {str(o) for o in (splits.get("object_splits") or {})}
    trivial = {str(h) for h in (splits.get("trivial_hashes") or ())}
    hashes = {str(h) for h in (splits.get("hash_object_usage") or {})} - trivial
    found_objects = {h for lv, h in found_keys if lv == 0}
    found_hashes = {h for lv, h in found_keys if lv > 0}
    lost = sorted(f"object {o}" for o in objects - found_objects)
    lost += sorted(f"sub-volume {h[:12]}" for h in hashes - found_hashes)
    if not lost:
        return None
    expected = len(objects) + len(hashes)
    present = len(objects & found_objects) + len(hashes & found_hashes)
    return Shortfall(ray_root, expected, present, False, lost[:SHOWN])


def warn_if_incomplete(
    ray_root: Path,
    splits: Mapping[str, Any],
    found: Iterable[tuple[int, str]],
    refused: Iterable[Path] = (),
) -> Shortfall | None:
    """:func:`missing_ray_files`, with an :class:`IncompleteDatasetWarning` when something
    is missing (once per message and call site, as Python's warnings go)."""
    short = missing_ray_files(ray_root, splits, found, refused)
    if short is not None:
        warnings.warn(short.message(), IncompleteDatasetWarning, stacklevel=3)
    return short
