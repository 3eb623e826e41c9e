"""npz members read straight from the file: :func:`fast_load_npz`, the one-pass reader of
the ray and voxel reads, with the checks of :func:`~gpuloader.format.npz_files.load_npz`
(which it hands anything unusual, for its named error).

The zip directory is remembered per unchanged settled file, compactly (:class:`_Directory`:
under 1 KB a file); each member is read from its offset (:class:`_Member`): at most
:data:`_FIRST_READ` compressed bytes for its ``.npy`` header, then the rest inflated into the
array :data:`_OUT_CHUNK` bytes at a time (a stored member read into it directly), so that a read
holds at most one chunk besides the arrays it returns.
"""

from __future__ import annotations

import array
import io
import os
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from gpuloader.format.header_cache import file_stamp
from gpuloader.format.npz_files import check_member_size, load_npz

__all__ = ["fast_load_npz"]

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
#: most compressed bytes a member's header is looked for in (its ``.npy`` header, <= 10 KB
#: inflated, lies within them unless the stream is forged: then the full reader names it)
_FIRST_READ = 32 << 10
#: most compressed bytes read at a time, and most bytes inflated at a time into an array
#: (numpy's own chunk): with one inflater (~40 KB), a read's working set besides its arrays
_IN_CHUNK = 64 << 10
_OUT_CHUNK = 256 << 10


class _Entry(NamedTuple):
    """What a read needs of a zip member's directory entry (``zipfile.ZipInfo``'s names)."""

    header_offset: int
    compress_type: int
    compress_size: int
    file_size: int
    CRC: int  # noqa: N815 - ZipInfo's name
    flag_bits: int


class _Directory:
    """A zip directory, compact: the members' positions (one dict shared by every file with
    the same members) and six integers per member in one array (a file costs under 1 KB)."""

    __slots__ = ("_index", "_fields")

    #: member names -> their positions, one dict for every file with those members
    _SHARED: dict[tuple[str, ...], dict[str, int]] = {}

    def __init__(self, names: list[str], fields: list[int]) -> None:
        """``names`` of the members in order; ``fields``: six integers per member, in the
        order of :class:`_Entry`."""
        key = tuple(sys.intern(n) for n in names)
        index = self._SHARED.get(key)
        if index is None:
            if len(self._SHARED) > 256:
                self._SHARED.clear()
            index = self._SHARED[key] = {n: k for k, n in enumerate(key)}
        self._index = index
        self._fields = array.array("q", fields)

    @classmethod
    def of_infos(cls, infos: list[zipfile.ZipInfo]) -> _Directory:
        """The directory of ``zipfile``'s entries."""
        fields = [v for i in infos for v in (i.header_offset, i.compress_type, i.compress_size,
                                             i.file_size, i.CRC, i.flag_bits)]  # fmt: skip
        return cls([i.filename for i in infos], fields)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def __getitem__(self, name: str) -> _Entry:
        k = 6 * self._index[name]
        return _Entry(*self._fields[k : k + 6])


#: zip directories of settled, unchanged files: path -> (stamp, directory); at most this
#: many files (then forgotten all at once: a larger dataset reads each directory once per
#: pass, as without them)
_DIRS: dict[str, tuple[tuple[int, ...], _Directory]] = {}
_DIRS_MAX = 16384


def _directory(path: Path, fh: Any, size: int) -> _Directory:
    """The zip directory of the open file ``fh`` (``path``, ``size`` bytes): remembered
    while the file's size, times and inode stay the same
    (:func:`~gpuloader.format.header_cache.file_stamp`; a file changed in the last seconds
    is read every time)."""
    name = os.fspath(path)
    got = file_stamp(path)
    stamp = tuple(got[0]) if got is not None else None
    known = _DIRS.get(name)
    if stamp is not None and known is not None and known[0] == stamp:
        return known[1]
    entries = _read_directory(fh, size)
    if entries is None:  # zip64, data before the archive, a comment, ...: zipfile's reader
        fh.seek(0)
        with zipfile.ZipFile(fh) as zf:
            entries = _Directory.of_infos(zf.infolist())
    if stamp is not None and got[1]:
        if len(_DIRS) >= _DIRS_MAX:
            _DIRS.clear()
        _DIRS[name] = (stamp, entries)
    return entries


_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record (22 bytes)
_CDIR = struct.Struct("<4s6H3L5H2L")  # central directory entry (46 bytes, then the name)
#: the archive's last bytes read at once: the end record and, mostly, the whole directory
_TAIL_READ = 4096


