"""Building a ray pack: :func:`pack_rays` inflates every ray file once into plain arrays.

The npz ray files cost about 7 ms of zlib per file per core, however few rows a sample
needs (design decision 7), so a pack holds them as ``.npy`` arrays, one set per level (the
layout of :mod:`gpuloader.stores.pack.manifest`). Two passes: the npy headers give every
file's row counts, then worker processes inflate chunks of files into their slices of the
level arrays. The pack is built in a hidden folder beside ``out_dir``, flushed to disk,
given its ``manifest.json`` last and renamed into place, so an interrupted run never leaves
a folder that passes for a pack.

Bad ray files (``on_error``): with ``"raise"`` (default) the first bad file stops the build
with its named error (:mod:`gpuloader.format.validate`) and no pack is left. With ``"skip"``
every bad file (every check ``pack`` runs, unreadable files and symlink loops included) is
left out of the level arrays and recorded in the manifest's ``bad_files`` (relative path ->
level, hash, error class name, the error's first line); a ``SkippedFileWarning`` names each.
It stays a source file of the manifest (size, mtime, sha256 when readable), so repairing it
makes the pack stale; reading it from the pack raises the recorded error class. An
up-to-date pack that left files out is kept by a later ``on_error="skip"`` run; an
``on_error="raise"`` run refuses it, raising the first left-out file's recorded error (a
raise-mode pack never holds a gap).

Layouts (``layout``): ``"rows"`` (:class:`~gpuloader.stores.pack.rows_build.RowsWriter`: the
ordinary pack, its files byte for byte as they always were) and ``"striped"``
(:class:`~gpuloader.stores.pack.striped_build.StripedWriter`: the files of
:mod:`gpuloader.stores.pack.striped`). A writer adds to pass 1 (``probe``: a striped pack's
voxel file headers), makes a level's files and its jobs (``level_jobs``), keeps what the jobs
return (``collect``), closes the holes of bad files (``finish_level``) and adds its manifest
keys (``manifest_keys``). An existing pack is kept only when its layout options (layout,
stripe_rays, seed, voxel side) are the ones asked for.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from gpuloader.errors import (
    DamagedFileError,
    DatasetLayoutError,
    IncompletePackError,
    PackError,
    StalePackError,
)
from gpuloader.format import layout as layout_io
from gpuloader.format.completeness import warn_if_incomplete
from gpuloader.format.listing import npz_member_header
from gpuloader.format.npz_files import npz_error
from gpuloader.stores.pack.build_steps import (
    OWNER,
    check_free_space,
    fsync_tree,
    make_tmp,
    refuse_or_warn_left_out,
    remove_stale_tmp,
    run_jobs,
    safe_to_replace,
    skippable,
    summary,
    swap_into_place,
    tmp_folder,
    writing,
)
from gpuloader.stores.pack.manifest import (
    FORMAT_NAME,
    LAYOUTS,
    MANIFEST,
    check_pack,
    error_record,
    file_stat,
    file_stat_any,
    is_readable,
    level_dir,
    pack_layout,
    read_manifest,
    rebuild_command,
    relative_name,
    sha256_file,
    source_files,
)
from gpuloader.stores.pack.rows_build import RowsWriter
from gpuloader.stores.pack.striped_build import StripedWriter, find_dataset_dir

__all__ = ["OnError", "pack_rays"]

OnError = Literal["raise", "skip"]


# ------------------------------------------------------------------------------ pack_rays


def pack_rays(
    ray_dataset_dir: Path | str,
    out_dir: Path | str,
    levels: Sequence[int] | None = None,
    progress: bool = True,
    workers: int | None = None,
    force: bool = False,
    on_error: OnError = "raise",
    layout: str = "rows",
    stripe_rays: int = 512,
    seed: int = 0,
    dataset_dir: Path | str | None = None,
) -> dict[str, Any]:
    """Inflate every ray file of ``ray_dataset_dir`` (at ``levels``) into a pack in ``out_dir``.

    Built in a temporary folder beside ``out_dir`` and renamed into place when whole. An
    ``out_dir`` holding an up-to-date pack of the same source, levels and layout options
    is kept (its file list, then its files' content, compared with the ray tree); a stale
    one, or a folder an interrupted run left, needs ``force=True``. Any other non-empty
    folder is never replaced.

    Args:
        ray_dataset_dir: ray dataset root (level_<L>/<hh>/<hash>_rays.npz).
        out_dir: pack folder to write.
        levels: pack only these levels (None: all).
        progress: show tqdm bars.
        workers: processes inflating files (None: all cores; 1: this process).
        force: replace a stale or interrupted pack in ``out_dir``.
        on_error: "raise" (the first bad ray file stops the build, naming it; no pack is
            written) or "skip" (bad files are left out, recorded in the manifest and named
            by a ``SkippedFileWarning`` each; see the module doc). "raise" also refuses an
            up-to-date pack that left files out, raising the first one's recorded error.
        layout: "rows" (the ordinary pack) or "striped" (:mod:`gpuloader.stores.pack.striped`:
            stripes of ``stripe_rays`` permuted rows, plus the voxel grids and views).
        stripe_rays: W, rows per stripe (striped only; >= 1).
        seed: the striped permutations' seed (recorded in the manifest).
        dataset_dir: the voxel side (striped only; default: found from the ray tree,
            :func:`~gpuloader.stores.pack.striped_build.find_dataset_dir`).

    Returns:
        Summary: out_dir, source_root, pack_id, layout, levels ``{L: {files, rays, views}}``
        (striped: also ``stripes``, ``record_bytes``; and ``stripe_rays``, ``seed``,
        ``dataset_dir``), files (packed), rays, bytes, seconds, up_to_date (True: an existing
        pack was kept), bad (the files left out: ``[{file, level, hash, error, message}]``,
        sorted).

    Raises:
        PackError: ``out_dir`` holds something else, or a stale pack without ``force``;
            striped: no voxel dataset found.
        DatasetLayoutError, DamagedFileError: a missing tree or a damaged ray file (named;
            with "skip": only when no ray file is good); striped: a missing voxel file.
    """
    start = time.perf_counter()
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip'; got {on_error!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}; got {layout!r}")
    striped = layout == "striped"
    if striped and (
        isinstance(stripe_rays, bool) or int(stripe_rays) != stripe_rays or stripe_rays < 1
    ):
        raise ValueError(f"stripe_rays must be an integer >= 1; got {stripe_rays!r}")
    if striped and not 0 <= int(seed) < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64); got {seed!r}")
    skip = on_error == "skip"
    root = Path(ray_dataset_dir).resolve()
    out_dir = Path(out_dir).absolute()
    level_set = None if levels is None else {int(lv) for lv in levels}
    level_list = None if level_set is None else sorted(level_set)
    inside = (
        out_dir.resolve().relative_to(root).parts
        if out_dir.resolve().is_relative_to(root)
        else None
    )
    if inside is not None and (not inside or inside[0].startswith("level_")):
        raise PackError(f"{out_dir}: the pack cannot be written into the ray tree {root}")
    writer: RowsWriter | StripedWriter = RowsWriter()
    rebuild = rebuild_command(root, out_dir, level_list)
    if striped:
        vroot = find_dataset_dir(root, dataset_dir)
        writer = StripedWriter(vroot, int(stripe_rays), int(seed))
        rebuild = rebuild_command(
            root, out_dir, level_list, layout, int(stripe_rays), int(seed), vroot
        )
    if out_dir.exists():
        if (out_dir / MANIFEST).is_file() and not force:
            try:
                manifest = read_manifest(out_dir)
                same = manifest["source_root"] == str(root) and manifest["levels"] == level_list
                options = _options(manifest)
                wanted = _options(writer.manifest_keys())
                if same and options == wanted:
                    # sizes and mtimes (what a store's open checks), then content: a file
                    # rewritten to the same size with its mtime set back is stale too
                    check_pack(out_dir, "fast", root, manifest)
                    check_pack(out_dir, "full", root, manifest)
                    refuse_or_warn_left_out(manifest, out_dir, skip)
                    return summary(manifest, out_dir, time.perf_counter() - start, True)
                why = f"it packs {manifest['source_root']} at levels {manifest['levels']}"
                if options != wanted:
                    why += f", {_describe(options)}; asked for {_describe(wanted)}"
            except StalePackError as exc:
                why = exc.reason
            except IncompletePackError as exc:
                why = str(exc)
            fix = "" if rebuild in why else f"; replace it: `{rebuild}`"
            raise PackError(f"{out_dir} already holds a ray pack that does not match ({why}){fix}")
        if not safe_to_replace(out_dir):
            raise PackError(
                f"{out_dir}: exists and is not a ray pack; choose an empty or new folder"
            )
        if not force and any(out_dir.iterdir()):
            raise PackError(
                f"{out_dir}: holds an incomplete ray pack (an interrupted run?); replace it: "
                f"`{rebuild}`"
            )

    # under skip, a folder of the tree that cannot be listed (a symlink loop) or a link out
    # of it is left out and recorded in the manifest's "refused" (raised under raise)
    refused: list[tuple[str, BaseException]] = []
    found = source_files(root, None, refused if skip else None)
    if not found:
        raise DatasetLayoutError(
            f"{root}: no *_rays.npz files; point RAY_DIR at the ray dataset root "
            "(it holds level_<L>/)"
        )
    _warn_if_incomplete(root, dataset_dir, found, refused)
    present = sorted({int(t[0]) for t in found})
    absent = [lv for lv in (level_list or []) if lv not in present]
    if absent:
        raise DatasetLayoutError(
            f"{root}: no ray files at level(s) {', '.join(map(str, absent))}; it has levels "
            f"{', '.join(map(str, present))}: give levels from those (--levels), or none to "
            "pack them all"
        )
    found = [t for t in found if level_set is None or t[0] in level_set]

    # Pass 1: sizes, mtimes and row counts from the npy headers (nothing inflated).
    plan: dict[int, list[tuple]] = {}
    stats: dict[str, tuple[int, int]] = {}
    bad: dict[str, dict[str, Any]] = {}  # rel -> record (on_error="skip")
    digests: dict[str, str | None] = {}
    where: dict[str, tuple[int, str]] = {}
    for level, hash_, path in tqdm(found, desc="headers", unit="file", disable=not progress):
        rel = relative_name(root, path)
        where[rel] = (int(level), str(hash_))
        try:
            try:
                stats[rel] = file_stat(path)
            except OSError as exc:  # a symlink loop, no permission
                err = npz_error(path, exc)
                if not skip:
                    raise err from exc
                stats[rel] = file_stat_any(path)  # the link itself; raises if nothing is there
                raise err from exc
            shape, _ = npz_member_header(path, "origins")
            vshape, _ = npz_member_header(path, "view_positions")
            if len(shape) != 2 or shape[1] != 3 or len(vshape) != 2 or vshape[1] != 3:
                raise DamagedFileError(
                    f"{path}: 'origins' {shape} / 'view_positions' {vshape}, expected (N, 3) "
                    "and (V, 3); regenerate it or delete it"
                )
            extra = writer.probe(level, hash_, path)
        except DamagedFileError as exc:
            if not (skip and skippable(exc)):
                raise
            rec = {**error_record(exc), **writer.blame(exc, level, hash_)}
            bad[rel] = {"level": level, "hash": hash_, **rec}
            digests[rel] = sha256_file(path) if is_readable(path) else None
            continue
        plan.setdefault(level, []).append((rel, shape[0], vshape[0], *extra))

    with writing(out_dir):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out_dir)  # what killed runs left (their process is gone)
    manifest_bytes = 4096 + 256 * len(found)  # its file list
    check_free_space(out_dir, writer.estimate_bytes(plan, skip) + manifest_bytes)
    tmp = tmp_folder(out_dir)
    pack_id = uuid.uuid4().hex
    try:
        jobs: list[tuple] = []
        level_info: dict[str, dict[str, Any]] = {}
        with writing(out_dir):
            make_tmp(tmp)
            for level, files in sorted(plan.items()):
                ldir = level_dir(tmp, level)
                ldir.mkdir()
                jobs += writer.level_jobs(ldir, level, files, stats, root, skip, workers, pack_id)

        # Pass 2: inflate every file into its slices.
        bar = tqdm(
            total=len(found) - len(bad), desc="packing rays", unit="file", disable=not progress
        )
        with bar:
            for done in run_jobs(writer.job, jobs, workers):
                for rel, digest, error, extra in done:
                    digests[rel] = digest
                    writer.collect(rel, extra)
                    if error is not None:
                        lv, h = where[rel]
                        bad[rel] = {"level": lv, "hash": h, **error}
                bar.update(len(done))
        if len(bad) == len(found):
            first = min(bad)
            raise DamagedFileError(
                f"{bad[first]['message']}\n(all {len(found)} ray files of {root} are bad; "
                "nothing to pack)"
            )

        total_bytes = 0
        for level, files in sorted(plan.items()):
            ldir = level_dir(tmp, level)
            keep = np.array([f[0] not in bad for f in files], dtype=bool)
            with writing(out_dir):
                info = writer.finish_level(ldir, level, keep, pack_id)
            if info is None:
                shutil.rmtree(ldir)
                continue
            level_info[str(level)] = info
            total_bytes += sum(info["file_bytes"].values())
        manifest = {
            "format": FORMAT_NAME,
            "format_version": writer.version,
            "pack_id": pack_id,
            "created": dt.datetime.now().isoformat(timespec="seconds"),
            "source_root": str(root),
            "levels": level_list,
            **writer.manifest_keys(),
            "on_error": on_error,
            "totals": {
                "files": sum(i["files"] for i in level_info.values()),
                "bad_files": len(bad),
                "rays": sum(i["rays"] for i in level_info.values()),
                "views": sum(i["views"] for i in level_info.values()),
                "bytes": total_bytes,
            },
            "level_info": level_info,
            "files": {rel: [*stats[rel], digests[rel]] for rel in sorted(stats)},
            "bad_files": {rel: bad[rel] for rel in sorted(bad)},
            "refused": {path: error_record(exc) for path, exc in sorted(refused)},
        }
        with writing(out_dir):
            (tmp / OWNER).unlink()
            fsync_tree(tmp)
            layout_io.atomic_write_json(tmp / MANIFEST, manifest)
            swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    refuse_or_warn_left_out(manifest, out_dir, skip)
    return summary(manifest, out_dir, time.perf_counter() - start, False)


def _warn_if_incomplete(
    root: Path,
    dataset_dir: Path | str | None,
    found: list[tuple[int, str, Path]],
    refused: list[tuple[str, BaseException]],
) -> None:
    """:class:`~gpuloader.errors.IncompleteDatasetWarning` when the ray tree lacks files
    its summary or the voxel side's ``splits.json`` describes (a generator that did not
    finish): the pack would hold a smaller dataset."""
    splits: Any = {}
    try:
        vroot = find_dataset_dir(root, dataset_dir)
        splits = layout_io.read_json(vroot / "splits.json")
    except (PackError, OSError, ValueError):
        pass  # no voxel side found: only the summary's count is compared
    keys = [(lv, h) for lv, h, _ in found]
    warn_if_incomplete(
        root, splits if isinstance(splits, dict) else {}, keys, [Path(f) for f, _ in refused]
    )


def _options(keys: dict[str, Any]) -> tuple:
    """The layout options a manifest (or a writer's manifest keys) records."""
    return (
        pack_layout(keys),
        keys.get("stripe_rays"),
        keys.get("seed"),
        keys.get("dataset_dir"),
    )


def _describe(options: tuple) -> str:
    """Layout options of :func:`_options` in words."""
    name, w, seed, ds = options
    if name == "rows":
        return "layout rows"
    return f"layout {name}, stripe_rays {w}, seed {seed}, voxels from {ds}"
