"""The torch Dataset: drop-in for upstream ``HierarchicalVoxelRayDataset``.

One item is one sub-volume (or, at level 0, one whole object) with some of its rays::

    voxels          (1, D, H, W) float32 tensor (0/1)
    origins         (N, 3) float32      directions (N, 3) float32
    distances       (N,)   float32      hits       (N,)   float32 (0/1)
    view_ids        (N,)   int64        face_ids   (N,)   int64
    view_positions  (V, 3) float32      one row per view, all of them
    level           int                 hash       str

Indices: an ``int`` (rays drawn with the dataset's current epoch, see :meth:`set_epoch`) or
a :class:`~gpuloader.plan.sampler.RayRequest` ``(index, epoch, num_rays)`` as yielded by
:class:`~gpuloader.plan.sampler.RayBatchSampler`; a request's epoch wins over the dataset's.

Rows read: ``k = min(n, samples_per_subvolume, request.num_rays, ray_budget(transform))``
(Nones ignored) and ``rows = rng.select_rows(n, k, seed, epoch, index)``: only those rows are
gathered, and the draw is a pure function of (seed, epoch, index), so it is the same in any
worker process.

Transforms get the seed's sample dict (torch tensors with the dtypes above), as upstream
transforms did, so a user's own callables keep working. They are called as
``apply_transform(transform, sample, SampleContext(seed, epoch, index))``: gpuloader
transforms draw from the dataset's counter-based streams, plain callables get
``transform(sample)``. The voxel tensor is a fresh float32 copy of the cached grid, so no
transform can corrupt the cache. :meth:`read_sample` gives the raw sample (numpy arrays with
the on-disk dtypes, voxels bool and read-only): that is what the GPU loader's reader uses.
The reading code itself is the dataset's :class:`~gpuloader.dataset.view.DatasetView`'s
(:meth:`view`: the samples, seed, ray store and options as one frozen, picklable value), which
the readers in worker processes hold instead of the dataset.

Bad files (``on_error``): every read is checked (:mod:`gpuloader.format.validate`). With
``on_error='raise'`` (default) the first bad file raises its named
:class:`~gpuloader.errors.DamagedFileError` (or :class:`~gpuloader.errors.DatasetLayoutError`
for a file removed after indexing), naming the file. With ``'skip'`` a bad sample is replaced
by the first good sample, in a permutation of the other samples keyed by (seed, epoch, bad
index) (:data:`~gpuloader.augment.rng.Purpose.REPLACE`), of the same level first, that holds
at least the rays the bad one would have given; it is read with that many rays, so batch
shapes and ray counts stay as promised, and it is that sample as the epoch draws it (so a
replacement is the same in every process and run). Files whose npz header cannot be read
when the index is built are left out of ``samples``. What is reported where:

* ``dataset.errors``: ``(file, first line of the error)`` of each bad file met *in this
  process*, and ``dataset.skipped`` the replacements made here. With DataLoader workers these
  live in the workers' copies: the main process's lists hold only what the index build and
  main-process reads met.
* every replacement sample carries ``skipped_from`` (the bad index) and ``skip_error``
  (``"<file>: <error>"``), in any process; :func:`~gpuloader.dataset.collate.collate_ray_batch`
  gathers them in the batch's ``skipped`` list, so the training loop sees every skip.
* a warning (``SkippedFileWarning``) per bad file, in the process that met it.

Errors that are not about one file (a stale pack, a bug) are raised under both policies.

The newer upstream API: ``rays_per_chunk=N`` makes each run of N consecutive rays of a file its
own item (``len`` counts chunks and ``chunk_idx`` numbers them, 0 without chunks;
``view_positions`` stays every view of the file); each chunk is an ordinary entry of
``samples`` (``num_rays`` its rows, ``ray_offset`` its first row), so the sampler, the stores
and the GPU loader see chunks as samples. ``sparse_voxels=True`` replaces ``voxels`` by
``voxel_pos`` (M, 3) float32 (x, y, z), ``voxel_features`` (M, 1) float32 and ``voxel_shape``
(3,) int64 (D, H, W), plus ``num_voxels`` int (``sparse_mode='coo'``) or ``voxel_edge_index``
(2, E) int64 (``'graph'``, ``sparse_connectivity`` 6, 18 or 26): see
:mod:`gpuloader.format.sparse`. The transform runs on the dense grid first, so a symmetry moves
the sparse voxels with the rays."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from gpuloader.augment.rng import SampleContext
from gpuloader.augment.transforms import Compose, Transform, apply_transform
from gpuloader.dataset.output import SAMPLE_DTYPES, to_output, to_sparse
from gpuloader.dataset.view import ON_ERROR, DatasetView, ReadLog
from gpuloader.errors import SkippedFileWarning
from gpuloader.format.chunks import chunk_samples
from gpuloader.format.index import Isolation, build_index
from gpuloader.plan.sampler import RayRequest
from gpuloader.stores.cache import LRUCache
from gpuloader.stores.npz import NpzRayStore, RayStore

__all__ = ["SAMPLE_DTYPES", "HierarchicalVoxelRayDataset", "SkippedFileWarning"]


def _levels_argument(levels: Any) -> list[int] | None:
    """The ``levels`` argument as sorted distinct ints >= 0 (one int means ``[it]``).

    Raises:
        TypeError: not None, an int or a sequence of ints. ValueError: empty, or negative.
    """
    allowed = "None, an int >= 0 or a sequence of them"
    if levels is None:
        return None
    if isinstance(levels, (int, np.integer)) and not isinstance(levels, bool):
        levels = [levels]
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__"):
        raise TypeError(f"HierarchicalVoxelRayDataset: levels must be {allowed}; got {levels=}")
    entries = list(levels)
    bad = [lv for lv in entries if isinstance(lv, bool) or not isinstance(lv, (int, np.integer))]
    if bad:
        raise TypeError(
            f"HierarchicalVoxelRayDataset: levels must be {allowed}; got levels={levels!r} "
            f"({bad[0]!r} is a {type(bad[0]).__name__})"
        )
    if not entries or min(entries) < 0:
        raise ValueError(
            f"HierarchicalVoxelRayDataset: levels must be {allowed} (not empty; None means "
            f"every level); got levels={levels!r}"
        )
    return sorted({int(lv) for lv in entries})


def _check_levels_exist(
    given: Any,
    levels: list[int],
    samples: list[dict[str, Any]],
    ray_dir: Path,
    split: str,
    listing: Sequence[tuple[Any, ...]] | None = None,
) -> None:
    """Refuse levels asked for that the ray dataset has no folder ``level_<L>/`` of (no
    file of, in a pack's ``listing`` where there is one).

    Raises:
        ValueError: names the missing levels, those the dataset and the split have.
    """
    in_split = {int(s["level"]) for s in samples}
    missing = [lv for lv in levels if lv not in in_split]
    if not missing:
        return
    if listing is not None:
        present = sorted({int(entry[0]) for entry in listing})
    else:
        present = sorted(
            int(p.name[6:]) for p in ray_dir.glob("level_*") if p.is_dir() and p.name[6:].isdigit()
        )
    absent = [lv for lv in missing if lv not in present]
    if absent:
        raise ValueError(
            f"HierarchicalVoxelRayDataset: levels={given!r}: level(s) {absent} not in the "
            f"dataset; {ray_dir} has levels {present} (split {split!r}: {sorted(in_split)}); "
            "choose levels among those"
        )


class HierarchicalVoxelRayDataset(Dataset):
    """Voxel grids with their rays, one sample per (level, sub-volume) of a split.

    Args:
        dataset_dir: voxel dataset root (metadata.json, splits.json, objects/, subvolumes/).
        ray_dataset_dir: ray dataset root (level_<L>/<hh>/<hash>_rays.npz).
        split: "train", "val" or "test".
        levels: keep only these octree levels: ints >= 0, or one int (``2`` means ``[2]``);
            None: all. A level the ray dataset does not have raises ValueError naming it
            and the levels it has; entries that are not ints raise TypeError.
        samples_per_subvolume: most rays read per sample (None: all).
        cache_size: voxel grids kept in the per-process LRU cache (0 disables).
        include_empty: keep all-empty sub-volumes (skipped by default).
        transform: gpuloader transform or any callable ``sample -> sample`` (torch dicts).
        seed: seed of every random draw (rays, augmentations; sampler default).
        isolation: "shared" (upstream: val/test may reuse sub-volumes of train objects) or
            "strict" (val/test drop every non-trivial sub-volume a train object uses).
        ray_store: where rays are read from (default: the npz files).
        rays_per_chunk: cut each ray file into items of this many consecutive rays (the
            newer upstream's argument; None: one item per file).
        sparse_voxels: give the grid as sparse voxels instead of ``voxels`` (module doc).
        sparse_mode: "coo" (points) or "graph" (points and neighbour edges).
        sparse_connectivity: neighbours of the graph: 6, 18 or 26.
        on_error: "raise" (stop at the first bad file, naming it) or "skip" (replace a bad
            sample reproducibly, record it: module doc).
        allow_outside: serve files and folders that symlinks lead outside the two roots
            (refused by default, as object IDs that are not plain names always are).
        check_grid_hash: check each sub-volume's grid (level >= 1), when it is read, against
            its hash (the SHA-256 of its bytes, the file's name): a file holding another
            sub-volume's grid raises ``GridHashError`` (or is skipped). Off by default (a
            hash per grid read, under 1 ms per MB); ``gpuloader verify`` always checks.

    Raises:
        DatasetLayoutError, NoSamplesError, DamagedFileError: see :mod:`gpuloader.format.index`.
    """

    def __init__(
        self,
        dataset_dir: Path | str,
        ray_dataset_dir: Path | str,
        split: str = "train",
        levels: Sequence[int] | None = None,
        samples_per_subvolume: int | None = None,
        cache_size: int = 100,
        include_empty: bool = False,
        transform: Any = None,
        seed: int = 42,
        isolation: Isolation = "shared",
        ray_store: RayStore | None = None,
        rays_per_chunk: int | None = None,
        sparse_voxels: bool = False,
        sparse_mode: str = "coo",
        sparse_connectivity: int = 6,
        on_error: str = "raise",
        allow_outside: bool = False,
        check_grid_hash: bool = False,
    ) -> None:
        if samples_per_subvolume is not None and samples_per_subvolume < 0:
            raise ValueError(f"samples_per_subvolume must be >= 0; got {samples_per_subvolume}")
        if sparse_mode not in ("coo", "graph"):
            raise ValueError(f"sparse_mode must be 'coo' or 'graph'; got {sparse_mode!r}")
        if sparse_connectivity not in (6, 18, 26):
            raise ValueError(f"sparse_connectivity must be 6, 18 or 26; got {sparse_connectivity}")
        if rays_per_chunk is not None and int(rays_per_chunk) < 1:
            raise ValueError(f"rays_per_chunk must be >= 1 or None; got {rays_per_chunk}")
        self.rays_per_chunk = None if rays_per_chunk is None else int(rays_per_chunk)
        self.sparse_voxels, self.sparse_mode = bool(sparse_voxels), sparse_mode
        self.sparse_connectivity = int(sparse_connectivity)
        self.dataset_dir, self.ray_dataset_dir = Path(dataset_dir), Path(ray_dataset_dir)
        self.split = split
        self.levels = _levels_argument(levels)
        self.samples_per_subvolume, self.include_empty = samples_per_subvolume, include_empty
        self.transform = transform
        self.seed = int(seed)
        self.isolation = isolation
        self.epoch = 0
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be 'raise' or 'skip'; got {on_error!r}")
        self.on_error, self.allow_outside = on_error, bool(allow_outside)
        self.check_grid_hash = bool(check_grid_hash)
        #: what reads met in this process (``errors``, ``skipped``; shared with the view)
        self.read_log = ReadLog()
        index_errors: list[tuple[str, BaseException]] = []
        # a pack lists the tree's files with their ray counts: no scan, no header reads
        listing = getattr(ray_store, "ray_listing", None)
        listing = listing(self.ray_dataset_dir, self.levels) if listing is not None else None
        self.samples: list[dict[str, Any]] = build_index(
            self.dataset_dir,
            self.ray_dataset_dir,
            split=split,
            levels=self.levels,
            include_empty=include_empty,
            isolation=isolation,
            errors=index_errors if on_error == "skip" else None,
            ray_files=listing,
            allow_outside=allow_outside,
        )
        if self.levels is not None:
            _check_levels_exist(
                levels, self.levels, self.samples, self.ray_dataset_dir, split, listing
            )
        if self.rays_per_chunk is not None:
            self.samples = chunk_samples(self.samples, self.rays_per_chunk)
        self.voxel_cache: LRUCache[np.ndarray] = LRUCache(cache_size)
        self.ray_store: RayStore = ray_store if ray_store is not None else NpzRayStore()
        for file, exc in index_errors:
            self.read_log.record(file, exc)

    # -- bookkeeping ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, samples={len(self)}, "
            f"levels={sorted(self.get_level_distribution())}, seed={self.seed})"
        )

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by integer indices (a RayRequest carries its own)."""
        self.epoch = int(epoch)

    def samples_fingerprint(self) -> str:
        """A short hash of the sample list (level, hash, ray count of each, in order): two
        datasets with the same fingerprint index the same samples the same way."""
        import hashlib

        h = hashlib.sha1(str(len(self.samples)).encode())
        for s in self.samples:
            h.update(f"|{s['level']}:{s['hash']}:{s['num_rays']}".encode())
        return h.hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs of the dataset: its ``epoch`` (integer indices), and its
        ``seed``, ``split`` and sample-list fingerprint to check that it is the same data."""
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "split": self.split,
            "num_samples": len(self.samples),
            "fingerprint": self.samples_fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s epoch (checks are made only for keys present).

        Raises:
            ValueError: the state belongs to another seed, split or sample list.
        """
        mine = self.state_dict()
        for key in ("seed", "split", "num_samples", "fingerprint"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: the state was saved with "
                    f"{key}={state[key]!r}, this dataset has {key}={mine[key]!r}; resume with "
                    "the same dataset, split, levels and seed"
                )
        self.set_epoch(int(state.get("epoch", self.epoch)))

    def get_level_distribution(self) -> dict[int, int]:
        """``{level: number of samples}``, levels ascending (sub-volumes, not chunks)."""
        files = {(s["level"], s["hash"]) for s in self.samples}
        counts = Counter(level for level, _ in files)
        return dict(sorted(counts.items()))

    def available_rays(self, index: int) -> int:
        """Rows a sample may yield: ``min(num_rays, samples_per_subvolume, ray_budget)``."""
        return self.view().available_rays(index)

    def cache_info(self) -> dict[str, int | float]:
        """Voxel cache counters of this process: hits, misses, size, capacity, hit_rate."""
        return self.voxel_cache.info()

    # -- bad files (on_error) ------------------------------------------------------------

    @property
    def errors(self) -> list[tuple[str, str]]:
        """``(file, first line of its error)`` of every bad file met in this process."""
        return self.read_log.errors

    @errors.setter
    def errors(self, value: list[tuple[str, str]]) -> None:
        self.read_log.errors = value

    @property
    def skipped(self) -> int:
        """Bad samples replaced in this process (``on_error='skip'``)."""
        return self.read_log.skipped

    @skipped.setter
    def skipped(self, value: int) -> None:
        self.read_log.skipped = int(value)

    def error_file(self, index: int, exc: BaseException) -> str:
        """The file bad sample ``index``'s error ``exc`` is about (``DatasetView.error_file``)."""
        return self.view().error_file(index, exc)

    def bad_entry(self, index: int, exc: BaseException) -> tuple[str, str]:
        """``(file, first line of the error)`` of bad sample ``index``."""
        return self.view().bad_entry(index, exc)

    def read_sample_checked(
        self, index: int, epoch: int | None = None, num_rays: int | None = None
    ) -> dict[str, Any]:
        """:meth:`read_sample` under the ``on_error`` policy (module doc).

        With ``'skip'``, a bad sample comes back as its replacement, with ``skipped_from``
        (the bad index) and ``skip_error``. Raises the bad sample's error when no other sample
        can replace it, and every error :func:`~gpuloader.format.validate.classify` does not
        call a bad file. (:meth:`DatasetView.read_sample_checked`; ``epoch`` None: the
        dataset's epoch.)
        """
        epoch = self.epoch if epoch is None else int(epoch)
        return self.view().read_sample_checked(index, epoch, num_rays)

    # -- reading -------------------------------------------------------------------------

    def view(self) -> DatasetView:
        """The dataset as readers see it (:class:`~gpuloader.dataset.view.DatasetView`): its
        samples, seed, ray store, ``on_error``, ``samples_per_subvolume``, transform and
        sparse options as they are now, with this dataset's voxel cache and read log.

        Cached: made again when one of those attributes has been set to another value
        (``dataset.transform = ...``; a new ``samples`` list, or one of another length).
        """
        v = self.__dict__.get("_view")
        if v is None or not self._view_current(v):
            v = DatasetView.build(
                self.samples,
                seed=self.seed,
                ray_store=self.ray_store,
                on_error=self.on_error,
                samples_per_subvolume=self.samples_per_subvolume,
                transform=self.transform,
                sparse_voxels=self.sparse_voxels,
                sparse_mode=self.sparse_mode,
                sparse_connectivity=self.sparse_connectivity,
                check_grid_hash=self.check_grid_hash,
                voxel_cache=self.voxel_cache,
                log=self.read_log,
            )
            self._view = v
        return v

    def _view_current(self, v: DatasetView) -> bool:
        """``v`` shows this dataset's attributes as they are now."""
        return (
            v.samples is self.samples
            and len(v.hashes) == len(self.samples)
            and v.ray_store is self.ray_store
            and v.transform is self.transform
            and v.voxel_cache is self.voxel_cache
            and v.log is self.read_log
            and v.seed == self.seed
            and v.on_error == self.on_error
            and v.samples_per_subvolume == self.samples_per_subvolume
            and v.sparse_voxels == self.sparse_voxels
            and v.sparse_mode == self.sparse_mode
            and v.sparse_connectivity == self.sparse_connectivity
            and v.check_grid_hash == getattr(self, "check_grid_hash", False)
        )

    def voxels(self, index: int) -> np.ndarray:
        """Grid of sample ``index`` through the cache: (D, H, W) bool, read-only."""
        return self.view().voxels(index)

    def read_sample(
        self, index: int, epoch: int | None = None, num_rays: int | None = None
    ) -> dict[str, Any]:
        """The raw, untransformed sample: numpy arrays with on-disk dtypes (module doc;
        :meth:`DatasetView.read_sample`).

        Args:
            index: sample position in ``self.samples``.
            epoch: epoch of the ray draw (None: the dataset's current epoch).
            num_rays: most rays wanted (None: no limit beyond the dataset's own).

        Returns:
            dict with ``voxels`` (1, D, H, W) bool read-only, ray arrays of k rows,
            ``view_positions`` (V, 3), ``level``, ``hash``, ``index``, ``epoch``.
        """
        epoch = self.epoch if epoch is None else int(epoch)
        return self.view().read_sample(index, epoch, num_rays)

    def __getitem__(self, idx: int | RayRequest) -> dict[str, Any]:
        if isinstance(idx, RayRequest):
            index, epoch, num_rays = idx
        elif isinstance(idx, tuple) and len(idx) == 3:
            index, epoch, num_rays = idx
        else:
            index, epoch, num_rays = idx, None, None
        epoch = self.epoch if epoch is None else int(epoch)
        sample = self.view().read_sample_checked(index, epoch, num_rays)  # warns from here
        i, epoch = sample.pop("index"), sample.pop("epoch")
        skip = {k: sample.pop(k) for k in ("skipped_from", "skip_error") if k in sample}
        if self.transform is not None and _plans_only(self.transform):
            # known transforms only: applied to the numpy arrays, then converted once
            context = SampleContext(self.seed, epoch, i)
            sample = to_output(apply_transform(self.transform, sample, context))
        else:
            sample = to_output(sample)
            if self.transform is not None:
                context = SampleContext(self.seed, epoch, i)
                sample = apply_transform(self.transform, sample, context)
                sample = to_output(sample)
        sample.update(skip)
        if self.sparse_voxels:
            sample = to_sparse(sample, self.sparse_mode, self.sparse_connectivity)
        return sample


def _plans_only(transform: Any) -> bool:
    """Whether ``transform`` is made only of known, plan-drawn transforms (no custom callable,
    no ToDevice, no overridden ``__call__``): it then gives the same values applied to the
    numpy raw sample as to the output tensors, so the dataset applies it before converting."""
    if isinstance(transform, Transform):
        if type(transform).__call__ is not Transform.__call__:
            return False
        transform = Compose([transform])
    if not isinstance(transform, Compose):
        return False
    return bool(transform.segments) and all(isinstance(s, list) for s in transform.segments)