def _read_directory(fh: Any, size: int) -> _Directory | None:
    """The central directory of a plain zip archive (what ``numpy.savez`` writes): one read
    of the file's last bytes, parsed with :mod:`struct` (``zipfile`` builds an object per
    member, ~10 us each). None for anything else (zip64 fields, a comment, bytes before the
    archive, more than one disk, an entry that does not parse): ``zipfile`` then reads it,
    and names what is wrong. The members themselves are checked as they are read."""
    if size < _EOCD.size:
        return None
    tail_at = max(0, size - _TAIL_READ)
    fh.seek(tail_at)
    tail = fh.read(size - tail_at)
    if len(tail) != size - tail_at:
        return None
    sig, disk, cd_disk, n_here, n_all, cd_size, cd_at, comment = _EOCD.unpack_from(
        tail, len(tail) - _EOCD.size
    )
    if sig != b"PK\x05\x06" or comment or disk or cd_disk or n_here != n_all:
        return None
    if 0xFFFF in (n_here, n_all) or 0xFFFFFFFF in (cd_size, cd_at):
        return None  # zip64
    if cd_at + cd_size != size - _EOCD.size:
        return None  # bytes before the archive, or between directory and end record
    if cd_at >= tail_at:
        cd = tail[cd_at - tail_at : cd_at - tail_at + cd_size]
    else:
        fh.seek(cd_at)
        cd = fh.read(cd_size)
    if len(cd) != cd_size:
        return None
    names: list[str] = []
    fields: list[int] = []
    pos = 0
    for _ in range(n_all):
        if pos + _CDIR.size > cd_size:
            return None
        e = _CDIR.unpack_from(cd, pos)
        if e[0] != b"PK\x01\x02":
            return None
        flags, method, crc, csize, usize = e[3], e[4], e[7], e[8], e[9]
        n_name, n_extra, n_comment, offset = e[10], e[11], e[12], e[16]
        if 0xFFFFFFFF in (csize, usize, offset):
            return None  # zip64 values in the extra field
        raw = cd[pos + _CDIR.size : pos + _CDIR.size + n_name]
        pos += _CDIR.size + n_name + n_extra + n_comment
        if len(raw) != n_name or pos > cd_size:
            return None
        names.append(raw.decode("utf-8" if flags & 0x800 else "cp437"))
        fields += (offset, method, csize, usize, crc, flags)
    if pos != cd_size or len(set(names)) != len(names):
        return None
    return _Directory(names, fields)


