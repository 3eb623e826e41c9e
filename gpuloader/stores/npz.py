"""Ray and voxel storage: *how* rows are stored, apart from *which* rows a sample needs.

A :class:`RayStore` answers ``read(sample, rows)``: the rays of one sample (an index record,
see :mod:`gpuloader.format.index`) restricted to ``rows``. :class:`NpzRayStore` reads the upstream
``*_rays.npz`` files; a packed memory-mapped store can implement the same protocol.

Arrays returned by ``read`` (dtypes as on disk, shapes with ``k = len(rows)`` or ``N``)::

    origins        (k, 3) float32
    directions     (k, 3) float32
    distances      (k,)   float32
    hits           (k,)   uint8
    face_ids       (k,)   int32
    view_ids       (k,)   int32
    view_positions (V, 3) float32   one row per view, never indexed by ray rows

A sample that is a chunk of its file (``HierarchicalVoxelRayDataset(rays_per_chunk=...)``)
carries ``ray_offset``: its rays are the file's rows ``ray_offset .. ray_offset + num_rays``,
and ``rows`` index those (:func:`chunk_span`).

Compatible dtypes (other float widths, bool/unsigned/signed integers) are cast to these;
anything else, a missing key, inconsistent row counts or an unreadable file raise
:class:`~gpuloader.errors.DamagedFileError` naming the file. A ray file's ``grid_shape``
(when it has one) must be its level's grid (:class:`~gpuloader.errors.WrongGridSideError`).

A voxel grid's side must be its level's, ``base_resolution >> level`` of the
``metadata.json`` of the dataset the file lies in (:func:`voxel_file_side`, from the file's
place in the layout); it is checked from the header, before the grid is inflated, so a
512^3 grid deflated into a 130 KB level-1 file costs nothing.
"""

from __future__ import annotations

import functools
import io
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from gpuloader.errors import (
    DamagedFileError,
    DatasetLayoutError,
    WrongGridSideError,
)
from gpuloader.format.grid_hash import check_grid_hash
from gpuloader.format.header_cache import file_stamp
from gpuloader.format.layout import RAY_ROW_KEYS, read_json
from gpuloader.format.npz_files import check_member_size, load_npz, make_error
from gpuloader.format.validate import (
    as_ray_dtypes,
    check_grid_header,
    check_ray_shapes,
    check_ray_values,
    validate_voxels,
)

__all__ = [
    "NpzRayStore",
    "RayStore",
    "check_grid_shape",
    "chunk_span",
    "fast_load_npz",
    "level_side",
    "read_voxel_file",
    "voxel_file_side",
]

_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError)


@runtime_checkable
class RayStore(Protocol):
    """Where rays come from. ``rows`` is a (k,) int array of row indices, or None for all."""

    def read(self, sample: dict[str, Any], rows: np.ndarray | None) -> dict[str, np.ndarray]:
        """The ray arrays of ``sample`` (see the module docstring), rows gathered."""
        ...


