"""The skip ledger of ``GPURayLoader`` (``on_error='skip'``): what was replaced, and why.

Bad samples are replaced by the rule of :mod:`gpuloader.plan.replace`, exactly as the CPU API
replaces them:

* bad samples known before reading (found by a store's fill, recorded in a pack, or by their
  headers) are replaced in every epoch's batches: :meth:`SkipLedger.known_bad` turns the
  sampler into a :class:`~gpuloader.plan.replace.SkippingSampler` for the whole-batch sources
  (resident store, pack stream); with ``on_error='raise'`` it raises the first one's error;
* the per-sample reader replaces them as it reads (``read_sample_checked`` in the workers, the
  replaced index in ``meta``): :meth:`SkipLedger.bad_line` reads the error's first line
  again here (only numbers cross the worker channel).

:meth:`SkipLedger.with_skips` wraps an epoch's batches: each batch carries ``skipped``
(``(position, bad index, error)``, as ``collate_ray_batch``'s), :attr:`SkipLedger.skipped`
counts the replacements, :attr:`SkipLedger.errors` lists ``(file, first line)`` of every bad
file met in the order met (first those the dataset already lists: the files its index build
left out, whose npz header could not be read), and each epoch that replaced samples ends with one
:class:`~gpuloader.errors.SkippedFileWarning` naming them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from gpuloader.dataset.view import DatasetView
from gpuloader.errors import DamagedFileError, SkippedFileWarning
from gpuloader.plan.replace import SkippingSampler
from gpuloader.reading.headers import find_bad

__all__ = ["SkipLedger"]


class SkipLedger:
    """Errors, replacements and the known-bad sampler of one loader (module doc).

    Args:
        view: the loader's view of the dataset (its samples, seed, ``on_error`` and the
            loader's transform, whose ray budget a replacement must hold).
    """

    def __init__(self, view: DatasetView) -> None:
        self.view = view
        self.on_error = view.on_error
        #: ``(file, first line of its error)`` of every bad file met, in the order met
        self.errors: list[tuple[str, str]] = []
        #: samples replaced so far
        self.skipped = 0
        #: the sampler with known bad samples replaced (None: none known)
        self.skipping: SkippingSampler | None = None
        self._bad_lines: dict[int, str] = {}
        # files the index build left out (on_error='skip': their npz header could not be
        # read), and any bad file the dataset met in this process before the loader
        for file, line in list(view.log.errors):
            self.note(file, line)

    def note(self, file: str, line: str) -> None:
        """Record a bad file (once)."""
        if all(f != file for f, _ in self.errors):
            self.errors.append((file, line))

    def bad_line(self, index: int) -> str:
        """First line of the error of sample ``index``, which a worker found bad and
        replaced (read again here: only numbers cross the worker channel)."""
        got = self._bad_lines.get(index)
        if got is None:
            file, got = find_bad(self.view, index)
            self._bad_lines[index] = got
            self.note(file, got)
        return got

    def known_bad(
        self, sampler: Any, bad: dict[int, tuple[str, str]], held: np.ndarray | None = None
    ) -> Any:
        """The sampler for whole-batch sources: bad samples known before reading (a store's
        fill, a pack's manifest, bad headers) replaced in every epoch's batches.

        Args:
            sampler: the loader's RayBatchSampler.
            bad: index -> (file, first line of its error).
            held: the samples a resident store holds (replacements come from these), or None.

        Raises:
            DamagedFileError: ``bad`` is not empty and ``on_error`` is "raise".
        """
        if not bad:
            return sampler
        if self.on_error != "skip":  # a store filled under skip has no data for these
            _, (_, line) = min(bad.items())
            raise DamagedFileError(
                f"{line} (left out of the store as bad; this loader has on_error='raise': "
                "use on_error='skip', or repair the file and fill the store again)"
            )
        for file, line in bad.values():
            self.note(file, line)
        known = self.view.known_bad(bad)
        if held is not None:  # replacements come from the samples the store holds
            outside = np.ones(len(known.available), bool)
            outside[held] = False
            known.available[outside] = -1
        self.skipping = SkippingSampler(sampler, known)
        return self.skipping

    def with_skips(
        self, it: Iterator[dict[str, Any]], epoch: int, start: int
    ) -> Iterator[dict[str, Any]]:
        """``it`` (the batches of ``epoch`` from ``start``) with each batch's ``skipped`` list
        (module doc), counted in :attr:`skipped`; at the end of the epoch one warning naming
        the bad files met."""
        plan = self.skipping.skipped(epoch) if self.skipping is not None else None
        met: dict[int, str] = {}
        try:
            for i, batch in enumerate(it, start):
                got = plan[i] if plan is not None else batch.get("skipped", [])
                if got:
                    batch["skipped"] = list(got)
                    self.skipped += len(got)
                    met.update((bad, line) for _, bad, line in got)
                yield batch
            if met:  # each error's first line names its file
                warnings.warn(
                    f"GPURayLoader: epoch {epoch}: {len(met)} bad samples replaced "
                    f"(on_error='skip'): {'; '.join(sorted(set(met.values())))}",
                    SkippedFileWarning,
                    stacklevel=2,
                )
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
