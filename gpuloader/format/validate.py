"""Read-time checks of ray files and voxel grids: one set of checks for every reader.

``gpuloader verify``, ``gpuloader pack``, the npz and packed ray stores, the voxel reader and
the resident store fill all check files with this module, so a file is judged the same way
wherever it is read. Every check is vectorized (a few passes over the arrays, no Python loop
over rays), cheap next to inflating the file.

Each problem is a named error, a subclass of :class:`~gpuloader.errors.DamagedFileError`
(see :mod:`gpuloader.errors`), whose message starts with the file, the array and the first
bad row: ``<path>: 'distances' row 3: NaN or inf in 1 of 432 row(s); <fix>``.

What is checked:

* the file itself: readable (permission denied and symlink loops say so:
  :class:`~gpuloader.errors.UnreadableFileError`, not damage), a zip archive (a bare
  ``.npy``, a pickle or text: :class:`~gpuloader.errors.NotAnNpzError`), members that
  inflate with a good CRC (:class:`~gpuloader.errors.CorruptArchiveError`), no pickled
  object arrays (:class:`~gpuloader.errors.PickledArrayError`);
* ray files: every key of :data:`RAY_KEYS` present, dtypes that stand for the format's
  (other float widths and integer kinds are cast by the readers; ``verify`` asks for the
  exact dtypes), shapes ``(N, 3)`` / ``(N,)`` / ``(V, 3)``, ``N >= 1``;
* ray values: finite origins, directions, distances and view positions; directions of
  length 1 within :data:`UNIT_TOL` (``| |d| - 1 | <= 1e-3``; a zero-length direction is
  named as such); distances ``>= 0``; ``hits == (distances > 0)`` (format.md: hits means
  the ray's path length through occupied voxels is positive); ``face_ids`` in 0..5;
  ``view_ids`` in ``[0, V)``;
* voxel grids: 3-D, a cube, side a power of two and its level's (``expected_side``, from
  the header before inflating: :func:`check_grid_header`), bool or numbers only 0 and 1.

Which rows: whole-file checks (:func:`validate_rays`, :func:`ray_problems`) serve ``verify``,
``pack`` and the store fill; the per-sample readers check the structure of the whole file and
the values of the rows they return (:func:`check_ray_values` with ``rows``), so a bad value
never reaches a sample and a row is judged the same on every store.

:func:`classify` tells a caller with an ``on_error`` policy which exceptions are a bad file
(skip-able) and which are not.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from gpuloader.errors import (
    BadDirectionError,
    BadGridError,
    BadVoxelValueError,
    DamagedFileError,
    DatasetLayoutError,
    EmptyRayFileError,
    FileCheckError,
    HitsMismatchError,
    InvalidValueError,
    MissingKeyError,
    NegativeDistanceError,
    NonFiniteValueError,
    OutOfRangeError,
    PackError,
    WrongDtypeError,
    WrongGridSideError,
    WrongShapeError,
)
from gpuloader.format.layout import RAY_DTYPES, RAY_ROW_KEYS
from gpuloader.format.npz_files import FIX, make_error

__all__ = [
    "FIX",
    "RAY_KEYS",
    "UNIT_TOL",
    "as_ray_dtypes",
    "check_grid_header",
    "check_ray_batch",
    "check_ray_shapes",
    "check_ray_values",
    "classify",
    "first_bad_row",
    "grid_problems",
    "ray_problems",
    "validate_rays",
    "validate_voxels",
    "voxel_problems",
]

#: Allowed deviation of a direction's length from 1: ``| |d| - 1 | <= UNIT_TOL``. The
#: generator writes float32 unit vectors (error about 1e-7); 1e-3 leaves room for other
#: writers' rounding and still refuses any direction a renderer would notice.
UNIT_TOL = 1e-3
#: Arrays a ray file must hold (the per-ray keys, then one row per view).
RAY_KEYS: tuple[str, ...] = (*RAY_ROW_KEYS, "view_positions")
_VEC_KEYS = ("origins", "directions", "view_positions")


# ------------------------------------------------------------------ ray files: structure


def _dtype_ok(key: str, dtype: np.dtype, exact: bool) -> bool:
    want = RAY_DTYPES[key]
    if dtype == want:
        return True
    if exact:
        return False
    return (want.kind == "f" and dtype.kind == "f") or (want.kind in "iu" and dtype.kind in "biu")


def as_ray_dtypes(path: Any, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ray arrays cast to the format's dtypes (other float widths, integer kinds).

    Raises:
        WrongDtypeError: a dtype that cannot stand for the format's (strings, complex ...).
    """
    out: dict[str, np.ndarray] = {}
    for key, arr in arrays.items():
        if key not in RAY_DTYPES:
            out[key] = arr
            continue
        if not _dtype_ok(key, arr.dtype, exact=False):
            raise make_error(
                WrongDtypeError, path, f"dtype {arr.dtype}, expected {RAY_DTYPES[key]}", key
            )
        out[key] = arr if arr.dtype == RAY_DTYPES[key] else arr.astype(RAY_DTYPES[key])
    return out


