"""RayReader: outputs, batch layout (fillers, StopIteration), pickling, named errors."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from gpuloader.augment import transforms as T
from gpuloader.augment.rng import select_rows
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.dataset.view import DatasetView
from gpuloader.errors import DamagedFileError
from gpuloader.generate import GeneratorConfig, generate_dataset
from gpuloader.generate.writer import EmptySplitWarning
from gpuloader.plan.sampler import RayBatchSampler, RayRequest
from gpuloader.reading.pipeline import RayPipeline, dali_available
from gpuloader.reading.reader import OUTPUT_DTYPES, OUTPUT_NAMES, RayReader, SampleReadError


class Info:
    """Stand-in for nvidia.dali.types.SampleInfo."""

    def __init__(self, iteration: int, idx_in_batch: int, epoch_idx: int = 0) -> None:
        self.iteration = iteration
        self.idx_in_batch = idx_in_batch
        self.epoch_idx = epoch_idx
        self.idx_in_epoch = -1


def halve_rays(sample: dict) -> dict:
    out = dict(sample)
    for k in ("origins", "directions", "distances", "hits", "view_ids", "face_ids"):
        out[k] = sample[k][::2]
    return out


def explode(sample: dict) -> dict:
    raise KeyError("no such key")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cfg = GeneratorConfig(
        shapes=["asym", "box"],
        resolution=16,
        min_resolution=8,
        divisions=2,
        samples_per_view=30,
        split=(1.0, 0.0, 0.0),
        workers=1,
    )
    with pytest.warns(EmptySplitWarning):  # --split 1 0 0: val and test are empty
        s = generate_dataset(tmp_path_factory.mktemp("reader_data"), cfg, progress=False)
    return Path(s["dataset_dir"]), Path(s["ray_dir"])


def dataset(dirs, **kw) -> HierarchicalVoxelRayDataset:
    return HierarchicalVoxelRayDataset(dirs[0], dirs[1], split="train", **kw)


def unpack(out: tuple) -> dict:
    return dict(zip(OUTPUT_NAMES, out, strict=True))


def test_outputs_are_the_rows_read_sample_reads(dirs):
    ds = dataset(dirs)
    sampler = RayBatchSampler(ds, 100, 3)
    reader = RayReader(ds, sampler, cpu_transforms=(), ray_budget=None)
    req = sampler.batches(4)[0][1]
    got = unpack(reader.read(req))
    for name, arr in got.items():
        assert arr.dtype == OUTPUT_DTYPES[name], name
        assert arr.flags.c_contiguous
    raw = ds.read_sample(req.index, req.epoch, req.num_rays)
    n = ds.samples[req.index]["num_rays"]
    rows = select_rows(n, req.num_rays, ds.seed, req.epoch, req.index)
    assert len(got["distances"]) == req.num_rays == len(rows)
    np.testing.assert_array_equal(got["origins"], raw["origins"])
    np.testing.assert_array_equal(got["hits"], raw["hits"].astype(np.uint8))
    np.testing.assert_array_equal(got["voxels"], raw["voxels"][0].astype(np.uint8))
    np.testing.assert_array_equal(got["view_positions"], raw["view_positions"])
    side = raw["voxels"].shape[-1]
    level = ds.samples[req.index]["level"]
    assert got["meta"].tolist() == [req.index, 4, level, side, -1]  # -1: replaced nothing


def test_batch_layout_fillers_and_end_of_epoch(dirs):
    ds = dataset(dirs)
    sampler = RayBatchSampler(ds, 64, 4, shuffle=True)
    reader = RayReader(ds, sampler, first_epoch=7)
    batches = sampler.batches(8)  # DALI epoch 1 -> epoch 7 + 1
    short = next(i for i, b in enumerate(batches) if len(b) < 4)
    for slot in range(4):
        out = unpack(reader(Info(short, slot, epoch_idx=1)))
        if slot < len(batches[short]):
            assert out["meta"][0] == batches[short][slot].index
            assert out["meta"][1] == 8
        else:  # filler: empty, index -1
            assert out["meta"].tolist()[:2] == [-1, 8]
            assert out["voxels"].size == 0 and out["origins"].shape == (0, 3)
            assert all(out[k].dtype == OUTPUT_DTYPES[k] for k in OUTPUT_NAMES)
    with pytest.raises(StopIteration):
        reader(Info(len(batches), 0, epoch_idx=1))


def test_ray_budget_and_custom_cpu_transform(dirs):
    tf = T.Compose([halve_rays, T.RandomFlip()])
    ds = dataset(dirs, transform=tf)
    sampler = RayBatchSampler(ds, None, 2)
    cpu, _, _ = T.split_for_device(tf)
    reader = RayReader(ds, sampler, cpu_transforms=cpu, ray_budget=T.ray_budget(tf))
    got = unpack(reader.read(RayRequest(0, 0, None)))
    assert len(got["distances"]) == (ds.samples[0]["num_rays"] + 1) // 2
    # a budget caps the rows read: with a subsample first, only that many are read
    sub = RayReader(ds, sampler, ray_budget=7)
    assert len(unpack(sub.read(RayRequest(1, 0, 50)))["origins"]) == 7
    assert len(unpack(sub.read(RayRequest(1, 0, 5)))["origins"]) == 5


def test_pickles_without_its_transform_or_cache(dirs):
    ds = dataset(dirs, transform=T.RandomFlip())
    sampler = RayBatchSampler(ds, 64, 2)
    reader = RayReader(ds, sampler)
    reader.read(RayRequest(0, 0, 10))  # fills the per-process caches
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.dataset.transform is None and clone.sampler.dataset is None
    assert isinstance(clone.dataset, DatasetView) and len(clone.dataset.voxel_cache) == 0
    assert ds.transform is not None  # the user's dataset is untouched
    a, b = reader(Info(0, 0)), clone(Info(0, 0))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    of_view = RayReader(ds.view(), sampler)  # a view serves as well as the dataset
    for x, y in zip(a, of_view(Info(0, 0)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_errors_name_the_file(dirs, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(dirs[0], root / "d")
    shutil.copytree(dirs[1], root / "r")
    ds = HierarchicalVoxelRayDataset(root / "d", root / "r", split="train")
    Path(ds.samples[0]["ray_path"]).write_bytes(b"garbage")
    reader = RayReader(ds, RayBatchSampler(ds, 64, 2, shuffle=False))
    with pytest.raises(DamagedFileError, match=Path(ds.samples[0]["ray_path"]).name):
        reader.read(RayRequest(0, 0, 10))
    failing = RayReader(ds, RayBatchSampler(ds, 64, 2), cpu_transforms=[explode])
    with pytest.raises(SampleReadError, match=r"sample 1 .*ray file .*_rays\.npz.*KeyError"):
        failing.read(RayRequest(1, 0, 10))


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_dali_worker_error_surfaces_named(dirs, tmp_path):
    """A damaged file read in a DALI worker raises DamagedFileError here; no hang, no leak."""
    root = tmp_path / "copy"
    shutil.copytree(dirs[0], root / "d")
    shutil.copytree(dirs[1], root / "r")
    ds = HierarchicalVoxelRayDataset(root / "d", root / "r", split="train")
    sampler = RayBatchSampler(ds, 64, 3, shuffle=False)
    bad = sampler.batches(0)[1][0].index  # the second batch
    Path(ds.samples[bad]["ray_path"]).write_bytes(b"garbage")
    with RayPipeline(RayReader(ds, sampler), batch_size=3, num_workers=1, prefetch=1) as pipe:
        first = pipe.next_batch()
        want = [r.index for r in sampler.batches(0)[0]]
        assert first.meta[:, 0].tolist() == want + [-1] * (3 - len(want))  # fillers last
        assert first.arrays["origins"].shape == (64, 3)
        with pytest.raises(DamagedFileError, match=Path(ds.samples[bad]["ray_path"]).name):
            pipe.next_batch()
