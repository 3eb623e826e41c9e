"""Writing a striped pack (``pack_rays(..., layout="striped")``): stripes, grids, views, index.

The files and the stripe rule are those of :mod:`gpuloader.stores.pack.striped`.
:func:`~gpuloader.stores.pack.build.pack_rays` runs the build (its two passes, atomic swap,
manifest) with a :class:`StripedWriter`: pass 1 adds each sample's voxel file header
(:meth:`StripedWriter.probe`), then a level's files are made at their full sizes
(:meth:`StripedWriter.level_jobs`) and worker processes fill them (:func:`stripe_job`): per
ray file, its rays permuted and written as S_L slots of W records, one per stripe file, its
grid and views, its places (``positions.npy``). Files left out as bad leave holes, which
:meth:`StripedWriter.finish_level` closes (sequential copies), before it writes the index.

The voxel side (``dataset_dir``) defaults to the dataset the ray tree was made from
(:func:`find_dataset_dir`). A sample whose voxel file is bad is a bad sample: with
``on_error="skip"`` it is left out and recorded under its ray file, the record naming the
voxel file (``voxel_file``); a missing voxel file always stops the build.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from gpuloader.augment.rng import feistel_permute
from gpuloader.errors import DamagedFileError, DatasetLayoutError, PackError
from gpuloader.format import layout
from gpuloader.format.listing import npz_member_header
from gpuloader.format.npz_files import load_npz, npz_error
from gpuloader.format.validate import check_grid_header, validate_voxels
from gpuloader.stores.npz import check_grid_shape, level_side, voxel_file_side
from gpuloader.stores.pack.build_steps import (
    chunk_jobs,
    new_file,
    new_npy,
    npy_data_offset,
    pack_of_tmp,
    pwrite_all,
    ray_arrays,
    read_source,
    skippable,
    writing,
)
from gpuloader.stores.pack.manifest import (
    INDEX,
    STRIPED_FORMAT_VERSION,
    error_record,
    file_stat,
    file_stat_any,
    is_readable,
    sha256_file,
)
from gpuloader.stores.pack.split_order import SplitOrder
from gpuloader.stores.pack.striped import (
    GRIDS,
    POSITIONS,
    VIEWS,
    level_keys,
    level_record,
    positions_dtype,
    record_from_descr,
    stripe_count,
    stripe_name,
)

__all__ = ["StripedWriter", "find_dataset_dir", "stripe_job", "voxel_cells"]

_BLOCK = 1 << 20  # rows per copy when closing holes


def find_dataset_dir(ray_root: Path, given: Path | str | None = None) -> Path:
    """The voxel side of ``ray_root``: ``given``, else the ``dataset_dir`` of its
    ``processing_summary.json`` (absolute, or relative to the folder above the ray tree),
    else ``dataset/`` beside the ray tree.

    Raises:
        PackError: none of them is a voxel dataset (a folder with ``objects/`` or
            ``subvolumes/``).
    """

    def is_voxel_side(p: Path) -> bool:
        return p.is_dir() and ((p / "objects").is_dir() or (p / "subvolumes").is_dir())

    if given is not None:
        p = Path(given).resolve()
        if not is_voxel_side(p):
            raise PackError(
                f"{p}: not a voxel dataset (no objects/ or subvolumes/); pass the dataset "
                "folder the rays were made from (--dataset-dir)"
            )
        return p
    candidates = []
    try:
        recorded = layout.read_json(ray_root / "processing_summary.json").get("dataset_dir")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str) and recorded:
        rp = Path(recorded)
        candidates += [rp] if rp.is_absolute() else [ray_root.parent / rp]
    candidates.append(ray_root.parent / "dataset")
    for p in candidates:
        if is_voxel_side(p):
            return p.resolve()
    raise PackError(
        f"{ray_root}: cannot find the voxel dataset the rays were made from (tried "
        f"{', '.join(str(p) for p in candidates)}); a striped pack also holds the voxel grids: "
        "pass the dataset folder (--dataset-dir, dataset_dir=...)"
    )


def voxel_cells(path: Path, data: bytes, voxels: int) -> np.ndarray:
    """A voxel file's grid from its bytes, checked: (side**3,) uint8 0/1, C order.

    Raises:
        DamagedFileError: any check of :func:`~gpuloader.format.validate.validate_voxels`
            (the side its level's, from ``metadata.json``: the pack stores the grid, and every
            reader of the npz files refuses another side), or not the ``voxels`` cells its
            header said.
    """
    grid = load_npz(path, ("voxels",), data=data)["voxels"]
    vox = validate_voxels(path, grid, voxel_file_side(path))
    if vox.size != voxels:
        raise DamagedFileError(
            f"{path}: holds {vox.size} voxels but its header said {voxels}; the file is "
            "damaged: regenerate it or delete it"
        )
    return vox.reshape(-1).view(np.uint8)


def stripe_job(job: tuple) -> list[tuple]:
    """Write one chunk of files of one level into its stripe, grid, view and place files.

    ``job = (level_dir, source_root, dataset_dir, files, skip, W, S, record descr)``; each
    file is ``(rel, size, mtime_ns, i, n, v, ray_start, view_start, vrel, vsize, vmtime_ns,
    grid_start, grid_size, keys)``. Returns ``[(rel, sha256 or None, None or the error
    record of a bad file, the voxel file's sha256 or None)]``; a bad file raises unless
    ``skip`` (then its slots stay unwritten).
    """
    ldir_s, source_root, dataset_dir, files, skip, w, s_count, descr = job
    ldir = Path(ldir_s)
    out_dir = pack_of_tmp(ldir.parent)
    guard = layout.RootGuard(dataset_dir, "dataset")
    record = record_from_descr(descr)
    r = record.itemsize
    pos_dtype = np.load(ldir / POSITIONS, mmap_mode="r").dtype
    fds: dict[str, int] = {}
    base: dict[str, int] = {}
    out: list[tuple] = []
    try:
        with writing(out_dir):
            for name in (GRIDS, VIEWS, POSITIONS):
                base[name] = npy_data_offset(ldir / name)
                fds[name] = os.open(ldir / name, os.O_WRONLY)
            for s in range(s_count):
                fds[stripe_name(s)] = os.open(ldir / stripe_name(s), os.O_WRONLY)
        for rel, size, mtime_ns, i, n, v, r0, v0, vrel, vsize, vmtime, g0, gsize, keys in files:
            path, vpath = Path(source_root) / rel, Path(dataset_dir) / vrel
            digest = vdigest = None
            try:
                data, digest = read_source(path, size, mtime_ns)
                arrays = ray_arrays(path, data, n, v)
                grid_shape = load_npz(path, (), data=data, optional=("grid_shape",))
                if "grid_shape" in grid_shape:  # rays traced for another grid than the level's
                    check_grid_shape(path, grid_shape["grid_shape"], voxel_file_side(vpath))
                guard.check(vpath)  # a link swapped since pass 1
                try:
                    vdata, vdigest = read_source(vpath, vsize, vmtime)
                except FileNotFoundError as exc:
                    raise DatasetLayoutError(f"{vpath}: voxel file not found") from exc
                vox = voxel_cells(vpath, vdata, gsize)
            except DamagedFileError as exc:
                if not (skip and skippable(exc)):
                    raise
                if vdigest is None and is_readable(vpath) and guard.outside(vpath) is None:
                    vdigest = sha256_file(vpath)
                rec = error_record(exc)
                if str(exc).startswith(str(vpath)):
                    rec["voxel_file"] = vrel
                out.append((rel, digest, rec, vdigest))
                continue
            perm = feistel_permute(np.arange(n), n, np.asarray(keys, dtype=np.uint32))
            rows = perm[np.arange(s_count * w, dtype=np.int64) % n]
            recs = np.empty(s_count * w, dtype=record)
            for name in record.names:
                recs[name] = _narrowed(path, name, arrays[name], record[name].base)[rows]
            raw = recs.view(np.uint8)
            place = np.empty(n, dtype=pos_dtype)
            place[perm] = np.arange(n, dtype=np.int64)
            with writing(out_dir):
                for s in range(s_count):
                    pwrite_all(fds[stripe_name(s)], raw[s * w * r : (s + 1) * w * r], i * w * r)
                pwrite_all(fds[POSITIONS], place, base[POSITIONS] + r0 * pos_dtype.itemsize)
                views = np.asarray(arrays["view_positions"], dtype=np.float32)
                pwrite_all(fds[VIEWS], views, base[VIEWS] + v0 * 12)
                pwrite_all(fds[GRIDS], vox, base[GRIDS] + g0)
            out.append((rel, digest, None, vdigest))
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def _narrowed(path: Path, name: str, a: np.ndarray, dt: np.dtype) -> np.ndarray:
    """``a`` cast to the record field's dtype ``dt``, after checking its values fit
    (they do for any file that passed validation: this guards the writer)."""
    if a.dtype == dt or dt.kind == "f":
        return a.astype(dt, copy=False)
    info = np.iinfo(dt)
    if a.size and (int(a.min()) < info.min or int(a.max()) > info.max):
        raise PackError(
            f"{path}: {name!r} values {int(a.min())}..{int(a.max())} do not fit the level's "
            f"record dtype {dt}; this is a bug of gpuloader pack: report it"
        )
    return a.astype(dt)


class StripedWriter:
    """The striped layout for :func:`~gpuloader.stores.pack.build.pack_rays`.

    Args:
        dataset_dir: the voxel side (:func:`find_dataset_dir`). stripe_rays: W. seed: the
            permutations' seed.
    """

    layout = "striped"
    version = STRIPED_FORMAT_VERSION
    job = staticmethod(stripe_job)

    def __init__(self, dataset_dir: Path, stripe_rays: int, seed: int) -> None:
        self.dataset_dir = Path(dataset_dir)
        self.stripe_rays = int(stripe_rays)
        self.seed = int(seed)
        self.voxel_files: dict[str, list] = {}  # rel -> [size, mtime_ns, sha256 or None]
        self._levels: dict[int, dict[str, Any]] = {}
        self._vrel: dict[str, str] = {}  # ray file rel -> its voxel file's rel
        self._guard = layout.RootGuard(self.dataset_dir, "dataset")
        self._order = SplitOrder(self.dataset_dir)

    def probe(self, level: int, hash_: str, path: Path) -> tuple:
        """Pass 1 for one ray file: its voxel file's ``(rel, size, mtime_ns, cells, side)``
        from its header (recorded for staleness even when bad).

        Raises:
            DatasetLayoutError: no voxel file. DamagedFileError: its header is bad.
        """
        vpath = layout.voxel_path(self.dataset_dir, level, hash_)
        vrel = vpath.relative_to(self.dataset_dir).as_posix()
        target = self._guard.outside(vpath)
        if target is not None:  # a link out of the voxel root: refused, as the index does
            self.voxel_files[vrel] = [*file_stat_any(vpath), None]
            raise self._guard.error(vpath, target)
        if not os.path.lexists(vpath):
            raise DatasetLayoutError(
                f"ray file {path} has no voxel file: {vpath} is missing; the ray and voxel "
                "datasets do not match (pass the dataset folder the rays were made from: "
                "--dataset-dir)"
            )
        try:
            try:
                stat = file_stat(vpath)
            except OSError as exc:
                self.voxel_files[vrel] = [*file_stat_any(vpath), None]
                raise npz_error(vpath, exc) from exc
            self.voxel_files[vrel] = [*stat, None]
            shape, dtype = npz_member_header(vpath, "voxels")
            if len(shape) == 3 and len(set(shape)) == 1:  # a cube of another side than its
                # level's is refused from its header, before anything is inflated (a 512^3
                # bomb); other grid problems are found with the grid, in the write pass
                check_grid_header(vpath, shape, dtype, level_side(self.dataset_dir, level))
        except DamagedFileError:
            if is_readable(vpath):
                self.voxel_files[vrel][2] = sha256_file(vpath)
            raise
        cells = int(np.prod(shape, dtype=np.int64)) if shape else 1
        return (vrel, *stat, cells, int(shape[0]) if shape else 1)

    def estimate_bytes(self, plan: dict[int, list[tuple]], skip: bool) -> int:
        """About the bytes the striped pack of ``plan`` (level -> the plan's ``(rel, n, v,
        vrel, vsize, vmtime_ns, cells, side)``) takes on disk; with ``skip`` also room for
        the copy of the largest file (closing holes rewrites a file)."""
        total = largest = 0
        for files in plan.values():
            n = np.array([f[1] for f in files], dtype=np.int64)
            v = np.array([f[2] for f in files], dtype=np.int64)
            stripe = len(files) * self.stripe_rays * level_record(int(v.max())).itemsize
            pos = positions_dtype(int(n.max())).itemsize * int(n.sum())
            sizes = [stripe] * stripe_count(int(n.max()), self.stripe_rays)
            sizes += [sum(int(f[6]) for f in files), 12 * int(v.sum()), pos]
            total += sum(sizes) + 3 * 128 + 1024 + 400 * len(files)  # + headers, index
            largest = max(largest, *sizes)
        return total + (largest if skip else 0)

    def blame(self, exc: BaseException, level: int, hash_: str) -> dict[str, Any]:
        """Keys added to a bad sample's record: ``voxel_file`` (relative to the voxel side)
        when ``exc`` is about its voxel file."""
        vpath = layout.voxel_path(self.dataset_dir, level, hash_)
        if str(exc).startswith(str(vpath)):
            return {"voxel_file": vpath.relative_to(self.dataset_dir).as_posix()}
        return {}

    def level_jobs(
        self,
        ldir: Path,
        level: int,
        files: list[tuple],
        stats: dict[str, tuple[int, int]],
        root: Path,
        skip: bool,
        workers: int | None,
        pack_id: str,
    ) -> list[tuple]:
        """Make the level's files at full size and return the jobs that fill them
        (``files``: the plan's ``(rel, n, v, vrel, vsize, vmtime_ns, cells, side)``; the
        index, with ``pack_id``, is written when the level is finished)."""
        w = self.stripe_rays
        k = len(files)
        perm = self._order.of(level, [layout.parse_ray_filename(Path(f[0]))[1] for f in files])
        files = [files[i] for i in perm]
        n = np.array([f[1] for f in files], dtype=np.int64)
        v = np.array([f[2] for f in files], dtype=np.int64)
        g = np.array([f[6] for f in files], dtype=np.int64)
        s_count = stripe_count(int(n.max()), w)
        record = level_record(int(v.max()))
        st = {
            "files": list(files),
            "n": n,
            "v": v,
            "g": g,
            "side": np.array([f[7] for f in files], dtype=np.int64),
            "keys": level_keys(self.seed, level, k),
            "perm": perm,
            "stripes": s_count,
            "record": record,
        }
        self._levels[level] = st
        self._vrel.update((f[0], f[3]) for f in files)
        for s in range(s_count):
            new_file(ldir / stripe_name(s), k * w * record.itemsize)
        new_npy(ldir / GRIDS, np.uint8, (int(g.sum()),))
        new_npy(ldir / VIEWS, np.float32, (int(v.sum()), 3))
        new_npy(ldir / POSITIONS, positions_dtype(int(n.max())), (int(n.sum()),))
        r0, v0, g0 = (_starts(x) for x in (n, v, g))
        entries = [
            (rel, *stats[rel], i, int(n[i]), int(v[i]), int(r0[i]), int(v0[i]))
            + (vrel, vsize, vmtime, int(g0[i]), int(g[i]), st["keys"][i].tolist())
            for i, (rel, _, _, vrel, vsize, vmtime, _, _) in enumerate(files)
        ]
        descr = record.descr
        return [
            (str(ldir), str(root), str(self.dataset_dir), part, skip, w, s_count, descr)
            for part in chunk_jobs(entries, workers)
        ]

    def collect(self, rel: str, vdigest: Any) -> None:
        """A job's result for ray file ``rel``: its voxel file's digest."""
        self.voxel_files[self._vrel[rel]][2] = vdigest

    def finish_level(self, ldir: Path, level: int, keep: np.ndarray, pack_id: str) -> dict | None:
        """Close the holes of the files left out (``keep``: (K,) bool), write the index;
        the level's ``level_info`` (None: no file kept, the caller removes the folder)."""
        st = self._levels[level]
        w, record = self.stripe_rays, st["record"]
        keep = np.asarray(keep, dtype=bool)[st["perm"]]  # the plan's order -> the pack's
        if not keep.any():
            return None
        n, v, g = st["n"], st["v"], st["g"]
        s_count = st["stripes"]
        if not keep.all():
            idx = np.flatnonzero(keep)
            new_s = stripe_count(int(n[idx].max()), w)
            for s in range(s_count):
                path = ldir / stripe_name(s)
                if s >= new_s:
                    path.unlink()
                    continue
                _compact(path, record, (), idx * w, np.full(idx.size, w), raw=True)
            for name, counts in ((GRIDS, g), (VIEWS, v), (POSITIONS, n)):
                src = np.load(ldir / name, mmap_mode="r")
                dt, tail = src.dtype, src.shape[1:]
                del src
                _compact(ldir / name, dt, tail, _starts(counts)[idx], counts[idx], raw=False)
            st["files"] = [st["files"][i] for i in idx]
            for key in ("n", "v", "g", "side", "keys"):
                st[key] = st[key][idx]
            n, v, g, s_count = st["n"], st["v"], st["g"], new_s
        hashes = np.array([layout.parse_ray_filename(Path(f[0]))[1] for f in st["files"]])
        np.savez(
            ldir / INDEX,
            hashes=hashes,
            n_rays=n,
            ray_start=_starts(n),
            view_start=_starts(v),
            view_count=v,
            grid_start=_starts(g),
            side=st["side"],
            keys=st["keys"],
            pack_id=np.array(pack_id),
        )
        return {
            "files": len(st["files"]),
            "rays": int(n.sum()),
            "views": int(v.sum()),
            "stripes": s_count,
            "stripe_rays": w,
            "record": [list(d) for d in record.descr],
            "record_bytes": int(record.itemsize),
            "grid_bytes": int(g.sum()),
            "file_bytes": {p.name: p.stat().st_size for p in sorted(ldir.iterdir())},
        }

    def manifest_keys(self) -> dict[str, Any]:
        """The striped layout's keys of the manifest."""
        return {
            "layout": self.layout,
            "stripe_rays": self.stripe_rays,
            "seed": self.seed,
            "dataset_dir": str(self.dataset_dir),
            "voxel_files": {rel: self.voxel_files[rel] for rel in sorted(self.voxel_files)},
        }


def _starts(counts: np.ndarray) -> np.ndarray:
    """Exclusive prefix sums: (K,) int64 starts of consecutive spans of ``counts``."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)[: counts.size]


def _compact(
    path: Path, dtype: np.dtype, tail: tuple, starts: np.ndarray, counts: np.ndarray, raw: bool
) -> None:
    """Rewrite ``path`` (a raw record file or an ``.npy``) with only the rows
    ``[starts[j], starts[j] + counts[j])``, in order (adjacent spans copied as one, in blocks
    of bounded memory)."""
    spans: list[list[int]] = []
    for s0, c in zip(starts.tolist(), counts.tolist(), strict=True):
        if spans and spans[-1][0] + spans[-1][1] == s0:
            spans[-1][1] += c
        else:
            spans.append([s0, c])
    total = int(sum(c for _, c in spans))
    tmp = path.with_name(f".{path.name}.compact")
    dtype = np.dtype(dtype)
    row = dtype.itemsize * int(np.prod(tail, dtype=np.int64))
    if raw:
        src = np.memmap(path, dtype=dtype, mode="r")
        new_file(tmp, total * row)
        head = 0
    else:
        src = np.load(path, mmap_mode="r")
        head = new_npy(tmp, dtype, (total, *tail))
    fd = os.open(tmp, os.O_WRONLY)
    try:
        at = 0
        for s0, c in spans:
            for i in range(0, c, _BLOCK):
                m = min(_BLOCK, c - i)
                pwrite_all(fd, src[s0 + i : s0 + i + m], head + (at + i) * row)
            at += c
    finally:
        os.close(fd)
    del src
    os.replace(tmp, path)
