"""Reading an epoch's stripes of a striped pack, in the background: the striped store's
reader side (:mod:`gpuloader.loading.sources.striped` uses it).

An epoch ``e`` uses, at each level L, the ``k`` stripes ``(e + offset_L + t) mod S_L``,
``t = 0 .. k-1`` (:meth:`StripeReader.stripes_of`). :meth:`StripeReader.read` reads them in
one pass forward through each stripe file: the runs of consecutive samples the buffer holds
(``StripedLevel.read_stripe_ranges``, at most ``chunk_bytes`` per call) and nothing between
them (another split's or another rank's samples are not read). It writes them, widened to
the resident store's records, into one buffer in dataset order::

    records   (M * k * W,) schema.RAY_RECORD   the M samples read (row >= 0), in dataset
                                               order: sample d in slot m = slots[d], rows
                                               [m*k*W, (m+1)*k*W), stripe t of its k at
                                               [m*k*W + t*W, ...)
    slots     (K,) int64                       each dataset sample's slot (-1: not read)
    distinct  (K,) int64                       leading rows of sample d that are distinct
                                               (the rows an epoch may keep; module doc of
                                               gpuloader.loading.sources.striped)

A sample with row -1 (bad, or held by another rank) has no slot and keeps zero rows; the
samples of a rank's contiguous range of the pack order (``RayBatchSampler(shard_keys=...)``)
lie in one byte range of each stripe file.

Double buffer (:meth:`StripeReader.prefetch`, :meth:`StripeReader.get`): one background
thread reads the next epoch while this one trains; the reader keeps at most two epochs'
buffers (the one asked last and the one read ahead) plus one chunk of raw records. Every
wait is bounded: a read error is raised again in the consumer (its first line names the
stripe file); a read that takes over ``timeout`` seconds raises :class:`PackError` naming
the file it was reading.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from gpuloader import schema
from gpuloader.augment import rng
from gpuloader.errors import GPULoaderError, PackError
from gpuloader.reading.widen import widen_into
from gpuloader.stores.pack.striped import StripedLevel

__all__ = [
    "EpochStripes",
    "StripeReader",
    "chunk_runs",
    "distinct_rows",
    "row_runs",
    "stripe_offset",
]

#: counter index of the stripe offset draw (Purpose.STRIPE, epoch = level): far from any
#: pack-time file index, so the offset never shares a stream with a sample's permutation
_OFFSET_INDEX = 0x7FFFFFFF


def stripe_offset(seed: int, level: int, stripes: int) -> int:
    """The stripe epoch 0 uses at ``level``: a pure function of the loader ``seed``, in
    ``[0, stripes)``."""
    words = rng.random_words(int(seed), int(level), _OFFSET_INDEX, rng.Purpose.STRIPE, 0)
    return int(np.asarray(words).reshape(-1)[0]) % max(1, int(stripes))


def distinct_rows(n: np.ndarray, w: int, stripes: int, first: int, k: int) -> np.ndarray:
    """Leading distinct rows of the ``k`` stripes ``first, first+1, ... (mod S)``, laid one
    after the other, of samples of ``n`` rays: (K,) int64.

    Slot j of stripe s holds place ``(s*W + j) mod n``. Without a wrap past stripe S-1 (or
    when ``n`` places fit before it) the places are consecutive mod n: ``min(n, k*W)``
    distinct. With a wrap after ``R1 = (S - first)*W`` rows the places restart at 0, so the
    rows run distinct up to the first place of the arc ``[a, a + R1)`` (``a = first*W mod n``)
    met again: ``min(k*W, R1 + a)`` when the arc ends by n, else ``R1``.
    """
    n = np.asarray(n, dtype=np.int64)
    w, s, first, k = int(w), int(stripes), int(first), int(k)
    full = np.minimum(n, k * w)
    if first + k <= s:
        return full
    r1 = (s - first) * w
    a = (first * w) % np.maximum(n, 1)
    wrapped = np.where(a + r1 <= n, np.minimum(k * w, r1 + a), r1)
    return np.where(r1 >= n, full, np.minimum(full, wrapped)).astype(np.int64)


def row_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """The runs ``(first, num)`` of consecutive values in sorted unique ``rows``."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return []
    cut = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [rows.size]])
    return [(int(rows[a]), int(b - a)) for a, b in zip(starts, ends, strict=True)]


