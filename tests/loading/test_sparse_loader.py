"""Sparse voxels from the GPU loader (``sparse_voxels=True`` datasets).

* ``dense_batch_to_sparse`` on a batch of zero-padded grids of mixed sizes equals
  ``collate_ray_batch`` of the per-sample conversions (``voxels_to_sparse_coo`` /
  ``voxels_to_sparse_index``) bit for bit: keys, order of voxels and of edges, dtypes;
* ``GPURayLoader`` on a sparse dataset (coo; graph with 6 / 18 / 26 neighbours) gives the
  batches of the CPU API (DataLoader + RayBatchSampler + collate_ray_batch), from a host
  store, streaming per sample and streaming whole batches from a pack;
* on a GPU, the converter on CUDA equals the CPU one (``-m gpu``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from gpuloader import PackedRayStore, pack_rays
from gpuloader.dataset.collate import collate_ray_batch
from gpuloader.format.sparse import voxels_to_sparse_coo, voxels_to_sparse_index
from gpuloader.loading.loader import GPURayLoader
from gpuloader.loading.sources.resident import FusedBatches
from gpuloader.loading.sparse_batch import dense_batch_to_sparse, sparse_batches
from gpuloader.plan.sampler import RayBatchSampler
from gpuloader.reading.pipeline import dali_available
from support import loading_helpers as _loading

RAYS, SPB = 300, 5
MODES = [("coo", 6), ("graph", 6), ("graph", 18), ("graph", 26)]
MODE_IDS = [f"{m}-{c}" for m, c in MODES]

make_dataset = _loading.make_dataset
cpu_api = partial(_loading.cpu_api, rays=RAYS, spb=SPB)
assert_batches_equal = partial(_loading.assert_batches_equal, nonempty=True, key_order=True)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _loading.generate(tmp_path_factory, "sparse_loader_data")


@pytest.fixture(scope="module")
def pack_dir(data_dirs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sparse_loader_pack") / "pack"
    pack_rays(data_dirs[1], out, progress=False)
    return out


# -- the batched converter ---------------------------------------------------------------------


def random_batch(seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, list]:
    """A padded (B, 1, S, S, S) batch of random grids of mixed shapes (values in [0, 1))."""
    r = np.random.default_rng(seed)
    b = int(r.integers(1, 6))
    shapes = [tuple(int(s) for s in r.integers(1, 8, size=3)) for _ in range(b)]
    if seed % 3 == 0:  # some all-empty and some full grids
        shapes[0] = (int(r.integers(1, 5)),) * 3
    big = np.max(shapes, axis=0)
    voxels = torch.zeros((b, 1, *big.tolist()), dtype=torch.float32)
    grids = []
    for i, (d, h, w) in enumerate(shapes):
        p = r.uniform(0.0, 1.0)
        g = torch.from_numpy(
            np.where(r.random((d, h, w)) < p, r.uniform(0.5, 1.0, (d, h, w)), 0.0)
        ).to(torch.float32)[None]
        if seed % 3 == 0 and i == 0:
            g = torch.full_like(g, float(seed % 2))
        voxels[i, :, :d, :h, :w] = g
        grids.append(g)
    vshapes = torch.tensor(shapes, dtype=torch.long)
    return voxels.to(device), vshapes.to(device), grids


def per_sample(grids: list, mode: str, connectivity: int) -> dict:
    """collate_ray_batch's sparse keys of the per-sample conversions (the dataset's)."""
    samples = []
    for g in grids:
        s = {"origins": torch.zeros((0, 3)), "directions": torch.zeros((0, 3))}
        s.update(distances=torch.zeros(0), hits=torch.zeros(0))
        if mode == "coo":
            sp = voxels_to_sparse_coo(g)
            s.update(voxel_features=sp["features"].to(torch.float32))
        else:
            sp = voxels_to_sparse_index(g, connectivity=connectivity)
            s.update(voxel_features=sp["features"], voxel_edge_index=sp["edge_index"])
        s.update(voxel_pos=sp["pos"], voxel_shape=sp["shape"])
        samples.append(s)
    out = collate_ray_batch(samples)
    keys = ["voxel_pos", "voxel_features", "voxel_batch", "voxel_shapes", "num_voxels"]
    keys += ["voxel_edge_index"] if mode == "graph" else []
    return {k: out[k] for k in keys}


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k, w in want.items():
        g = got[k].cpu()
        assert g.dtype == w.dtype and g.shape == w.shape, (k, g.dtype, w.dtype, g.shape, w.shape)
        assert torch.equal(g, w), k


@pytest.mark.parametrize("mode,conn", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("seed", range(10))
def test_converter_equals_per_sample_functions(seed, mode, conn):
    voxels, vshapes, grids = random_batch(seed)
    got = dense_batch_to_sparse(voxels, vshapes, mode, conn)
    assert_same(got, per_sample(grids, mode, conn))
    # bool grids and a (B, D, H, W) batch give the same
    again = dense_batch_to_sparse(voxels[:, 0] > 0.5, vshapes, mode, conn)
    if mode == "coo":  # features of a bool grid are its values: ones
        assert torch.equal(again.pop("voxel_features"), torch.ones_like(got["voxel_features"]))
        got.pop("voxel_features")
    assert_same(again, got)


def test_converter_ignores_values_outside_each_grid_and_adds_self_loops():
    voxels, vshapes, grids = random_batch(4)
    dirty = voxels.clone()
    for i, (d, h, w) in enumerate(vshapes.tolist()):
        box = torch.ones_like(dirty[i, 0], dtype=torch.bool)
        box[:d, :h, :w] = False
        dirty[i, 0][box] = 1.0
    for mode, conn in MODES:
        got = dense_batch_to_sparse(dirty, vshapes, mode, conn)
        assert_same(got, per_sample(grids, mode, conn))
    loops = dense_batch_to_sparse(voxels, vshapes, "graph", 26, add_self_loops=True)
    first = torch.cumsum(loops["num_voxels"], 0) - loops["num_voxels"]
    want = torch.cat(
        [
            voxels_to_sparse_index(g, connectivity=26, add_self_loops=True)["edge_index"] + f
            for g, f in zip(grids, first.tolist(), strict=True)
        ],
        dim=1,
    )
    assert torch.equal(loops["voxel_edge_index"], want)


def test_converter_checks_its_arguments():
    voxels, vshapes, _ = random_batch(1)
    with pytest.raises(ValueError, match="mode"):
        dense_batch_to_sparse(voxels, vshapes, "csr")
    with pytest.raises(ValueError, match="connectivity"):
        dense_batch_to_sparse(voxels, vshapes, "coo", 10)
    with pytest.raises(ValueError, match="B, 1, D, H, W"):
        dense_batch_to_sparse(voxels[0, 0], vshapes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode,conn", MODES, ids=MODE_IDS)
def test_converter_on_cuda_equals_cpu(mode, conn):
    for seed in range(6):
        voxels, vshapes, _ = random_batch(seed)
        want = dense_batch_to_sparse(voxels, vshapes, mode, conn)
        got = dense_batch_to_sparse(voxels.cuda(), vshapes.cuda(), mode, conn)
        assert all(t.is_cuda for t in got.values())
        assert_same(got, want)
    big = (torch.rand((8, 1, 64, 64, 64), device="cuda") < 0.3).float()
    shapes = torch.full((8, 3), 64, dtype=torch.long)
    got = dense_batch_to_sparse(big, shapes, mode, conn)
    assert_same(got, dense_batch_to_sparse(big.cpu(), shapes, mode, conn))


# -- the loader: the CPU API's batches ---------------------------------------------------------


@pytest.mark.parametrize("mode,conn", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("store", ["host", "stream", "stream-pack"])
def test_loader_sparse_batches_equal_cpu_api(data_dirs, pack_dir, mode, conn, store):
    kw = dict(sparse_voxels=True, sparse_mode=mode, sparse_connectivity=conn)
    ds = make_dataset(data_dirs, _loading.full_transform(), **kw)
    src = ds
    if store == "stream-pack":
        src = make_dataset(
            data_dirs, _loading.full_transform(), ray_store=PackedRayStore(pack_dir), **kw
        )
    where = "stream" if store.startswith("stream") else store
    with GPURayLoader(src, RAYS, SPB, device="cpu", store=where, num_workers=0) as ld:
        assert ld.store == where
        for epoch in (0, 1):
            ld.set_epoch(epoch)
            got = list(ld)
            assert_batches_equal(got, cpu_api(ds, epoch))
            assert "voxels" not in got[0] and ("voxel_edge_index" in got[0]) == (mode == "graph")


@pytest.mark.parametrize("mode,conn", [("coo", 6), ("graph", 26)], ids=["coo", "graph-26"])
def test_loader_sparse_mixed_levels_no_transform_and_resume(data_dirs, mode, conn):
    """No transform and a resumed pass; grids of several sizes in one batch (zero padding:
    the sampler's ``mixed_levels``, through the loader's sparse step)."""
    kw = dict(sparse_voxels=True, sparse_mode=mode, sparse_connectivity=conn)
    ds = make_dataset(data_dirs, **kw)
    want = _loading.cpu_api(ds, 0, rays=1000, spb=3)
    with GPURayLoader(ds, 1000, 3, device="cpu", store="host", num_workers=0) as ld:
        assert_batches_equal(list(ld), want)
        ld.set_epoch(0)
        it = iter(ld)
        next(it)
        state = ld.state_dict()
        it.close()
        ld.load_state_dict(state)
        assert_batches_equal(list(ld), want[1:])
    fused = make_dataset(data_dirs, _loading.full_transform(), **kw)
    with GPURayLoader(fused, RAYS, SPB, device="cpu", store="host", num_workers=0) as ld:
        sampler = RayBatchSampler(fused, RAYS, SPB, mixed_levels=True)
        segment = _loading.full_transform().segments[0]
        batches = FusedBatches(ld.resident, fused, sampler, segment, torch.device("cpu"))
        got = list(sparse_batches(batches.batches(2), mode, conn))
    assert any(len(set(b["levels"].tolist())) > 1 for b in got)
    assert_batches_equal(got, cpu_api(fused, 2, mixed_levels=True))


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(
            "dali", marks=pytest.mark.skipif(not dali_available(), reason="no DALI"), id="dali"
        ),
        pytest.param("torch", id="torch-workers"),
    ],
)
def test_loader_sparse_with_reader_workers(data_dirs, backend):
    """The per-sample reader in worker processes (DALI or torch), streaming."""
    kw = dict(sparse_voxels=True, sparse_mode="graph", sparse_connectivity=26)
    ds = make_dataset(data_dirs, _loading.full_transform(), **kw)
    with GPURayLoader(
        ds, RAYS, SPB, num_workers=2, device="cpu", backend=backend, store="stream"
    ) as ld:
        assert ld.backend == backend
        for epoch in (0, 1):
            ld.set_epoch(epoch)
            assert_batches_equal(list(ld), cpu_api(ds, epoch))
