"""The order of a striped level's samples: grouped by the splits that use them.

An epoch of one split reads, in each stripe file, the rows of that split's samples. In hash
order those lie between the other splits' (a val sample every few train ones), so a local
read skips through the file and an object store gets one range request per short run.
:class:`SplitOrder` orders a level's samples by the set of splits that use each
(:data:`SPLIT_GROUPS`), hash order within a group, so that the train and val splits are one
run of every stripe file and test two. Readers look samples up by hash and need no order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gpuloader.errors import GPULoaderError
from gpuloader.format.index import split_membership
from gpuloader.format.listing import read_splits

__all__ = ["SPLIT_GROUPS", "SplitOrder"]

#: the rank of each set of splits in a striped level's order: train's samples are ranks
#: 0-3, val's 2-5, test's 1-2 and 5-6 (a sample in no split, or unknown, comes last)
SPLIT_GROUPS: dict[frozenset[str], int] = {
    frozenset(g): r
    for r, g in enumerate(
        [
            {"train"},
            {"train", "test"},
            {"train", "val", "test"},
            {"train", "val"},
            {"val"},
            {"val", "test"},
            {"test"},
        ]
    )
}


class SplitOrder:
    """The split-grouped order of a dataset's levels (``splits.json`` read once).

    Args:
        dataset_dir: the voxel side (holds ``splits.json``).
    """

    def __init__(self, dataset_dir: Path | str) -> None:
        self.dataset_dir = Path(dataset_dir)
        self._splits: tuple[dict[str, str], dict, set[str]] | None = None

    def _read(self) -> tuple[dict[str, str], dict, set[str]]:
        if self._splits is None:
            try:
                sp = read_splits(self.dataset_dir)
                self._splits = (
                    {str(k): str(v) for k, v in sp["object_splits"].items()},
                    dict(sp.get("hash_object_usage") or {}),
                    set(sp.get("trivial_hashes") or ()),
                )
            except (GPULoaderError, OSError, AttributeError, TypeError, ValueError):
                self._splits = ({}, {}, set())  # unreadable: hash order
        return self._splits

    def of(self, level: int, hashes: Sequence[str]) -> np.ndarray:
        """The pack order of a level's samples given in hash order: (K,) int64 indices into
        ``hashes``, grouped by :data:`SPLIT_GROUPS`, hash order within a group (all of it
        when ``splits.json`` cannot be read)."""
        objects, usage, trivial = self._read()
        ranks = []
        for h in hashes:
            try:
                member = frozenset(split_membership(h, level, objects, usage, trivial))
            except (AttributeError, TypeError):  # a malformed usage entry: last
                member = frozenset()
            ranks.append(SPLIT_GROUPS.get(member, len(SPLIT_GROUPS)))
        return np.argsort(np.array(ranks, dtype=np.int64), kind="stable")
