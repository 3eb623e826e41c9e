"""The striped pack: each sample's rays permuted once, cut into stripes of W rows, stripe-major.

Built by ``gpuloader pack RAY_DIR OUT --layout striped [--stripe-rays W] [--seed S]`` (or
``pack_rays(..., layout="striped", stripe_rays=W, seed=S)``; writer in
:mod:`gpuloader.stores.pack.striped_build`); opened by :class:`PackedRayStore` like any pack,
whose :meth:`~gpuloader.stores.pack.store.PackedRayStore.striped_level` gives a
:class:`StripedLevel` (this module) to a streaming store. An epoch then reads one stripe per
level: one sequential read, or one contiguous byte range per rank.

Files (``manifest.json``: format ``gpuloader-ray-pack``, ``format_version`` 2,
``"layout": "striped"``, ``stripe_rays`` W, ``seed``, ``dataset_dir`` (the voxel side),
``voxel_files``, and per level in ``level_info[L]``: ``files`` K_L, ``rays`` N_L, ``views``
V_L, ``stripes`` S_L, ``record`` (the record dtype as ``np.dtype.descr``), ``record_bytes``
R, ``grid_bytes`` G_L, ``file_bytes``)::

    level_<L>/stripe_<s>.bin      s = 0 .. S_L-1. Raw records, no header: stripe s of every
                                  sample of the level, in pack order, W records per sample:
                                  sample i's stripe is bytes [i*W*R, (i+1)*W*R)
    level_<L>/index.npz           one row per sample i (K_L samples, pack order):
                                    hashes      (K,)   str     sample hash (level 0: object ID)
                                    n_rays      (K,)   int64   n_i, the rays of its ray file
                                    ray_start   (K,)   int64   its first row in positions.npy
                                    view_start  (K,)   int64   first view in view_positions
                                    view_count  (K,)   int64   its views V_i
                                    grid_start  (K,)   int64   grid start in grids.npy
                                    side        (K,)   int64   grid side (grid: side**3 bytes)
                                    keys        (K, 4) uint32  Feistel round keys of its
                                                               permutation
                                    pack_id     ()     str     the build (as the manifest's)
    level_<L>/grids.npy           (G_L,) uint8 0/1: sample i's (side, side, side) grid, C order
                                  (z, y, x), at [grid_start_i, grid_start_i + side_i**3)
    level_<L>/view_positions.npy  (V_L, 3) float32: sample i's views at
                                  [view_start_i, view_start_i + view_count_i)
    level_<L>/positions.npy       (N_L,) uint16 (uint32 when a sample has over 65,536 rays):
                                  positions[ray_start_i + r] = p, the place of file row r of
                                  sample i in its permutation (stripe p // W, slot p % W);
                                  only the CPU API (``read``) uses it

Pack order: the level's ray files grouped by the splits that use each sample (train only,
train and test, all three (trivial), train and val, val only, val and test, test only, none:
``split_order.SPLIT_GROUPS``), sorted by hash within a group, minus the files left out as
bad (``on_error="skip"``); so one split's samples are one run of each stripe file (test:
two), read forward without gaps (from disk) or in few range requests (object storage).
Readers look samples up by hash (the index's ``hashes``) and need no particular order.
The unit is a ray file: a dataset's chunks (``rays_per_chunk``) are row ranges of one file,
read through ``positions.npy``.

Record (:func:`record_dtype`; the level's is in the manifest, :func:`level_record`): a packed
(``align=False``), little-endian structured dtype, one ray, fields in
:data:`gpuloader.schema.RECORD_ORDER`::

    field       dtype              byte offset (u1 views / <u2 views / <i4 views)
    origins     (3,) <f4           0
    directions  (3,) <f4           12
    distances   <f4                24
    view_ids    u1 | <u2 | <i4     28
    face_ids    u1                 29 / 30 / 32
    hits        u1                 30 / 31 / 33       R = 31 / 32 / 34 bytes

``view_ids`` is ``u1`` when the level's largest view count V_max <= 256, ``<u2`` when
V_max <= 65,536, else ``<i4``; ``face_ids`` is ``u1`` (0..5). Every packed file passed the
checks of :func:`gpuloader.format.validate.validate_rays` (``0 <= view_ids < V``, face ids
0..5), so its values fit, and the writer checks again before narrowing (a value that does
not fit stops the build, naming the file). ``hits`` is ``distances > 0``. A reader casts
back to the on-disk dtypes of :mod:`gpuloader.schema` (int32 ids).

Stripes (exactly; ``i`` a sample, ``n = n_i``, ``W`` = stripe_rays):

* ``keys_i = feistel_keys(seed, L, i0, Purpose.STRIPE)`` (:mod:`gpuloader.augment.rng`),
  ``i0`` the file's place in the level's build plan (before bad files were left out);
  stored in the index, so a reader never derives them. ``perm_i(p) = feistel_permute(p, n,
  keys_i)``: the file row at place p (a bijection of [0, n)).
* ``S_L = ceil(max_i n_i / W)``. Slot j (0 <= j < W) of stripe s of sample i holds file row
  ``perm_i((s*W + j) mod n)`` (:func:`stripe_rows`).
* ``n >= W``: a stripe's W rows are distinct (W consecutive places mod n). Stripes
  0 .. ceil(n/W)-1 hold places 0 .. n-1, so every row once; places from n on wrap around
  to the sample's own first places. Over the S_L stripes the row at place p appears
  ``S_L*W // n + (p < S_L*W % n)`` times: exactly once when ``n = S_L*W`` (a largest sample
  whose n is a multiple of W), else once or more, the counts of two rows differing by at
  most one.
* ``n < W``: slots j >= n repeat slot ``j mod n`` (the slot is fixed-size). A reader keeps
  the first ``min(n, W)`` slots (:attr:`StripedLevel.distinct`): all n rows, in the order of
  a rotation by ``s*W mod n``, as ``RandomRaySubsample`` keeps every row of a sample with
  fewer rows than it asks for.

So within one stripe each sample's kept rows are a uniform random subset of its rays
(without repeats), and over any S_L consecutive stripes (cyclically) every ray of every
sample is used at least once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpuloader import schema
from gpuloader.augment.rng import (
    FEISTEL_ROUNDS,
    Purpose,
    feistel_keys,
    feistel_permute,
    random_words,
)
from gpuloader.errors import IncompletePackError, PackLayoutError, StalePackError
from gpuloader.stores.files import LocalPackFiles, PackFiles, load_npy, load_npz
from gpuloader.stores.pack.manifest import INDEX, MANIFEST, level_dir

__all__ = [
    "GRIDS",
    "INDEX_KEYS",
    "POSITIONS",
    "VIEWS",
    "StripedLevel",
    "id_dtype",
    "level_keys",
    "level_record",
    "positions_dtype",
    "record_dtype",
    "record_from_descr",
    "sample_keys",
    "stripe_count",
    "stripe_name",
    "stripe_places",
    "stripe_rows",
]

GRIDS = "grids.npy"
VIEWS = "view_positions.npy"
POSITIONS = "positions.npy"
#: per-sample arrays of a striped level's ``index.npz`` (besides ``pack_id``)
INDEX_KEYS: tuple[str, ...] = (
    "hashes",
    "n_rays",
    "ray_start",
    "view_start",
    "view_count",
    "grid_start",
    "side",
    "keys",
)
_ID_FIELDS = ("view_ids", "face_ids")


# ------------------------------------------------------------------------------ the record


def id_dtype(bound: int) -> np.dtype:
    """The smallest id dtype holding ``0 .. bound-1``: ``u1`` (bound <= 256), ``<u2``
    (<= 65,536), else ``<i4`` (the on-disk dtype)."""
    if bound <= 1 << 8:
        return np.dtype("u1")
    if bound <= 1 << 16:
        return np.dtype("<u2")
    return np.dtype("<i4")


def record_dtype(view_ids: Any = "u1", face_ids: Any = "u1") -> np.dtype:
    """One ray as a packed little-endian record (fields of :data:`schema.RECORD_ORDER`),
    with the given id dtypes; the float fields and ``hits`` as :mod:`gpuloader.schema`."""
    narrow = {"view_ids": np.dtype(view_ids), "face_ids": np.dtype(face_ids)}
    fields = []
    for name in schema.RECORD_ORDER:
        f = schema.field(name)
        dt = narrow.get(name, f.disk).newbyteorder("<")
        fields.append((name, dt.str, f.shape) if f.shape else (name, dt.str))
    return np.dtype(fields, align=False)


def level_record(max_views: int) -> np.dtype:
    """The record of a level whose files hold at most ``max_views`` views: ``view_ids``
    :func:`id_dtype` (max_views), ``face_ids`` ``u1`` (6 faces)."""
    return record_dtype(id_dtype(int(max_views)), id_dtype(6))


def record_from_descr(descr: Sequence[Sequence[Any]]) -> np.dtype:
    """The record dtype from its manifest form (``np.dtype.descr`` through JSON)."""
    return np.dtype(
        [
            (str(d[0]), str(d[1]), tuple(d[2])) if len(d) > 2 else (str(d[0]), str(d[1]))
            for d in descr
        ]
    )


def positions_dtype(max_rays: int) -> np.dtype:
    """dtype of ``positions.npy``: ``<u2`` when no sample has over 65,536 rays, else
    ``<u4``."""
    return np.dtype("<u2") if max_rays <= 1 << 16 else np.dtype("<u4")


# ------------------------------------------------------------------------------ the stripes


def stripe_name(s: int) -> str:
    """File name of stripe ``s``: ``stripe_<s>.bin``."""
    return f"stripe_{int(s)}.bin"


def stripe_count(max_rays: int, stripe_rays: int) -> int:
    """S_L = ceil(max_rays / W): stripes of a level whose largest file has ``max_rays``."""
    return max(1, -(-int(max_rays) // int(stripe_rays)))


def sample_keys(seed: int, level: int, i: int) -> np.ndarray:
    """The round keys of the permutation of the ``i``-th file of level ``level`` in the
    build plan: (4,) uint32 (``feistel_keys(seed, level, i, Purpose.STRIPE)``)."""
    return feistel_keys(seed, int(level), int(i), Purpose.STRIPE)


def level_keys(seed: int, level: int, k: int) -> np.ndarray:
    """:func:`sample_keys` of files ``0 .. k-1`` of a level at once: (k, 4) uint32."""
    index = np.arange(int(k), dtype=np.int64)[:, None]
    words = random_words(seed, int(level), index, Purpose.STRIPE, np.arange(FEISTEL_ROUNDS))
    return np.ascontiguousarray(words[..., 0])


def stripe_places(n: int, stripe_rays: int, s: int) -> np.ndarray:
    """Places of stripe ``s``'s W slots in a sample's permutation: (W,) int64
    ``(s*W + j) mod n``."""
    w = int(stripe_rays)
    return (int(s) * w + np.arange(w, dtype=np.int64)) % int(n)


def stripe_rows(n: int, stripe_rays: int, s: int, keys: np.ndarray) -> np.ndarray:
    """File rows of stripe ``s`` of a sample of ``n`` rays with round ``keys``: (W,) int64
    (the module doc's rule; slots j >= n repeat when n < W)."""
    return feistel_permute(stripe_places(n, stripe_rays, s), int(n), keys)


# ------------------------------------------------------------------------------ reading


class StripedLevel:
    """One level of an open striped pack (the module doc's files).

    Attributes:
        level: L. stripe_rays: W. stripes: S_L. record: the record dtype; record_bytes: R.
        hashes (K,) str; n_rays, ray_start, view_start, view_count, grid_start, side (K,)
        int64; keys (K, 4) uint32: the index. distinct: (K,) int64 ``min(n_rays, W)``, the
        slots of a stripe a reader keeps per sample. row: hash -> sample i.
        grids: (G_L,) uint8 and view_positions: (V_L, 3) float32, read-only memory maps.
        positions: (N_L,) uint16/uint32 memory map (file row -> place).

    Raises:
        IncompletePackError: a file of the level is missing.
        StalePackError: the level was written by another build (``pack_id``).
    """

    def __init__(
        self,
        pack_dir: Path | str,
        level: int,
        pack_id: str,
        info: dict[str, Any],
        files: PackFiles | None = None,
    ) -> None:
        self.files: PackFiles = LocalPackFiles(pack_dir) if files is None else files
        self.pack_dir = pack_dir if self.files.remote else Path(pack_dir)
        self.level = int(level)
        self.dir = level_dir(Path("."), level).name  # "level_<L>", the files' folder
        where = self.files.where(self.dir)
        try:
            arrays = load_npz(self.files, self._name(INDEX), ("pack_id", *INDEX_KEYS))
            got_id = str(arrays.pop("pack_id"))
            if got_id != pack_id:
                raise StalePackError(
                    f"ray pack {pack_dir} was rebuilt while in use (pack id {got_id}, opened "
                    f"as {pack_id}); open the store again"
                )
            self.grids: np.ndarray = load_npy(self.files, self._name(GRIDS))
            self.view_positions: np.ndarray = load_npy(self.files, self._name(VIEWS))
        except FileNotFoundError as exc:
            raise IncompletePackError(
                f"{where}: {exc.filename or exc} is missing; the pack is damaged: rebuild it "
                f"(gpuloader pack RAY_DIR {pack_dir} --force --layout striped)"
            ) from exc
        self._positions: np.ndarray | None = None
        self.pack_id = str(pack_id)
        self.stripe_rays = int(info["stripe_rays"])
        self.stripes = int(info["stripes"])
        self.record: np.dtype = record_from_descr(info["record"])
        self.record_bytes = int(self.record.itemsize)
        self.hashes: np.ndarray = arrays["hashes"]
        self.n_rays: np.ndarray = arrays["n_rays"].astype(np.int64, copy=False)
        self.ray_start: np.ndarray = arrays["ray_start"].astype(np.int64, copy=False)
        self.view_start: np.ndarray = arrays["view_start"].astype(np.int64, copy=False)
        self.view_count: np.ndarray = arrays["view_count"].astype(np.int64, copy=False)
        self.grid_start: np.ndarray = arrays["grid_start"].astype(np.int64, copy=False)
        self.side: np.ndarray = arrays["side"].astype(np.int64, copy=False)
        self.keys: np.ndarray = arrays["keys"].astype(np.uint32, copy=False)
        self.distinct: np.ndarray = np.minimum(self.n_rays, self.stripe_rays)
        self.row: dict[str, int] = {str(h): i for i, h in enumerate(self.hashes.tolist())}
        self._stripes: dict[int, np.ndarray] = {}

    def _name(self, name: str) -> str:
        """``level_<L>/<name>``, a file of the level in the pack."""
        return f"{self.dir}/{name}"

    @property
    def positions(self) -> np.ndarray:
        """(N_L,) uint16/uint32 ``positions.npy`` (file row -> place): memory-mapped on
        disk, fetched whole on first use from object storage (only the CPU API's ``read``
        needs it)."""
        if self._positions is None:
            try:
                self._positions = load_npy(self.files, self._name(POSITIONS))
            except FileNotFoundError as exc:
                raise IncompletePackError(
                    f"{self.files.where(self._name(POSITIONS))} is missing; the pack is "
                    f"damaged: rebuild it (gpuloader pack RAY_DIR {self.pack_dir} --force "
                    "--layout striped)"
                ) from exc
        return self._positions

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_stripes"] = {}  # memory maps are reopened in the receiving process
        return state

    @property
    def num_samples(self) -> int:
        """K_L, the samples of the level."""
        return int(self.n_rays.shape[0])

    @property
    def stripe_bytes(self) -> int:
        """Bytes of one stripe file: K_L * W * R."""
        return self.num_samples * self.stripe_rays * self.record_bytes

    def stripe_name(self, s: int) -> str:
        """``level_<L>/stripe_<s>.bin``, the file's name in the pack (IndexError outside
        0 .. S_L-1)."""
        self._check_stripe(s)
        return self._name(stripe_name(s))

    def stripe_path(self, s: int) -> Path | str:
        """Stripe ``s``'s file: its Path in a local pack, its URL in a remote one
        (IndexError outside 0 .. S_L-1)."""
        where = self.files.where(self.stripe_name(s))
        return where if self.files.remote else Path(where)

    def stripe(self, s: int) -> np.ndarray:
        """Stripe ``s`` memory-mapped, read-only: (K_L, W) records (mapped once per process;
        a local pack only)."""
        got = self._stripes.get(int(s))
        if got is None:
            if not isinstance(self.files, LocalPackFiles):
                raise PackLayoutError(f"{self.stripe_path(s)}: a remote stripe is not mapped")
            got = np.memmap(self.stripe_path(s), dtype=self.record, mode="r")
            got = got.view(np.ndarray).reshape(self.num_samples, self.stripe_rays)
            self._stripes[int(s)] = got
        return got

    def read_stripe(
        self,
        s: int,
        first_sample: int = 0,
        num_samples: int | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Stripe ``s`` of samples ``first_sample .. first_sample + num_samples - 1`` (None:
        to the last), with one sequential read of bytes ``[first*W*R, (first+num)*W*R)``.

        Args:
            out: a preallocated C-contiguous, writable buffer of at least ``num*W*R`` bytes
                (any dtype: e.g. the ``.numpy()`` of a pinned uint8 torch tensor), filled
                from its start; None: a new array.

        Returns:
            (num, W) records of :attr:`record` (a view of ``out`` when given).
        """
        first = int(first_sample)
        num = self.num_samples - first if num_samples is None else int(num_samples)
        return self.read_stripe_ranges(s, [(first, num)], out)

    def read_stripe_ranges(
        self, s: int, ranges: Sequence[tuple[int, int]], out: np.ndarray | None = None
    ) -> np.ndarray:
        """Stripe ``s`` of several sample ranges ``(first, num)`` (ascending, not
        overlapping), one after the other: one pass forward through the stripe file, one
        read per range and nothing between them (a local file is read without the kernel's
        read-ahead, ``POSIX_FADV_RANDOM``, so neither the gaps nor what follows the last
        range are read; a remote one with concurrent range requests: :class:`PackFiles`).

        Args:
            out: as :meth:`read_stripe`'s, of at least ``sum(num)*W*R`` bytes.

        Returns:
            (sum(num), W) records of :attr:`record`, the ranges in order.
        """
        self._check_stripe(s)
        k, w, r = self.num_samples, self.stripe_rays, self.record_bytes
        ranges = [(int(a), int(n)) for a, n in ranges]
        end = 0
        for first, num in ranges:
            if first < end or num < 0 or first + num > k:
                raise IndexError(
                    f"samples [{first}, {first + num}) outside the {k} samples of level "
                    f"{self.level}, or not after the range before"
                )
            end = first + num
        total = sum(n for _, n in ranges)
        nbytes = total * w * r
        if out is None:
            raw = np.empty(nbytes, dtype=np.uint8)
        else:
            if not (isinstance(out, np.ndarray) and out.flags.c_contiguous and out.flags.writeable):
                raise ValueError("out must be a C-contiguous, writable numpy array")
            if out.nbytes < nbytes:
                raise ValueError(f"out holds {out.nbytes} bytes; stripe range needs {nbytes}")
            raw = out.reshape(-1).view(np.uint8)[:nbytes]
        if self.files.remote:
            self._check_current()
        spans = [(first * w * r, num * w * r) for first, num in ranges if num]
        self.files.read_spans(self.stripe_name(s), spans, memoryview(raw))
        return raw.view(self.record).reshape(total, w)

    def stripe_rows(self, i: int, s: int) -> np.ndarray:
        """File rows of sample ``i``'s stripe ``s``: (W,) int64 (:func:`stripe_rows`)."""
        self._check_stripe(s)
        return stripe_rows(int(self.n_rays[i]), self.stripe_rays, s, self.keys[i])

    def grid(self, i: int) -> np.ndarray:
        """Sample ``i``'s voxel grid: (side, side, side) uint8 0/1, read-only."""
        side, g0 = int(self.side[i]), int(self.grid_start[i])
        return self.grids[g0 : g0 + side**3].reshape(side, side, side)

    def views(self, i: int) -> np.ndarray:
        """Sample ``i``'s view positions: (V_i, 3) float32, read-only."""
        v0 = int(self.view_start[i])
        return self.view_positions[v0 : v0 + int(self.view_count[i])]

    def read_rows(self, i: int, file_rows: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``file_rows`` ((k,) int64 in [0, n_i), file order as asked) of sample ``i``,
        gathered from the stripes: the per-ray fields of :data:`schema.RAY_FIELDS`, fresh
        C-contiguous arrays with the on-disk dtypes (ids back to int32)."""
        file_rows = np.asarray(file_rows, dtype=np.int64)
        w = self.stripe_rays
        places = self.positions[self.ray_start[i] + file_rows].astype(np.int64)
        stripe_of, slot = np.divmod(places, w)
        slot += int(i) * w
        recs = np.empty(file_rows.shape[0], dtype=self.record)
        if recs.shape[0]:
            order = np.argsort(stripe_of, kind="stable")
            sorted_s = stripe_of[order]
            cuts = np.flatnonzero(np.diff(sorted_s)) + 1
            for part in np.split(order, cuts):
                st = int(stripe_of[part[0]])
                if isinstance(self.files, LocalPackFiles):
                    recs[part] = self.stripe(st).reshape(-1)[slot[part]]
                else:
                    recs[part] = self._fetch_records(st, slot[part])
        return {
            k: np.array(recs[k], dtype=schema.field(k).disk, order="C") for k in schema.RAY_FIELDS
        }

    def _check_current(self) -> None:
        """A remote pack's manifest still has the pack id this level was opened with (one
        small request): a pack replaced on the store mid-job is refused, not mixed."""
        raw = self.files.read_bytes(MANIFEST)
        try:
            got = str(json.loads(raw.decode("utf-8")).get("pack_id"))
        except (ValueError, UnicodeDecodeError, AttributeError):
            got = "an unreadable manifest"
        if got != self.pack_id:
            raise StalePackError(
                f"ray pack {self.pack_dir} was replaced on the store while in use (pack id "
                f"{got}, opened as {self.pack_id}); open the store again (restart the job)"
            )

    def _fetch_records(self, s: int, slots: np.ndarray) -> np.ndarray:
        """Records ``slots`` ((k,) int64 flat slots ``i*W + j``) of stripe ``s``, fetched as
        the byte spans of their distinct slots (runs of neighbours merged): (k,) records."""
        r = self.record_bytes
        uniq, back = np.unique(slots, return_inverse=True)
        cuts = np.flatnonzero(np.diff(uniq) != 1) + 1
        runs = np.split(uniq, cuts)
        spans = [(int(run[0]) * r, len(run) * r) for run in runs]
        raw = np.empty(uniq.shape[0] * r, dtype=np.uint8)
        self.files.read_spans(self.stripe_name(s), spans, memoryview(raw))
        return raw.view(self.record)[back]

    def _check_stripe(self, s: int) -> None:
        if not 0 <= int(s) < self.stripes:
            raise IndexError(f"stripe {s} outside 0 .. {self.stripes - 1} of level {self.level}")