def _shape_problems(path: Any, arrays: Mapping[str, np.ndarray]) -> Iterator[FileCheckError]:
    n = None
    for key in ("origins", "distances", *RAY_ROW_KEYS):
        a = arrays.get(key)
        if a is not None and a.ndim >= 1:
            n = int(a.shape[0])
            break
    for key in RAY_KEYS:
        a = arrays.get(key)
        if a is None:
            continue
        if key in _VEC_KEYS:
            rows = "V" if key == "view_positions" else n
            ok = a.ndim == 2 and a.shape[1] == 3 and (key == "view_positions" or a.shape[0] == n)
            want = f"({rows}, 3)"
        else:
            ok = a.shape == (n,)
            want = f"({n},)"
        if not ok:
            yield make_error(WrongShapeError, path, f"shape {a.shape}, expected {want}", key)
    if n == 0:
        yield make_error(EmptyRayFileError, path, "holds no rays (N = 0)", "origins")


def check_ray_shapes(path: Any, arrays: Mapping[str, np.ndarray]) -> int:
    """Shapes of a whole ray file's arrays; returns N (the rays), which is at least 1.

    Raises:
        WrongShapeError, EmptyRayFileError.
    """
    for problem in _shape_problems(path, arrays):
        raise problem
    return int(arrays["origins"].shape[0])


# ------------------------------------------------------------------ ray files: values


def _value_masks(
    arrays: Mapping[str, Any], xp: Any, num_views: int | None
) -> Iterator[tuple[type[InvalidValueError], str, Any, str]]:
    """``(error class, key, bad-row mask, what is wrong)`` per check, lazily, in order.

    Later checks look only at rows whose origins, directions and distances are finite, so
    a NaN row is reported once, as non-finite.
    """
    finite = None
    for key in ("origins", "directions", "distances", "view_positions"):
        a = arrays.get(key)
        if a is None:
            continue
        ok = xp.isfinite(a)
        if ok.ndim > 1:
            ok = ok.all(axis=1)
        if key != "view_positions":
            finite = ok if finite is None else finite & ok
        yield NonFiniteValueError, key, ~ok, "NaN or inf"
    d = arrays.get("directions")
    if d is not None:
        # float32 is exact enough for a 1e-3 tolerance on |d| and twice as fast as float64
        n2 = (d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1]) + d[:, 2] * d[:, 2]
        zero = n2 == 0
        if finite is not None:
            zero &= finite
        yield BadDirectionError, "directions", zero, "zero-length direction"
        off = xp.abs(xp.sqrt(n2) - 1.0) > UNIT_TOL
        off &= ~zero if finite is None else finite & ~zero
        what = f"direction not unit (| |d| - 1 | > {UNIT_TOL:g})"
        yield BadDirectionError, "directions", off, what
    dist = arrays.get("distances")
    if dist is not None:
        neg = dist < 0
        if finite is not None:
            neg &= finite
        yield NegativeDistanceError, "distances", neg, "negative distance"
        hits = arrays.get("hits")
        if hits is not None:
            bad = (hits != 0) != (dist > 0)
            if finite is not None:
                bad &= finite
            yield HitsMismatchError, "hits", bad, "hits differs from (distances > 0)"
    faces = arrays.get("face_ids")
    if faces is not None:
        yield OutOfRangeError, "face_ids", (faces < 0) | (faces > 5), "face_ids outside 0..5"
    views = arrays.get("view_ids")
    if views is not None and num_views is not None:
        bad = (views < 0) | (views >= num_views)
        yield OutOfRangeError, "view_ids", bad, f"view_ids outside [0, {num_views})"


