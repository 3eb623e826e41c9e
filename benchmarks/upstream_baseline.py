"""BASELINE ONLY: the upstream loader's behaviour, re-implemented for benchmark comparisons.

This is **not** part of gpuloader and must not be used for training. It reproduces, from the
description in shared/format.md ("What the upstream loader gets wrong"), how the upstream
``HierarchicalVoxelRayDataset`` / ``RayBatchSampler`` / ``collate_ray_batch`` spend their time,
so that every throughput figure of gpuloader can be given as a ratio against it, measured in
the same run on the same data:

* every ``__getitem__`` opens the sample's ``*_rays.npz`` with ``np.load`` and decompresses
  **every** ray array in full (about 48,000 rays upstream, 8,000 in the demo preset), then
  keeps ``samples_per_subvolume`` randomly chosen rows (``np.random.choice`` without
  replacement, itself O(N));
* voxel grids go through a FIFO cache whose eviction is ``list.pop(0)`` (O(n)), held per
  DataLoader worker process;
* the batch sampler **ignores** ``rays_per_batch``: a batch is ``subvolumes_per_batch``
  samples with all the rays each one returns;
* the collate stacks grids with ``torch.stack`` (so a batch that mixes levels crashes);
* ``UpstreamRotation90`` turns the grid one way and the rays the other (the upstream defect:
  labels no longer match the grid for k = 1, 3). It exists only so the ``transform``
  benchmark pays the upstream cost; never train with it.

Two deliberate departures, so that the baseline runs on the same data as gpuloader:
level-0 grids are read from ``objects/object_<ID>/level_0.npz`` (the fixed upstream
version), and :class:`UpstreamRayBatchSampler` has an opt-in ``group_by_level`` (off by
default, i.e. upstream's crash on mixed levels) that keeps each batch to one level. Neither
changes the cost of a sample.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "UpstreamDataset",
    "UpstreamRayBatchSampler",
    "upstream_collate",
    "UpstreamRotation90",
    "UpstreamFlip",
    "UpstreamRaySubsample",
    "UpstreamCompose",
]

_RAY_KEYS = ("origins", "directions", "distances", "hits", "view_ids", "face_ids")


class UpstreamDataset(Dataset):
    """Upstream-behaviour dataset (baseline only; see the module docstring).

    Args mirror the seed's API: dataset_dir, ray_dataset_dir, split, levels,
    samples_per_subvolume, cache_size, include_empty, transform, seed.
    """

    def __init__(
        self,
        dataset_dir: Path | str,
        ray_dataset_dir: Path | str,
        split: str = "train",
        levels: Sequence[int] | None = None,
        samples_per_subvolume: int | None = None,
        cache_size: int = 100,
        include_empty: bool = False,
        transform: Callable[[dict], dict] | None = None,
        seed: int = 42,
    ) -> None:
        self.dataset_dir = Path(dataset_dir)
        self.ray_dataset_dir = Path(ray_dataset_dir)
        self.split = split
        self.levels = None if levels is None else list(levels)
        self.samples_per_subvolume = samples_per_subvolume
        self.cache_size = int(cache_size)
        self.include_empty = include_empty
        self.transform = transform
        self.seed = seed
        np.random.seed(seed)
        # FIFO cache: a dict plus a list of keys in insertion order.
        self._cache: dict[str, np.ndarray] = {}
        self._cache_order: list[str] = []
        self.cache_hits = 0
        self.cache_misses = 0
        self.samples = self._build_index()
        if not self.samples:
            raise RuntimeError(f"No samples found for split '{split}'")

    def _build_index(self) -> list[dict[str, Any]]:
        splits = json.loads((self.dataset_dir / "splits.json").read_text())
        object_splits: dict[str, str] = splits["object_splits"]
        usage: dict[str, dict[str, str]] = splits.get("hash_object_usage", {})
        trivial = set(splits.get("trivial_hashes", []))
        samples: list[dict[str, Any]] = []
        for level_dir in sorted(self.ray_dataset_dir.glob("level_*")):
            level = int(level_dir.name.split("_")[1])
            if self.levels is not None and level not in self.levels:
                continue
            for ray_file in sorted(level_dir.glob("*/*_rays.npz")):
                key = ray_file.name[: -len("_rays.npz")]
                if level == 0:
                    if object_splits.get(key) != self.split:
                        continue
                    voxel_path = self.dataset_dir / "objects" / f"object_{key}" / "level_0.npz"
                else:
                    users = usage.get(key, {})
                    if key not in trivial and self.split not in users.values():
                        continue
                    voxel_path = (
                        self.dataset_dir / "subvolumes" / f"level_{level}" / key[:2] / f"{key}.npz"
                    )
                samples.append(
                    {"level": level, "hash": key, "ray_path": ray_file, "voxel_path": voxel_path}
                )
        if not self.include_empty:
            empty = self._empty_hashes()
            samples = [s for s in samples if (s["level"], s["hash"]) not in empty]
        return samples

    def _empty_hashes(self) -> set[tuple[int, str]]:
        """(level, hash) of every sub-volume its subdivision map marks empty."""
        empty: set[tuple[int, str]] = set()
        for map_path in sorted(
            (self.dataset_dir / "objects").glob("object_*/subdivision_map.json")
        ):
            for rec in json.loads(map_path.read_text()):
                if rec.get("is_empty"):
                    empty.add((int(rec["level"]), str(rec["hash"])))
        return empty

    def _load_voxels(self, s: dict[str, Any]) -> np.ndarray:
        key = f"{s['level']}/{s['hash']}"
        if key in self._cache:
            self.cache_hits += 1
            return self._cache[key]
        self.cache_misses += 1
        with np.load(s["voxel_path"]) as f:
            vox = f["voxels"].astype(bool)
        if self.cache_size > 0:
            if len(self._cache_order) >= self.cache_size:
                oldest = self._cache_order.pop(0)  # O(n), as upstream
                del self._cache[oldest]
            self._cache[key] = vox
            self._cache_order.append(key)
        return vox

    def __len__(self) -> int:
        return len(self.samples)

    def get_level_distribution(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for s in self.samples:
            out[s["level"]] = out.get(s["level"], 0) + 1
        return dict(sorted(out.items()))

    def __getitem__(self, idx: int) -> dict[str, Any]:
        s = self.samples[idx]
        voxels = self._load_voxels(s)
        with np.load(s["ray_path"]) as f:  # decompresses every ray of the file
            data = {k: f[k] for k in (*_RAY_KEYS, "view_positions")}
        n = len(data["distances"])
        k = self.samples_per_subvolume
        if k is not None and k < n:
            rows = np.random.choice(n, k, replace=False)
            for key in _RAY_KEYS:
                data[key] = data[key][rows]
        sample = {
            "voxels": torch.from_numpy(voxels.astype(np.float32)).unsqueeze(0),
            "origins": torch.from_numpy(data["origins"]).float(),
            "directions": torch.from_numpy(data["directions"]).float(),
            "distances": torch.from_numpy(data["distances"]).float(),
            "hits": torch.from_numpy(data["hits"]).float(),
            "view_ids": torch.from_numpy(data["view_ids"]).long(),
            "face_ids": torch.from_numpy(data["face_ids"]).long(),
            "view_positions": torch.from_numpy(data["view_positions"]).float(),
            "level": s["level"],
            "hash": s["hash"],
        }
        if self.transform is not None:
            sample = self.transform(sample)
        return sample


class UpstreamRayBatchSampler:
    """Upstream-behaviour batch sampler: ``rays_per_batch`` is accepted and ignored.

    ``group_by_level`` (not upstream, off by default) keeps each batch to one level so the
    baseline collate does not crash on multi-level data.
    """

    def __init__(
        self,
        dataset: UpstreamDataset,
        rays_per_batch: int = 4096,
        subvolumes_per_batch: int = 8,
        shuffle: bool = True,
        drop_last: bool = False,
        group_by_level: bool = False,
    ) -> None:
        self.dataset = dataset
        self.rays_per_batch = rays_per_batch  # ignored, as upstream
        self.subvolumes_per_batch = subvolumes_per_batch
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.group_by_level = group_by_level

    def _groups(self) -> list[list[int]]:
        if not self.group_by_level:
            return [list(range(len(self.dataset)))]
        by_level: dict[int, list[int]] = {}
        for i, s in enumerate(self.dataset.samples):
            by_level.setdefault(s["level"], []).append(i)
        return list(by_level.values())

    def _batches(self) -> list[list[int]]:
        batches: list[list[int]] = []
        spb = self.subvolumes_per_batch
        for idx in self._groups():
            if self.shuffle:
                random.shuffle(idx)
            for b in range(0, len(idx), spb):
                chunk = idx[b : b + spb]
                if len(chunk) < spb and self.drop_last:
                    continue
                batches.append(chunk)
        if self.shuffle:
            random.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        spb = self.subvolumes_per_batch
        rnd = math.floor if self.drop_last else math.ceil
        return sum(rnd(len(g) / spb) for g in self._groups())


def upstream_collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Upstream-behaviour collate: stacks grids (crashes when sizes differ)."""
    out: dict[str, Any] = {"voxels": torch.stack([s["voxels"] for s in batch])}
    for key in _RAY_KEYS:
        out[key] = torch.cat([s[key] for s in batch])
    counts = [len(s["distances"]) for s in batch]
    out["ray_to_voxel"] = torch.cat(
        [torch.full((c,), i, dtype=torch.long) for i, c in enumerate(counts)]
    )
    out["levels"] = torch.tensor([s["level"] for s in batch])
    out["hashes"] = [s["hash"] for s in batch]
    return out


