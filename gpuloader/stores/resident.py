"""Resident stores: every sample of a dataset's split held whole where batches are made.

A :class:`ResidentStore` holds the split's rays, view positions and grids concatenated in
dataset order, as flat arrays (numpy in host RAM, or CuPy in device memory; in RAM the
per-ray arrays are views of one ``records`` array of 40-byte ``fused_numpy.RAY_RECORD``s, so
that gathering a ray touches one cache line, not six)::

    origins, directions   (R, 3) float32      every ray of every sample
    distances             (R,)   float32
    hits                  (R,)   uint8
    view_ids, face_ids    (R,)   int32
    view_positions        (V, 3) float32      every view of every sample
    grids                 (G,)   uint8        every grid, flat, C order (z, y, x), 0/1

and a :class:`~gpuloader.stores.layout.StoreLayout` (host int64 arrays by dataset index:
``ray_start``, ``ray_count``, ``view_start``, ``view_count``, ``grid_start``, ``side``) that
says where each sample lives. A batch is then one fused gather from these arrays
(:mod:`gpuloader.fused.cpu`, :mod:`gpuloader.fused.cuda`): nothing is decompressed or read
from disk after the fill.

The fill (:func:`gpuloader.reading.fill.fill_store`) reads every file of the split once, in
parallel worker processes; ``store="auto"``'s choice is :mod:`gpuloader.stores.budget`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gpuloader import schema
from gpuloader.stores.layout import StoreLayout

__all__ = ["ResidentStore", "STORE_KEYS"]

#: (dtype, trailing shape) of every array of a store
STORE_KEYS = schema.STORE_KEYS


@dataclass
class ResidentStore:
    """A split held whole (module doc).

    Attributes:
        arrays: name -> flat array (:data:`STORE_KEYS`), numpy (host) or CuPy (gpu).
        layout: where each dataset sample lives (host int64 arrays).
        location: "host" or "gpu".
        fill_seconds: how long the fill took.
        bad: samples left out as bad (``on_error='skip'``): index -> (file, first line of
            its error); their places are never read (loaders replace them, module doc of
            :mod:`gpuloader.plan.replace`).
    """

    arrays: dict[str, Any]
    layout: StoreLayout
    location: str
    fill_seconds: float = 0.0
    #: the dataset indices held (sorted), or None for every sample (``fill_store(indices)``)
    held: np.ndarray | None = None

    @property
    def bad(self) -> dict[int, tuple[str, str]]:
        return self.layout.bad

    @property
    def nbytes(self) -> int:
        """Bytes held (the ray fields of a record array counted once)."""
        skip = set(schema.RAY_FIELDS) if "records" in self.arrays else set()
        return int(sum(int(a.nbytes) for k, a in self.arrays.items() if k not in skip))

    def __repr__(self) -> str:
        return (
            f"ResidentStore(location={self.location!r}, samples={len(self.layout.side)}, "
            f"rays={int(self.layout.ray_count.sum())}, {self.nbytes / 2**20:.1f} MiB)"
        )
