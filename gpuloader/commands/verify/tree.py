"""The JSON side of the dataset tree for ``gpuloader verify``: the top-level files and splits.json.

:func:`read_json` reads one of the dataset's JSON files (a missing or unreadable one is a
problem); :func:`check_metadata_keys` names the keys upstream's generator writes that a JSON
file lacks; :func:`check_splits` holds splits.json's bookkeeping (object_splits,
hash_object_usage, trivial_hashes) against the object folders, the subdivision maps and the
voxel contents.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpuloader.commands.verify.report import (
    FORMAT,
    MISSING,
    OUTSIDE,
    SPLITS,
    UNREADABLE,
    Problem,
    VerifyReport,
    describe,
    examples,
)
from gpuloader.format import layout

__all__ = ["SPLIT_NAMES", "read_json", "check_splits", "check_metadata_keys"]

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


def read_json(report: VerifyReport, path: Path, what: str) -> Any:
    """The parsed JSON file; None, with a MISSING or UNREADABLE problem, when it cannot be read.

    ``what``: the file as the problem names it (``"dataset metadata.json"``).
    """
    if not path.is_file():
        report.problems.append(Problem(str(path), f"{what} is missing", MISSING))
        return None
    try:
        return layout.read_json(path)
    except Exception as exc:
        report.problems.append(
            Problem(str(path), f"cannot parse JSON ({describe(exc)})", UNREADABLE)
        )
        return None


def check_splits(
    report: VerifyReport,
    path: Path,
    splits: Any,
    objects: Sequence[str],
    refs: dict[tuple[int, str], tuple[bool, set[str]]],
    trivial: dict[str, bool],
) -> None:
    """splits.json against the object folders, the subdivision maps and the voxel contents.

    ``splits``: the parsed splits.json; ``objects``: the object IDs with a folder; ``refs``:
    ``(level, hash) -> (all records empty, object IDs using it)``; ``trivial``: ``hash ->
    all-empty`` of the sub-volumes whose grid could be read (or that only empty records name).
    """

    def add(msg: str, kind: str = SPLITS) -> None:
        report.problems.append(Problem(str(path), msg, kind))

    if not isinstance(splits, dict):
        add("splits.json must be a JSON object", FORMAT)
        return
    missing = [
        k for k in ("object_splits", "hash_object_usage", "trivial_hashes") if k not in splits
    ]
    if missing:
        add(f"missing key(s) {missing}", FORMAT)
    object_splits = splits.get("object_splits")
    if isinstance(object_splits, dict):
        absent = [o for o in objects if o not in object_splits]
        if absent:
            add(f"{len(absent)} object(s) have no entry in object_splits: {examples(absent)}")
        paths = [o for o in object_splits if not layout.is_plain_name(o)]
        if paths:
            add(
                f"object_splits holds {len(paths)} object ID(s) that are not plain names "
                f"(paths that lead out of objects/): {examples([repr(o) for o in paths])}; "
                "the loaders refuse them (BadObjectIdError): fix or remove the entries",
                OUTSIDE,
            )
        extra = [o for o in object_splits if o not in set(objects) and layout.is_plain_name(o)]
        if extra:
            add(f"{len(extra)} object(s) in object_splits have no object folder: {examples(extra)}")
        odd = sorted({str(v) for v in object_splits.values() if v not in SPLIT_NAMES})
        if odd:
            add(f"object_splits uses unknown split name(s) {odd}; expected train/val/test")
    elif "object_splits" in splits:
        add("object_splits must be a JSON object {object ID: split}", FORMAT)
        object_splits = None

    usage = splits.get("hash_object_usage")
    used: dict[str, set[str]] = defaultdict(set)
    for (_level, h), (_empty, oids) in refs.items():
        used[h] |= oids
    if isinstance(usage, dict):
        lacking = [h for h in used if h not in usage]
        if lacking:
            add(
                f"hash_object_usage lacks {len(lacking)} hash(es) used in subdivision maps: "
                f"{examples(lacking)}"
            )
        stale = [h for h in usage if h not in used]
        if stale:
            add(
                f"hash_object_usage lists {len(stale)} hash(es) no subdivision map uses: "
                f"{examples(stale)}"
            )
        wrong_users, wrong_split = [], []
        for h, oids in used.items():
            entry = usage.get(h)
            if not isinstance(entry, dict):
                continue
            if set(entry) != oids:
                wrong_users.append(h)
            elif isinstance(object_splits, dict) and any(
                object_splits.get(o) != s for o, s in entry.items()
            ):
                wrong_split.append(h)
        if wrong_users:
            add(
                f"hash_object_usage names other objects than the subdivision maps for "
                f"{len(wrong_users)} hash(es): {examples(wrong_users)}"
            )
        if wrong_split:
            add(
                f"hash_object_usage gives other splits than object_splits for "
                f"{len(wrong_split)} hash(es): {examples(wrong_split)}"
            )
    elif "hash_object_usage" in splits:
        add("hash_object_usage must be a JSON object {hash: {object ID: split}}", FORMAT)

    listed = splits.get("trivial_hashes")
    if isinstance(listed, list):
        listed_set = {str(h) for h in listed}
        not_listed = [h for h, t in trivial.items() if t and h not in listed_set]
        if not_listed:
            add(
                f"trivial_hashes lacks {len(not_listed)} all-empty hash(es): {examples(not_listed)}"
            )
        wrongly = [h for h in listed_set if trivial.get(h) is False]
        if wrongly:
            add(
                f"trivial_hashes lists {len(wrongly)} hash(es) that are not all-empty (upstream "
                f"lists only all-empty grids; all-full ones are ordinary samples): "
                f"{examples(wrongly)}"
            )
        unknown = [h for h in listed_set if h not in used and h not in trivial]
        if unknown:
            add(f"trivial_hashes lists {len(unknown)} unknown hash(es): {examples(unknown)}")
    elif "trivial_hashes" in splits:
        add("trivial_hashes must be a JSON list of hashes", FORMAT)


def check_metadata_keys(
    report: VerifyReport,
    ds: Path,
    rays_root: Path,
    meta: Any,
    splits: Any,
    summary: Any,
    registry: Any,
) -> None:
    """Every JSON file holds the keys upstream's generator writes; name the missing ones.

    ``meta``, ``splits``, ``summary``, ``registry``: the parsed dataset metadata.json,
    splits.json, processing_summary.json, registry.json (None: missing or unreadable, already
    reported). Object metadata.json files are read here.
    """
    from gpuloader.generate.metadata import missing_keys

    def check(file: str, path: Path, doc: Any) -> None:
        if doc is None:
            return
        lacking = missing_keys(file, doc)
        if lacking:
            report.problems.append(
                Problem(
                    str(path),
                    f"missing key(s) that upstream's generator writes: {', '.join(lacking)}; "
                    "regenerate the dataset (gpuloader generate) so upstream tools can read it",
                    FORMAT,
                )
            )

    check("metadata.json", ds / "metadata.json", meta)
    check("splits.json", ds / "splits.json", splits)
    check("registry.json", ds / "registry.json", registry)
    check("processing_summary.json", rays_root / "processing_summary.json", summary)
    objects_root = ds / "objects"
    guard = layout.RootGuard(ds, "dataset")
    if objects_root.is_dir():
        for odir in sorted(objects_root.glob("object_*/")):
            path = odir / "metadata.json"
            if guard.outside(path) is not None:
                continue  # a link out of the dataset: reported, not read
            try:
                doc = layout.read_json(path)
            except Exception:
                continue  # missing or unreadable: reported by the object check
            check("object metadata.json", path, doc)
