"""Reading a ray pack: :class:`PackedRayStore`, its per-level memory maps, open_ray_store.

A pack (written by :func:`~gpuloader.stores.pack.build.pack_rays`; layout in
:mod:`gpuloader.stores.pack.manifest`) holds every ray file of a tree as plain ``.npy``
arrays, one set per level. :class:`PackedRayStore` serves ``read(sample, rows)`` from them
as a gather of ``rows`` (the :class:`~gpuloader.stores.npz.RayStore` protocol), returning
exactly what :class:`~gpuloader.stores.npz.NpzRayStore` returns. Its manifest is read and
its staleness checked when it is made (``check``); a level's arrays are memory-mapped on
first use (:class:`PackLevel`, :meth:`PackedRayStore.level_arrays`).

A sample the pack left out as bad (``on_error="skip"``) raises its recorded error class,
which a dataset with ``on_error='skip'`` replaces like any bad file.

A striped pack (``layout="striped"``, :mod:`gpuloader.stores.pack.striped`) opens the same
way and serves the same ``read``: the rows asked for, in file order, gathered from its
stripes through the level's ``positions`` (so a dataset over it gives exactly the samples
it gives over the npz files). Its levels are :class:`~gpuloader.stores.pack.striped.StripedLevel`
objects (:meth:`PackedRayStore.striped_level`), for a store that streams stripes; it has no
row arrays (:meth:`PackedRayStore.level_arrays` raises :class:`PackLayoutError`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from gpuloader import schema
from gpuloader.errors import (
    DamagedFileError,
    IncompletePackError,
    PackLayoutError,
    SampleNotInPackError,
    StalePackError,
)
from gpuloader.format import layout
from gpuloader.format.validate import check_ray_values
from gpuloader.stores.files import LocalPackFiles, PackFiles
from gpuloader.stores.npz import NpzRayStore, RayStore, chunk_span
from gpuloader.stores.pack.manifest import (
    INDEX,
    PACK_KEYS,
    Check,
    check_pack,
    level_dir,
    manifest_rebuild,
    pack_layout,
    read_manifest,
    recorded_error,
)
from gpuloader.stores.pack.striped import StripedLevel

__all__ = ["PackLevel", "PackedRayStore", "open_ray_store"]


class PackLevel:
    """One level of an open pack, memory-mapped.

    Attributes:
        arrays: :data:`~gpuloader.stores.pack.manifest.PACK_KEYS` -> read-only memory map
            (a plain ndarray view): ``origins``/``directions`` (N_L, 3) float32,
            ``distances`` (N_L,) float32, ``hits`` (N_L,) uint8, ``face_ids``/``view_ids``
            (N_L,) int32, ``view_positions`` (V_L, 3) float32.
        offsets: (K, 4) int64, one row per file: ray start, ray count, view start, view count.
        row: hash -> the file's row of ``offsets``.

    Raises:
        IncompletePackError: an index or array file is missing.
        StalePackError: the level was written by another build (``pack_id``).
    """

    def __init__(self, pack_dir: Path, level: int, pack_id: str) -> None:
        ldir = level_dir(pack_dir, level)
        try:
            with np.load(ldir / INDEX, allow_pickle=False) as idx:
                hashes, offsets, got_id = idx["hashes"], idx["offsets"], str(idx["pack_id"])
            if got_id != pack_id:
                raise StalePackError(
                    f"ray pack {pack_dir} was rebuilt while in use (pack id {got_id}, opened "
                    f"as {pack_id}); open the store again"
                )
            self.arrays: dict[str, np.ndarray] = {
                k: np.load(ldir / f"{k}.npy", mmap_mode="r").view(np.ndarray) for k in PACK_KEYS
            }
        except FileNotFoundError as exc:
            raise IncompletePackError(
                f"{ldir}: {exc.filename} is missing; the pack is damaged: rebuild it "
                f"(gpuloader pack RAY_DIR {pack_dir} --force)"
            ) from exc
        self.offsets: np.ndarray = offsets.astype(np.int64, copy=False)
        self.row: dict[str, int] = {str(h): i for i, h in enumerate(hashes.tolist())}


class PackedRayStore:
    """Reads rays from a pack written by :func:`~gpuloader.stores.pack.build.pack_rays` (the
    RayStore protocol).

    ``read(sample, rows)`` returns exactly what :class:`~gpuloader.stores.npz.NpzRayStore`
    returns for the same sample and rows: fresh, writable arrays with the on-disk dtypes
    (``origins``/``directions`` (k, 3) float32, ``distances`` (k,) float32, ``hits`` (k,)
    uint8, ``face_ids``/``view_ids`` (k,) int32, ``view_positions`` (V, 3) float32).

    The manifest is read and checked when the store is made; the arrays are memory-mapped
    on first use in each process, and pickling drops them, so the store travels cheaply
    into DataLoader and DALI worker processes.

    Args:
        pack_dir: the pack folder, or the URL of a pack on object storage
            (``s3://bucket/prefix``, any fsspec URL; needs the ``s3`` extra): a striped pack
            there streams through :class:`~gpuloader.stores.remote.RemotePackFiles`.
        check: "fast" (compare file list, sizes and mtimes with the ray tree), "full" (also
            the files' sha256) or "none"; None (default): "fast" for a folder, "none" for a
            URL (the ray tree is rarely where the job runs; the pack's own files are still
            checked against its manifest, and its pack id at every epoch's stripe read).
        storage_options: a URL's fsspec options (credentials, ``client_kwargs``'s
            ``endpoint_url``, ...; default: fsspec's configuration, e.g. the environment).
        cache_dir, cache_bytes: a URL's local stripe cache (a folder, bounded in bytes,
            least recently used evicted; default: none).
        ray_dataset_dir: the ray tree to check against (default: the one packed).
        dataset_dir: a striped pack's voxel side to check against (default: the one packed).

    Attributes:
        layout: "rows" or "striped". stripe_rays (W) and seed: a striped pack's, else None.
        bad: ``{(level, hash): (file, message)}`` of every ray file the pack left out as bad
            (``pack_rays(..., on_error="skip")``): the source file's path (under
            ``ray_dataset_dir`` when given) and the first line of its error when packed.
            ``read``/``locate`` of such a sample raise :meth:`bad_error`.

    Raises:
        IncompletePackError: not a complete pack. StalePackError: the ray tree changed.
    """

    keys: tuple[str, ...] = PACK_KEYS

    def __init__(
        self,
        pack_dir: Path | str,
        check: Check | None = None,
        ray_dataset_dir: Path | str | None = None,
        dataset_dir: Path | str | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        cache_dir: Path | str | None = None,
        cache_bytes: int | None = None,
    ) -> None:
        self.files: PackFiles = open_pack_files(pack_dir, storage_options, cache_dir, cache_bytes)
        self.pack_dir: Any = self.files.root if self.files.remote else Path(pack_dir)
        check = ("none" if self.files.remote else "fast") if check is None else check
        self.check = check
        manifest = read_manifest(self.pack_dir, self.files)
        check_pack(self.pack_dir, check, ray_dataset_dir, manifest, dataset_dir, self.files)
        self.layout: str = pack_layout(manifest)
        striped = self.layout == "striped"
        self.stripe_rays: int | None = int(manifest["stripe_rays"]) if striped else None
        self.seed: int | None = int(manifest["seed"]) if striped else None
        #: what rebuilds the pack (manifest keys of manifest_rebuild)
        self._rebuild = {
            k: manifest.get(k)
            for k in ("source_root", "levels", "layout", "stripe_rays", "seed", "dataset_dir")
            if k in manifest
        }
        #: a striped level's facts its StripedLevel needs (none for rows)
        self._striped_info: dict[int, dict[str, Any]] = {
            int(lv): {k: info[k] for k in ("stripe_rays", "stripes", "record")}
            for lv, info in manifest["level_info"].items()
            if striped
        }
        self.pack_id: str = manifest["pack_id"]
        if self.files.remote:
            self.files.pack_id = self.pack_id  # keys its cache, checked at every stripe read
        self.source_root = Path(manifest["source_root"])
        self.levels: list[int] = sorted(int(lv) for lv in manifest["level_info"])
        self.packed_levels: list[int] | None = manifest["levels"]
        self.totals: dict[str, int] = dict(manifest["totals"])
        self._open: dict[int, PackLevel] = {}
        root = Path(ray_dataset_dir) if ray_dataset_dir is not None else self.source_root
        #: the ray tree the staleness check compared the pack with (None: not checked)
        self._checked: Path | None = root if check != "none" else None
        #: (level, hash) -> (relative path, manifest record) of the files left out as bad
        self._bad: dict[tuple[int, str], tuple[str, dict[str, Any]]] = {
            (int(rec["level"]), str(rec["hash"])): (rel, rec)
            for rel, rec in (manifest.get("bad_files") or {}).items()
        }
        self.bad: dict[tuple[int, str], tuple[str, str]] = {
            key: (str(root / rel), str(rec["message"])) for key, (rel, rec) in self._bad.items()
        }

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}  # memory maps are reopened in the receiving process
        return state

    def __repr__(self) -> str:
        bad = f", bad={len(self.bad)}" if self.bad else ""
        striped = f", striped W={self.stripe_rays}" if self.layout == "striped" else ""
        return (
            f"PackedRayStore({str(self.pack_dir)!r}{striped}, levels={self.levels}, "
            f"files={self.totals.get('files')}, rays={self.totals.get('rays')}{bad})"
        )

    def bad_error(self, level: int, hash_: str) -> DamagedFileError:
        """The error a read of left-out sample (level, hash) raises (see ``bad``): the
        recorded class (e.g. NonFiniteValueError; DamagedFileError if unknown), whose first
        line names the source file, says it was left out when packed and repeats the
        original first line. KeyError if the sample was not left out."""
        key = (int(level), str(hash_))
        rel, rec = self._bad[key]
        return recorded_error(
            self.bad[key][0],
            rec,
            self.pack_dir,
            f"(repair or regenerate the file, then rebuild the pack: `{self.rebuild_command()}`)",
            str(self.source_root / rel),
        )

    def rebuild_command(self, levels: Any = "packed") -> str:
        """The ``gpuloader pack ... --force`` command that rebuilds this pack (its layout
        options included); ``levels``: the levels to pack (None: all; default: the packed
        ones)."""
        keys = dict(self._rebuild)
        if levels != "packed":
            keys["levels"] = levels
        return manifest_rebuild(keys, self.pack_dir)

    def close(self) -> None:
        """Drop the memory maps (they are reopened on the next read)."""
        self._open.clear()

    def open_level(self, level: int) -> PackLevel | StripedLevel | None:
        """The open level (memory-mapped on first use in this process): a
        :class:`PackLevel`, or a :class:`~gpuloader.stores.pack.striped.StripedLevel` in a
        striped pack; None if it is not packed."""
        level = int(level)
        got = self._open.get(level)
        if got is None and level in self.levels:
            if self.layout == "striped":
                info = self._striped_info[level]
                got = StripedLevel(self.pack_dir, level, self.pack_id, info, self.files)
            else:
                if self.files.remote:
                    raise PackLayoutError(
                        f"ray pack {self.pack_dir} has the rows layout, which is read from "
                        "a local folder only; build a striped pack for object storage "
                        "(gpuloader pack RAY_DIR OUT --layout striped)"
                    )
                got = PackLevel(self.pack_dir, level, self.pack_id)
            self._open[level] = got
        return got

    def striped_level(self, level: int) -> StripedLevel | None:
        """Level ``level`` of a striped pack (record dtype, W, S_L, the per-sample index,
        grids, views, ``stripe_path(s)``, ``read_stripe(...)``: see
        :class:`~gpuloader.stores.pack.striped.StripedLevel`), or None when it is not packed.

        Raises:
            PackLayoutError: the pack has the rows layout (no stripes).
        """
        if self.layout != "striped":
            raise PackLayoutError(
                f"ray pack {self.pack_dir} has the rows layout: it has no stripes; build a "
                f"striped one: `gpuloader pack {self.source_root} OUT --layout striped`"
            )
        lv = self.open_level(level)
        assert lv is None or isinstance(lv, StripedLevel)
        return lv

    def level_arrays(self, level: int) -> dict[str, np.ndarray] | None:
        """The level's memory-mapped arrays (:attr:`PackLevel.arrays`: ``origins`` (N_L, 3)
        float32 ... ``view_positions`` (V_L, 3) float32, read-only), or None when the pack
        holds no such level.

        Raises:
            PackLayoutError: a striped pack (its rays are in stripes: :meth:`striped_level`).
        """
        if self.layout == "striped":
            raise PackLayoutError(
                f"ray pack {self.pack_dir} is striped: it has no row arrays; read its samples "
                "with read(), or its stripes with striped_level(L)"
            )
        lv = self.open_level(int(level))
        assert lv is None or isinstance(lv, PackLevel)
        return None if lv is None else lv.arrays

    def _missing(self, level: int, hash_: str) -> SampleNotInPackError:
        what = (
            f"level {level} is not packed (levels {self.levels})"
            if level not in self.levels
            else f"no hash {hash_} at level {level}"
        )
        levels = self.packed_levels
        if levels is not None:
            levels = sorted({*levels, level})
        return SampleNotInPackError(
            f"ray pack {self.pack_dir} has no sample level {level}, hash {hash_} ({what}); "
            f"re-run `{self.rebuild_command(levels)}` so that it "
            "covers every ray file of the dataset"
        )

    def locate(self, sample: dict[str, Any]) -> tuple[Any, int, int, int, int]:
        """``(level, ray start, ray count, view start, view count)`` of a sample. In a
        striped pack the level is a StripedLevel and "ray start" is the sample's row ``i``
        of the level index (its records are slot ``i`` of every stripe)."""
        level, hash_ = int(sample["level"]), str(sample["hash"])
        if (level, hash_) in self._bad:
            raise self.bad_error(level, hash_)
        lv = self.open_level(level)
        i = None if lv is None else lv.row.get(hash_)
        if i is None:
            raise self._missing(level, hash_)
        if isinstance(lv, StripedLevel):
            return lv, i, int(lv.n_rays[i]), int(lv.view_start[i]), int(lv.view_count[i])
        r0, n, v0, v = (int(x) for x in lv.offsets[i])
        return lv, r0, n, v0, v

    def ray_listing(
        self, ray_dataset_dir: Path | str | None = None, levels: Any = None
    ) -> list[tuple[int, str, Path, Any]] | None:
        """The ray files this pack was built from, as ``build_index(ray_files=...)`` takes
        them: ``(level, hash, path, count)``, ``path`` under ``ray_dataset_dir`` (default:
        the source root), ``count`` the file's rays, or for a file left out as bad None when
        the file is there (its header is read, as without a pack) else its recorded error.
        None (the caller scans the tree) when the pack does not hold every level asked for
        (``levels``; None: all the tree's levels), so that a missing level is named on read,
        or when ``ray_dataset_dir`` exists and is not the tree the pack was checked against
        (its staleness check off, or another folder). So the listing is used where it
        equals the scan: the checked tree, or no tree at all (a remote pack's node)."""
        root = Path(ray_dataset_dir) if ray_dataset_dir is not None else self.source_root
        if root.exists() and not (self._checked is not None and _same_dir(root, self._checked)):
            return None  # a tree the pack was not checked against: scan it
        if self.packed_levels is not None:
            if levels is None or not {int(lv) for lv in levels} <= set(self.packed_levels):
                return None
        out: list[tuple[int, str, Path, Any]] = []
        for level in self.levels:
            lv = self.open_level(level)
            counts = lv.n_rays if isinstance(lv, StripedLevel) else lv.offsets[:, 1]
            for h, i in lv.row.items():
                out.append((level, h, layout.ray_path(root, level, h), int(counts[i])))
        for (level, h), (rel, _) in self._bad.items():
            path = root / rel
            known = None if path.exists() else self.bad_error(level, h)
            out.append((level, h, path, known))
        return out

    def shard_keys(self, samples: list[dict[str, Any]]) -> np.ndarray | None:
        """Each sample's place in a striped pack, for ``RayBatchSampler(shard="samples")``:
        (K,) int64 ``level << 40 | row`` (-1 where the pack lacks the sample; it is named
        when read), or None for the rows layout. Sorted by it a level's samples are in pack
        order, so a rank's contiguous range of them is one byte range of every stripe."""
        if self.layout != "striped":
            return None
        keys = np.full(len(samples), -1, dtype=np.int64)
        for d, s in enumerate(samples):
            try:
                _, i, _, _, _ = self.locate(s)
            except Exception:  # noqa: BLE001 - a sample the pack lacks: named when read
                continue
            keys[d] = (int(s["level"]) << 40) | int(i)
        return keys

    def read(self, sample: dict[str, Any], rows: np.ndarray | None) -> dict[str, np.ndarray]:
        """Rays of ``sample`` (``rows``: (k,) int indices into its N rays, None: all; a chunk's
        rows count from its ``ray_offset``)."""
        lv, r0, n, v0, v = self.locate(sample)
        expected = sample.get("file_num_rays", sample.get("num_rays"))
        if expected is not None and int(expected) != n:
            raise StalePackError(
                f"ray pack {self.pack_dir}: level {sample['level']}, hash {sample['hash']} "
                f"has {n} rays in the pack and {expected} in {sample.get('ray_path')}; rebuild "
                f"it: `{self.rebuild_command(None)}`"
            )
        off, n = chunk_span(sample, n)
        if isinstance(lv, StripedLevel):
            return self._read_striped(sample, lv, r0, off, n, rows, v0, v)
        r0 += off
        arrays = lv.arrays
        out: dict[str, np.ndarray] = {}
        if rows is None:
            for k in schema.RAY_FIELDS:
                out[k] = arrays[k][r0 : r0 + n].copy()
        else:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.size and (rows.min() < 0 or rows.max() >= n):
                raise IndexError(
                    f"{sample.get('ray_path')}: ray rows out of range [0, {n}): "
                    f"min {rows.min()}, max {rows.max()}"
                )
            # np.take on the mapped level: ~2x faster than fancy indexing, ~3x faster than
            # a sorted gather + un-permute (512 of 48,000 rows, page cache warm).
            idx = rows + r0
            for k in schema.RAY_FIELDS:
                out[k] = np.take(arrays[k], idx, axis=0)
        out["view_positions"] = arrays["view_positions"][v0 : v0 + v].copy()
        file_rows = np.arange(off, off + n) if rows is None else rows + off
        check_ray_values(sample.get("ray_path"), out, file_rows)  # the rows gathered only
        return out

    def _read_striped(
        self,
        sample: dict[str, Any],
        lv: StripedLevel,
        i: int,
        off: int,
        n: int,
        rows: np.ndarray | None,
        v0: int,
        v: int,
    ) -> dict[str, np.ndarray]:
        """:meth:`read` of sample ``i`` of a striped level: the file rows ``off + rows``
        (the chunk's ``n`` rows from ``off`` when None), gathered from the stripes."""
        if rows is None:
            file_rows = np.arange(off, off + n, dtype=np.int64)
        else:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.size and (rows.min() < 0 or rows.max() >= n):
                raise IndexError(
                    f"{sample.get('ray_path')}: ray rows out of range [0, {n}): "
                    f"min {rows.min()}, max {rows.max()}"
                )
            file_rows = rows + off
        out = lv.read_rows(i, file_rows)
        out["view_positions"] = lv.view_positions[v0 : v0 + v].copy()
        check_ray_values(sample.get("ray_path"), out, file_rows)  # the rows gathered only
        return out


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def open_pack_files(
    pack_dir: Path | str,
    storage_options: dict[str, Any] | None = None,
    cache_dir: Path | str | None = None,
    cache_bytes: int | None = None,
) -> PackFiles:
    """The files of a pack: a folder (:class:`LocalPackFiles`), or a URL
    (:class:`~gpuloader.stores.remote.RemotePackFiles`, with a :class:`StripeCache` in
    ``cache_dir`` of ``cache_bytes`` when given)."""
    from gpuloader.stores.remote.urls import is_url

    if not is_url(pack_dir):
        if storage_options or cache_dir is not None:
            raise ValueError(
                f"storage_options and cache_dir are for a pack URL (s3://...); {pack_dir} is "
                "a local folder"
            )
        return LocalPackFiles(pack_dir)
    from gpuloader.stores.remote.cache import StripeCache
    from gpuloader.stores.remote.files import RemotePackFiles

    cache = None
    if cache_dir is not None:
        if cache_bytes is None:
            raise ValueError("cache_dir needs cache_bytes (the cache's bound in bytes)")
        cache = StripeCache(cache_dir, int(cache_bytes))
    return RemotePackFiles(str(pack_dir), storage_options, cache=cache)


def open_ray_store(
    ray_dataset_dir: Path | str,
    pack_dir: Path | str | None = None,
    check: Check = "fast",
) -> RayStore:
    """The ray store for a dataset: the pack in ``pack_dir`` (checked against
    ``ray_dataset_dir``), or the npz files when ``pack_dir`` is None."""
    if pack_dir is None:
        return NpzRayStore()
    return PackedRayStore(pack_dir, check=check, ray_dataset_dir=ray_dataset_dir)
