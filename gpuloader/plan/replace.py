"""Bad samples and their replacements (``on_error='skip'``): one rule for every path.

A bad sample ``i`` (a file that fails :mod:`gpuloader.format.validate`'s checks, or cannot
be read) asked for with ``rays`` rows is replaced by the first sample of
:func:`replacement_order` that is not bad: the other samples that may yield at least
``rays`` rows, those of ``i``'s level first, each group in a permutation keyed by
``(seed, epoch, i)`` (:data:`~gpuloader.augment.rng.Purpose.REPLACE`). The replacement is
read with ``rays`` rows, as the epoch draws it (its own row choice and augmentation), so the
batch keeps its shapes and ray counts and the result is the same in every process and run.

The dataset applies the rule per read (``DatasetView.read_sample_checked``,
finding bad files as it reads them). When the bad samples are known before reading (a
resident store's fill, a pack's manifest), :class:`KnownBad` applies it to a whole epoch's
batches at once and :class:`SkippingSampler` hands those batches to the batch builders; the
two give the same samples, since a candidate the dataset finds bad is one the fill found bad.

Each replacement is reported as ``(position in the batch, bad index, error)`` (the batch's
``skipped`` list of :func:`~gpuloader.dataset.collate.collate_ray_batch`), the error being the
first line of the bad file's error, which names the file.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from gpuloader.augment.rng import Purpose, permutation
from gpuloader.errors import DamagedFileError
from gpuloader.plan.sampler import RayRequest, order_only

__all__ = ["KnownBad", "SkippingSampler", "available_rays", "replacement_order"]

#: one replacement of a batch: (position in the batch, bad sample index, its error's first line)
Skip = tuple[int, int, str]


def replacement_order(
    levels: np.ndarray, available: np.ndarray, index: int, rays: int, seed: int, epoch: int
) -> Iterator[int]:
    """Candidates for bad sample ``index`` (module doc), in the order they are tried.

    Args:
        levels: (K,) int64 level of every sample.
        available: (K,) int64 rows every sample may yield (:func:`available_rays`).
        index: the bad sample. rays: rows it was asked for.
        seed, epoch: the dataset seed and the epoch of the read.
    """
    enough = np.asarray(available) >= int(rays)
    enough[int(index)] = False
    same = np.asarray(levels) == levels[int(index)]
    for group in (np.flatnonzero(enough & same), np.flatnonzero(enough & ~same)):
        if group.size:
            order = permutation(group.size, int(seed), int(epoch), Purpose.REPLACE, index=index)
            yield from (int(j) for j in group[order])


def available_rays(
    num_rays: np.ndarray, samples_per_subvolume: int | None, budget: int | None
) -> np.ndarray:
    """(K,) int64 rows each sample may yield: ``min(num_rays, samples_per_subvolume, budget)``
    (Nones ignored), as ``HierarchicalVoxelRayDataset.available_rays``."""
    out = np.asarray(num_rays, dtype=np.int64).copy()
    for limit in (samples_per_subvolume, budget):
        if limit is not None:
            out = np.minimum(out, int(limit))
    return out


class KnownBad:
    """Bad samples known before reading, and their replacements in an epoch's batches.

    Args:
        errors: bad sample index -> (file, first line of its error).
        levels: (K,) int64 level of every sample.
        available: (K,) int64 rows every sample may yield (:func:`available_rays`).
        seed: the dataset seed.
    """

    def __init__(
        self,
        errors: Mapping[int, tuple[str, str]],
        levels: np.ndarray,
        available: np.ndarray,
        seed: int,
    ) -> None:
        self.errors = {int(i): (str(f), str(m)) for i, (f, m) in errors.items()}
        self.levels = np.asarray(levels, dtype=np.int64)
        self.available = np.asarray(available, dtype=np.int64)
        self.seed = int(seed)

    @classmethod
    def of_dataset(
        cls, dataset: Any, errors: Mapping[int, tuple[str, str]], budget: int | None
    ) -> KnownBad:
        """For the samples of ``dataset`` (a HierarchicalVoxelRayDataset or its DatasetView:
        its ``samples``, ``samples_per_subvolume`` and ``seed``), with a transform that keeps
        ``budget`` rows. (A view's ``known_bad(errors)`` is the same, from its columns.)"""
        samples = dataset.samples
        levels = np.array([int(s["level"]) for s in samples], dtype=np.int64)
        counts = np.array([int(s["num_rays"]) for s in samples], dtype=np.int64)
        avail = available_rays(counts, dataset.samples_per_subvolume, budget)
        return cls(errors, levels, avail, int(dataset.seed))

    def __bool__(self) -> bool:
        return bool(self.errors)

    def replacement(self, index: int, epoch: int, rays: int) -> int:
        """The sample that replaces bad ``index`` asked for with ``rays`` rows in ``epoch``.

        Raises:
            DamagedFileError: no good sample holds that many rows (names the bad file).
        """
        for j in replacement_order(self.levels, self.available, index, rays, self.seed, epoch):
            if j not in self.errors:
                return j
        file, line = self.errors[int(index)]
        raise DamagedFileError(
            f"{line} (on_error='skip': no other sample of the split holds {rays} rays to "
            f"replace it; repair or regenerate {file})"
        )

    def apply(
        self, batches: Sequence[Sequence[RayRequest]]
    ) -> tuple[list[list[RayRequest]], list[list[Skip]]]:
        """``batches`` with every bad sample replaced, and each batch's replacements."""
        out: list[list[RayRequest]] = []
        skips: list[list[Skip]] = []
        for batch in batches:
            new, mine = list(batch), []
            for pos, req in enumerate(batch):
                i = int(req[0])
                if i not in self.errors:
                    continue
                epoch, asked = int(req[1]), req[2]
                rays = (
                    int(self.available[i])
                    if asked is None
                    else min(int(asked), int(self.available[i]))
                )
                new[pos] = RayRequest(self.replacement(i, epoch, rays), epoch, rays)
                mine.append((pos, i, self.errors[i][1]))
            out.append(new)
            skips.append(mine)
        return out, skips


class SkippingSampler:
    """A sampler's batches with the known bad samples replaced (``batches``), and the
    replacements of each batch (``skipped``); everything else is the sampler's.

    Picklable (the batch readers of the pack stream run in worker processes): the wrapped
    sampler is kept without its dataset (:func:`~gpuloader.plan.sampler.order_only`).
    """

    def __init__(self, sampler: Any, bad: KnownBad) -> None:
        self._inner = order_only(sampler)
        self.bad = bad
        self._cache: dict[int, tuple[list[list[RayRequest]], list[list[Skip]]]] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": {}}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_inner", "bad", "_cache"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)

    def _epoch(self, epoch: int) -> tuple[list[list[RayRequest]], list[list[Skip]]]:
        epoch = int(epoch)
        got = self._cache.get(epoch)
        if got is None:
            got = self.bad.apply(self._inner.batches(epoch))
            self._cache = {epoch: got}
        return got

    def batches(self, epoch: int) -> list[list[RayRequest]]:
        """The sampler's batches of ``epoch``, bad samples replaced."""
        return self._epoch(epoch)[0]

    def skipped(self, epoch: int) -> list[list[Skip]]:
        """Per batch of ``epoch``: its replacements ``(position, bad index, error)``."""
        return self._epoch(epoch)[1]
