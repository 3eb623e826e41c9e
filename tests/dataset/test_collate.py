"""collate_ray_batch: concatenation, mapping, and mixed-level (zero-padded) grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gpuloader.dataset.collate import collate_ray_batch
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.plan.sampler import RayBatchSampler
from gpuloader.tracer import trace


def fake_sample(side: int, n: int, v: int, level: int, fill: float = 1.0) -> dict:
    g = torch.zeros(1, side, side, side)
    g[0, 0, 0, 0] = fill
    return {
        "voxels": g,
        "origins": torch.full((n, 3), float(level)),
        "directions": torch.ones(n, 3),
        "distances": torch.arange(n, dtype=torch.float32),
        "hits": torch.ones(n),
        "view_ids": torch.arange(n),
        "face_ids": torch.zeros(n, dtype=torch.long),
        "view_positions": torch.ones(v, 3),
        "level": level,
        "hash": f"h{level}",
    }


def test_same_level_stack_and_concat():
    batch = [fake_sample(8, 3, 2, 1), fake_sample(8, 5, 4, 1)]
    out = collate_ray_batch(batch)
    assert out["voxels"].shape == (2, 1, 8, 8, 8)
    assert out["origins"].shape == (8, 3) and out["distances"].shape == (8,)
    assert out["ray_to_voxel"].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert out["num_rays"].tolist() == [3, 5]
    assert out["levels"].tolist() == [1, 1]
    assert out["hashes"] == ["h1", "h1"]
    assert [tuple(v.shape) for v in out["view_positions"]] == [(2, 3), (4, 3)]
    assert out["voxel_shapes"].tolist() == [[8, 8, 8], [8, 8, 8]]
    assert out["view_ids"].dtype == torch.long and out["hits"].dtype == torch.float32
    assert torch.equal(out["distances"][3:], torch.arange(5, dtype=torch.float32))


def test_mixed_levels_pad_at_end():
    batch = [fake_sample(4, 2, 1, 2), fake_sample(16, 3, 1, 0), fake_sample(8, 1, 1, 1)]
    out = collate_ray_batch(batch)
    assert out["voxels"].shape == (3, 1, 16, 16, 16)
    assert out["voxel_shapes"].tolist() == [[4, 4, 4], [16, 16, 16], [8, 8, 8]]
    assert out["levels"].tolist() == [2, 0, 1]
    for i, s in enumerate(batch):
        d = s["voxels"].shape[-1]
        assert torch.equal(out["voxels"][i, :, :d, :d, :d], s["voxels"])
        assert out["voxels"][i].sum() == s["voxels"].sum()  # padding is zeros
    assert out["ray_to_voxel"].tolist() == [0, 0, 1, 1, 1, 2]


def test_mixed_levels_pad_center():
    batch = [fake_sample(4, 2, 1, 2), fake_sample(8, 1, 1, 1)]
    out = collate_ray_batch(batch, pad="center")
    assert out["voxels"].shape == (2, 1, 8, 8, 8)
    assert torch.equal(out["voxels"][0, :, 2:6, 2:6, 2:6], batch[0]["voxels"])
    assert out["voxels"][0].sum() == 1


def test_center_padding_keeps_rays_consistent(tiny_dataset):
    ds, rays = tiny_dataset
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train", samples_per_subvolume=64)
    i1 = next(i for i, s in enumerate(dataset.samples) if s["level"] == 1)
    i0 = next(i for i, s in enumerate(dataset.samples) if s["level"] == 0)
    out = collate_ray_batch([dataset[i1], dataset[i0]], pad="center")
    sel = out["ray_to_voxel"] == 0
    got = trace(
        out["voxels"][0, 0].numpy(), out["origins"][sel].numpy(), out["directions"][sel].numpy()
    )
    np.testing.assert_allclose(got, out["distances"][sel].numpy(), rtol=1e-5, atol=1e-4)


def test_numpy_inputs_and_read_only_arrays():
    s = {
        k: (v.numpy() if isinstance(v, torch.Tensor) else v)
        for k, v in fake_sample(4, 2, 1, 2).items()
    }
    for v in s.values():
        if isinstance(v, np.ndarray):
            v.flags.writeable = False
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = collate_ray_batch([s, s])
    assert out["voxels"].shape == (2, 1, 4, 4, 4) and out["origins"].shape == (4, 3)


def test_optional_keys_left_out():
    a, b = fake_sample(4, 2, 1, 2), fake_sample(4, 2, 1, 2)
    del a["face_ids"], b["view_positions"]
    out = collate_ray_batch([a, b])
    assert "face_ids" not in out and "view_positions" not in out and "view_ids" in out


def test_zero_ray_sample():
    out = collate_ray_batch([fake_sample(4, 0, 1, 2), fake_sample(4, 3, 1, 2)])
    assert out["ray_to_voxel"].tolist() == [1, 1, 1] and out["num_rays"].tolist() == [0, 3]


def test_errors():
    with pytest.raises(ValueError, match="empty"):
        collate_ray_batch([])
    bad = fake_sample(4, 1, 1, 1)
    del bad["origins"]
    with pytest.raises(ValueError, match="origins"):
        collate_ray_batch([bad])
    with pytest.raises(ValueError, match="pad"):
        collate_ray_batch([fake_sample(4, 1, 1, 1)], pad="middle")


def test_mixed_level_loader_does_not_crash(tiny_dataset):
    ds, rays = tiny_dataset
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train")
    sampler = RayBatchSampler(dataset, 512, len(dataset), mixed_levels=True)
    (batch,) = list(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_ray_batch))
    assert batch["voxels"].shape == (len(dataset), 1, 16, 16, 16)
    assert sorted(set(batch["levels"].tolist())) == [0, 1]
    assert batch["origins"].shape[0] == 512


def test_docstring_lists_every_batch_key(tiny_dataset):
    """help(collate_ray_batch) names every key a batch holds (not "see the module doc")."""
    from gpuloader import HierarchicalVoxelRayDataset, collate_ray_batch

    ds = HierarchicalVoxelRayDataset(*tiny_dataset)
    batch = collate_ray_batch([ds[0], ds[1]])
    doc = collate_ray_batch.__doc__
    for key in batch:
        assert f"    {key} " in doc, key


def _storages(out: dict) -> set[int]:
    tensors = [v for v in out.values() if isinstance(v, torch.Tensor)]
    tensors += [v for v in out.get("view_positions") or () if isinstance(v, torch.Tensor)]
    return {t.untyped_storage().data_ptr() for t in tensors}


def _separately(batch: list[dict]) -> dict:
    """The batch built key by key (one tensor each), as the seed's collate does."""
    return {
        "origins": torch.cat([s["origins"] for s in batch]),
        "directions": torch.cat([s["directions"] for s in batch]),
        "distances": torch.cat([s["distances"] for s in batch]),
        "hits": torch.cat([s["hits"] for s in batch]),
        "view_ids": torch.cat([s["view_ids"] for s in batch]),
        "face_ids": torch.cat([s["face_ids"] for s in batch]),
    }


