"""The dataset as readers see it: a validated, picklable view, and the one sample reader.

A :class:`DatasetView` is what every reader needs of a
:class:`~gpuloader.dataset.hierarchical.HierarchicalVoxelRayDataset`, as one frozen value::

    samples                 the index records (dicts), shared with the dataset, not copied
    levels                  (K,) int64, read-only     level of each sample
    num_rays                (K,) int64, read-only     rays of each sample (a chunk's rows)
    hashes                  tuple of K str            hash of each sample
    seed                    int                       seed of every draw
    ray_store               RayStore                  where rays are read from
    on_error                "raise" | "skip"          what a bad file does (dataset doc)
    samples_per_subvolume   int | None                most rays read per sample
    transform               callable | None           its ray budget limits the rows read
    sparse_voxels, sparse_mode, sparse_connectivity   the dataset's sparse output options
    check_grid_hash         bool                      grids checked against their hash
    voxel_cache             LRUCache                  this process's grids, shared by variants
    log                     ReadLog                   bad files met and replacements made

Made by :meth:`DatasetView.of` (from a dataset: its cached view, see
``HierarchicalVoxelRayDataset.view``), it is validated once (``on_error`` in raise/skip,
``samples_per_subvolume >= 0``, a ray store with ``read``, columns as long as ``samples``).
Variants are new values, the dataset untouched: :meth:`DatasetView.with_` (no transform,
another ``on_error``, every row, ...) and :meth:`DatasetView.subset` (some samples).

:meth:`DatasetView.read_sample` and :meth:`DatasetView.read_sample_checked` are *the* reading
code of the package: the dataset's own methods of the same names call them, and so do the
GPU loader's readers in their worker processes. Rows read::

    k = min(num_rays, samples_per_subvolume, num_rays asked, ray_budget(transform))
    rows = select_rows(num_rays, k, seed, epoch, index)     (None when k covers the sample)

so a draw is a pure function of (seed, epoch, index), the same in every process.

Pickling (workers get a copy): the voxel cache travels empty (``LRUCache``), the log with
what it holds; a worker's copy then records in its own process. The view is frozen (its
fields cannot be rebound); its cache and log are the process's mutable bookkeeping, shared
by every variant of a view (a :meth:`subset` gets its own log of bad indices, since its
indices are others).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpuloader.augment.rng import select_rows
from gpuloader.augment.transforms import ray_budget
from gpuloader.errors import SkippedFileWarning
from gpuloader.format.validate import classify
from gpuloader.plan.replace import KnownBad, available_rays, replacement_order
from gpuloader.stores.cache import LRUCache
from gpuloader.stores.npz import RayStore, read_voxel_file

__all__ = ["ON_ERROR", "DatasetView", "ReadLog", "first_line", "min_ignoring_none"]

#: the values of ``on_error``
ON_ERROR: tuple[str, ...] = ("raise", "skip")

#: fields :meth:`DatasetView.with_` may change (the columns change only with the samples)
_VARIABLE = (
    "seed",
    "ray_store",
    "on_error",
    "samples_per_subvolume",
    "transform",
    "sparse_voxels",
    "sparse_mode",
    "sparse_connectivity",
    "check_grid_hash",
    "voxel_cache",
)


def min_ignoring_none(*values: int | None) -> int | None:
    """The smallest of ``values`` that are not None (None when all are)."""
    present = [int(v) for v in values if v is not None]
    return min(present) if present else None


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its class name when the message is empty)."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(eq=False)
class ReadLog:
    """What reads met in this process: bad files, bad sample indices, replacements made.

    Attributes:
        errors: ``(file, first line of its error)`` of every bad file met, in order.
        bad: indices of the samples found bad (not tried again as replacements).
        skipped: replacements made (``on_error='skip'``).
    """

    errors: list[tuple[str, str]] = field(default_factory=list)
    bad: set[int] = field(default_factory=set)
    skipped: int = 0

    def record(self, file: str, exc: BaseException, stacklevel: int = 3) -> None:
        """Note bad ``file`` once, with a :class:`~gpuloader.errors.SkippedFileWarning`
        (``stacklevel`` as ``warnings.warn``'s, counted from the caller of this method's
        caller)."""
        line = first_line(exc)
        if any(f == file for f, _ in self.errors):
            return
        self.errors.append((file, line))
        warnings.warn(
            f"gpuloader: skipping a bad file: {line}", SkippedFileWarning, stacklevel=stacklevel
        )


def _column(values: list, dtype: type) -> np.ndarray:
    arr = np.array(values, dtype=dtype)
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True, eq=False, repr=False)
class DatasetView:
    """What readers need of a dataset, validated and picklable (module doc).

    Build it with :meth:`of` (from a dataset) or :meth:`build` (from samples and options);
    the columns are derived from ``samples`` there. Fields: module doc.

    Raises:
        ValueError: ``on_error`` not "raise"/"skip", ``samples_per_subvolume < 0``, or
            columns of another length than ``samples``.
        TypeError: ``ray_store`` has no ``read(sample, rows)``.
    """

    samples: Sequence[dict[str, Any]]
    levels: np.ndarray
    num_rays: np.ndarray
    hashes: tuple[str, ...]
    seed: int
    ray_store: RayStore
    on_error: str = "raise"
    samples_per_subvolume: int | None = None
    transform: Any = None
    sparse_voxels: bool = False
    sparse_mode: str = "coo"
    sparse_connectivity: int = 6
    check_grid_hash: bool = False
    voxel_cache: LRUCache = field(default_factory=lambda: LRUCache(0))
    log: ReadLog = field(default_factory=ReadLog)

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be 'raise' or 'skip'; got {self.on_error!r}")
        sps = self.samples_per_subvolume
        if sps is not None and sps < 0:
            raise ValueError(f"samples_per_subvolume must be >= 0; got {sps}")
        if not isinstance(self.ray_store, RayStore):
            raise TypeError(
                f"ray_store must have read(sample, rows); got {type(self.ray_store).__name__}"
            )
        k = len(self.samples)
        if not len(self.levels) == len(self.num_rays) == len(self.hashes) == k:
            raise ValueError(
                f"a DatasetView's columns must have one entry per sample ({k}): levels "
                f"{len(self.levels)}, num_rays {len(self.num_rays)}, hashes {len(self.hashes)}"
            )
        object.__setattr__(self, "seed", int(self.seed))

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        samples: Sequence[dict[str, Any]],
        *,
        seed: int,
        ray_store: RayStore,
        **options: Any,
    ) -> DatasetView:
        """A view of ``samples`` (index records with ``level``, ``num_rays``, ``hash``), its
        columns derived from them; ``options``: the other fields (module doc)."""
        return cls(
            samples=samples,
            levels=_column([int(s["level"]) for s in samples], np.int64),
            num_rays=_column([int(s["num_rays"]) for s in samples], np.int64),
            hashes=tuple(str(s["hash"]) for s in samples),
            seed=seed,
            ray_store=ray_store,
            **options,
        )

    @classmethod
    def of(cls, data: Any) -> DatasetView:
        """``data`` itself if it is a view, else the dataset's view
        (``HierarchicalVoxelRayDataset.view``: its current attributes, its cache and log).
        ``data``: a view, or a HierarchicalVoxelRayDataset (not imported here: the dataset
        module imports this one)."""
        if isinstance(data, DatasetView):
            return data
        return data.view()

    def with_(self, **changes: Any) -> DatasetView:
        """A variant with some fields changed (validated again), e.g.
        ``with_(transform=None)``, ``with_(on_error="skip")``,
        ``with_(transform=None, samples_per_subvolume=None)`` (every row). The samples, cache
        and log are shared; use :meth:`subset` for other samples.

        Raises:
            TypeError: a field that is not one of those (or a column).
        """
        wrong = sorted(set(changes) - set(_VARIABLE))
        if wrong:
            raise TypeError(
                f"DatasetView.with_ cannot change {', '.join(wrong)} (variable: "
                f"{', '.join(_VARIABLE)}; other samples: subset)"
            )
        return dataclasses.replace(self, **changes)

    def subset(self, indices: Sequence[int] | np.ndarray) -> DatasetView:
        """A view of samples ``indices`` (in that order; index ``j`` of the result is sample
        ``indices[j]`` here, and its draws are keyed by ``j``). Shares the cache and the list
        of bad files; bad indices and the replacement count start empty (the subset's own)."""
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        levels, num_rays = self.levels[idx], self.num_rays[idx]
        levels.flags.writeable = num_rays.flags.writeable = False
        return dataclasses.replace(
            self,
            samples=[self.samples[i] for i in idx],
            levels=levels,
            num_rays=num_rays,
            hashes=tuple(self.hashes[i] for i in idx),
            log=ReadLog(errors=self.log.errors),
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"DatasetView(samples={len(self)}, seed={self.seed}, on_error={self.on_error!r}, "
            f"samples_per_subvolume={self.samples_per_subvolume}, "
            f"transform={'None' if self.transform is None else type(self.transform).__name__}, "
            f"ray_store={type(self.ray_store).__name__})"
        )

    # -- limits ----------------------------------------------------------------------------

    @property
    def budget(self) -> int | None:
        """Rows the transform keeps (``transforms.ray_budget``), or None."""
        return ray_budget(self.transform)

    def available(self) -> np.ndarray:
        """(K,) int64 rows each sample may yield: ``min(num_rays, samples_per_subvolume,
        budget)`` (a fresh, writable array)."""
        return available_rays(self.num_rays, self.samples_per_subvolume, self.budget)

    def available_rays(self, index: int) -> int:
        """Rows sample ``index`` may yield: ``min(num_rays, samples_per_subvolume, budget)``."""
        k = min_ignoring_none(
            self.samples[index]["num_rays"], self.samples_per_subvolume, self.budget
        )
        return int(k)

    def known_bad(self, errors: Mapping[int, tuple[str, str]]) -> KnownBad:
        """The bad samples ``errors`` (index -> (file, first line)) known before reading, with
        this view's levels, rows (:meth:`available`) and seed: their replacements in a whole
        epoch's batches (:class:`~gpuloader.plan.replace.KnownBad`)."""
        return KnownBad(errors, self.levels, self.available(), self.seed)

    # -- reading ---------------------------------------------------------------------------

    def normalize_index(self, index: int) -> int:
        """``index`` in ``[0, K)`` (a negative one counts from the end).

        Raises:
            IndexError: out of range.
        """
        n = len(self.samples)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample index {index} out of range for {n} samples")
        return i

    def voxels(self, index: int) -> np.ndarray:
        """Grid of sample ``index`` through the cache: (D, H, W) bool, read-only; with
        ``check_grid_hash`` a sub-volume's grid (level >= 1) is checked against its hash
        when it is read (a cached grid was checked then)."""
        s = self.samples[self.normalize_index(index)]
        key = (s["level"], s["hash"])
        expect = str(s["hash"]) if self.check_grid_hash and int(s["level"]) >= 1 else None
        return self.voxel_cache.get_or_load(
            key, lambda: read_voxel_file(s["voxel_path"], expected_hash=expect)
        )

    def read_sample(self, index: int, epoch: int, num_rays: int | None = None) -> dict[str, Any]:
        """The raw, untransformed sample: numpy arrays with on-disk dtypes (module doc).

        Args:
            index: sample position in ``samples``.
            epoch: epoch of the ray draw.
            num_rays: most rays wanted (None: no limit beyond the view's own).

        Returns:
            dict with ``voxels`` (1, D, H, W) bool read-only, the ray arrays of k rows,
            ``view_positions`` (V, 3) float32, ``level``, ``hash``, ``chunk_idx`` (0
            unless ``rays_per_chunk`` is set), ``index``, ``epoch``.
        """
        i = self.normalize_index(index)
        epoch = int(epoch)
        s = self.samples[i]
        n = int(s["num_rays"])
        k = min_ignoring_none(n, self.samples_per_subvolume, num_rays, self.budget)
        rows = None if k >= n else select_rows(n, k, self.seed, epoch, i)
        rays = self.ray_store.read(s, rows)
        sample: dict[str, Any] = {"voxels": self.voxels(i)[None]}
        sample.update(rays)
        sample["level"] = int(s["level"])
        sample["hash"] = str(s["hash"])
        sample["chunk_idx"] = int(s.get("chunk_idx", 0))  # 0 without rays_per_chunk, as HEAD
        sample["index"] = i
        sample["epoch"] = epoch
        return sample

    def error_file(self, index: int, exc: BaseException) -> str:
        """The file that bad sample ``index``'s error ``exc`` is about: the error's ``path``,
        else the sample's voxel or ray file named in its message, else its ray file."""
        path = getattr(exc, "path", None)
        if path:
            return str(path)
        s = self.samples[index]
        text = str(exc)
        for key in ("voxel_path", "ray_path"):
            if str(s.get(key)) in text:
                return str(s[key])
        return str(s.get("ray_path"))

    def bad_entry(self, index: int, exc: BaseException) -> tuple[str, str]:
        """``(file, first line of the error)`` of bad sample ``index``."""
        return self.error_file(index, exc), first_line(exc)

    def replacements(self, index: int, epoch: int, rays: int) -> Iterator[int]:
        """Candidates for bad sample ``index``, in order (``replace.replacement_order``:
        samples holding at least ``rays`` rays, same level first, keyed by (seed, epoch,
        index))."""
        return replacement_order(self.levels, self.available(), index, rays, self.seed, epoch)

    def read_sample_checked(
        self, index: int, epoch: int, num_rays: int | None = None
    ) -> dict[str, Any]:
        """:meth:`read_sample` under the ``on_error`` policy (dataset doc).

        With ``'skip'``, a bad sample comes back as its replacement, with ``skipped_from``
        (the bad index) and ``skip_error``; the bad file is recorded in :attr:`log` (and
        warned about once). Raises the bad sample's error when no other sample can replace
        it, and every error :func:`~gpuloader.format.validate.classify` does not call a bad
        file.
        """
        try:
            return self.read_sample(index, epoch, num_rays)
        except Exception as exc:
            if self.on_error != "skip" or classify(exc) is None:
                raise
            first = exc
        i = self.normalize_index(index)
        epoch = int(epoch)
        log = self.log
        log.record(self.error_file(i, first), first)
        log.bad.add(i)
        rays = min_ignoring_none(
            int(self.samples[i]["num_rays"]), self.samples_per_subvolume, num_rays, self.budget
        )
        for j in self.replacements(i, epoch, int(rays)):
            if j in log.bad:
                continue
            try:
                sample = self.read_sample(j, epoch, rays)
            except Exception as exc:
                if classify(exc) is None:
                    raise
                log.record(self.error_file(j, exc), exc)
                log.bad.add(j)
                continue
            log.skipped += 1
            sample["skipped_from"] = i
            sample["skip_error"] = str(first).splitlines()[0]
            return sample
        raise first