def _check_dtype(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    """``arr`` cast to the format's dtype of ``key`` (``validate.as_ray_dtypes``)."""
    return as_ray_dtypes(path, {key: arr})[key]


def _validate(path: Path, arrays: dict[str, np.ndarray]) -> int:
    """Check shapes of the ray arrays (and N >= 1); returns N."""
    return check_ray_shapes(path, arrays)


def chunk_span(sample: dict[str, Any], n_file: int, where: Any = None) -> tuple[int, int]:
    """``(first row, row count)`` of a sample's rays in its file of ``n_file`` rows.

    A whole-file sample is ``(0, n_file)``; a chunk (``ray_offset`` set) is
    ``(ray_offset, num_rays)``.

    Raises:
        DamagedFileError: the chunk runs past the file (it changed since the index was built).
    """
    off = sample.get("ray_offset")
    if off is None:
        return 0, int(n_file)
    off, count = int(off), int(sample["num_rays"])
    if off < 0 or off + count > n_file:
        raise DamagedFileError(
            f"{where or sample.get('ray_path')}: chunk rows [{off}, {off + count}) are past "
            f"the file's {n_file} rays; the file changed since the dataset was indexed: "
            "rebuild the dataset object"
        )
    return off, count


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"


#: parsed ``.npy`` headers by their bytes (files of one dataset share a few dozen)
_HEADERS: dict[bytes, tuple[tuple[int, ...], bool, np.dtype]] = {}


def _npy_header(f: Any) -> tuple[tuple, bool, Any]:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` data ``f`` is at the start of (left
    after the header). A header is parsed by numpy once per distinct text, then remembered."""
    magic = f.read(len(_NPY_MAGIC) + 2)
    if magic[: len(_NPY_MAGIC)] != _NPY_MAGIC or len(magic) < len(_NPY_MAGIC) + 2:
        raise ValueError("not a .npy member")
    version = (magic[-2], magic[-1])
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise ValueError("unknown .npy version")
    width = 2 if version == (1, 0) else 4
    raw = f.read(width)
    n = int.from_bytes(raw, "little")
    if len(raw) != width or n > 10000:
        raise ValueError("bad .npy header length")
    header = f.read(n)
    if len(header) != n:
        raise ValueError("short .npy header")
    key = magic[-2:] + header
    got = _HEADERS.get(key)
    if got is None:
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        if version == (3, 0):  # utf-8 text: numpy's 2.0 reader takes it as latin-1
            header.decode("utf-8")
        shape, fortran, dtype = read(io.BytesIO(raw + header))
        got = (tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype))
        if len(_HEADERS) > 4096:
            _HEADERS.clear()
        _HEADERS[key] = got
    return got


#: a member's first bytes inflated to read its ``.npy`` header (the header is < 10 KB)
_HEAD_BYTES = 16 << 10


class _Entry(NamedTuple):
    """What a read needs of a zip member's directory entry (``zipfile.ZipInfo``'s names)."""

    header_offset: int
    compress_type: int
    compress_size: int
    file_size: int
    CRC: int  # noqa: N815 - ZipInfo's name
    flag_bits: int


#: zip directories of settled, unchanged files: path -> (stamp, {member name: entry});
#: at most this many files (then forgotten all at once: a larger dataset reads each
#: directory once per pass, as without them)
_DIRS: dict[str, tuple[list[int], dict[str, _Entry]]] = {}
_DIRS_MAX = 16384


def _directory(path: Path, fh: Any) -> dict[str, _Entry]:
    """The zip directory of the open file ``fh`` (``path``): remembered while the file's
    size, times and inode stay the same (:func:`~gpuloader.format.header_cache.file_stamp`;
    a file changed in the last seconds is read every time)."""
    name = os.fspath(path)
    got = file_stamp(path)
    known = _DIRS.get(name)
    if got is not None and known is not None and known[0] == got[0]:
        return known[1]
    fh.seek(0)
    with zipfile.ZipFile(fh) as zf:
        entries = {
            i.filename: _Entry(
                i.header_offset, i.compress_type, i.compress_size, i.file_size, i.CRC,
                i.flag_bits,
            )
            for i in zf.infolist()
        }  # fmt: skip
    if got is not None and got[1]:
        if len(_DIRS) >= _DIRS_MAX:
            _DIRS.clear()
        _DIRS[name] = (got[0], entries)
    return entries


class _Member:
    """One member read straight from the file: its compressed bytes inflated in two steps
    (the first :data:`_HEAD_BYTES` for the ``.npy`` header, then the rest into the array),
    its CRC and length checked. Deflated and stored members only (others: ValueError)."""

    def __init__(self, fh: Any, info: _Entry) -> None:
        if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, 8):
            raise ValueError("encrypted, or a compression other than deflate")
        fh.seek(info.header_offset)
        local = fh.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise ValueError("bad local header")
        skip = int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        fh.seek(info.header_offset + 30 + skip)
        self.comp = fh.read(info.compress_size)
        if len(self.comp) != info.compress_size:
            raise ValueError("short member")
        self.info = info
        if info.compress_type == zipfile.ZIP_STORED:
            self.z = None
            self.head = self.comp[:_HEAD_BYTES]
        else:
            self.z = zlib.decompressobj(-15)
            self.head = self.z.decompress(self.comp, _HEAD_BYTES)
        f = io.BytesIO(self.head)
        self.shape, self.fortran, self.dtype = _npy_header(f)
        self.start = f.tell()  # where the data begins in the member

    def read_into(self, arr: np.ndarray) -> None:
        """The member's data into ``arr`` (exactly its bytes), CRC and length checked; never
        inflates more than ``arr`` holds (plus one byte to see that the member ends there)."""
        out = memoryview(arr).cast("B")
        need = self.start + out.nbytes - len(self.head)  # bytes still to inflate
        if need < 0:
            raise ValueError("member longer than its header declares")
        if self.z is None:
            rest = self.comp[len(self.head) :]
        else:
            rest = self.z.decompress(self.z.unconsumed_tail, need + 1)
            if len(rest) == need and not self.z.eof:  # the end of the stream, and no more
                if self.z.decompress(self.z.unconsumed_tail, 1) or not self.z.eof:
                    raise ValueError("member longer than its header declares, or cut short")
        if len(rest) != need:
            raise ValueError("member of another size than its header declares")
        crc = zlib.crc32(rest, zlib.crc32(self.head))
        if len(self.head) + need != self.info.file_size or crc != self.info.CRC:
            raise ValueError("bad CRC or length")
        first = self.head[self.start :]
        out[: len(first)] = first
        out[len(first) :] = rest


def fast_load_npz(
    path: Path,
    keys: tuple[str, ...],
    optional: tuple[str, ...] = (),
    check_header: Any = None,
) -> dict[str, np.ndarray]:
    """:func:`~gpuloader.format.npz_files.load_npz` in one pass over one open zip archive.

    Same checks, in the same order (every member's header, its declared size and
    ``check_header``, before the member is inflated past its header; the CRC and length of
    each member), but the archive's directory is read once per unchanged file in a process
    (:func:`_directory`) and each member is read straight from the file: its compressed
    bytes in one read, inflated in two C calls into the array (:class:`_Member`; never more
    than the array holds), not through ``zipfile``'s 64 KB Python loop (``load_npz`` reads
    the headers twice, then lets ``np.load`` read them again). Anything unusual (not a zip, a
    missing key, a bad header, a short, long or corrupt member, encryption, another
    compression, ...) is handed to ``load_npz``, so every error is the one it raises, named
    the same.

    Raises:
        FileNotFoundError; the errors of ``load_npz``.
    """
    try:
        with open(path, "rb") as fh:
            if fh.read(4) not in _ZIP_MAGIC:
                raise ValueError("not a zip")
            size = os.fstat(fh.fileno()).st_size
            infos = _directory(path, fh)
            wanted = list(keys)
            wanted += [k for k in optional if f"{k}.npy" in infos or k in infos]
            heads = []
            for key in wanted:
                m = _Member(fh, infos[key if key in infos else f"{key}.npy"])
                if m.dtype.hasobject or any(d < 0 for d in m.shape):
                    raise ValueError("object or negative shape")
                check_member_size(path, key, m.info, m.shape, m.dtype, size)
                if check_header is not None:
                    check_header(key, m.shape, m.dtype)
                heads.append((key, m))
            out: dict[str, np.ndarray] = {}
            for key, m in heads:
                count = int(np.prod(m.shape, dtype=np.int64)) if m.shape else 1
                arr = np.empty(count, dtype=m.dtype)
                m.read_into(arr)
                shape = m.shape
                out[key] = arr.reshape(shape[::-1]).T if m.fortran else arr.reshape(shape)
            return out
    except FileNotFoundError:
        raise
    except Exception:  # noqa: BLE001 - load_npz names the error (or reads it after all)
        _DIRS.pop(os.fspath(path), None)
        return load_npz(path, keys, optional=optional, check_header=check_header)


class NpzRayStore:
    """Reads ``*_rays.npz`` files (``numpy.savez_compressed``) and gathers rows.

    Each row array is inflated whole (deflate has no random access) and ``rows`` are
    gathered from it; ``view_positions`` is returned whole. Values are checked over every
    row of the sample (the file, or its chunk), not only the rows gathered.
    """

    keys: tuple[str, ...] = (*RAY_ROW_KEYS, "view_positions")

    def __init__(self) -> None:
        #: ``(file, first row, rows) -> file stamp`` of spans whose values passed the checks:
        #: an unchanged file (same size, mtime, ctime, inode; settled, as
        #: :mod:`~gpuloader.format.header_cache` rules) is not scanned for NaNs again
        self._values_ok: dict[tuple[str, int, int], tuple[int, ...]] = {}

    def read(self, sample: dict[str, Any], rows: np.ndarray | None) -> dict[str, np.ndarray]:
        path = Path(sample["ray_path"])
        got = file_stamp(path)  # before the read: a later change gives another stamp
        stamp = tuple(got[0]) if got is not None and got[1] else None  # unsettled: checked
        try:
            arrays = fast_load_npz(path, self.keys, optional=("grid_shape",))
        except FileNotFoundError as exc:
            raise DatasetLayoutError(
                f"{path}: ray file not found (removed after the index was built?); "
                "rebuild the dataset object or regenerate the rays"
            ) from exc
        grid_shape = arrays.pop("grid_shape", None)
        if grid_shape is not None and sample.get("voxel_path") is not None:
            check_grid_shape(path, grid_shape, voxel_file_side(sample["voxel_path"]))
        arrays = as_ray_dtypes(path, arrays)
        n = _validate(path, arrays)
        off, count = chunk_span(sample, n, path)
        # every row of the sample (file or chunk) is checked, not only the rows read: a
        # sample is bad or good as a whole, whatever rows an epoch draws (as the stores and
        # packs, which check whole samples once)
        span_key = (str(path), off, count)
        if stamp is None or self._values_ok.get(span_key) != stamp:
            if count == n:
                check_ray_values(path, arrays)
            else:
                span = {
                    k: (v[off : off + count] if k in RAY_ROW_KEYS else v) for k, v in arrays.items()
                }
                check_ray_values(path, span, np.arange(off, off + count, dtype=np.int64))
            if stamp is not None:
                self._values_ok[span_key] = stamp
        if count != n and rows is None:
            rows = np.arange(off, off + count, dtype=np.int64)
        elif count != n:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.size and (rows.min() < 0 or rows.max() >= count):
                raise IndexError(
                    f"{path}: ray rows out of range [0, {count}) of the chunk at row {off}: "
                    f"min {rows.min()}, max {rows.max()}"
                )
            rows = rows + off
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.size and (rows.min() < 0 or rows.max() >= n):
                raise IndexError(
                    f"{path}: ray rows out of range [0, {n}): min {rows.min()}, max {rows.max()}"
                )
            for key in RAY_ROW_KEYS:
                arrays[key] = arrays[key][rows]
        return arrays


def read_voxel_file(
    path: Path, expected_side: int | None = None, expected_hash: str | None = None
) -> np.ndarray:
    """The ``voxels`` array of a voxel ``.npz``: (D, H, W) bool, C-contiguous.

    Args:
        expected_side: the side of the grid's level; None: :func:`voxel_file_side` (from the
            dataset's ``metadata.json``; no side check when it says nothing).
        expected_hash: the sub-volume's hash, checked against the grid's SHA-256
            (:func:`~gpuloader.format.validate.check_grid_hash`); None: not checked.

    Raises:
        DatasetLayoutError: the file is missing.
        DamagedFileError: unreadable, no ``voxels`` key, a header declaring more than the
            file holds, not a cube with a power-of-two side, another side than its level's,
            values other than 0 and 1, another grid than ``expected_hash`` names (the named
            subclasses of :mod:`gpuloader.format.validate`); the side is checked before
            inflating.
    """
    path = Path(path)
    side = voxel_file_side(path) if expected_side is None else int(expected_side)

    def check(key: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        check_grid_header(path, shape, dtype, side)

    try:
        vox = fast_load_npz(path, ("voxels",), check_header=check)["voxels"]
    except FileNotFoundError as exc:
        raise DatasetLayoutError(
            f"{path}: voxel file not found; the voxel dataset does not match the index "
            "(regenerate it, or pass the dataset_dir the rays were made from)"
        ) from exc
    grid = validate_voxels(path, vox, side)
    if expected_hash is not None:
        check_grid_hash(path, grid, expected_hash)
    return grid


def check_grid_shape(path: Any, grid_shape: np.ndarray, expected_side: int | None) -> None:
    """A ray file's ``grid_shape`` ((3,) integers, or one side) against its level's side
    (None: unknown). Another form is left to ``gpuloader verify`` (provenance, not rays).

    Raises:
        WrongGridSideError: the rays were made for another grid than the level's.
    """
    gs = np.asarray(grid_shape)
    if expected_side is None or gs.dtype.kind not in "iu" or gs.size not in (1, 3):
        return
    shape = tuple(int(v) for v in gs.reshape(-1))
    if set(shape) != {int(expected_side)}:
        detail = f"{shape}, but the grids of its level have side {int(expected_side)}"
        raise make_error(WrongGridSideError, path, detail, "grid_shape")


@functools.lru_cache(maxsize=64)
def _level_sides(meta: str, stamp: tuple[int, int]) -> tuple[int | None, tuple[int, ...]]:
    """``(base_resolution, level_resolutions)`` of a ``metadata.json`` (``stamp``: its size
    and mtime, so a rewritten file is read again); None / () where it does not say."""
    try:
        doc = read_json(Path(meta))
    except (OSError, ValueError, UnicodeDecodeError):
        return None, ()
    if not isinstance(doc, dict):
        return None, ()
    base = doc.get("base_resolution")
    base = base if isinstance(base, int) and not isinstance(base, bool) and base >= 1 else None
    sides = doc.get("level_resolutions")
    ok = isinstance(sides, list) and all(type(v) is int and v >= 1 for v in sides)
    return base, tuple(sides) if ok else ()


def level_side(dataset_dir: Path | str, level: int) -> int | None:
    """The grid side of ``level`` in the voxel dataset ``dataset_dir``: its
    ``metadata.json``'s ``base_resolution >> level`` (else ``level_resolutions[level]``);
    None when the file says neither (then no side can be checked)."""
    meta = Path(dataset_dir) / "metadata.json"
    try:
        st = os.stat(meta)
    except OSError:
        return None
    base, sides = _level_sides(str(meta), (st.st_size, st.st_mtime_ns))
    level = int(level)
    if base is not None:
        return base >> level if level >= 0 and base >> level >= 1 else None
    return sides[level] if 0 <= level < len(sides) else None


def voxel_file_side(path: Path | str) -> int | None:
    """The side a voxel file's grid must have, from its place in the layout
    (``<dataset>/objects/object_<ID>/level_0.npz`` or
    ``<dataset>/subvolumes/level_<L>/<hh>/<hash>.npz``) and :func:`level_side`; None when
    the path is not in that layout or the metadata does not say."""
    # string splits, not pathlib: this runs for every sample read
    head, name = os.path.split(os.fspath(path).rstrip(os.sep) or os.sep)
    head, folder = os.path.split(head)
    head, parent = os.path.split(head)
    if name == "level_0.npz" and folder.startswith("object_") and parent == "objects":
        return level_side(head or ".", 0)
    root, top = os.path.split(head)
    if top != "subvolumes" or not parent.startswith("level_") or not folder:
        return None
    level = parent[len("level_") :]
    return level_side(root or ".", int(level)) if level.isdigit() else None
