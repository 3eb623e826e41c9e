"""Per-sample reader outputs as batches, for the torch DataLoader back end (loader and fill).

:class:`ReaderDataset` maps a request to the reader's outputs (in a worker), :class:`EpochBatches`
is the batch sampler of an epoch's requests (from a start batch), :func:`keep_batch` the
collate that keeps the list, and :func:`raw_from_samples` concatenates a batch's outputs into
a :class:`~gpuloader.reading.pipeline.RawBatch`, as DALI's pipeline gives it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from gpuloader.reading.pipeline import RawBatch
from gpuloader.reading.reader import OUTPUT_NAMES, RayReader

__all__ = ["EpochBatches", "ReaderDataset", "keep_batch", "raw_from_samples"]


class ReaderDataset(torch.utils.data.Dataset):
    """Map-style view of a reader for the torch DataLoader back end: request -> outputs."""

    def __init__(self, reader: RayReader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader.dataset.samples)

    def __getitem__(self, request: Any) -> tuple[np.ndarray, ...]:
        return self.reader.read(request)


class EpochBatches:
    """Batch sampler for the torch back end: the reader's batches of ``self.epoch``, from
    batch ``self.start`` on (a resumed epoch)."""

    def __init__(self, reader: RayReader) -> None:
        self.reader = reader
        self.epoch = 0
        self.start = 0

    def __iter__(self) -> Iterator[list]:
        return iter(self.reader.batches(self.epoch)[self.start :])

    def __len__(self) -> int:
        return max(0, len(self.reader.batches(self.epoch)) - self.start)


def keep_batch(batch: list) -> list:
    return batch


def raw_from_samples(samples: list[tuple[np.ndarray, ...]]) -> RawBatch:
    """Per-sample reader outputs -> a RawBatch of concatenated numpy arrays."""
    arrays: dict[str, Any] = {}
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for j, name in enumerate(OUTPUT_NAMES):
        if name == "meta":
            continue
        parts = [s[j] for s in samples]
        shapes[name] = [tuple(p.shape) for p in parts]
        if name == "voxels":
            parts = [p.reshape(-1) for p in parts]
        arrays[name] = np.concatenate(parts, axis=0)
    meta = np.stack([s[OUTPUT_NAMES.index("meta")] for s in samples]).astype(np.int64)
    return RawBatch(arrays=arrays, shapes=shapes, meta=meta)
