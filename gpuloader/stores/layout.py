"""``StoreLayout``: where each dataset sample lives in a store (rows, views, grid bytes).

Made from the files' headers (:func:`estimate_layout`), from a pack's index, or by a store's
fill; cut to a rank's samples (:func:`take_layout`) and spread back (:func:`spread_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["StoreLayout"]


@dataclass
class StoreLayout:
    """Where each dataset sample lives in a store: (K,) int64 arrays by dataset index.

    ``ray_start``/``ray_count`` rows of the ray arrays, ``view_start``/``view_count`` rows of
    ``view_positions``, ``grid_start`` first byte of the flat grid store, ``side`` grid side.
    ``bad``: samples found bad (``on_error='skip'``) -> (file, first line of the error);
    their places are never read (the epoch's batches replace them).
    """

    ray_start: np.ndarray
    ray_count: np.ndarray
    view_start: np.ndarray
    view_count: np.ndarray
    grid_start: np.ndarray
    side: np.ndarray
    bad: dict[int, tuple[str, str]] = field(default_factory=dict)
