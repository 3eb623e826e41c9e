"""HierarchicalVoxelRayDataset: the seed's API and snippets, rows, epochs, cache, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gpuloader.augment import transforms
from gpuloader.augment.rng import SampleContext, select_rows
from gpuloader.dataset.collate import collate_ray_batch
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.errors import DamagedFileError, DatasetLayoutError, NoSamplesError
from gpuloader.plan.sampler import RayBatchSampler, RayRequest
from gpuloader.stores.cache import LRUCache
from gpuloader.tracer import trace

SEED_KEYS = {
    "voxels",
    "origins",
    "directions",
    "distances",
    "hits",
    "level",
    "hash",
    "view_ids",
    "face_ids",
    "view_positions",
    "chunk_idx",  # not in the documented seed; HEAD always adds it (0 without rays_per_chunk)
}


@pytest.fixture()
def dirs(tiny_dataset):
    return tiny_dataset


def _full_rays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# -- the seed's snippets ------------------------------------------------------------------


def test_seed_basic_usage(dirs, capsys):
    ds, rays = dirs
    dataset = HierarchicalVoxelRayDataset(
        dataset_dir=Path(ds), ray_dataset_dir=Path(rays), split="train", cache_size=100
    )
    sample = dataset[0]
    print(f"Voxels: {sample['voxels'].shape}")
    print(f"Rays: {sample['origins'].shape}")
    print(f"Hit rate: {sample['hits'].float().mean():.2%}")
    assert "Hit rate:" in capsys.readouterr().out


def test_seed_sample_format(dirs):
    ds, rays = dirs
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train")
    for i in range(len(dataset)):
        s = dataset[i]
        assert set(s) == SEED_KEYS
        n = s["origins"].shape[0]
        assert n == dataset.samples[i]["num_rays"]
        d = s["voxels"].shape[-1]
        assert s["voxels"].shape == (1, d, d, d) and s["voxels"].dtype == torch.float32
        for k in ("origins", "directions"):
            assert s[k].shape == (n, 3) and s[k].dtype == torch.float32
        for k in ("distances", "hits"):
            assert s[k].shape == (n,) and s[k].dtype == torch.float32
        for k in ("view_ids", "face_ids"):
            assert s[k].shape == (n,) and s[k].dtype == torch.int64
        assert s["view_positions"].dtype == torch.float32 and s["view_positions"].shape[1] == 3
        assert isinstance(s["level"], int) and isinstance(s["hash"], str)
        assert torch.equal(s["hits"], (s["distances"] > 0).float())


def test_seed_augmentation_snippet(dirs):
    ds, rays = dirs
    transform = transforms.Compose(
        [
            transforms.RandomRotation90(p=0.5),
            transforms.RandomFlip(axes=[0, 1, 2], p=0.5),
            transforms.NormalizeRayOrigins(voxel_size=1.0),
            transforms.RandomRaySubsample(num_rays=1024),
        ]
    )
    dataset = HierarchicalVoxelRayDataset(
        dataset_dir=Path(ds), ray_dataset_dir=Path(rays), split="train", transform=transform
    )
    s = dataset[0]
    assert set(s) == SEED_KEYS
    assert s["origins"].shape[0] == min(1024, dataset.samples[0]["num_rays"])


def test_seed_dataloader_snippet(dirs):
    ds, rays = dirs
    dataset = HierarchicalVoxelRayDataset(
        dataset_dir=Path(ds), ray_dataset_dir=Path(rays), split="train"
    )
    sampler = RayBatchSampler(dataset, rays_per_batch=4096, subvolumes_per_batch=8, shuffle=True)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_ray_batch,
        num_workers=2,
        pin_memory=False,  # no CUDA here; the seed passes True
    )
    for batch in loader:
        voxels = batch["voxels"]
        origins = batch["origins"]
        ray_to_voxel = batch["ray_to_voxel"]
        assert voxels.dim() == 5 and voxels.shape[1] == 1
        assert ray_to_voxel.shape == (origins.shape[0],)
        caps = sum(int(n) for n in batch["num_rays"])
        assert origins.shape[0] == caps <= 4096


def test_seed_level_specific_and_memory_efficient(dirs):
    ds, rays = dirs
    dataset = HierarchicalVoxelRayDataset(
        dataset_dir=Path(ds), ray_dataset_dir=Path(rays), split="train", levels=[1]
    )
    assert set(dataset.get_level_distribution()) == {1}
    dataset = HierarchicalVoxelRayDataset(
        dataset_dir=Path(ds),
        ray_dataset_dir=Path(rays),
        split="train",
        levels=[1],
        samples_per_subvolume=32,
        cache_size=10,
        include_empty=False,
    )
    assert all(dataset[i]["origins"].shape[0] == 32 for i in range(len(dataset)))
    assert not any(s["is_empty"] for s in dataset.samples)


def test_seed_statistics_snippet(dirs):
    ds, rays = dirs
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train")
    distribution = dataset.get_level_distribution()
    assert distribution == {0: 2, 1: 5} and sum(distribution.values()) == len(dataset)
    num_unique = len(set(s["hash"] for s in dataset.samples))
    assert num_unique == len(dataset)
    occupancies = [sample["voxels"].float().mean().item() for sample in dataset]
    assert len(occupancies) == len(dataset)
    avg_occupancy = sum(occupancies) / len(occupancies)
    assert 0 < avg_occupancy < 1


# -- level 0 and data correctness ---------------------------------------------------------


def test_level0_loads(dirs):
    ds, rays = dirs
    dataset = HierarchicalVoxelRayDataset(ds, rays, "val", levels=[0])
    assert sorted(s["hash"] for s in dataset.samples) == ["0002", "0004"]
    for i, rec in enumerate(dataset.samples):
        s = dataset[i]
        with np.load(ds / "objects" / f"object_{rec['hash']}" / "level_0.npz") as z:
            assert torch.equal(s["voxels"][0], torch.from_numpy(z["voxels"]).float())
        assert s["voxels"].shape == (1, 16, 16, 16) and s["level"] == 0


def test_rays_match_the_file_and_the_grid(dirs):
    ds, rays = dirs
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train", samples_per_subvolume=50)
    for i, rec in enumerate(dataset.samples):
        s = dataset[i]
        full = _full_rays(rec["ray_path"])
        rows = select_rows(rec["num_rays"], 50, dataset.seed, 0, i)
        assert torch.equal(s["origins"], torch.from_numpy(full["origins"][rows]))
        assert torch.equal(s["view_ids"], torch.from_numpy(full["view_ids"][rows]).long())
        # view positions: one per view, whole, never sliced by ray rows (upstream bug)
        assert torch.equal(s["view_positions"], torch.from_numpy(full["view_positions"]))
        got = trace(s["voxels"][0].numpy(), s["origins"].numpy(), s["directions"].numpy())
        np.testing.assert_allclose(got, s["distances"].numpy(), rtol=1e-5, atol=1e-4)


def test_rotations_keep_labels(dirs):
    ds, rays = dirs
    t = transforms.Compose([transforms.RandomRotation90(p=1.0), transforms.RandomFlip(p=0.5)])
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train", transform=t, samples_per_subvolume=64)
    for i in range(len(dataset)):
        s = dataset[i]
        got = trace(s["voxels"][0].numpy(), s["origins"].numpy(), s["directions"].numpy())
        np.testing.assert_allclose(got, s["distances"].numpy(), rtol=1e-5, atol=1e-4)


# -- rows, epochs, requests ---------------------------------------------------------------


def test_rows_reproducible_and_epoch_dependent(dirs):
    ds, rays = dirs
    a = HierarchicalVoxelRayDataset(ds, rays, "train", samples_per_subvolume=20)
    b = HierarchicalVoxelRayDataset(ds, rays, "train", samples_per_subvolume=20)
    assert torch.equal(a[3]["origins"], b[3]["origins"])
    before = a[3]["origins"]
    a.set_epoch(1)
    after = a[3]["origins"]
    assert not torch.equal(before, after)
    assert torch.equal(b[RayRequest(3, 1, None)]["origins"], after)
    c = HierarchicalVoxelRayDataset(ds, rays, "train", samples_per_subvolume=20, seed=9)
    assert not torch.equal(c[3]["origins"], before)


def test_k_is_the_min_of_all_limits(dirs):
    ds, rays = dirs
    sub = transforms.RandomRaySubsample(num_rays=30)
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train", samples_per_subvolume=40)
    n = dataset.samples[0]["num_rays"]
    assert dataset[RayRequest(0, 0, None)]["origins"].shape[0] == 40
    assert dataset[RayRequest(0, 0, 7)]["origins"].shape[0] == 7
    assert dataset[RayRequest(0, 0, 10**6)]["origins"].shape[0] == 40
    assert dataset[RayRequest(0, 0, 0)]["origins"].shape[0] == 0
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train", transform=sub)
    assert dataset.available_rays(0) == 30
    s = dataset[RayRequest(0, 2, None)]
    assert s["origins"].shape[0] == 30
    # the budget made the dataset read exactly the rows the transform would pick
    full = _full_rays(dataset.samples[0]["ray_path"])
    direct = sub(
        {k: full[k] for k in ("origins", "directions", "distances", "hits")}
        | {"voxels": np.zeros((1, 16, 16, 16), bool)},
        SampleContext(dataset.seed, 2, 0),
    )
    assert np.array_equal(s["origins"].numpy(), direct["origins"])
    plain = HierarchicalVoxelRayDataset(ds, rays, "train")
    assert plain[0]["origins"].shape[0] == n


def test_read_sample_is_raw_numpy(dirs):
    ds, rays = dirs
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train")
    raw = dataset.read_sample(1, epoch=0, num_rays=12)
    assert raw["voxels"].dtype == np.bool_ and raw["voxels"].ndim == 4
    assert not raw["voxels"].flags.writeable
    assert raw["origins"].shape == (12, 3) and raw["hits"].dtype == np.uint8
    assert raw["view_ids"].dtype == np.int32
    assert raw["index"] == 1 and raw["epoch"] == 0
    assert np.array_equal(raw["origins"], dataset[RayRequest(1, 0, 12)]["origins"].numpy())


def test_plain_callable_transform_gets_the_seeds_torch_dict(dirs):
    ds, rays = dirs
    seen = []

    def my_transform(sample):
        seen.append({k: type(v) for k, v in sample.items()})
        out = dict(sample)
        out["distances"] = sample["distances"] * 2
        return out

    dataset = HierarchicalVoxelRayDataset(ds, rays, "train", transform=my_transform)
    plain = HierarchicalVoxelRayDataset(ds, rays, "train")
    assert torch.equal(dataset[0]["distances"], plain[0]["distances"] * 2)
    # upstream transforms were written for torch tensors: they keep working
    assert seen[0]["voxels"] is torch.Tensor and seen[0]["origins"] is torch.Tensor
    sample = HierarchicalVoxelRayDataset(ds, rays, "train", transform=lambda s: s)[0]
    assert sample["voxels"].dtype == torch.float32 and sample["view_ids"].dtype == torch.long


def test_known_transforms_on_numpy_equal_the_tensor_path(dirs):
    """The dataset applies a Compose of known transforms to the numpy raw sample (one
    conversion): every key equals applying it to the converted tensors, as before."""
    from gpuloader.augment.transforms import apply_transform
    from gpuloader.dataset.output import to_output

    ds, rays = dirs
    tr = transforms.Compose(
        [
            transforms.RandomRotation90(p=0.8),
            transforms.RandomFlip(p=0.5),
            transforms.NormalizeRayOrigins(),
            transforms.AddNoise(origin_std=0.01, direction_std=0.02),
            transforms.VoxelOccupancyJitter(flip_prob=0.1),
            transforms.RandomRaySubsample(num_rays=7),
        ]
    )
    seen = []
    custom = transforms.Compose([transforms.RandomFlip(), lambda s: seen.append(s) or s])
    HierarchicalVoxelRayDataset(ds, rays, "train", transform=custom)[0]
    assert isinstance(seen[0]["origins"], torch.Tensor)  # a custom callable: tensors, as before
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train", transform=tr, seed=3)
    for i in range(len(dataset)):
        raw = dataset.read_sample(i)
        idx, epoch = raw.pop("index"), raw.pop("epoch")
        want = to_output(apply_transform(tr, to_output(raw), SampleContext(3, epoch, idx)))
        got = dataset[i]
        assert set(got) == set(want)
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
            else:
                assert got[key] == value, key


def test_indexing(dirs):
    ds, rays = dirs
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train")
    assert dataset[-1]["hash"] == dataset.samples[-1]["hash"]
    assert dataset[np.int64(1)]["hash"] == dataset.samples[1]["hash"]
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    assert len(list(iter(dataset))) == len(dataset)


# -- cache --------------------------------------------------------------------------------


def test_lru_eviction_order():
    c: LRUCache[int] = LRUCache(2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1  # a is now the most recent
    c.put("c", 3)  # evicts b
    assert c.keys() == ["a", "c"]
    assert c.get("b") is None
    c.put("d", 4)  # evicts a
    assert c.keys() == ["c", "d"]
    assert (c.hits, c.misses) == (1, 1)
    assert c.info()["size"] == 2


def test_cache_disabled_and_read_only():
    c: LRUCache[np.ndarray] = LRUCache(0)
    arr = c.put("x", np.zeros(3))
    assert len(c) == 0 and c.get("x") is None
    assert not arr.flags.writeable
    with pytest.raises(ValueError):
        LRUCache(-1)
    loads = []
    c2: LRUCache[np.ndarray] = LRUCache(1)
    c2.get_or_load("k", lambda: loads.append(1) or np.ones(2))
    c2.get_or_load("k", lambda: loads.append(1) or np.ones(2))
    assert loads == [1] and c2.hits == 1


def test_dataset_cache_counts_and_is_not_mutated(dirs):
    ds, rays = dirs
    t = transforms.Compose(
        [transforms.RandomRotation90(p=1.0), transforms.VoxelOccupancyJitter(0.2)]
    )
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train", cache_size=3, transform=t)
    grid = dataset.voxels(0).copy()
    s = dataset[0]
    s["voxels"] += 1  # the caller owns its output
    s["origins"] += 1
    dataset.set_epoch(4)
    dataset[0]
    assert np.array_equal(dataset.voxels(0), grid)
    assert not dataset.voxels(0).flags.writeable
    assert dataset.cache_info()["hits"] >= 2
    for i in range(len(dataset)):
        dataset.voxels(i)
    assert len(dataset.voxel_cache) == 3

    def careless_transform(sample):
        sample["voxels"][...] = 1.0  # writes into its input: a copy, not the cached grid
        return sample

    careless = HierarchicalVoxelRayDataset(ds, rays, "train", transform=careless_transform)
    assert careless[0]["voxels"].min() == 1.0
    assert np.array_equal(careless.voxels(0), grid)


def test_cache_size_zero(dirs):
    ds, rays = dirs
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train", cache_size=0)
    dataset[0]
    dataset[0]
    assert len(dataset.voxel_cache) == 0 and dataset.cache_info()["hits"] == 0


# -- errors -------------------------------------------------------------------------------


def test_no_samples_error(dirs):
    ds, rays = dirs
    with pytest.raises(NoSamplesError, match="level filter"):
        HierarchicalVoxelRayDataset(ds, rays, "train", levels=[5])


def test_file_removed_after_indexing(tiny_copy):
    ds, rays = tiny_copy
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train", cache_size=0)
    rec = dataset.samples[2]
    rec["voxel_path"].unlink()
    with pytest.raises(DatasetLayoutError, match=str(rec["voxel_path"])):
        dataset[2]
    rec = dataset.samples[3]
    rec["ray_path"].unlink()
    with pytest.raises(DatasetLayoutError, match=str(rec["ray_path"])):
        dataset[3]


def test_damaged_ray_file(tiny_copy):
    ds, rays = tiny_copy
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train")
    rec = dataset.samples[1]
    full = _full_rays(rec["ray_path"])
    del full["view_ids"]
    np.savez_compressed(rec["ray_path"], **full)
    with pytest.raises(DamagedFileError, match="view_ids") as err:
        dataset[1]
    assert str(rec["ray_path"]) in str(err.value)
    full = _full_rays(dataset.samples[2]["ray_path"])
    full["distances"] = full["distances"][:-1]
    np.savez_compressed(dataset.samples[2]["ray_path"], **full)
    with pytest.raises(DamagedFileError, match="distances"):
        dataset[2]
    full["distances"] = np.array(["x"] * len(full["origins"]))
    np.savez_compressed(dataset.samples[2]["ray_path"], **full)
    with pytest.raises(DamagedFileError, match="dtype"):
        dataset[2]
    data = dataset.samples[4]["ray_path"].read_bytes()
    dataset.samples[4]["ray_path"].write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedFileError, match=str(dataset.samples[4]["ray_path"])):
        dataset[4]


def test_damaged_voxel_file(tiny_copy):
    ds, rays = tiny_copy
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train")
    np.savez_compressed(dataset.samples[0]["voxel_path"], grid=np.zeros(3))
    with pytest.raises(DamagedFileError, match="voxels"):
        dataset[0]