def _all_values_ok(arrays: Mapping[str, Any], num_views: int | None) -> bool:
    """True when no check of :func:`_value_masks` can fail, from a few reductions (the
    common case: a clean file costs one pass per array instead of a mask per check).

    False means "look closer", not "bad": the masks then find the first bad row. A float64
    sum of float32 values is finite exactly when every value is (it cannot overflow).
    """
    for key in ("origins", "directions", "distances", "view_positions"):
        a = arrays.get(key)
        if a is not None and a.size and not np.isfinite(a.sum(dtype=np.float64)):
            return False
    d = arrays.get("directions")
    if d is not None and len(d):
        n2 = (d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1]) + d[:, 2] * d[:, 2]
        lo, hi = float(n2.min()), float(n2.max())
        if not (lo > 0 and abs(lo**0.5 - 1.0) <= UNIT_TOL and abs(hi**0.5 - 1.0) <= UNIT_TOL):
            return False
    dist = arrays.get("distances")
    if dist is not None and len(dist):
        if float(dist.min()) < 0:
            return False
        hits = arrays.get("hits")
        if hits is not None and not np.array_equal(hits != 0, dist > 0):
            return False
    faces = arrays.get("face_ids")
    if faces is not None and len(faces) and (int(faces.min()) < 0 or int(faces.max()) > 5):
        return False
    views = arrays.get("view_ids")
    if views is not None and len(views) and num_views is not None:
        if int(views.min()) < 0 or int(views.max()) >= num_views:
            return False
    return True


def first_bad_row(
    arrays: Mapping[str, Any], xp: Any = np, num_views: int | None = None
) -> tuple[type[InvalidValueError], str, int, str] | None:
    """The first failed value check of (possibly concatenated) ray arrays, or None.

    Works on numpy or CuPy arrays (``xp``); one host sync per check. ``view_ids`` are
    checked only when ``num_views`` is given. Returns ``(error class, key, row, what)``.
    """
    if xp is np and _all_values_ok(arrays, num_views):
        return None
    for cls, key, mask, what in _value_masks(arrays, xp, num_views):
        if bool(mask.any()):
            return cls, key, int(xp.argmax(mask)), what
    return None


def check_ray_batch(
    arrays: Mapping[str, Any], files: Sequence[Any], counts: Sequence[int], xp: Any = np
) -> None:
    """Value checks of a batch of whole files' rays, concatenated (a store fill's batch).

    Args:
        arrays: per-ray arrays of the files, one after the other (numpy, CuPy, or anything
            ``xp.asarray`` takes: torch CUDA tensors for CuPy); other keys are ignored.
        files: each file's path, in batch order; counts: each file's rays.
        xp: numpy or cupy.

    Raises:
        the first value error (:func:`check_ray_values`), naming the file and its own row.
    """
    rays = {k: xp.asarray(arrays[k]) for k in RAY_ROW_KEYS if k in arrays}
    bad = first_bad_row(rays, xp)
    if bad is None:
        return
    cls, key, row, what = bad
    ends = np.cumsum(np.asarray(counts, dtype=np.int64))
    f = int(np.searchsorted(ends, row, side="right"))
    start = int(ends[f - 1]) if f else 0
    raise make_error(cls, files[f], what, key, row - start)


def _num_views(arrays: Mapping[str, np.ndarray]) -> int | None:
    vp = arrays.get("view_positions")
    return None if vp is None or vp.ndim < 1 else int(vp.shape[0])


