"""``GPURayLoader(shard_store=True)``: each rank's resident store holds only the fixed subset
of samples its batches use (``RayBatchSampler(shard="samples")``), and its batches are the
CPU API's with that sampler, bit for bit (issue 8).

Ranks are given explicitly (``rank``, ``world_size``): the loader reads no process group
state; tests/test_distributed.py launches gloo processes for the sampler.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from gpuloader.dataset.collate import collate_ray_batch
from gpuloader.loading.loader import GPURayLoader
from gpuloader.plan.sampler import RayBatchSampler
from gpuloader.reading.fill import fill_store
from gpuloader.reading.headers import estimate_layout
from gpuloader.stores.layout import store_bytes
from support import loading_helpers as _loading

RAYS, SPB, SEED = 200, 3, 11


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _loading.generate(tmp_path_factory, "shard_store_data", ("asym", "torus", "box"), 30)


def _dataset(dirs):
    return _loading.make_dataset(dirs, _loading.full_transform(num_rays=60), seed=SEED)


def _loader(ds, rank: int, world: int, **kw) -> GPURayLoader:
    kw = {"store": "host", "device": "cpu", "num_workers": 0, "backend": "torch", **kw}
    kw.update(seed=SEED, rank=rank, world_size=world, shard_store=True, progress=False)
    return GPURayLoader(ds, RAYS, SPB, **kw)


def _cpu_api(ds, rank: int, world: int, epoch: int) -> list[dict]:
    sampler = RayBatchSampler(
        ds, RAYS, SPB, shuffle=True, seed=SEED, rank=rank, world_size=world, shard="samples"
    )
    sampler.set_epoch(epoch)
    return list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate_ray_batch))


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_holds_only_its_samples_and_yields_the_cpu_api_batches(data_dirs, world):
    ds = _dataset(data_dirs)
    full = store_bytes(estimate_layout(ds))
    held, lengths = [], set()
    for rank in range(world):
        with _loader(ds, rank, world, num_workers=2 if rank == 0 else 0) as loader:
            mine = loader.sampler.shard_indices()
            store = loader.resident
            assert np.array_equal(store.held, mine)
            others = np.setdiff1d(np.arange(len(ds)), mine)
            assert (store.layout.ray_count[others] == 0).all()
            assert (store.layout.ray_count[mine] > 0).all()
            assert store.nbytes < full  # only the shard's rays, views and grids
            assert len(store.arrays["distances"]) == int(store.layout.ray_count.sum())
            held.append(mine)
            lengths.add(len(loader))
            for epoch in (0, 1):
                loader.set_epoch(epoch)
                got = list(loader)
                want = _cpu_api(ds, rank, world, epoch)
                _loading.assert_batches_equal(got, want, nonempty=True)
                used = {h for b in got for h in b["hashes"]}
                assert used <= {ds.samples[i]["hash"] for i in mine}
    assert len(lengths) == 1  # every rank the same number of batches
    every = np.concatenate(held)
    assert len(every) == len(ds) and set(every.tolist()) == set(range(len(ds)))


def test_shard_mode_is_part_of_the_resume_state(data_dirs):
    ds = _dataset(data_dirs)
    with _loader(ds, 1, 2) as loader:
        it = iter(loader)
        first = next(it)
        state = loader.state_dict()
        assert state["shard"] == "samples" and state["batches_yielded"] == 1
        rest = list(it)
    with _loader(ds, 1, 2) as again:
        again.load_state_dict(state)
        _loading.assert_batches_equal(list(again), rest)
    del first
    plain = GPURayLoader(
        ds, RAYS, SPB, seed=SEED, rank=1, world_size=2, store="stream", device="cpu",
        num_workers=0, backend="torch",
    )  # fmt: skip
    with plain, pytest.raises(ValueError, match="the state was saved with"):
        plain.load_state_dict(state)


def test_a_store_of_another_rank_is_refused(data_dirs):
    ds = _dataset(data_dirs)
    with _loader(ds, 0, 2, store="stream") as zero:
        theirs = zero.sampler.shard_indices()
    store = fill_store(ds, "host", num_workers=0, progress=False, indices=theirs)
    with pytest.raises(ValueError, match="holds only part of the split"):
        _loader(ds, 1, 2, store=store)
    with _loader(ds, 0, 2, store=store) as mine:  # the rank it was filled for
        mine.set_epoch(3)
        _loading.assert_batches_equal(list(mine), _cpu_api(ds, 0, 2, 3), nonempty=True)
