"""Geometric transforms on generated data: every sample of every level, re-traced."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gpuloader import HierarchicalVoxelRayDataset
from gpuloader.augment import transforms
from gpuloader.generate import PRESETS, generate_dataset
from gpuloader.tracer import trace


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = dataclasses.replace(PRESETS["demo"], samples_per_view=60, workers=1)
    summary = generate_dataset(out, cfg, progress=False)
    return summary["dataset_dir"], summary["ray_dir"]


COMPOSITIONS = {
    "rotation": [transforms.RandomRotation90(p=1.0)],
    "flip": [transforms.RandomFlip(p=0.5)],
    "rotation+flip+rotation": [
        transforms.RandomRotation90(p=1.0),
        transforms.RandomFlip(p=0.5),
        transforms.RandomRotation90(p=0.5),
    ],
    "with subsample": [
        transforms.RandomFlip(p=0.5),
        transforms.RandomRotation90(p=1.0),
        transforms.RandomRaySubsample(num_rays=100),
    ],
}


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_every_sample_of_every_level_retraces(demo, name):
    dataset_dir, ray_dir = demo
    levels_seen = set()
    changed = 0
    for split in ("train", "val", "test"):
        t = transforms.Compose(COMPOSITIONS[name])
        ds = HierarchicalVoxelRayDataset(dataset_dir, ray_dir, split=split, transform=t, seed=3)
        plain = HierarchicalVoxelRayDataset(dataset_dir, ray_dir, split=split, seed=3)
        for i in range(len(ds)):
            s = ds[i]
            grid = s["voxels"][0].numpy()
            got = trace(grid, s["origins"].numpy(), s["directions"].numpy())
            np.testing.assert_allclose(got, s["distances"].numpy(), atol=1e-4, rtol=0)
            levels_seen.add(s["level"])
            changed += not np.array_equal(grid, plain.voxels(i))
    assert levels_seen == {0, 1, 2}
    assert changed > 0  # the transforms did move grids


def test_upstream_style_inconsistent_rotation_is_caught(demo):
    """The property test fails on the upstream defect (grid turned one way, rays the other)."""
    dataset_dir, ray_dir = demo
    worst = 0.0
    for split in ("train", "val", "test"):
        ds = HierarchicalVoxelRayDataset(dataset_dir, ray_dir, split=split, levels=[0])
        for i in range(len(ds)):
            s = ds[i]
            grid = np.rot90(s["voxels"][0].numpy(), k=1, axes=(1, 2))  # (x, y) -> (y, -x)
            o, d, want = s["origins"].numpy(), s["directions"].numpy(), s["distances"].numpy()
            turn = [1, 0, 2]
            good = trace(grid, o[:, turn] * [1, -1, 1], d[:, turn] * [1, -1, 1])
            np.testing.assert_allclose(good, want, atol=1e-4)
            bad = trace(grid, o[:, turn] * [-1, 1, 1], d[:, turn] * [-1, 1, 1])  # other way
            worst = max(worst, float(np.mean(np.abs(bad - want) > 1e-4)))
    assert worst > 0.2
