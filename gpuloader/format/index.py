"""Index a dataset: which samples a split holds, and where their files are.

Inputs (shared/format.md): ``dataset/metadata.json``, ``dataset/splits.json``, the ray tree
``ray_dataset_hierarchical/level_<L>/<hh>/<hash>_rays.npz`` and, only for hashes that
``splits.json`` does not describe, the objects' ``subdivision_map.json``.

One sample is one ray file: a top-level object at level 0 (``hash`` is the object ID, e.g.
``"0007"``, voxels at ``objects/object_0007/level_0.npz``) or a unique sub-volume at level
``L >= 1`` (``hash`` is the SHA-256 of its grid, voxels under ``subvolumes/``). A sample is a
plain ``dict``::

    level: int            octree level
    hash: str             sub-volume hash, or the object ID at level 0
    object_ids: list[str] objects that use the sub-volume (sorted)
    ray_path: Path        its ray file
    voxel_path: Path      its voxel file
    num_rays: int         rows in the ray file (read from the npz member header only)
    is_empty: bool        all-zero voxels (so no ray hits)
    is_trivial: bool      listed in ``trivial_hashes`` and all-empty (see below)

:func:`gpuloader.format.chunks.chunk_samples` turns this list into one of chunks
(``rays_per_chunk``).

Split membership follows the format: a sub-volume belongs to a split when it is trivial or
when any object using it is in that split. Trivial means all-empty, as upstream's pipeline
writes ``trivial_hashes``: a listed hash that is not the all-empty grid of its level (an
all-full grid, as older gpuloader versions and upstream's splitter definition also list) is
an ordinary sample, in the splits of the objects that use it. ``isolation='strict'``
additionally drops from val/test every non-trivial sub-volume that a train object also uses,
so nothing a model trained on can reappear in evaluation.

Filters run in this order: split (and isolation), levels, empty. When nothing survives,
:class:`~gpuloader.errors.NoSamplesError` says how many samples each filter left.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from gpuloader.errors import (
    BadObjectIdError,
    DamagedFileError,
    DatasetLayoutError,
    EmptyRayFileError,
    NoSamplesError,
)
from gpuloader.format import index_memo, layout
from gpuloader.format.completeness import warn_if_incomplete
from gpuloader.format.grid_hash import zero_grid_hash
from gpuloader.format.header_cache import HeaderCache, cache_folder
from gpuloader.format.listing import (
    npz_member_header,
    read_json_checked,
    read_splits,
    scan_ray_tree,
)

__all__ = [
    "SPLITS",
    "build_index",
    "npz_member_header",
    "read_splits",
    "scan_ray_tree",
    "split_membership",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
Isolation = Literal["shared", "strict"]


def _refuse(errors: list[tuple[str, BaseException]] | None, path: Any, exc: Exception) -> None:
    """Raise ``exc`` (raise policy) or record it as ``(path, exc)`` (``errors``: skip)."""
    if errors is None:
        raise exc
    errors.append((str(path), exc))


def _plain_object_splits(
    splits_path: Path, object_splits: dict[str, str], errors: list | None
) -> dict[str, str]:
    """``object_splits`` without IDs that are not plain names (raised, or recorded)."""
    out: dict[str, str] = {}
    for oid, split in object_splits.items():
        if layout.is_plain_name(oid):
            out[oid] = split
            continue
        exc = BadObjectIdError(
            f"{splits_path}: object ID {oid!r} in object_splits is not a plain name (it "
            "would lead out of objects/); object IDs are folder names such as '0007': fix "
            "or remove the entry, or regenerate the splits"
        )
        _refuse(errors, splits_path, exc)
    return out


def _usage_from_subdivision_maps(
    dataset_dir: Path,
    object_ids: Iterable[str],
    guard: layout.RootGuard | None = None,
    errors: list[tuple[str, BaseException]] | None = None,
) -> tuple[dict[str, set[str]], set[str]]:
    """Fallback usage: ``{hash: {object ID}}`` and the set of empty hashes, from the maps
    (a map outside the root under ``guard``, or a damaged one, is raised or recorded)."""
    usage: dict[str, set[str]] = {}
    empty: set[str] = set()
    for oid in object_ids:
        p = layout.object_dir(dataset_dir, oid) / "subdivision_map.json"
        target = guard.outside(p) if guard is not None else None
        if target is not None:
            _refuse(errors, p, guard.error(p, target))
            continue
        if not p.is_file():
            continue
        try:
            records = read_json_checked(p)
            if not isinstance(records, list):
                raise DamagedFileError(
                    f"{p}: expected a JSON list of octant records; regenerate it"
                )
        except DamagedFileError as exc:
            _refuse(errors, p, exc)
            continue
        for r in records:
            h = r.get("hash")
            if h is None:
                continue
            usage.setdefault(h, set()).add(str(r.get("object_id", oid)))
            if r.get("is_empty"):
                empty.add(h)
    return usage, empty


def split_membership(
    hash_: str,
    level: int,
    object_splits: dict[str, str],
    usage: dict[str, dict[str, str]] | dict[str, set[str]],
    trivial: set[str],
) -> set[str]:
    """Splits a sample belongs to: every split if trivial, else the splits of its users."""
    if level == 0:
        s = object_splits.get(hash_)
        return {s} if s is not None else set()
    if hash_ in trivial:
        return set(SPLITS)
    users = usage.get(hash_, ())
    if isinstance(users, dict):
        return {object_splits.get(oid, s) for oid, s in users.items()}
    return {object_splits[oid] for oid in users if oid in object_splits}


def _no_samples_message(
    dataset_dir: Path,
    ray_dataset_dir: Path,
    split: str,
    levels: Sequence[int] | None,
    include_empty: bool,
    n_files: int,
    n_split: int,
    leaked: int,
    split_levels: list[int],
    n_levels: int,
) -> str:
    """Why no sample survived: what each filter left, and the one fix that would help."""
    steps = [f"{n_files} ray files under {ray_dataset_dir}"]
    steps.append(
        f"split {split!r} had {n_split}"
        + (f" ({leaked} dropped by isolation='strict')" if leaked else "")
    )
    if n_split == 0:
        fix = (
            f"check that {dataset_dir / 'splits.json'} assigns objects to {split!r} and that "
            "the ray dataset matches the voxel dataset"
        )
        if leaked:
            fix += "; isolation='shared' keeps the sub-volumes a train object also uses"
    elif levels is not None and n_levels == 0:
        steps.append(
            f"level filter levels={sorted(set(levels))} left 0 (levels present: {split_levels})"
        )
        fix = f"choose levels among those split {split!r} has: {split_levels}"
    else:
        if levels is not None:
            steps.append(f"level filter levels={sorted(set(levels))} left {n_levels}")
        steps.append(f"empty filter (include_empty={include_empty}) left 0")
        fix = "every sample left is an all-empty sub-volume: pass include_empty=True to keep them"
    return "no samples found for split: " + "; ".join(steps) + f". To fix: {fix}"


def _level_zero_hashes(
    dataset_dir: Path,
    ray_files: Sequence[tuple[int, str, Path]],
    headers: HeaderCache,
    guard: layout.RootGuard | None = None,
    strict: bool = True,
) -> dict[int, str]:
    """``{level: hash of the all-empty grid of that level}`` for every level >= 1 with rays.

    The side of a level comes from the header of one voxel file of that level (levels whose
    voxel files are all missing are left out; the filters report the missing file). Files
    outside the root (``guard``) are not read; a bad header raises when ``strict``, else the
    next file of the level is tried (the filters record the bad one).
    """
    out: dict[int, str] = {}
    for level, hash_, _ in ray_files:
        if level == 0 or level in out:
            continue
        vpath = layout.voxel_path(dataset_dir, level, hash_)
        if (guard is not None and guard.outside(vpath) is not None) or not vpath.is_file():
            continue
        try:
            shape, _ = headers.header(vpath, "voxels")
        except (DamagedFileError, DatasetLayoutError):
            if strict:
                raise
            continue
        out[level] = zero_grid_hash(shape[0] if shape else 0)
    return out


def build_index(
    dataset_dir: Path,
    ray_dataset_dir: Path,
    split: str = "train",
    levels: Sequence[int] | None = None,
    include_empty: bool = False,
    isolation: Isolation = "shared",
    errors: list[tuple[str, BaseException]] | None = None,
    ray_files: Sequence[tuple[int, str, Path, Any]] | None = None,
    allow_outside: bool = False,
) -> list[dict[str, Any]]:
    """Samples of one split, sorted by (level, hash).

    Args:
        dataset_dir: voxel dataset root (holds metadata.json, splits.json).
        ray_dataset_dir: ray dataset root (holds level_<L>/).
        split: "train", "val" or "test".
        levels: keep only these levels (None: all).
        include_empty: keep all-empty sub-volumes (skipped by default).
        isolation: "shared" (upstream) or "strict" (no val/test sample a train object uses).
        errors: None: a file whose npz header cannot be read raises (as below). A list: the
            sample is left out and ``(file, error)`` appended (the ``on_error='skip'``
            policy; a ray file with no rays is left out the same way).
        ray_files: the ray tree's files as ``(level, hash, path, count)``, e.g. from a pack
            (``PackedRayStore.ray_listing``), instead of scanning ``ray_dataset_dir`` and
            reading every ray file's header: ``count`` is the file's rays (int), None (read
            its header, as without a listing) or an exception (a file known bad: raised, or
            under ``errors`` recorded and left out).
        allow_outside: follow symlinks (of ray or voxel files, their folders, object
            folders) that lead outside ``ray_dataset_dir`` / ``dataset_dir``. False
            (default): such a file is refused, :class:`~gpuloader.errors.OutsideRootError`
            (raised, or under ``errors`` recorded and left out), and never opened.

    ``errors`` also takes, instead of raising: a voxel file that is missing, a ray-tree
    folder that cannot be listed (a symlink loop), an object ID of ``splits.json`` that is
    not a plain name (:class:`~gpuloader.errors.BadObjectIdError`; the ID is ignored) and a
    damaged subdivision map.

    A scanned ray tree with fewer files than the dataset describes (a generator that did not
    finish) warns, :class:`~gpuloader.errors.IncompleteDatasetWarning`
    (:mod:`gpuloader.format.completeness`), and loads what is there.

    Raises:
        DatasetLayoutError: a required file is missing (named, with the fix).
        NoSamplesError: no sample survives the filters (says which filter removed them).
        DamagedFileError: a JSON or npz header cannot be parsed; its subclasses
            BadObjectIdError (an object ID that is a path), UnreadableFileError (a folder
            of the ray tree that cannot be listed) and OutsideRootError (above).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    if isolation not in ("shared", "strict"):
        raise ValueError(f"isolation must be 'shared' or 'strict'; got {isolation!r}")
    memo = None  # a scanned tree's index is remembered in this process (index_memo)
    if ray_files is None and cache_folder() is not None:
        memo = index_memo.memo_key(
            dataset_dir, ray_dataset_dir, split, levels, include_empty, isolation, allow_outside
        )
        known = index_memo.recall(memo)
        if known is not None:
            return known
    inputs = index_memo.Inputs()  # what this build reads, stamped (none kept without a memo)
    if memo is None:
        inputs.refuse()
    n_errors = len(errors) if errors is not None else 0
    dataset_dir = Path(dataset_dir)
    ray_dataset_dir = Path(ray_dataset_dir)
    guard = None if allow_outside else layout.RootGuard(dataset_dir, "dataset")
    for name in ("metadata.json", "splits.json") if guard is not None else ():
        guard.check(dataset_dir / name)  # the whole index depends on them: always raised
    splits = read_splits(dataset_dir)
    object_splits = _plain_object_splits(
        dataset_dir / "splits.json",
        {str(k): str(v) for k, v in splits["object_splits"].items()},
        errors,
    )
    usage: dict[str, Any] = dict(splits.get("hash_object_usage") or {})
    trivial: set[str] = set(splits.get("trivial_hashes") or ())

    counts: dict[tuple[int, str], Any] = {}
    headers = HeaderCache(ray_dataset_dir)  # remembered headers and folder listings
    if ray_files is None:
        before = len(errors) if errors is not None else 0
        ray_files = scan_ray_tree(ray_dataset_dir, errors, allow_outside, headers, as_text=True)
        if ray_files:  # none at all: the wrong folder, said below
            refused = [Path(f) for f, _ in (errors or [])[before:]]
            if warn_if_incomplete(
                ray_dataset_dir, splits, [(lv, h) for lv, h, _ in ray_files], refused
            ):
                inputs.refuse()
    else:
        counts = {(int(lv), str(h)): n for lv, h, _, n in ray_files}
        ray_files = sorted(((int(lv), str(h), Path(p)) for lv, h, p, _ in ray_files))
        if not allow_outside:  # files the pack does not hold are read from the tree
            tree = layout.RootGuard(ray_dataset_dir, "ray tree")
            for lv, h, p in ray_files:
                target = tree.outside(p) if counts.get((lv, h)) is None else None
                if target is not None:
                    counts[(lv, h)] = tree.error(p, target)
    if not ray_files:
        raise NoSamplesError(
            f"{ray_dataset_dir}: no *_rays.npz files under level_<L>/<hh>/; generate the rays "
            "(gpuloader generate) or point ray_dataset_dir at the ray dataset root"
        )
    # Trivial = all-empty (upstream's pipeline); other listed hashes are ordinary samples.
    zero_hashes = _level_zero_hashes(dataset_dir, ray_files, headers, guard, errors is None)
    trivial &= set(zero_hashes.values())

    # Hashes that splits.json does not describe: fall back to the subdivision maps.
    map_empty: set[str] = set()
    unknown = [h for lv, h, _ in ray_files if lv > 0 and h not in usage and h not in trivial]
    if unknown:
        inputs.refuse()  # the maps' stamps are not kept: built afresh each time
        map_usage, map_empty = _usage_from_subdivision_maps(
            dataset_dir, object_splits, guard, errors
        )
        for h, users in map_usage.items():
            usage.setdefault(h, users)

    # Filter 1: split (+ isolation).
    in_split = []
    leaked = 0
    for level, hash_, path in ray_files:
        member = split_membership(hash_, level, object_splits, usage, trivial)
        if split not in member:
            continue
        if (
            isolation == "strict"
            and split != "train"
            and level > 0
            and hash_ not in trivial
            and "train" in member
        ):
            leaked += 1
            continue
        in_split.append((level, hash_, path))
    n_split = len(in_split)

    # Filter 2: levels.
    if levels is not None:
        wanted = {int(lv) for lv in levels}
        in_levels = [t for t in in_split if t[0] in wanted]
    else:
        in_levels = in_split
    n_levels = len(in_levels)

    # Filter 3: empty sub-volumes (hash equals the all-zero grid's hash at that level's side).
    side_of_level: dict[int, int] = {}
    kept: list[dict[str, Any]] = []
    for level, hash_, path in in_levels:
        vpath = layout.voxel_path(dataset_dir, level, hash_)
        vtext = os.fspath(vpath)
        try:  # one lstat says both: a link (then followed) and a plain file
            st = os.lstat(vtext)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        link = st is not None and stat.S_ISLNK(st.st_mode)
        if st is not None:
            inputs.add_lstat(vtext, st)
        target = guard.outside(vtext, is_link=link) if guard is not None else None
        if target is not None:
            _refuse(errors, vpath, guard.error(vpath, target))
            continue
        if not (os.path.isfile(vtext) if link else st is not None and stat.S_ISREG(st.st_mode)):
            missing = DatasetLayoutError(
                f"{vpath}: voxel file missing (ray file {path} has none); the ray and voxel "
                "datasets do not match (regenerate one from the other, or pass the "
                "dataset_dir that the rays were made from)"
            )
            _refuse(errors, vpath, missing)
            continue
        if level > 0 and level not in zero_hashes:
            try:
                shape, _ = headers.header(vpath, "voxels")
            except (DamagedFileError, DatasetLayoutError) as exc:
                if errors is None:
                    raise
                errors.append((str(vpath), exc))
                continue
            side_of_level[level] = shape[0] if shape else 0
            zero_hashes[level] = zero_grid_hash(side_of_level[level])
        is_empty = level > 0 and (hash_ == zero_hashes[level] or hash_ in map_empty)
        if is_empty and not include_empty:
            continue
        users = usage.get(hash_, ())
        object_ids = [hash_] if level == 0 else sorted(str(u) for u in users)
        kept.append(
            {
                "level": level,
                "hash": hash_,
                "object_ids": object_ids,
                "ray_path": Path(path) if isinstance(path, str) else path,
                "voxel_path": vpath,
                "num_rays": 0,
                "is_empty": bool(is_empty),
                "is_trivial": hash_ in trivial,
            }
        )

    if not kept:
        raise NoSamplesError(
            _no_samples_message(
                dataset_dir,
                ray_dataset_dir,
                split,
                levels,
                include_empty,
                len(ray_files),
                n_split,
                leaked,
                sorted({lv for lv, _, _ in in_split}),
                n_levels,
            )
        )

    try:
        _count_rays(kept, counts, headers, errors)
    finally:
        headers.save()
    out = [s for s in kept if s["num_rays"] >= 0]
    if memo is not None:
        if errors is not None and len(errors) > n_errors:
            inputs.refuse()
        voxels = [s["voxel_path"] for s in kept]
        inputs.note_build(headers.seen, dataset_dir, ray_dataset_dir, voxels)
        index_memo.remember(memo, out, inputs)
    return out