def check_ray_values(
    path: Any, arrays: Mapping[str, np.ndarray], rows: np.ndarray | None = None
) -> None:
    """Raise the first value problem of the ray arrays (whole, or ``rows`` gathered).

    Args:
        path: the file, for the message.
        arrays: ray arrays; the per-ray ones may be a gather of ``rows`` of the file.
        rows: file rows of the gathered arrays (named in the message); None: file order.

    Raises:
        NonFiniteValueError, BadDirectionError, NegativeDistanceError, HitsMismatchError,
        OutOfRangeError.
    """
    bad = first_bad_row(arrays, np, _num_views(arrays))
    if bad is None:
        return
    cls, key, row, what = bad
    vec = arrays[key]
    n = 1 if vec.ndim == 0 else vec.shape[0]
    if key != "view_positions" and rows is not None:
        row = int(np.asarray(rows)[row])
    raise make_error(cls, path, f"{what} (the first bad row of {n} checked)", key, row)


def validate_rays(path: Any, arrays: Mapping[str, np.ndarray]) -> int:
    """Every check of one whole ray file's arrays (dtypes as the readers accept them).

    Returns:
        N, the rays of the file.

    Raises:
        MissingKeyError, WrongDtypeError, WrongShapeError, EmptyRayFileError, or a value
        error (:func:`check_ray_values`); the message names the file, key and first bad row.
    """
    missing = [k for k in RAY_KEYS if k not in arrays]
    if missing:
        raise make_error(MissingKeyError, path, f"missing array(s) {missing}", missing[0])
    for key in RAY_KEYS:
        if not _dtype_ok(key, arrays[key].dtype, exact=False):
            raise make_error(
                WrongDtypeError, path, f"dtype {arrays[key].dtype}, expected {RAY_DTYPES[key]}", key
            )
    n = check_ray_shapes(path, arrays)
    bad = first_bad_row(arrays, np, _num_views(arrays))
    if bad is not None:
        cls, key, row, what = bad
        raise make_error(cls, path, what, key, row)
    return n


def ray_problems(path: Any, arrays: Mapping[str, np.ndarray]) -> list[FileCheckError]:
    """Every problem of one whole ray file (exact dtypes), one error per failed check.

    For ``verify``: each error's ``detail`` counts the bad rows; ``row`` is the first.
    Value checks run on the arrays whose dtype and shape are right.
    """
    out: list[FileCheckError] = []
    missing = [k for k in RAY_KEYS if k not in arrays]
    if missing:
        out.append(make_error(MissingKeyError, path, f"missing array(s) {missing}", missing[0]))
    good = {k: arrays[k] for k in RAY_KEYS if k in arrays}
    for key in list(good):
        if not _dtype_ok(key, good[key].dtype, exact=True):
            detail = f"dtype {good[key].dtype}, expected {RAY_DTYPES[key]}"
            out.append(make_error(WrongDtypeError, path, detail, key))
            del good[key]
    for problem in _shape_problems(path, good):
        out.append(problem)
        if problem.key in good and not isinstance(problem, EmptyRayFileError):
            del good[problem.key]
    for cls, key, mask, what in _value_masks(good, np, _num_views(good)):
        count = int(np.count_nonzero(mask))
        if count:
            unit = "view(s)" if key == "view_positions" else "ray(s)"
            detail = f"{what} in {count} {unit}"
            out.append(make_error(cls, path, detail, key, int(np.argmax(mask))))
    return out


# ------------------------------------------------------------------ voxel grids


