"""Named errors. Each message names the file involved and the likely fix."""

from __future__ import annotations


class GPULoaderError(Exception):
    """Base class of every error gpuloader raises on purpose."""


class DatasetLayoutError(GPULoaderError, FileNotFoundError):
    """A file the format requires is missing (metadata, splits, a voxel file for a ray file)."""


class NoSamplesError(GPULoaderError, ValueError):
    """No samples are left for a split after filtering; the message says which filter."""


class DamagedFileError(GPULoaderError, ValueError):
    """A file exists but cannot be parsed or has the wrong keys, shapes or dtypes."""


class GenerationError(GPULoaderError):
    """The generator cannot do what it was asked (bad mesh, unwritable folder, bad arguments)."""


class GenerationSpaceError(GenerationError, OSError):
    """A write of the generator failed for want of space (ENOSPC, EDQUOT, EFBIG). The
    message names the output folder, the free space and the fix (free space, run the same
    command again: it resumes). ``errno``: the write's; ``free``: bytes free, or None."""

    def __init__(self, message: str, *, errno: int | None = None, free: int | None = None):
        super().__init__(message)
        self.errno = errno
        self.free = free

    def __reduce__(self):
        return _rebuild_error, (type(self), self.args, self.__dict__)


class UnsupportedTransformError(GPULoaderError, TypeError):
    """A transform the GPU back end cannot apply in the place it stands."""


class FileCheckError(DamagedFileError):
    """A read-time check of :mod:`gpuloader.format.validate` failed.

    The first line of the message names the file, then the array (key) and the first bad
    row where there is one: ``<path>: 'distances' row 3: ...``. The same facts are on the
    attributes ``path``, ``key``, ``row`` and ``detail`` (what is wrong, without the file
    and the fix); None when unknown.

    Raised again in the main process by a torch DataLoader (which rebuilds an error from its
    formatted traceback), the message is reordered so that its first line is still this
    one, followed by torch's "Caught ... in DataLoader worker process N" and the traceback.
    """

    #: what :func:`gpuloader.format.validate.classify` reports for this class
    category: str = "damaged"

    def __init__(
        self,
        message: str,
        *,
        path: object = None,
        key: str | None = None,
        row: int | None = None,
        detail: str | None = None,
    ) -> None:
        message = reorder_worker_message(message, type(self))
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.key = key
        self.row = None if row is None else int(row)
        self.detail = detail


def reorder_worker_message(message: str, cls: type) -> str:
    """Move the original error line of a DataLoader worker's re-raised message to the top."""
    if not (isinstance(message, str) and message.startswith("Caught ")):
        return message
    head, sep, _ = message.partition("\n")
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    at = message.rfind(marker)
    if not sep or at < 0:
        return message
    original = message[at + len(marker) :].rstrip("\n")
    return f"{original}\n({head.rstrip('.')}; its traceback:)\n{message[len(head) + 1 :]}"


class UnreadableFileError(FileCheckError):
    """The file cannot be opened: permission denied, a symlink loop or an I/O error.

    Not damage: the file may be fine once its permissions or links are fixed.
    """

    category = "unreadable"


class NotAnNpzError(FileCheckError):
    """The file is not an npz archive (not a zip: a bare ``.npy``, a pickle, text, empty)."""


class CorruptArchiveError(FileCheckError):
    """The npz archive is damaged: bad CRC, truncated, or a member that does not inflate."""


class PickledArrayError(FileCheckError):
    """An array of the file holds Python objects (a pickle); npz files of the format never do."""


class MissingKeyError(FileCheckError):
    """An array the format requires is not in the file."""


class WrongDtypeError(FileCheckError):
    """An array has a dtype that cannot stand for the format's (e.g. strings for floats)."""


class WrongShapeError(FileCheckError):
    """An array has the wrong number of dimensions or rows."""


class BadGridError(WrongShapeError):
    """A voxel grid that is not a cube with a power-of-two side."""


class EmptyRayFileError(FileCheckError):
    """A ray file that holds no rays."""


class InvalidValueError(FileCheckError):
    """Values a sample must never carry into training (base of the value checks)."""

    category = "invalid"


class NonFiniteValueError(InvalidValueError):
    """NaN or inf in origins, directions, distances or view positions."""


class BadDirectionError(InvalidValueError):
    """A zero-length or non-unit direction (see ``validate.UNIT_TOL``)."""


class NegativeDistanceError(InvalidValueError):
    """A negative path length."""


class HitsMismatchError(InvalidValueError):
    """``hits`` differs from ``distances > 0``."""


class OutOfRangeError(InvalidValueError):
    """``face_ids`` outside 0..5, or ``view_ids`` outside the file's views."""


class WorkerError(GPULoaderError, RuntimeError):
    """A reader worker process (DALI or torch DataLoader) died, or no batch came from the
    workers within the loader's ``worker_timeout``.

    The first line says what happened and names the worker's pid (``a DALI reader worker (pid
    N) died (killed by signal 9)``, ``no batch from the reader workers within 60 s (worker pid
    N hung?)``); the worker's own error follows where there is one. The broken workers are
    stopped before this is raised: iterating the loader again starts fresh ones.

    Attributes:
        pids: the workers concerned (may be empty). timeout: the seconds waited, for a hang;
        None for a death.
    """

    def __init__(
        self, message: str, *, pids: tuple[int, ...] = (), timeout: float | None = None
    ) -> None:
        super().__init__(message)
        self.pids = tuple(int(p) for p in pids)
        self.timeout = timeout


class PackError(GPULoaderError):
    """A ray pack cannot be built or used (base class)."""