def _count_rays(
    kept: list[dict[str, Any]],
    counts: dict[tuple[int, str], Any],
    headers: HeaderCache,
    errors: list[tuple[str, BaseException]] | None,
) -> None:
    """Set each sample's ``num_rays`` (-1 for a refused file, recorded in ``errors``).

    A count the pack manifest gave is used as is; others come from the ``origins`` header
    (remembered between runs by ``headers``), checked to be ``(N, 3)`` with N > 0.
    """
    for s in kept:
        known = counts.get((s["level"], s["hash"]))
        if isinstance(known, BaseException):
            if errors is None:
                raise known
            errors.append((str(s["ray_path"]), known))
            s["num_rays"] = -1
            continue
        if known is not None and (int(known) > 0 or errors is None):
            s["num_rays"] = int(known)
            continue
        try:
            shape, _ = headers.header(s["ray_path"], "origins")
            if len(shape) != 2 or shape[1] != 3:
                raise DamagedFileError(
                    f"{s['ray_path']}: 'origins' has shape {shape}, expected (N, 3); regenerate it"
                )
            if errors is not None and shape[0] == 0:
                raise EmptyRayFileError(
                    f"{s['ray_path']}: 'origins': holds no rays (N = 0); regenerate it",
                    path=s["ray_path"],
                    key="origins",
                )
        except (DamagedFileError, DatasetLayoutError) as exc:
            if errors is None:
                raise
            errors.append((str(s["ray_path"]), exc))
            s["num_rays"] = -1
            continue
        s["num_rays"] = shape[0]
