"""DatasetView: columns, validation, variants, pickling, and the dataset's own reads through it."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from gpuloader.augment import transforms
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.dataset.view import DatasetView, ReadLog
from gpuloader.errors import DamagedFileError, SkippedFileWarning
from gpuloader.plan.replace import KnownBad


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(v, b[k])
        else:
            assert v == b[k], k


@pytest.fixture()
def dataset(tiny_dataset) -> HierarchicalVoxelRayDataset:
    ds, rays = tiny_dataset
    sub = transforms.RandomRaySubsample(5)
    return HierarchicalVoxelRayDataset(ds, rays, "train", seed=5, transform=sub)


def test_columns_and_fields(dataset):
    view = DatasetView.of(dataset)
    assert len(view) == len(dataset.samples) and view.samples is dataset.samples
    assert view.levels.tolist() == [s["level"] for s in dataset.samples]
    assert view.num_rays.tolist() == [s["num_rays"] for s in dataset.samples]
    assert view.hashes == tuple(s["hash"] for s in dataset.samples)
    assert view.levels.dtype == view.num_rays.dtype == np.int64
    assert not view.levels.flags.writeable and not view.num_rays.flags.writeable
    assert (view.seed, view.on_error, view.transform) == (5, "raise", dataset.transform)
    assert view.ray_store is dataset.ray_store and view.voxel_cache is dataset.voxel_cache
    assert view.budget == 5
    assert view.available().tolist() == [dataset.available_rays(i) for i in range(len(view))]
    assert DatasetView.of(view) is view
    with pytest.raises(AttributeError):
        view.seed = 1  # frozen


def test_the_dataset_reads_through_its_view(dataset):
    view = dataset.view()
    assert dataset.view() is view  # cached
    for i in range(len(view)):
        _same(view.read_sample(i, 3, 4), dataset.read_sample(i, 3, 4))
    dataset.set_epoch(3)
    _same(view.read_sample(1, 3), dataset.read_sample(1))
    dataset.transform = None  # a changed attribute makes a new view
    fresh = dataset.view()
    assert fresh is not view and fresh.transform is None and fresh.log is view.log
    assert len(dataset.read_sample(0, 0)["distances"]) == dataset.samples[0]["num_rays"]
    dataset.samples = dataset.samples[:3]
    assert len(dataset.view()) == 3


def test_variants_leave_the_dataset_alone(dataset):
    view = dataset.view()
    bare = view.with_(transform=None, samples_per_subvolume=None)
    assert bare.transform is None and dataset.transform is not None
    assert bare.samples is view.samples and bare.log is view.log
    assert len(bare.read_sample(0, 0)["distances"]) == dataset.samples[0]["num_rays"]
    skip = view.with_(on_error="skip")
    assert skip.on_error == "skip" and dataset.on_error == "raise"
    with pytest.raises(TypeError, match="subset"):
        view.with_(samples=[])
    part = view.subset([3, 1])
    assert part.hashes == (view.hashes[3], view.hashes[1]) and len(part) == 2
    assert part.levels.tolist() == [view.levels[3], view.levels[1]]
    assert part.samples[0] is view.samples[3]
    assert part.log.errors is view.log.errors and part.log.bad is not view.log.bad


def test_validation(dataset):
    view = dataset.view()
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'; got 'retry'"):
        view.with_(on_error="retry")
    with pytest.raises(ValueError, match="samples_per_subvolume must be >= 0"):
        view.with_(samples_per_subvolume=-1)
    with pytest.raises(TypeError, match="ray_store"):
        view.with_(ray_store=object())
    with pytest.raises(ValueError, match="one entry per sample"):
        DatasetView(
            samples=view.samples,
            levels=view.levels[:1],
            num_rays=view.num_rays,
            hashes=view.hashes,
            seed=0,
            ray_store=view.ray_store,
        )


def test_pickles_with_an_empty_cache(dataset):
    view = dataset.view().with_(transform=None)
    want = view.read_sample(2, 1, 7)
    assert len(view.voxel_cache) > 0
    clone = pickle.loads(pickle.dumps(view))
    assert len(clone.voxel_cache) == 0 and clone.voxel_cache.capacity == view.voxel_cache.capacity
    _same(clone.read_sample(2, 1, 7), want)
    assert (clone.seed, clone.hashes) == (view.seed, view.hashes)


def test_known_bad_matches_of_dataset(dataset):
    errors = {1: ("f", "line")}
    a, b = dataset.view().known_bad(errors), KnownBad.of_dataset(dataset, errors, 5)
    assert a.errors == b.errors and a.seed == b.seed
    np.testing.assert_array_equal(a.levels, b.levels)
    np.testing.assert_array_equal(a.available, b.available)


def test_skip_is_recorded_in_the_shared_log(tiny_dataset, tmp_path):
    ds = Path(shutil.copytree(tiny_dataset[0], tmp_path / "d"))
    rays = Path(shutil.copytree(tiny_dataset[1], tmp_path / "r"))
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train", cache_size=0)
    bad = dataset.samples[1]["ray_path"]
    Path(bad).write_bytes(b"garbage")
    view = dataset.view()
    with pytest.raises(DamagedFileError, match=Path(bad).name) as err:
        view.read_sample_checked(1, 0)
    assert view.bad_entry(1, err.value) == (str(bad), str(err.value).splitlines()[0])
    assert dataset.error_file(1, err.value) == str(bad)
    skip = view.with_(on_error="skip")
    with pytest.warns(SkippedFileWarning, match=Path(bad).name):
        got = skip.read_sample_checked(1, 0)
    assert got["skipped_from"] == 1 and got["index"] != 1
    assert dataset.errors == [(str(bad), str(err.value).splitlines()[0])]
    assert dataset.skipped == 1 and 1 in skip.log.bad
    assert isinstance(dataset.read_log, ReadLog) and skip.log is dataset.read_log
