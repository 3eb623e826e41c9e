"""The ray/voxel file checks of ``gpuloader verify``: one unit per sample (a level and name).

:func:`check_sample` checks a sample's voxel file and ray file (either may be absent) and then
re-traces a fraction of its rays. Each file is read whole (so CRC and zlib damage surfaces)
and checked with the readers' own checks (:mod:`gpuloader.format.validate`: keys, dtypes,
shapes, values), then for what only a verifier looks at: the content hash against the file
name, the grid side against the level, the provenance scalars and the origins against the box
faces their face_ids name.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from gpuloader.commands.verify.report import (
    FORMAT,
    HASH,
    PAIRING,
    UNREADABLE,
    VALUES,
    UnitResult,
    describe,
)
from gpuloader.commands.verify.retrace import retrace
from gpuloader.errors import (
    EmptyRayFileError,
    FileCheckError,
    InvalidValueError,
    MissingKeyError,
    UnreadableFileError,
)
from gpuloader.format import layout, npz_files, validate
from gpuloader.format.grid_hash import grid_hash

__all__ = ["UNIT_TOL", "npz_problem", "check_voxel_file", "check_ray_file", "check_sample"]

#: Allowed deviation of |direction| from 1 (the readers' tolerance, one for all).
UNIT_TOL = validate.UNIT_TOL


def npz_problem(exc: BaseException) -> str:
    """What to say about an npz that numpy cannot open, as the dataset and ``pack`` say it.

    numpy reads a file that is neither a zip nor a ``.npy`` as a pickle and then advises
    ``allow_pickle=True``; that advice is wrong here (an npz never holds pickles), so such a
    file, an empty one or a broken zip is reported as not a valid npz.
    """
    fix = f"the file is damaged: {npz_files.FIX}"
    if isinstance(exc, UnreadableFileError):
        return str(exc)[len(f"{exc.path}: ") :] if exc.path else str(exc)
    if isinstance(exc, FileCheckError):
        what = "holds a pickled object array" if "pickled" in (exc.detail or "") else None
        where = f"{exc.key!r} " if exc.key else ""
        return f"not a valid npz file ({what or where + (exc.detail or str(exc))}); {fix}"
    if isinstance(exc, zipfile.BadZipFile):
        return f"not a valid npz file (broken zip: {exc}); {fix}"
    if isinstance(exc, EOFError) or (isinstance(exc, ValueError) and "pickle" in str(exc)):
        return f"not a valid npz file (neither a zip archive nor a .npy array); {fix}"
    return f"cannot read npz ({describe(exc)}); {fix}"


def _first(mask: np.ndarray) -> int:
    """Index of the first True of a (N,) bool mask."""
    return int(np.flatnonzero(mask)[0])


def _load_all(path: Path) -> dict[str, np.ndarray]:
    """Every member of an npz (decompressing all, so CRC and zlib errors surface)."""
    return npz_files.load_npz(path)


def _problem(res: UnitResult, exc: FileCheckError) -> None:
    """One problem from a validate error: the message without the file and the fix."""
    where = f"{exc.key} row {exc.row}: " if exc.row is not None else ""
    kind = VALUES if isinstance(exc, (InvalidValueError, EmptyRayFileError)) else FORMAT
    res.add(exc.path or "?", f"{where or (exc.key + ' ' if exc.key else '')}{exc.detail}", kind)


def check_voxel_file(
    res: UnitResult, path: Path, level: int, name: str, expected_side: int | None
) -> np.ndarray | None:
    """Check one voxel file; the (S, S, S) bool grid when it is a cube (even if other checks fail).

    ``expected_side``: base resolution >> level (None: unknown). At level >= 1 the grid's
    SHA-256 must be the file name ``name``.
    """
    res.counts["voxel files"] += 1
    try:
        data = _load_all(path)
    except Exception as exc:
        res.add(path, npz_problem(exc), UNREADABLE)
        return None
    if "voxels" not in data:
        res.add(path, f"no key 'voxels' (keys: {sorted(data)})", FORMAT)
        return None
    arr = data["voxels"]
    problems = validate.voxel_problems(path, arr)
    for problem in problems:
        _problem(res, problem)
    if arr.ndim != 3 or len(set(arr.shape)) != 1:
        return None
    side = arr.shape[0]
    if expected_side is not None and side != expected_side and not side & (side - 1):
        res.add(
            path,
            f"voxels side {side} does not match level {level} (base >> {level} = {expected_side})",
            FORMAT,
        )
    grid = arr.astype(bool)
    if level >= 1:
        digest = grid_hash(grid)
        if digest != name:
            res.add(path, f"content SHA-256 is {digest}, not the file name {name}", HASH)
    return grid


def _is_int_scalar(a: np.ndarray) -> bool:
    """A 0-d integer array."""
    return a.shape == () and np.issubdtype(a.dtype, np.integer)


def check_ray_file(
    res: UnitResult, path: Path, level: int, name: str, grid: np.ndarray | None
) -> dict[str, np.ndarray] | None:
    """Check one ray file; what the re-trace needs when origins, directions and distances are sound.

    ``grid``: the sample's (S, S, S) bool grid, or None. Returns ``origins`` (N, 3),
    ``directions`` (N, 3), ``distances`` (N,) as stored, ``finite`` (N,) bool and
    ``voxel_size`` (float64 scalar); None when they cannot be traced.
    """
    res.counts["ray files"] += 1
    try:
        data = _load_all(path)
    except Exception as exc:
        res.add(path, npz_problem(exc), UNREADABLE)
        return None
    expected = (*layout.RAY_ROW_KEYS, "view_positions", *layout.RAY_SCALAR_KEYS)
    missing = [k for k in expected if k not in data]
    if missing:
        res.add(path, f"missing key(s) {missing}", FORMAT)

    n = None
    for key in ("origins", "distances", *layout.RAY_ROW_KEYS):  # as validate counts N
        if key in data and data[key].ndim >= 1:
            n = int(data[key].shape[0])
            break
    # keys, dtypes, shapes, zero rays and values: the readers' checks (gpuloader.format.validate)
    problems = validate.ray_problems(path, data)
    bad_keys = set()
    for problem in problems:
        if not isinstance(problem, MissingKeyError):  # named above, with the scalar keys
            _problem(res, problem)
        if not isinstance(problem, (InvalidValueError, EmptyRayFileError)):
            bad_keys.add(problem.key)
    good = {
        k: data[k]
        for k in (*layout.RAY_ROW_KEYS, "view_positions")
        if k in data and k not in bad_keys
    }
    if n is not None:
        res.counts["rays"] += n
    finite = np.ones(n or 0, dtype=bool)
    for key in ("origins", "directions", "distances"):
        a = good.get(key)
        if a is not None:
            ok = np.isfinite(a)
            finite &= ok.all(axis=1) if ok.ndim > 1 else ok
    hits = good.get("hits")
    if hits is not None:
        res.counts["hits"] += int(np.count_nonzero(hits))
    faces = good.get("face_ids")

    # provenance scalars
    voxel_size = 1.0
    if "voxel_size" in data:
        vs = data["voxel_size"]
        if vs.shape != () or not np.issubdtype(vs.dtype, np.number) or not (float(vs) > 0):
            res.add(path, f"voxel_size must be a positive number; got {vs!r}", VALUES)
        else:
            voxel_size = float(vs)
    if "level" in data:
        lv = data["level"]
        if not _is_int_scalar(lv):
            res.add(path, f"level must be an integer scalar; got {lv!r}", FORMAT)
        elif int(lv) != level:
            res.add(path, f"level scalar {int(lv)} but the file lies under level_{level}", VALUES)
    if "hash" in data:
        hv = data["hash"]
        if hv.shape != () or hv.dtype.kind not in "US":
            res.add(path, f"hash must be a string scalar; got {hv!r}", FORMAT)
        elif str(hv.item() if hv.dtype.kind == "U" else hv.item().decode()) != name:
            res.add(path, f"hash scalar {hv.item()!r} does not match the file name {name}", VALUES)
    if "sampling_mode" in data:
        sm = data["sampling_mode"]
        if sm.shape != () or sm.dtype.kind not in "US":
            res.add(path, f"sampling_mode must be a string scalar; got {sm!r}", FORMAT)
    shape_xyz = None
    if "grid_shape" in data:
        gs = data["grid_shape"]
        if gs.shape != (3,) or not np.issubdtype(gs.dtype, np.integer):
            res.add(path, f"grid_shape must be 3 integers; got {gs!r}", FORMAT)
        else:
            if grid is not None and tuple(int(v) for v in gs) != grid.shape:
                res.add(
                    path,
                    f"grid_shape {tuple(int(v) for v in gs)} differs from the voxel grid's "
                    f"{grid.shape}",
                    VALUES,
                )
            shape_xyz = gs[::-1].astype(np.float64)
    o = good.get("origins")
    if faces is not None and o is not None and shape_xyz is not None:
        ok_face = (faces >= 0) & (faces <= 5) & finite
        f = np.clip(faces, 0, 5)
        axis = f // 2
        sign = np.where(f % 2 == 0, -1.0, 1.0)
        half = shape_xyz[axis] * voxel_size / 2.0
        coord = o[np.arange(o.shape[0]), axis].astype(np.float64)
        bad = ok_face & (np.abs(coord - sign * half) > 1e-3 * (1.0 + half))
        if bad.any():
            res.add(
                path,
                f"{int(bad.sum())} origin(s) do not lie on the box face given by face_ids "
                f"(first: ray {_first(bad)})",
                VALUES,
            )
    if all(k in good for k in ("origins", "directions", "distances")):
        return {
            "origins": good["origins"],
            "directions": good["directions"],
            "distances": good["distances"],
            "finite": finite,
            "voxel_size": np.float64(voxel_size),
        }
    return None


def check_sample(job: dict[str, Any]) -> UnitResult:
    """A sample's voxel file and ray file (either may be absent), then the re-trace.

    ``job``: level, name, key (``level_<L>/<name>``), voxel and ray (paths or None),
    ray_expected, ray_refused (its ray file leads out of the tree: not read, not missing),
    side (expected grid side or None), map_empty (what the subdivision maps say,
    or None), fraction and seed. The payload holds level, name, empty and trivial.
    """
    level, name = job["level"], job["name"]
    res = UnitResult(weight=int(job["voxel"] is not None) + int(job["ray"] is not None))
    res.payload = {"level": level, "name": name, "trivial": None, "empty": None}
    grid = None
    if job["voxel"] is not None:
        grid = check_voxel_file(res, Path(job["voxel"]), level, name, job["side"])
        if grid is not None:
            empty = not grid.any()
            res.payload["empty"] = empty
            res.payload["trivial"] = empty  # upstream's pipeline lists all-empty grids only
    if job["ray"] is None:
        if job.get("ray_refused"):  # a link out of the ray tree: reported, not read
            return res
        known_empty = res.payload["empty"] if grid is not None else job["map_empty"]
        if level == 0 or known_empty is False:
            what = "object" if level == 0 else "non-empty sub-volume"
            res.add(
                job["ray_expected"],
                f"ray file of {what} {name} is missing (voxel file {job['voxel']})",
                PAIRING,
            )
        return res
    rays = check_ray_file(res, Path(job["ray"]), level, name, grid)
    if rays is not None and grid is not None:
        retrace(res, Path(job["ray"]), job["key"], grid, rays, job["fraction"], job["seed"])
    return res
