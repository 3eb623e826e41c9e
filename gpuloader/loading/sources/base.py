"""The contract of a batch source: what ``GPURayLoader`` iterates.

A source turns the sampler's order into the dicts of ``collate_ray_batch`` (built by
:func:`gpuloader.loading.sources.batch_dict.batch_dict`), one epoch at a time:

* ``batches(epoch, start)`` yields the batches of ``epoch`` from batch ``start`` on (a resumed
  epoch reads nothing before ``start``). A batch is valid until the source reuses its
  tensors: never, except on the GPU ring of a resident store, which overwrites a batch once
  ``ring`` (3) further batches have been taken; ``clone()`` what you keep longer.
* A :class:`~gpuloader.errors.WorkerError` raised while iterating leaves the source usable:
  the broken workers are stopped, and the next ``batches`` call starts new ones.
* ``close()`` stops every worker and frees what the source holds; it is idempotent, and a
  closed source is not iterated again.

The sources: :class:`~gpuloader.loading.sources.resident.FusedBatches` (a resident store),
:class:`~gpuloader.loading.sources.pack_stream.StreamBatches` (whole batches from a pack),
:class:`~gpuloader.loading.sources.sample_stream.SampleStream` (the per-sample reader),
:class:`~gpuloader.loading.sources.striped.StripedBatches` (a striped pack's stripes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

__all__ = ["BatchSource"]


class BatchSource(ABC):
    """Batches of an epoch from a start batch; ``close`` (module doc)."""

    @abstractmethod
    def batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of ``epoch`` from batch ``start`` on (module doc)."""

    def close(self) -> None:  # noqa: B027 - a source that holds no workers has nothing to stop
        """Stop the source's workers and free what it holds (idempotent)."""

    def __call__(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """:meth:`batches` (shorthand)."""
        return self.batches(epoch, start)