class _Member:
    """One member read straight from the file, its CRC and length checked; deflated and
    stored members only (others: ValueError).

    Made, it has read its first compressed bytes (4 KB, or up to :data:`_FIRST_READ` where
    the header is longer) and inflated its ``.npy`` header (``shape``, ``fortran``,
    ``dtype``) with the inflater that :meth:`read_into` goes on with: the rest is inflated
    into the array :data:`_OUT_CHUNK` bytes at a time from :data:`_IN_CHUNK`-byte reads (a
    stored member is read into it directly). :func:`fast_load_npz` reads one member at a
    time: one inflater and one chunk besides its arrays."""

    def __init__(self, fh: Any, info: _Entry) -> None:
        if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, 8):
            raise ValueError("encrypted, or a compression other than deflate")
        fh.seek(info.header_offset)
        buf = fh.read(30 + 4096)  # the local header and, mostly, the member's first bytes
        if len(buf) < 30 or buf[:4] != b"PK\x03\x04":
            raise ValueError("bad local header")
        skip = int.from_bytes(buf[26:28], "little") + int.from_bytes(buf[28:30], "little")
        self.fh, self.info = fh, info
        self.data_at = info.header_offset + 30 + skip  # the member's compressed bytes
        stored = info.compress_type == zipfile.ZIP_STORED
        for size in (4096, _FIRST_READ):  # most headers lie in the first few hundred bytes
            want = min(info.compress_size, size)
            first = buf[30 + skip : 30 + skip + want]
            if len(first) != want:
                fh.seek(self.data_at)
                first = fh.read(want)
                if len(first) != want:
                    raise ValueError("short member")
            self.z = None if stored else zlib.decompressobj(-15)
            self.head = first if stored else self.z.decompress(first, 1024)
            try:
                self._parse_header()
                break
            except ValueError:
                if want == info.compress_size or size == _FIRST_READ:
                    raise
        self.taken = len(first)  # compressed bytes read
        self.tail = b"" if stored else self.z.unconsumed_tail  # read, not yet inflated

    def _parse_header(self) -> None:
        """The ``.npy`` header from :attr:`head`, inflating more (up to :data:`_HEAD_BYTES`)
        where it is longer than what was inflated (a header is mostly 128 bytes)."""
        while True:
            f = io.BytesIO(self.head)
            try:
                self.shape, self.fortran, self.dtype = _npy_header(f)
                self.start = f.tell()  # where the data begins in the member
                return
            except ValueError:
                z = self.z
                if z is None or len(self.head) >= _HEAD_BYTES or not z.unconsumed_tail:
                    raise
                self.head += z.decompress(z.unconsumed_tail, _HEAD_BYTES - len(self.head))

    def read_into(self, arr: np.ndarray) -> None:
        """The member's data into ``arr`` (exactly its bytes), CRC and length checked; never
        inflates more than ``arr`` holds (plus one byte to see that the member ends there)."""
        out = memoryview(arr).cast("B")
        info, fh = self.info, self.fh
        want = self.start + out.nbytes  # the member's bytes, by its header
        first = self.head[self.start :]
        if want != info.file_size or len(first) > out.nbytes:
            raise ValueError("member of another size than its header declares")
        out[: len(first)] = first
        crc, total, pos = zlib.crc32(self.head), len(self.head), len(first)
        left = info.compress_size - self.taken  # compressed bytes still in the file
        fh.seek(self.data_at + self.taken)
        if self.z is None:  # stored: the rest straight into the array
            if total + left != want:
                raise ValueError("stored member of another size than its header declares")
            if left and fh.readinto(out[pos:]) != left:
                raise ValueError("short member")
            crc = zlib.crc32(out[pos:], crc)
            total = want
        else:
            z, data = self.z, self.tail
            while not z.eof:
                if not data:
                    if not left:
                        raise ValueError("member cut short")
                    data = fh.read(min(left, _IN_CHUNK))
                    if not data:
                        raise ValueError("short member")
                    left -= len(data)
                piece = z.decompress(data, min(_OUT_CHUNK, want - total + 1))
                data = z.unconsumed_tail
                total += len(piece)
                if total > want:
                    raise ValueError("member longer than its header declares")
                out[pos : pos + len(piece)] = piece
                crc = zlib.crc32(piece, crc)
                pos += len(piece)
            if data or left or z.unused_data:
                raise ValueError("bytes after the member's stream")
        self.z = self.head = self.tail = None  # its inflater freed before the next member
        if total != want or crc != info.CRC:
            raise ValueError("bad CRC or length")


def fast_load_npz(
    path: Path,
    keys: tuple[str, ...],
    optional: tuple[str, ...] = (),
    check_header: Any = None,
) -> dict[str, np.ndarray]:
    """:func:`~gpuloader.format.npz_files.load_npz` in one pass over one open zip archive.

    Same checks (each member's header, its declared size and ``check_header``, before the
    member is inflated past its header; the CRC and length of each member), but the
    archive's directory is read once per unchanged file in a process (:func:`_directory`)
    and each member is read straight from the file, one member at a time, inflated into its
    array in large chunks (:class:`_Member`; never more than the array holds), not through
    ``zipfile``'s 64 KB Python loop (``load_npz`` reads the headers twice, then lets
    ``np.load`` read them again). Anything unusual (not a zip, a
    missing key, a bad header, a short, long or corrupt member, encryption, another
    compression, ...) is handed to ``load_npz``, so every error is the one it raises, named
    the same.

    Raises:
        FileNotFoundError; the errors of ``load_npz``.
    """
    try:
        with open(path, "rb", buffering=0) as fh:  # every read one system call
            if fh.read(4) not in _ZIP_MAGIC:
                raise ValueError("not a zip")
            size = os.fstat(fh.fileno()).st_size
            infos = _directory(path, fh, size)
            wanted = list(keys)
            wanted += [k for k in optional if f"{k}.npy" in infos or k in infos]
            out: dict[str, np.ndarray] = {}
            for key in wanted:  # one member at a time: its header checked, then its data
                m = _Member(fh, infos[key if key in infos else f"{key}.npy"])
                if m.dtype.hasobject or any(d < 0 for d in m.shape):
                    raise ValueError("object or negative shape")
                check_member_size(path, key, m.info, m.shape, m.dtype, size)
                if check_header is not None:
                    check_header(key, m.shape, m.dtype)
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