def chunk_runs(runs: list[tuple[int, int]], per_chunk: int) -> list[list[tuple[int, int]]]:
    """``runs`` grouped, in order, into reads of at most ``per_chunk`` rows (a longer run is
    cut)."""
    out: list[list[tuple[int, int]]] = [[]]
    room = per_chunk
    for first, num in runs:
        while num:
            if room == 0:
                out.append([])
                room = per_chunk
            take = min(num, room)
            out[-1].append((first, take))
            first, num, room = first + take, num - take, room - take
    return [c for c in out if c]


@dataclass
class EpochStripes:
    """One epoch's stripes in a resident buffer (module doc).

    Attributes:
        epoch: the epoch. records: (M * k * W,) RAY_RECORD. distinct: (K,) int64.
        stripes: level -> the stripes read, in buffer order.
    """

    epoch: int
    records: np.ndarray
    distinct: np.ndarray
    stripes: dict[int, tuple[int, ...]]


class StripeReader:
    """The stripes of each epoch, read ahead in one background thread (module doc).

    Args:
        levels: level -> its StripedLevel (one pack, one W).
        sample_levels: (K,) int64 level of each dataset sample.
        rows: (K,) int64 each sample's row in its level's index (-1: bad or another rank's,
            not read).
        per_epoch: k, the stripes an epoch uses at each level (beyond S_L they repeat, and
            only the distinct rows count: :func:`distinct_rows` of ``min(k, S_L)``).
        seed: the loader's seed (the stripe offsets, :func:`stripe_offset`).
        timeout: seconds a wait for a read may take before :class:`PackError`.
        chunk_bytes: largest raw read (one stripe range of consecutive samples).
    """

    def __init__(
        self,
        levels: Mapping[int, StripedLevel],
        sample_levels: np.ndarray,
        rows: np.ndarray,
        per_epoch: int,
        seed: int,
        timeout: float = 60.0,
        chunk_bytes: int = 64 << 20,
    ) -> None:
        self.levels = dict(levels)
        self.sample_levels = np.asarray(sample_levels, dtype=np.int64)
        self.rows = np.asarray(rows, dtype=np.int64)
        read = self.rows >= 0
        #: (K,) int64 each sample's slot in the buffer (-1: not read)
        self.slots = np.where(read, np.cumsum(read) - 1, -1).astype(np.int64)
        self.num_slots = int(read.sum())
        widths = {lv.stripe_rays for lv in self.levels.values()}
        if len(widths) != 1:
            raise ValueError(f"the levels of one pack have one stripe width; got {widths}")
        self.w = widths.pop()
        self.k = max(1, int(per_epoch))
        self.timeout = float(timeout)
        self.chunk_bytes = max(1, int(chunk_bytes))
        self.offsets = {L: stripe_offset(seed, L, lv.stripes) for L, lv in self.levels.items()}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._job: tuple[int, Future] | None = None  # (epoch, its read) in flight or done
        self._kept: dict[int, EpochStripes] = {}
        self._reading: list[str] = [""]  # the file the background read is at (for errors)

    @property
    def row_stride(self) -> int:
        """Rows of one sample in the buffer: k * W."""
        return self.k * self.w

    def stripes_of(self, epoch: int) -> dict[int, tuple[int, ...]]:
        """level -> the stripes ``epoch`` uses there, in buffer order (module doc)."""
        out = {}
        for L, lv in self.levels.items():
            first = (int(epoch) + self.offsets[L]) % lv.stripes
            out[L] = tuple((first + t) % lv.stripes for t in range(self.k))
        return out

    def read(self, epoch: int, where: list[str] | None = None) -> EpochStripes:
        """The stripes of ``epoch``, read now (module doc). ``where[0]`` is set to the file
        being read. Raises what ``read_stripe`` raises (named pack errors), an OSError as a
        :class:`PackError` naming the stripe file."""
        where = where if where is not None else [""]
        kw = self.row_stride
        records = np.zeros(self.num_slots * kw, dtype=schema.RAY_RECORD)
        out = records.reshape(self.num_slots, self.k, self.w)
        distinct = np.zeros(len(self.rows), dtype=np.int64)
        stripes = self.stripes_of(epoch)
        for L, lv in self.levels.items():
            mine = np.flatnonzero((self.sample_levels == L) & (self.rows >= 0))
            if mine.size == 0:
                continue
            rows = self.rows[mine]
            order = np.argsort(rows, kind="stable")
            mine, rows = mine[order], rows[order]
            distinct[mine] = distinct_rows(
                lv.n_rays[rows], self.w, lv.stripes, stripes[L][0], min(self.k, lv.stripes)
            )
            per_chunk = max(1, self.chunk_bytes // (self.w * lv.record_bytes))
            for t, s in enumerate(stripes[L]):
                where[0] = str(lv.stripe_path(s))
                self._read_level(lv, s, t, rows, self.slots[mine], per_chunk, out, where[0])
        return EpochStripes(int(epoch), records, distinct, stripes)

    def _read_level(
        self,
        lv: StripedLevel,
        s: int,
        t: int,
        rows: np.ndarray,
        slots: np.ndarray,
        per_chunk: int,
        out: np.ndarray,
        path: str,
    ) -> None:
        """Stripe ``s`` of the level's samples ``rows`` (sorted; buffer slots ``slots``)
        into ``out[slots, t]``: one pass forward through the stripe file, reading the runs
        of consecutive rows (:func:`row_runs`) and nothing between them, at most
        ``per_chunk`` rows per call."""
        want = np.unique(rows)
        scratch = np.empty(min(per_chunk, want.size) * self.w * lv.record_bytes, np.uint8)
        for chunk in chunk_runs(row_runs(want), per_chunk):
            try:
                raw = lv.read_stripe_ranges(s, chunk, out=scratch)
            except GPULoaderError:
                raise
            except OSError as exc:
                raise PackError(f"{path}: reading stripe {s} failed: {exc}") from exc
            got_rows = np.concatenate([np.arange(a, a + n) for a, n in chunk])
            sel = np.flatnonzero((rows >= got_rows[0]) & (rows <= got_rows[-1]))
            src = np.searchsorted(got_rows, rows[sel])  # the row of raw of each sample
            widen_into(raw, src, slots[sel], t, out)  # without the GIL (reading/widen.py)

    # -- the double buffer -------------------------------------------------------------------

    def prefetch(self, epoch: int) -> None:
        """Start reading ``epoch`` in the background (nothing when it is kept or in flight).
        Buffers of epochs other than the one asked last and ``epoch`` are dropped."""
        epoch = int(epoch)
        with self._lock:
            if epoch in self._kept or (self._job is not None and self._job[0] == epoch):
                return
        self._settle()  # at most one read in flight: a stale one ends (bounded) first
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="gpuloader-stripes")
            where = [""]
            self._reading = where
            self._job = (epoch, self._pool.submit(self.read, epoch, where))

    def get(self, epoch: int) -> EpochStripes:
        """The stripes of ``epoch``: kept, read ahead (waited for, bounded), or read now.
        Keeps it and drops any other epoch's buffer. A failed read ahead raises its error
        once; the next call reads again."""
        epoch = int(epoch)
        with self._lock:
            got = self._kept.get(epoch)
            job = self._job
        if got is None and job is not None and job[0] == epoch:
            try:
                got = self._wait(job[1])
            finally:  # a read that ended (well or not) is dropped: a later get reads again
                if job[1].done():
                    with self._lock:
                        if self._job is job:
                            self._job = None
        if got is None:
            self._settle()
            got = self.read(epoch)
        with self._lock:
            self._kept = {epoch: got}
        return got

    def _hung(self) -> PackError:
        return PackError(
            f"{self._reading[0] or 'a stripe file'}: the background stripe read did not "
            f"finish in {self.timeout:g} s (storage hung or too slow); raise "
            "worker_timeout or check the pack's file system"
        )

    def _wait(self, fut: Future) -> EpochStripes:
        """The read's stripes, or its error; :class:`PackError` after ``timeout``."""
        try:
            return fut.result(timeout=self.timeout)
        except FutureTimeout:
            raise self._hung() from None

    def _settle(self) -> None:
        """Wait (bounded) for a read in flight and drop it: its errors are not this epoch's."""
        with self._lock:
            job, self._job = self._job, None
        if job is None:
            return
        try:
            job[1].result(timeout=self.timeout)
        except FutureTimeout:
            raise self._hung() from None
        except Exception:  # noqa: BLE001, S110 - a dropped read's error is not this epoch's
            pass

    @property
    def buffers(self) -> int:
        """Epoch buffers held now (kept plus one read ahead): at most two."""
        with self._lock:
            return len(self._kept) + (self._job is not None)

    def close(self) -> None:
        """Drop the buffers; the background thread ends after its read (not waited for)."""
        with self._lock:
            self._kept = {}
            job, self._job = self._job, None
            pool, self._pool = self._pool, None
        if job is not None:
            job[1].cancel()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