@pytest.mark.parametrize("sides", [(8, 8, 8), (4, 16, 8)])
def test_one_block_per_batch_with_the_values_of_each_key(sides):
    """Every tensor of a dense batch is a view of one storage (one shared-memory block per
    batch from a DataLoader worker), aligned, not overlapping, and holding what a key-by-key
    collate holds; writing one key leaves the others as they were."""
    batch = [fake_sample(side, 3 + i, 2 + i, i) for i, side in enumerate(sides)]
    out = collate_ray_batch(batch)
    assert len(_storages(out)) == 1
    for key, want in _separately(batch).items():
        assert torch.equal(out[key], want), key
        assert out[key].data_ptr() % 64 == 0 and out[key].is_contiguous()
    for i, s in enumerate(batch):
        assert torch.equal(out["view_positions"][i], s["view_positions"])
    before = {k: v.clone() for k, v in out.items() if isinstance(v, torch.Tensor)}
    out["origins"].fill_(-7.0)
    out["ray_to_voxel"].fill_(99)
    for key, was in before.items():
        if key not in ("origins", "ray_to_voxel"):
            assert torch.equal(out[key], was), key


def test_a_worker_batch_equals_the_in_process_batch(tiny_dataset):
    ds = HierarchicalVoxelRayDataset(*tiny_dataset, "train", samples_per_subvolume=16, seed=3)
    idx = [[0, 1, 2], [3, 4]]
    here = [collate_ray_batch([ds[i] for i in b]) for b in idx]
    loader = DataLoader(ds, batch_sampler=idx, collate_fn=collate_ray_batch, num_workers=1)
    there = list(loader)
    for a, b in zip(here, there, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), key
            elif key == "view_positions":
                assert all(torch.equal(x, y) for x, y in zip(a[key], b[key], strict=True))
            else:
                assert a[key] == b[key], key
