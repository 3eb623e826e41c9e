"""``StoreLayout``: where each dataset sample lives in a store (rows, views, grid bytes).

Made from the files' headers (:func:`estimate_layout`), from a pack's index, or by a store's
fill; cut to a rank's samples (:func:`take_layout`) and spread back (:func:`spread_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gpuloader import schema

__all__ = [
    "StoreLayout",
    "packed_layout",
    "spread_layout",
    "starts_of",
    "store_bytes",
    "take_layout",
]


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


def starts_of(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def packed_layout(
    rays: np.ndarray, views: np.ndarray, sides: np.ndarray, bad: dict[int, tuple[str, str]]
) -> StoreLayout:
    """Samples one after the other in every array: starts from the counts."""
    return StoreLayout(
        ray_start=starts_of(rays),
        ray_count=rays,
        view_start=starts_of(views),
        view_count=views,
        grid_start=starts_of(sides**3),
        side=sides,
        bad=bad,
    )


def take_layout(layout: StoreLayout, held: np.ndarray) -> StoreLayout:
    """The layout of a store holding only samples ``held`` (sorted dataset indices), in
    their order, compact; its index ``j`` is dataset sample ``held[j]``."""
    held = np.asarray(held, dtype=np.int64)
    rays, views, sides = layout.ray_count[held], layout.view_count[held], layout.side[held]
    where = {int(i): j for j, i in enumerate(held.tolist())}
    bad = {where[i]: v for i, v in layout.bad.items() if i in where}
    return packed_layout(rays, views, sides, bad)


def spread_layout(local: StoreLayout, held: np.ndarray, k: int) -> StoreLayout:
    """A compact layout of samples ``held`` (:func:`take_layout`) indexed by dataset index
    again (``k`` samples): the others hold nothing (zero counts and sides)."""
    held = np.asarray(held, dtype=np.int64)
    out = {}
    for name in ("ray_start", "ray_count", "view_start", "view_count", "grid_start", "side"):
        a = np.zeros(k, dtype=np.int64)
        a[held] = getattr(local, name)
        out[name] = a
    bad = {int(held[j]): v for j, v in local.bad.items()}
    return StoreLayout(**out, bad=bad)


def store_bytes(layout: StoreLayout) -> int:
    """Bytes a store of ``layout`` takes (rays, views and grids)."""
    return int(
        layout.ray_count.sum() * schema.RAY_BYTES
        + layout.view_count.sum() * 12
        + (layout.side.astype(np.int64) ** 3).sum()
    )