def grid_problems(
    path: Any,
    shape: tuple[int, ...],
    dtype: Any,
    exact: bool = True,
    expected_side: int | None = None,
) -> list[FileCheckError]:
    """Problems of a ``voxels`` header (or array): dtype (``exact``: bool only, else any
    number), 3-D, a cube, a power-of-two side, and ``expected_side`` (its level's; None: any)."""
    out: list[FileCheckError] = []
    dtype, shape = np.dtype(dtype), tuple(int(d) for d in shape)
    if dtype != np.bool_ and (exact or dtype.kind not in "biuf"):
        out.append(make_error(WrongDtypeError, path, f"dtype {dtype}, expected bool", "voxels"))
    if len(shape) != 3 or len(set(shape)) != 1:
        what = "is not a cube" if len(shape) == 3 else "expected a 3-D grid (D, H, W)"
        out.append(make_error(BadGridError, path, f"shape {shape}, {what}", "voxels"))
    elif shape[0] < 1 or shape[0] & (shape[0] - 1):
        out.append(
            make_error(BadGridError, path, f"side {shape[0]} is not a power of two", "voxels")
        )
    elif expected_side is not None and shape[0] != int(expected_side):
        want = f"side {int(expected_side)} (metadata.json's base_resolution >> level)"
        detail = f"side {shape[0]}, but the grids of its level have {want}"
        out.append(make_error(WrongGridSideError, path, detail, "voxels"))
    return out


def check_grid_header(
    path: Any, shape: tuple[int, ...], dtype: Any, expected_side: int | None = None
) -> None:
    """:func:`grid_problems` of a ``voxels`` header, before the grid is inflated.

    Raises:
        WrongDtypeError, BadGridError, WrongGridSideError (not ``expected_side``, the level's).
    """
    for problem in grid_problems(path, shape, dtype, False, expected_side):
        raise problem


def _value_problem(path: Any, vox: np.ndarray) -> FileCheckError | None:
    """A number grid's voxels that are not exactly 0 or 1 (NaN, -1, 1e-30 ...; of a bool
    grid, bytes other than 0 and 1, which numpy reads as True)."""
    raw = vox.view(np.uint8) if vox.dtype == np.bool_ else vox
    kind = raw.dtype.kind
    if vox.size == 0 or (kind in "iu" and raw.max() <= 1 and (kind == "u" or raw.min() >= 0)):
        return None
    bad = (raw != 0) & (raw != 1)  # NaN compares unequal to both
    if not bad.any():
        return None
    at = np.unravel_index(int(np.argmax(bad)), bad.shape)
    detail = (
        f"{int(np.count_nonzero(bad))} of {bad.size} voxels are not 0 or 1 (at "
        f"{tuple(int(i) for i in at)}: {raw[at].item()!r}, dtype {vox.dtype}); voxels are bool"
    )
    return make_error(BadVoxelValueError, path, detail, "voxels")


def voxel_problems(
    path: Any, vox: np.ndarray, exact: bool = True, expected_side: int | None = None
) -> list[FileCheckError]:
    """:func:`grid_problems` of a ``voxels`` array, then values other than 0 and 1."""
    out = grid_problems(path, vox.shape, vox.dtype, exact, expected_side)
    bad = _value_problem(path, vox) if vox.dtype.kind in "biuf" else None
    return out + ([bad] if bad is not None else [])


def validate_voxels(path: Any, vox: np.ndarray, expected_side: int | None = None) -> np.ndarray:
    """The grid as (S, S, S) bool, C-contiguous; a number dtype holding only 0 and 1 is read
    as ``!= 0``. ``expected_side``: its level's side (``base_resolution >> level``; None: any).

    Raises:
        WrongDtypeError, BadGridError, WrongGridSideError, BadVoxelValueError.
    """
    for problem in voxel_problems(path, vox, False, expected_side):
        raise problem
    if vox.dtype != np.bool_:
        vox = vox != 0
    return np.ascontiguousarray(vox)


# ------------------------------------------------------------------ policy helper


def classify(exc: BaseException) -> str | None:
    """What kind of bad file ``exc`` reports, or None when it is not about one file.

    ``"unreadable"`` (permission, symlink loop, I/O), ``"missing"`` (removed after the index
    was built), ``"invalid"`` (values), ``"damaged"`` (archive, keys, dtypes, shapes). An
    ``on_error='skip'`` policy skips exactly these; None (a bug, a stale pack, a bad
    argument) is always raised.
    """
    if isinstance(exc, FileCheckError):
        return exc.category
    if isinstance(exc, DatasetLayoutError):
        return "missing"
    if isinstance(exc, DamagedFileError):
        # a pack-wide problem, not one file
        return None if isinstance(exc, PackError) else "damaged"
    return None