class UpstreamRotation90:
    """Upstream-behaviour rotation, **inconsistent on purpose** (timing only, never train).

    Rotates the grid by ``k * 90`` degrees in the (H, W) plane with ``torch.rot90`` and the
    rays by the opposite angle about z, which is the upstream defect.
    """

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if random.random() >= self.p:
            return sample
        k = random.randint(1, 3)
        sample = dict(sample)
        sample["voxels"] = torch.rot90(sample["voxels"], k, dims=(2, 3))
        a = k * math.pi / 2
        c, s = round(math.cos(a)), round(math.sin(a))
        rot = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float32)
        sample["origins"] = sample["origins"] @ rot.T
        sample["directions"] = sample["directions"] @ rot.T
        if "view_positions" in sample:
            sample["view_positions"] = sample["view_positions"] @ rot.T
        return sample


class UpstreamFlip:
    """Upstream-behaviour flips (consistent): each world axis flipped with probability p."""

    def __init__(self, axes: Sequence[int] = (0, 1, 2), p: float = 0.5) -> None:
        self.axes = list(axes)
        self.p = p

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        sample = dict(sample)
        for axis in self.axes:
            if random.random() < self.p:
                dim = 1 + (2 - axis)  # world x is array axis 2 of (D, H, W)
                sample["voxels"] = torch.flip(sample["voxels"], dims=(dim,))
                for key in ("origins", "directions", "view_positions"):
                    if key in sample:
                        v = sample[key].clone()
                        v[:, axis] = -v[:, axis]
                        sample[key] = v
        return sample


class UpstreamRaySubsample:
    """Upstream-behaviour subsample: a full ``torch.randperm`` of the rays, first k kept."""

    def __init__(self, num_rays: int = 1024) -> None:
        self.num_rays = num_rays

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        n = len(sample["distances"])
        if n <= self.num_rays:
            return sample
        rows = torch.randperm(n)[: self.num_rays]
        sample = dict(sample)
        for key in _RAY_KEYS:
            sample[key] = sample[key][rows]
        return sample


class UpstreamCompose:
    """Apply transforms one after the other (upstream-behaviour)."""

    def __init__(self, transforms: Sequence[Callable[[dict], dict]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        for t in self.transforms:
            sample = t(sample)
        return sample
