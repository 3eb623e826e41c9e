"""GPURayLoader on the CPU: the DALI CPU pipeline and the torch-DataLoader back end give the
batches of the CPU API (DataLoader + RayBatchSampler + collate_ray_batch), bit for bit.

DALI pipelines start spawned workers (a few seconds each on 2 cores), so the loaders are
module-scoped and shared; the last test closes them and checks that nothing is left.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from gpuloader.augment import transforms as T
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.errors import DamagedFileError, UnsupportedTransformError
from gpuloader.loading.loader import GPURayLoader
from gpuloader.plan.sampler import RayBatchSampler
from gpuloader.reading.pipeline import dali_available
from support import loading_helpers as _loading

RAYS, SPB = 300, 5
needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")


def drop_every_third_ray(sample: dict) -> dict:
    """A custom (non-gpuloader) transform: keeps rays whose position is not 2 mod 3."""
    keep = np.arange(len(sample["distances"])) % 3 != 2
    out = dict(sample)
    for k in ("origins", "directions", "distances", "hits", "view_ids", "face_ids"):
        out[k] = np.asarray(sample[k])[keep]
    return out


full_transform = _loading.full_transform
make_dataset = _loading.make_dataset
cpu_api = partial(_loading.cpu_api, rays=RAYS, spb=SPB)
assert_batches_equal = partial(_loading.assert_batches_equal, key_order=True)


def geometric_transform() -> T.Compose:
    return _loading.geometric_transform(drop_every_third_ray)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _loading.generate(tmp_path_factory, "loader_data")


@pytest.fixture(scope="module")
def full_loader(data_dirs):
    if not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    ds = make_dataset(data_dirs, full_transform())
    loader = GPURayLoader(
        ds, RAYS, SPB, num_workers=2, prefetch=2, device="cpu", backend="dali", store="stream"
    )
    yield loader
    loader.close()


@pytest.fixture(scope="module")
def geo_loader(data_dirs):
    if not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    ds = make_dataset(data_dirs, geometric_transform())
    loader = GPURayLoader(ds, RAYS, SPB, num_workers=1, prefetch=1, device="cpu", backend="dali")
    yield loader
    loader.close()


# -- the DALI CPU pipeline ---------------------------------------------------------------------


@needs_dali
def test_dali_equals_cpu_api_two_epochs(full_loader, data_dirs):
    ds = make_dataset(data_dirs, full_transform())
    assert full_loader.backend == "dali" and full_loader.device == torch.device("cpu")
    assert len(full_loader) == len(RayBatchSampler(ds, RAYS, SPB)) > 1
    full_loader.set_epoch(0)
    epoch0 = list(full_loader)
    assert_batches_equal(epoch0, cpu_api(ds, 0))
    epoch1 = list(full_loader)  # the next pass is epoch 1 (same pipeline, next DALI epoch)
    assert_batches_equal(epoch1, cpu_api(ds, 1))
    assert [b["hashes"] for b in epoch0] != [b["hashes"] for b in epoch1]
    # a full batch holds min(rays_per_batch, SPB * 40 subsampled) rays; the partial batches
    # (the last of each level, fewer than SPB sub-volumes) came through too
    full = [int(b["num_rays"].sum()) for b in epoch0 if len(b["hashes"]) == SPB]
    assert full and set(full) == {min(RAYS, 40 * SPB)}
    assert any(len(b["hashes"]) < SPB for b in epoch0)


@needs_dali
def test_same_seed_same_batches_and_set_epoch(full_loader, data_dirs):
    full_loader.set_epoch(0)  # goes back: the pipeline is rebuilt at epoch 0
    again0 = list(full_loader)
    again1 = list(full_loader)  # then epoch 1, same pipeline
    ds = make_dataset(data_dirs, full_transform())
    with GPURayLoader(ds, RAYS, SPB, num_workers=0, backend="torch", device="cpu") as other:
        other.set_epoch(0)
        assert_batches_equal(again0, list(other))
        assert_batches_equal(again1, list(other))  # epoch 1: each pass advances the epoch
    assert [b["hashes"] for b in again0] != [b["hashes"] for b in again1]


@needs_dali
def test_custom_transform_first_and_retrace(geo_loader, data_dirs):
    """1 worker, a custom transform before the known ones; every augmented ray re-traced
    through its own augmented grid gives its (scaled) distance."""
    ds = make_dataset(data_dirs, geometric_transform())
    geo_loader.set_epoch(2)
    batches = list(geo_loader)
    assert_batches_equal(batches, cpu_api(ds, 2))
    assert _loading.assert_rays_retrace(batches) > 200


def test_torch_backend_worker_counts_equal_cpu_api(data_dirs):
    ds = make_dataset(data_dirs, geometric_transform())
    want = cpu_api(ds, 5)
    for workers in (0, 2):
        with GPURayLoader(ds, RAYS, SPB, num_workers=workers, backend="torch", device="cpu") as ld:
            assert ld.backend == "torch"
            ld.set_epoch(5)
            assert_batches_equal(list(ld), want)


def test_no_transform_and_dataset_transform_default(data_dirs):
    ds = make_dataset(data_dirs)
    with GPURayLoader(ds, 1000, 3, backend="torch", num_workers=0, device="cpu") as ld:
        assert len(ld) == len(RayBatchSampler(ds, 1000, 3))
        assert_batches_equal(list(ld), cpu_api(ds, 0, rays=1000, spb=3))
    # transform given to the loader wins over the dataset's (None here)
    ds_t = make_dataset(data_dirs, full_transform())
    with GPURayLoader(ds, RAYS, SPB, transform=full_transform(), backend="torch",
                      num_workers=0, device="cpu") as ld:  # fmt: skip
        ld.set_epoch(1)
        assert_batches_equal(list(ld), cpu_api(ds_t, 1))


def several_runs() -> T.Compose:
    """A custom step, then three fused runs (``ToDevice`` cuts the known transforms)."""
    return T.Compose(
        [
            drop_every_third_ray,
            T.RandomFlip(axes=[0, 1, 2], p=0.5),
            T.RandomRaySubsample(num_rays=60),
            T.ToDevice("cpu"),
            T.RandomRotation90(p=0.9),
            T.NormalizeRayOrigins(voxel_size=1.0, scale_distances=True),
            T.RandomRaySubsample(num_rays=25),
            T.ToDevice("cpu"),
            T.AddNoise(origin_std=0.02, direction_std=0.03),
            T.VoxelOccupancyJitter(flip_prob=0.1),
        ]
    )


def test_several_fused_runs_equal_cpu_api(data_dirs):
    """The sample stream chains one fused pass per run (the output of run j is the
    batch-sized store of run j + 1), each drawing as ``Compose`` does with ``segment=j``."""
    ds = make_dataset(data_dirs, several_runs())
    with GPURayLoader(ds, RAYS, SPB, backend="torch", num_workers=0, device="cpu") as ld:
        assert ld.store == "stream" and ld.setup.source == "samples"
        assert len(ld.setup.segments) == 3
        for epoch in (0, 1):
            assert_batches_equal(list(ld), cpu_api(ds, epoch))


@pytest.mark.parametrize("transform", [full_transform, several_runs], ids=["one-run", "runs"])
def test_sample_stream_mixed_levels_equal_cpu_api(data_dirs, transform):
    """Grids of several sizes in one read batch: the batch-sized store holds each grid's own
    cube, the fused pass pads to the largest, as collate pads."""
    ds = make_dataset(data_dirs, transform())
    with GPURayLoader(ds, RAYS, SPB, backend="torch", num_workers=0, device="cpu",
                      store="stream") as ld:  # fmt: skip
        ld.source.sampler = RayBatchSampler(ld.sampler.dataset, RAYS, SPB, mixed_levels=True)
        ld.set_epoch(3)
        got = list(ld)
    assert any(len(set(b["levels"].tolist())) > 1 for b in got)
    assert_batches_equal(got, cpu_api(ds, 3, mixed_levels=True))


def test_custom_transform_after_known_is_rejected(data_dirs):
    bad = T.Compose([T.RandomFlip(), drop_every_third_ray])
    with pytest.raises(UnsupportedTransformError, match="drop_every_third_ray"):
        GPURayLoader(make_dataset(data_dirs), transform=bad, backend="torch", device="cpu")


def test_todevice_target_sets_device(data_dirs):
    tf = T.Compose([T.RandomFlip(), T.ToDevice("cpu")])
    with GPURayLoader(make_dataset(data_dirs), 64, 2, transform=tf, backend="torch",
                      num_workers=0) as ld:  # fmt: skip
        assert ld.device == torch.device("cpu")
        batch = next(iter(ld))
        assert batch["origins"].device.type == "cpu"


def test_damaged_file_is_named(data_dirs, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(data_dirs[0], root / "dataset")
    shutil.copytree(data_dirs[1], root / "rays")
    ds = HierarchicalVoxelRayDataset(root / "dataset", root / "rays", split="train")
    victim = Path(ds.samples[0]["ray_path"])
    victim.write_bytes(b"not a zip file")
    for store in ("stream", "host"):  # named when read, or when the store is sized
        with pytest.raises(DamagedFileError, match=victim.name):
            with GPURayLoader(ds, 64, 4, shuffle=False, backend="torch", num_workers=0,
                              store=store) as ld:  # fmt: skip
                list(ld)


# -- shutdown ----------------------------------------------------------------------------------


def _child_pids() -> list[int]:
    """Live child processes of this one (except multiprocessing's resource tracker)."""
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z" and b"resource_tracker" not in cmd:
            out.append(int(entry))
    return out


def test_torch_backend_del_leaves_no_workers(data_dirs):
    before = set(_child_pids())  # e.g. the DALI workers of the module's loaders
    ds = make_dataset(data_dirs)
    ld = GPURayLoader(ds, 64, 2, backend="torch", num_workers=2, device="cpu", store="stream")
    it = iter(ld)
    next(it)
    assert set(_child_pids()) - before
    del it, ld
    gc.collect()
    assert not set(_child_pids()) - before


@needs_dali
def test_interrupted_then_closed_leaves_nothing(full_loader, geo_loader):
    """Break out of an epoch, close: no worker processes, no open shared memory left."""
    for ld in (full_loader, geo_loader):
        it = iter(ld)
        next(it)
        del it
    assert _child_pids()
    full_loader.close()
    geo_loader.close()
    full_loader.close()  # idempotent
    gc.collect()
    assert not _child_pids()
    assert not [p for p in multiprocessing.active_children() if "resource_tracker" not in p.name]
    with pytest.raises(RuntimeError, match="closed"):
        iter(full_loader)


def _shared_mappings() -> list[str]:
    """Shared-memory mappings of this process (DALI's worker buffers live in memfd/shm)."""
    with open("/proc/self/maps") as f:
        return sorted(line.strip() for line in f if "memfd" in line or "/dev/shm" in line)


def _mapped_shm_names(pids: list[int]) -> set[str]:
    """Names under /dev/shm that these processes map and that still exist there.

    Only the loader's own entries are compared, so that other processes using /dev/shm at
    the same time (``pytest -n 16``) cannot fail the test.
    """
    names: set[str] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                lines = f.readlines()
        except OSError:  # the process is gone
            continue
        for line in lines:
            fields = line.split()
            if len(fields) == 6 and fields[5].startswith("/dev/shm/"):  # not "(deleted)"
                names.add(fields[5][len("/dev/shm/") :])
    return names


@needs_dali
def test_closed_dali_loader_leaks_no_shared_memory(data_dirs):
    ds = make_dataset(data_dirs)
    before = _shared_mappings()
    shm_before = set(os.listdir("/dev/shm"))
    ld = GPURayLoader(ds, 64, 2, num_workers=2, device="cpu", backend="dali", store="stream")
    it = iter(ld)
    next(it)
    assert len(_shared_mappings()) > len(before)  # the workers' buffers are mapped
    own = _mapped_shm_names([os.getpid(), *_child_pids()]) - shm_before
    assert own  # the loader's shared buffers and semaphores, named under /dev/shm
    del it
    ld.close()
    gc.collect()
    assert _shared_mappings() == before
    assert not own & set(os.listdir("/dev/shm"))