class StalePackError(PackError):
    """The ray files changed since the pack was built; the message says how to rebuild.

    ``reason`` is the message without the fix (what changed), for callers that give their
    own.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason if reason is not None else message


class IncompletePackError(PackError, DamagedFileError):
    """A pack folder without a manifest (interrupted), or with missing or wrong arrays."""


class SampleNotInPackError(PackError, DamagedFileError, KeyError):
    """A sample (level, hash) the pack does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SampleReadError(GPULoaderError, RuntimeError):
    """A sample could not be read or its custom CPU transform failed; names its files."""


class SkippedFileWarning(UserWarning):
    """``on_error='skip'`` met a bad file (once per file and process); the message names it."""


class EmptySplitWarning(UserWarning):
    """A split (train, val or test) received no object."""


class PackLayoutError(PackError, TypeError):
    """A call a pack's layout does not serve: the row arrays of a striped pack
    (``level_arrays``), or the stripes of an ordinary one (``striped_level``)."""


class RemoteStoreError(PackError, OSError):
    """Object storage (an fsspec URL such as ``s3://bucket/prefix``) cannot serve a pack
    file; the message names the URL and what to check (base class)."""

    def __init__(self, message: str, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url

    def __str__(self) -> str:  # OSError would format (errno, strerror)
        return str(self.args[0]) if self.args else ""


class RemoteUnreachableError(RemoteStoreError, ConnectionError):
    """The endpoint does not answer (connection refused, DNS, timeouts after the retries)."""


class RemoteNotFoundError(RemoteStoreError, FileNotFoundError):
    """The bucket or the key does not exist."""


class RemoteAccessDeniedError(RemoteStoreError, PermissionError):
    """The credentials are missing, wrong or not allowed to read (or write) the key."""


class RemoteTruncatedError(RemoteStoreError, IncompletePackError):
    """An object is shorter than the pack's manifest says (or a range read came back short,
    every retry)."""


class RemoteRetriesExhaustedError(RemoteStoreError, TimeoutError):
    """Transient errors (timeouts, 5xx, connection resets) went on past the bounded retries."""


class MissingExtraError(GPULoaderError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class BadVoxelValueError(InvalidValueError):
    """A voxel grid holding values other than 0 and 1 (NaN, negatives, 1e-30, 2 ...).

    The format stores occupancy as bool; an integer or float grid is read only when every
    value is exactly 0 or 1 (a bool array whose bytes are not 0/1 is refused the same way).
    """


class WrongGridSideError(BadGridError):
    """A voxel grid (or a ray file's ``grid_shape``) whose side is not its level's:
    ``base_resolution >> level`` (``dataset/metadata.json``)."""


class GridHashError(FileCheckError):
    """A sub-volume's grid whose content SHA-256 is not its name (the hash in its file
    name): the file holds another sub-volume's grid. Checked on read only when the dataset
    asks (``check_grid_hash=True``); ``gpuloader verify`` always checks it."""


class DeclaredSizeError(FileCheckError):
    """An npz member whose ``.npy`` header declares more bytes than the file can hold
    (more than its zip member's size, or than deflate can inflate from its compressed
    bytes: about 1032:1); refused before anything is allocated."""


class OutsideRootError(UnreadableFileError):
    """A file or folder of the dataset that resolves (through a symlink) outside its root
    (``dataset/`` or ``ray_dataset_hierarchical/``); refused unless allowed explicitly
    (``build_index(..., allow_outside=True)``). ``path`` is the link, ``detail`` its target."""


class BadObjectIdError(DamagedFileError):
    """An object ID in ``splits.json`` that is not a plain name (it holds ``/``, ``\\``, is
    ``.`` or ``..``, or is empty): the format makes folder names of IDs, so a path-like ID
    would reach files outside the dataset."""


class PackWriteError(PackError):
    """The pack's files cannot be written (an ``OSError`` such as EIO, EROFS, or one of
    :class:`PackSpaceError`'s); the message names the pack folder, the file and the errno
    text. The partial pack (its temporary folder) is removed before this is raised.

    Attributes: folder (the pack folder), errno (None when not from an ``OSError``).
    """

    def __init__(self, message: str, *, folder: object = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.folder = None if folder is None else str(folder)
        self.errno = errno

    def __reduce__(self):  # keep the attributes across worker processes
        return (_rebuild_error, (type(self), self.args, self.__dict__))


class PackSpaceError(PackWriteError):
    """Not enough space for a pack: the estimate before anything is written exceeds the
    free space, or a write failed with ENOSPC, EDQUOT or EFBIG. ``needed``/``free``: bytes
    (None when unknown)."""

    def __init__(
        self,
        message: str,
        *,
        folder: object = None,
        errno: int | None = None,
        needed: int | None = None,
        free: int | None = None,
    ) -> None:
        super().__init__(message, folder=folder, errno=errno)
        self.needed = needed
        self.free = free


def _rebuild_error(cls: type, args: tuple, state: dict) -> BaseException:
    """Unpickle an error whose ``__init__`` takes keyword attributes."""
    exc = cls(*args)
    exc.__dict__.update(state)
    return exc


class PassEndedError(GPULoaderError, RuntimeError):
    """``next()`` on a ``GPURayLoader`` iterator whose pass was ended: a new ``iter(loader)``
    started (one pass at a time per loader), or the loader was closed. The message says which."""


class IncompleteDatasetWarning(UserWarning):
    """The ray dataset holds fewer ray files than its dataset describes (a generator or ray
    tracer that did not finish): it loads as a smaller dataset; the message names what is
    missing and how to finish it."""
