"""Sparse voxels (the newer upstream API): utilities, dataset samples, collate, augmentation.

Properties, on random grids of random shapes:

* ``voxels_to_sparse_coo`` lists exactly the occupied voxels, in C order, as (x, y, z), and
  ``sparse_coo_to_dense`` gives the grid back (round trip);
* ``voxels_to_sparse_index`` has exactly the edges of a brute-force neighbour search
  (every ordered pair of occupied voxels at Chebyshev distance 1 whose offset has at most
  1 / 2 / 3 non-zero components for connectivity 6 / 18 / 26), no duplicates;
* a sparse dataset sample is its dense sample converted, also after a geometric transform,
  and its rays re-trace through the sparse grid densified back;
* ``collate_ray_batch`` concatenates sparse samples with ``voxel_batch``, ``voxel_shapes``
  and per-sample edge offsets.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gpuloader import (
    compute_sparse_statistics,
    sparse_coo_to_dense,
    voxels_to_sparse_coo,
    voxels_to_sparse_index,
)
from gpuloader.augment import transforms as T
from gpuloader.dataset.collate import collate_ray_batch
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.format.sparse import neighbour_offsets
from gpuloader.plan.sampler import RayBatchSampler
from gpuloader.tracer import trace


def random_grid(seed: int) -> np.ndarray:
    r = np.random.default_rng(seed)
    shape = tuple(int(s) for s in r.integers(1, 7, size=3))
    return r.random(shape) < r.uniform(0.0, 0.9)


def brute_force_edges(grid: np.ndarray, connectivity: int) -> set[tuple[int, int]]:
    """Every ordered pair (i, j) of occupied neighbours, by comparing all pairs."""
    coords = np.argwhere(grid)  # C order: node numbers
    max_nonzero = {6: 1, 18: 2, 26: 3}[connectivity]
    edges = set()
    for i, a in enumerate(coords):
        for j, b in enumerate(coords):
            d = np.abs(a - b)
            if i != j and d.max() == 1 and np.count_nonzero(d) <= max_nonzero:
                edges.add((i, j))
    return edges


# -- utilities --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_coo_lists_occupied_voxels_and_round_trips(seed):
    grid = random_grid(seed)
    values = grid.astype(np.float32) * np.float32(0.9)  # above the 0.5 threshold
    sp = voxels_to_sparse_coo(torch.from_numpy(values)[None])
    coords = np.argwhere(grid)
    assert sp["pos"].dtype == torch.float32 and sp["pos"].shape == (len(coords), 3)
    np.testing.assert_array_equal(sp["pos"].numpy(), coords[:, ::-1])  # (x, y, z)
    assert sp["num_nodes"] == len(coords)
    assert sp["shape"].dtype == torch.long and sp["shape"].tolist() == list(grid.shape)
    assert sp["features"].shape == (len(coords), 1)
    np.testing.assert_allclose(sp["features"].numpy(), 0.9, rtol=1e-6)
    dense = sparse_coo_to_dense(sp)
    assert dense.shape == (1, *grid.shape) and dense.dtype == torch.float32
    np.testing.assert_array_equal(dense[0].numpy(), values)
    # numpy input, bool grid, explicit shape, and the shape inferred from the points
    sp_np = voxels_to_sparse_coo(grid)
    assert torch.equal(sp_np["pos"], sp["pos"]) and sp_np["features"].dtype == torch.bool
    np.testing.assert_array_equal(sparse_coo_to_dense(sp_np, grid.shape)[0].numpy(), grid)
    if len(coords):
        inferred = sparse_coo_to_dense({"pos": sp["pos"], "features": sp["features"]})
        ext = tuple(coords.max(axis=0) + 1)
        np.testing.assert_array_equal(inferred[0].numpy(), values[: ext[0], : ext[1], : ext[2]])


def test_coo_threshold_and_batched_input():
    grid = torch.tensor([0.2, 0.5, 0.51, 1.0]).reshape(1, 1, 4)
    sp = voxels_to_sparse_coo(grid, threshold=0.5)
    assert sp["pos"][:, 0].tolist() == [2.0, 3.0]
    batch = torch.zeros(3, 1, 2, 2, 2)
    batch[0, 0, 1, 1, 1] = 1
    batch[2, 0, 0, 1, 0] = 1
    batch[2, 0, 1, 0, 0] = 1
    sp = voxels_to_sparse_coo(batch, return_batch=True)
    assert sp["batch"].tolist() == [0, 2, 2]
    assert sp["pos"].tolist() == [[1, 1, 1], [0, 1, 0], [0, 0, 1]]
    assert sp["shape"].tolist() == [2, 2, 2]
    assert "batch" not in voxels_to_sparse_coo(batch)
    with pytest.raises(ValueError, match="3, 4 or 5"):
        voxels_to_sparse_coo(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="no points and no shape"):
        sparse_coo_to_dense({"pos": torch.zeros(0, 3), "features": torch.zeros(0, 1)})


def test_neighbour_offsets():
    for conn, nonzero in ((6, 1), (18, 2), (26, 3)):
        off = neighbour_offsets(conn).numpy()
        assert len(off) == conn == len({tuple(o) for o in off})
        counts = np.count_nonzero(off, axis=1)
        assert counts.min() == 1 and counts.max() == nonzero and np.abs(off).max() == 1
    with pytest.raises(ValueError, match="6, 18 or 26"):
        voxels_to_sparse_index(np.zeros((2, 2, 2)), connectivity=8)


@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize("seed", range(8))
def test_graph_edges_equal_brute_force_neighbours(seed, connectivity):
    grid = random_grid(100 + seed)
    g = voxels_to_sparse_index(torch.from_numpy(grid)[None].float(), connectivity=connectivity)
    coords = np.argwhere(grid)
    np.testing.assert_array_equal(g["pos"].numpy(), coords[:, ::-1])
    assert g["num_nodes"] == len(coords)
    assert g["edge_index"].dtype == torch.long and g["edge_index"].shape[0] == 2
    got = [tuple(e) for e in g["edge_index"].t().tolist()]
    assert len(got) == len(set(got))  # no duplicates
    assert set(got) == brute_force_edges(grid, connectivity)
    assert g["features"].shape == (len(coords), 1) and bool((g["features"] == 1).all())
    loops = voxels_to_sparse_index(grid, add_self_loops=True, connectivity=connectivity)
    extra = loops["edge_index"][:, len(got) :].tolist()
    assert extra == [list(range(len(coords)))] * 2
    stats = compute_sparse_statistics(g)
    assert stats["num_occupied"] == len(coords) and stats["total_voxels"] == grid.size
    assert stats["num_edges"] == len(got)
    assert stats["occupancy"] == pytest.approx(len(coords) / grid.size)
    assert stats["sparsity"] == pytest.approx(1 - len(coords) / grid.size)
    if len(coords):
        assert stats["avg_degree"] == pytest.approx(len(got) / len(coords))


def test_statistics_of_empty_and_coo():
    sp = voxels_to_sparse_coo(np.zeros((2, 3, 4), bool))
    stats = compute_sparse_statistics(sp)
    assert stats["num_occupied"] == 0 and stats["total_voxels"] == 24
    assert stats["compression_ratio"] == float("inf") and "num_edges" not in stats
    g = voxels_to_sparse_index(np.zeros((2, 3, 4), bool))
    assert g["edge_index"].shape == (2, 0) and g["pos"].shape == (0, 3)


# -- the dataset ---------------------------------------------------------------------------------


def geometric() -> T.Compose:
    return T.Compose([T.RandomRotation90(p=0.9), T.RandomFlip(axes=[0, 1, 2], p=0.5)])


@pytest.mark.parametrize("mode,connectivity", [("coo", 6), ("graph", 6), ("graph", 26)])
def test_sparse_samples_are_the_dense_samples_converted(tiny_dataset3, mode, connectivity):
    kw = dict(split="train", transform=geometric(), seed=5, include_empty=True)
    dense = HierarchicalVoxelRayDataset(*tiny_dataset3, **kw)
    sparse = HierarchicalVoxelRayDataset(
        *tiny_dataset3,
        sparse_voxels=True,
        sparse_mode=mode,
        sparse_connectivity=connectivity,
        **kw,
    )
    assert len(sparse) == len(dense)
    moved = 0
    for i in range(len(dense)):
        d, s = dense[i], sparse[i]
        assert "voxels" not in s
        grid = d["voxels"][0].numpy() > 0.5
        assert s["voxel_pos"].dtype == torch.float32
        assert s["voxel_features"].shape == (int(grid.sum()), 1)
        assert s["voxel_features"].dtype == torch.float32
        assert s["voxel_shape"].dtype == torch.long and s["voxel_shape"].tolist() == list(
            grid.shape
        )
        np.testing.assert_array_equal(s["voxel_pos"].numpy(), np.argwhere(grid)[:, ::-1])
        if mode == "coo":
            assert s["num_voxels"] == int(grid.sum()) and "voxel_edge_index" not in s
        else:
            assert "num_voxels" not in s
            if grid.shape[0] <= 8:  # the brute force is quadratic
                edges = {tuple(e) for e in s["voxel_edge_index"].t().tolist()}
                assert edges == brute_force_edges(grid, connectivity)
        for k in ("origins", "directions", "distances", "view_positions", "view_ids"):
            assert torch.equal(s[k], d[k]), k
        assert (s["level"], s["hash"]) == (d["level"], d["hash"])
        raw = sparse.voxels(i)
        moved += not np.array_equal(raw, grid)
        # the rays re-trace through the sparse grid densified back
        back = (
            sparse_coo_to_dense(
                {"pos": s["voxel_pos"], "features": s["voxel_features"]},
                tuple(s["voxel_shape"].tolist()),
            )[0].numpy()
            > 0.5
        )
        np.testing.assert_array_equal(back, grid)
        traced = trace(back, s["origins"].numpy(), s["directions"].numpy())
        np.testing.assert_allclose(traced, s["distances"].numpy(), atol=1e-4)
    assert moved > 3  # the symmetries really moved the grids


def test_sparse_batches_through_the_cpu_api(tiny_dataset3):
    ds = HierarchicalVoxelRayDataset(
        *tiny_dataset3,
        split="train",
        sparse_voxels=True,
        sparse_mode="graph",
        sparse_connectivity=18,
    )
    sampler = RayBatchSampler(ds, 200, 4, mixed_levels=True)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_ray_batch)
    batches = list(loader)
    assert len(batches) == len(sampler) > 1
    for batch, requests in zip(batches, sampler.batches(0), strict=True):
        samples = [ds[r] for r in requests]
        counts = [len(s["voxel_pos"]) for s in samples]
        assert batch["num_voxels"].tolist() == counts
        assert torch.equal(batch["voxel_pos"], torch.cat([s["voxel_pos"] for s in samples]))
        assert torch.equal(
            batch["voxel_batch"],
            torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(counts)),
        )
        assert batch["voxel_shapes"].tolist() == [s["voxel_shape"].tolist() for s in samples]
        assert batch["voxel_features"].shape == (sum(counts), 1)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        want = torch.cat(
            [s["voxel_edge_index"] + int(f) for s, f in zip(samples, first, strict=True)], 1
        )
        assert torch.equal(batch["voxel_edge_index"], want)
        # every edge stays inside its own sample
        eb = batch["voxel_batch"][batch["voxel_edge_index"]]
        assert torch.equal(eb[0], eb[1])
        assert "voxels" not in batch and int(batch["num_rays"].sum()) == len(batch["origins"])


def test_collate_sparse_edge_cases():
    def sample(grid, graph):
        vox = torch.from_numpy(grid.astype(np.float32))[None]
        sp = voxels_to_sparse_index(vox) if graph else voxels_to_sparse_coo(vox)
        s = {
            "voxel_pos": sp["pos"],
            "voxel_features": sp["features"].float(),
            "voxel_shape": sp["shape"],
            "origins": torch.zeros(2, 3),
            "directions": torch.zeros(2, 3),
            "distances": torch.zeros(2),
            "hits": torch.zeros(2),
        }
        if graph:
            s["voxel_edge_index"] = sp["edge_index"]
        return s

    empty, full = np.zeros((2, 2, 2), bool), np.ones((4, 4, 4), bool)
    batch = collate_ray_batch([sample(empty, True), sample(full, True), sample(empty, True)])
    assert batch["num_voxels"].tolist() == [0, 64, 0]
    assert batch["voxel_edge_index"].min() >= 0 and batch["voxel_edge_index"].max() == 63
    assert batch["voxel_shapes"].tolist() == [[2, 2, 2], [4, 4, 4], [2, 2, 2]]
    dense = {
        "voxels": torch.zeros(1, 2, 2, 2),
        **{k: v for k, v in sample(empty, False).items() if not k.startswith("voxel_")},
    }
    with pytest.raises(ValueError, match="mixes sparse"):
        collate_ray_batch([sample(full, False), dense])
    with pytest.raises(ValueError, match="mixes graph and coo"):
        collate_ray_batch([sample(full, False), sample(full, True)])


def test_sparse_arguments_are_checked_and_the_gpu_loader_makes_them(tiny_dataset):
    with pytest.raises(ValueError, match="sparse_mode"):
        HierarchicalVoxelRayDataset(*tiny_dataset, sparse_voxels=True, sparse_mode="csr")
    with pytest.raises(ValueError, match="sparse_connectivity"):
        HierarchicalVoxelRayDataset(*tiny_dataset, sparse_voxels=True, sparse_connectivity=10)
    from gpuloader.loading.loader import GPURayLoader

    # the loader's sparse batches equal the CPU API's: tests/test_sparse_loader.py
    ds = HierarchicalVoxelRayDataset(*tiny_dataset, sparse_voxels=True)
    with GPURayLoader(ds, 100, 2, device="cpu", num_workers=0) as ld:
        batch = next(iter(ld))
    assert "voxels" not in batch and batch["voxel_pos"].shape[1] == 3


def test_all_neighbour_pairs_of_a_full_grid():
    """A full 3^3 grid: the centre has 6 / 18 / 26 neighbours, a corner 3 / 6 / 7."""
    grid = np.ones((3, 3, 3), bool)
    for conn, centre, corner in ((6, 6, 3), (18, 18, 6), (26, 26, 7)):
        e = voxels_to_sparse_index(grid, connectivity=conn)["edge_index"]
        deg = torch.bincount(e[0], minlength=27)
        assert int(deg[13]) == centre and int(deg[0]) == corner
        assert {tuple(x) for x in e.t().tolist()} == brute_force_edges(grid, conn)
