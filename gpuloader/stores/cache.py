"""A least-recently-used cache of voxel grids.

``LRUCache`` is an ``OrderedDict`` kept in use order: a hit moves the key to the end
(``move_to_end``, O(1)), an insert past capacity drops the oldest (``popitem(last=False)``,
O(1)). ``capacity == 0`` disables caching (every lookup is a miss, nothing is kept).

Values are shared between callers, so numpy arrays are stored read-only
(``arr.flags.writeable = False``): a caller that tries to write into a cached grid gets
``ValueError: assignment destination is read-only`` instead of silently corrupting every
later sample. Copy before modifying.

Each DataLoader worker process holds its own cache (the dataset is pickled into workers).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import numpy as np

__all__ = ["LRUCache"]

V = TypeVar("V")


def _freeze(value: V) -> V:
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
    return value


class LRUCache(Generic[V]):
    """LRU map with hit/miss counters; thread-safe.

    Args:
        capacity: most entries kept; 0 disables the cache.
    """

    def __init__(self, capacity: int) -> None:
        capacity = int(capacity)
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0; got {capacity}")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._data.keys())

    def get(self, key: Hashable) -> V | None:
        """The value (marking it most recently used), or None; counts a hit or a miss."""
        with self._lock:
            try:
                value = self._data[key]
            except KeyError:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: V) -> V:
        """Insert (numpy arrays made read-only), evicting the least recently used entry."""
        value = _freeze(value)
        if self.capacity == 0:
            return value
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)
        return value

    def get_or_load(self, key: Hashable, load: Callable[[], V]) -> V:
        """Cached value, or ``load()`` inserted and returned (load runs outside the lock)."""
        value = self.get(key)
        if value is None:
            value = self.put(key, load())
        return value

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        with self._lock:
            self._data.clear()
            self.hits = 0
            self.misses = 0

    def info(self) -> dict[str, int | float]:
        """``{'hits', 'misses', 'size', 'capacity', 'hit_rate'}``."""
        total = self.hits + self.misses
        return {
            "hits": self.hits,
            "misses": self.misses,
            "size": len(self._data),
            "capacity": self.capacity,
            "hit_rate": self.hits / total if total else 0.0,
        }

    def __getstate__(self) -> dict:
        # Locks do not pickle; a copy sent to a worker starts with an empty cache.
        return {"capacity": self.capacity}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["capacity"])
