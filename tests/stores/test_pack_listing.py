"""A dataset over a pack takes its index from the pack (no scan, no ray-file header reads)
where that equals the scan: the tree the pack was checked against, or no tree at all."""

from __future__ import annotations

import shutil

import pytest

import gpuloader.format.index as index_mod
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.format import index_memo
from gpuloader.stores.pack import PackedRayStore, pack_rays


def _records(ds: HierarchicalVoxelRayDataset) -> list[tuple]:
    return [(s["level"], s["hash"], str(s["ray_path"]), s["num_rays"]) for s in ds.samples]


@pytest.fixture(scope="module", params=["rows", "striped"])
def packed(request, tiny_dataset, tmp_path_factory):
    ds, rays = tiny_dataset
    out = tmp_path_factory.mktemp("listing") / request.param
    pack_rays(rays, out, layout=request.param, progress=False, workers=1, dataset_dir=ds)
    return ds, rays, out


def _no_ray_headers(monkeypatch) -> list:
    """Make every ray file header read fail loudly; voxel headers still read. No index is
    remembered from before (a scan answered by index_memo reads no header)."""
    monkeypatch.setattr(index_memo, "_MEMO", type(index_memo._MEMO)())
    seen: list = []
    real = index_mod.HeaderCache.header  # every header the index reads (cached or not)

    def spy(self, path, key):
        if key == "origins":
            seen.append(path)
            raise AssertionError(f"ray header read: {path}")
        return real(self, path, key)

    monkeypatch.setattr(index_mod.HeaderCache, "header", spy)
    return seen


@pytest.mark.parametrize("split", ["train", "val"])
def test_index_from_the_pack_equals_the_scan(packed, split, monkeypatch):
    ds, rays, out = packed
    scanned = HierarchicalVoxelRayDataset(ds, rays, split, cache_size=0)
    _no_ray_headers(monkeypatch)
    listed = HierarchicalVoxelRayDataset(ds, rays, split, ray_store=PackedRayStore(out))
    assert _records(listed) == _records(scanned)
    assert listed[0]["origins"].shape == scanned[0]["origins"].shape


def test_no_tree_builds_from_the_pack_alone(packed, tmp_path, monkeypatch):
    ds, rays, out = packed
    scanned = HierarchicalVoxelRayDataset(ds, rays, "train", cache_size=0, seed=5)
    gone = tmp_path / "elsewhere"  # the tree is not on this node
    store = PackedRayStore(out, check="none", ray_dataset_dir=gone)
    _no_ray_headers(monkeypatch)
    alone = HierarchicalVoxelRayDataset(ds, gone, "train", ray_store=store, cache_size=0, seed=5)
    want = [(lv, h, str(p).replace(str(rays), str(gone)), n) for lv, h, p, n in _records(scanned)]
    assert _records(alone) == want
    a, b = alone[1], scanned[1]
    assert (a["distances"] == b["distances"]).all()


def test_another_tree_is_scanned(packed, tmp_path, monkeypatch):
    """A pack checked against one tree says nothing of another: the dataset scans it."""
    ds, rays, out = packed
    copy = tmp_path / "copy"
    shutil.copytree(rays, copy)
    seen = _no_ray_headers(monkeypatch)
    with pytest.raises(AssertionError, match="ray header read"):
        HierarchicalVoxelRayDataset(ds, copy, "train", ray_store=PackedRayStore(out))
    assert seen


def test_a_pack_of_some_levels_is_not_a_listing(tiny_dataset, tmp_path, monkeypatch):
    ds, rays = tiny_dataset
    pack_rays(rays, tmp_path / "p", levels=[1], progress=False, workers=1)
    store = PackedRayStore(tmp_path / "p")
    assert store.ray_listing(rays, None) is None
    assert {lv for lv, *_ in store.ray_listing(rays, [1])} == {1}
    seen = _no_ray_headers(monkeypatch)
    with pytest.raises(AssertionError):
        HierarchicalVoxelRayDataset(ds, rays, "train", ray_store=store)
    assert seen
