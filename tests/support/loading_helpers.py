"""Shared helpers of the loader tests: a generated dataset, the transforms, the CPU API
(DataLoader + RayBatchSampler + collate_ray_batch) and the bit-for-bit batch comparison.

Plain functions; each test module wraps :func:`generate` in its own module-scoped fixture
(its own temporary directory, shapes and rays per view) and binds its batch size with
``functools.partial`` where it needs one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gpuloader.augment import transforms as T
from gpuloader.dataset.collate import collate_ray_batch
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.generate import GeneratorConfig, generate_dataset
from gpuloader.generate.writer import EmptySplitWarning
from gpuloader.plan.sampler import RayBatchSampler
from gpuloader.tracer import trace

SHAPES = ("asym", "torus", "box", "blobs")


def generate(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    shapes: Sequence[str] = SHAPES,
    samples_per_view: int = 60,
) -> tuple[Path, Path]:
    """A small generated dataset, all of it in the train split: ``(dataset_dir, ray_dir)``.

    The generation must announce the empty val/test splits (one EmptySplitWarning each).
    """
    out = tmp_path_factory.mktemp(name)
    cfg = GeneratorConfig(
        shapes=list(shapes),
        resolution=16,
        min_resolution=4,
        divisions=2,
        samples_per_view=samples_per_view,
        split=(1.0, 0.0, 0.0),
        workers=1,
    )
    with pytest.warns(EmptySplitWarning) as record:
        s = generate_dataset(out, cfg, progress=False)
    assert sum(w.category is EmptySplitWarning for w in record) == 2
    return Path(s["dataset_dir"]), Path(s["ray_dir"])


def full_transform(
    num_rays: int = 40, *, scale_distances: bool = False, occupancy_jitter: bool = True
) -> T.Compose:
    """Every kind of transform: symmetries, normalization, subsampling, noise, jitter."""
    return T.Compose(
        [
            T.RandomRotation90(p=0.7),
            T.RandomFlip(axes=[0, 1, 2], p=0.5),
            T.NormalizeRayOrigins(voxel_size=1.0, scale_distances=scale_distances),
            T.RandomRaySubsample(num_rays=num_rays),
            T.AddNoise(origin_std=0.01, direction_std=0.01),
            *([T.VoxelOccupancyJitter(flip_prob=0.02)] if occupancy_jitter else []),
        ]
    )


def geometric_transform(*first: Callable[[dict], dict]) -> T.Compose:
    """Symmetries, normalization with distances and subsampling, after ``first``."""
    return T.Compose(
        [
            *first,
            T.RandomRotation90(p=0.8),
            T.RandomFlip(axes=[0, 1, 2], p=0.5),
            T.NormalizeRayOrigins(voxel_size=1.0, scale_distances=True),
            T.RandomRaySubsample(num_rays=50),
        ]
    )


def make_dataset(dirs, transform=None, **kw) -> HierarchicalVoxelRayDataset:
    return HierarchicalVoxelRayDataset(dirs[0], dirs[1], split="train", transform=transform, **kw)


def cpu_api(ds, epoch: int, rays: int, spb: int, **kw) -> list[dict]:
    """The batches of the CPU API; ``kw`` goes to the sampler."""
    sampler = RayBatchSampler(ds, rays, spb, shuffle=True, **kw)
    sampler.set_epoch(epoch)
    return list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate_ray_batch))


def assert_batches_equal(
    got: list[dict],
    want: list[dict],
    *,
    nonempty: bool = False,
    key_order: bool = False,
    list_dtypes: bool = True,
) -> None:
    """Bit for bit: the same batches, keys, dtypes, shapes and values.

    ``nonempty``: there is at least one batch; ``key_order``: the keys come in the same order
    (else the same set); ``list_dtypes``: the tensors of list values (``view_positions``) have
    the same dtype too (else equal values suffice).
    """
    assert len(got) == len(want)
    if nonempty:
        assert len(want) > 0
    for g, w in zip(got, want, strict=True):
        if key_order:
            assert list(g) == list(w)
        else:
            assert sorted(g) == sorted(w)
        for k in w:
            a, b = g[k], w[k]
            if isinstance(b, list):
                assert len(a) == len(b), k
                for x, y in zip(a, b, strict=True):
                    if isinstance(y, str):
                        assert x == y, k
                    else:
                        assert (x.dtype == y.dtype or not list_dtypes) and torch.equal(x, y), k
            else:
                assert a.dtype == b.dtype, (k, a.dtype, b.dtype)
                assert a.shape == b.shape, (k, a.shape, b.shape)
                assert torch.equal(a, b), (k, int((a != b).sum()))


def assert_rays_retrace(batches: list[dict], normalized: bool = True) -> int:
    """Every augmented ray re-traced through its own augmented grid gives its distance.

    ``normalized``: origins normalized to [-1, 1] (voxel size ``2 / d``), else voxel size 1.
    Returns the number of rays checked.
    """
    checked = 0
    for batch in batches:
        for b in range(len(batch["hashes"])):
            d, h, w = batch["voxel_shapes"][b].tolist()
            grid = batch["voxels"][b, 0, :d, :h, :w].numpy()
            sel = batch["ray_to_voxel"] == b
            o = batch["origins"][sel].numpy()
            dirs = batch["directions"][sel].numpy()
            traced = trace(grid, o, dirs, voxel_size=2.0 / d if normalized else 1.0)
            np.testing.assert_allclose(traced, batch["distances"][sel].numpy(), atol=1e-4)
            checked += int(sel.sum())
    return checked
