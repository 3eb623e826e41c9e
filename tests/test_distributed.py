"""Distributed sharding: each rank gets a disjoint shard of the epoch's batches, the ranks
together cover the epoch once, and every rank yields the same number of batches.

The sampler's sharding is checked directly for many sizes; then 2 and 4 processes (spawned,
``torch.distributed`` with the gloo back end on 127.0.0.1) each run a ``GPURayLoader``
(host store, CPU) whose rank and world size come from ``torch.distributed``, and their
batches are compared with a single-process run of the same seed, bit for bit.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpuloader.augment import transforms as T
from gpuloader.loading.dataset import HierarchicalVoxelRayDataset
from gpuloader.loading.loader import GPURayLoader
from gpuloader.loading.sampler import RayBatchSampler, shard_batches

try:
    from tests import _loading
except ImportError:
    import _loading

RAYS, SPB = 200, 3
EPOCHS = (0, 1)


assert_batches_equal = partial(_loading.assert_batches_equal, list_dtypes=False)


def full_transform() -> T.Compose:
    return _loading.full_transform(30, occupancy_jitter=False)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _loading.generate(
        tmp_path_factory, "dist_data", ("asym", "torus", "box"), 30, expect_warning=True
    )


def make_loader(dirs, **kw) -> GPURayLoader:
    ds = HierarchicalVoxelRayDataset(dirs[0], dirs[1], split="train")
    return GPURayLoader(ds, RAYS, SPB, transform=full_transform(), device="cpu", store="host",
                        num_workers=0, backend="torch", **kw)  # fmt: skip


# -- the sampler's shards ------------------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [False, True])
def test_shard_batches_disjoint_complete_equal(drop_last):
    for n in range(0, 13):
        batches = [[i] for i in range(n)]
        for ws in range(1, 6):
            shards = [shard_batches(batches, r, ws, drop_last) for r in range(ws)]
            lengths = {len(s) for s in shards}
            assert len(lengths) == 1, (n, ws)
            per = lengths.pop()
            assert per == (n // ws if drop_last else -(-n // ws))
            interleaved = [shards[j % ws][j // ws] for j in range(per * ws)]
            if drop_last:  # the remainder dropped, nothing repeated
                assert interleaved == batches[: n - n % ws]
            else:  # all once, then the first ones repeated to fill the last round
                assert interleaved[:n] == batches
                assert interleaved[n:] == (batches * ws)[: per * ws - n]


def test_sampler_shards_follow_the_global_order(data_dirs):
    ds = HierarchicalVoxelRayDataset(data_dirs[0], data_dirs[1], split="train")
    for drop_last in (False, True):
        one = RayBatchSampler(ds, RAYS, SPB, seed=4, drop_last=drop_last)
        assert (one.rank, one.world_size) == (0, 1)  # torch.distributed is not initialized
        for ws in (2, 3, 4):
            ranks = [
                RayBatchSampler(ds, RAYS, SPB, seed=4, drop_last=drop_last, rank=r, world_size=ws)
                for r in range(ws)
            ]
            assert len({len(s) for s in ranks}) == 1
            glob = one.batches(6)
            assert ranks[0].global_batches(6) == glob
            for r, s in enumerate(ranks):
                assert s.batches(6) == shard_batches(glob, r, ws, drop_last)
                s.set_epoch(6)
                assert list(s) == s.batches(6) and len(s.batches(6)) == len(s)
    with pytest.raises(ValueError, match="rank"):
        RayBatchSampler(ds, RAYS, SPB, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        RayBatchSampler(ds, RAYS, SPB, rank=0, world_size=0)


def test_loader_shards_without_torch_distributed(data_dirs):
    """Explicit rank/world_size: the rank's loader yields its shard of the global batches."""
    with make_loader(data_dirs, world_size=1) as one:
        glob = list(one)
    got = []
    for r in range(2):
        with make_loader(data_dirs, rank=r, world_size=2) as ld:
            assert (ld.sampler.rank, ld.sampler.world_size) == (r, 2)
            assert len(ld) == -(-len(glob) // 2)
            got.append(list(ld))
    assert_batches_equal(got[0], shard_batches(glob, 0, 2, False))
    assert_batches_equal(got[1], shard_batches(glob, 1, 2, False))


# -- real processes: torch.distributed with gloo -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world_size: int, port: int, dirs, out: Path, drop_last: bool) -> None:
    """One rank: its loader's batches of every epoch, a collective per batch (as DDP's
    gradient all-reduce), a resume from a mid-epoch state; saved to ``out/rank<r>.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        result: dict = {"batches": {}, "requests": {}}
        with make_loader(dirs, drop_last=drop_last) as ld:  # rank, world size: from dist
            assert (ld.sampler.rank, ld.sampler.world_size) == (rank, world_size)
            for epoch in EPOCHS:
                ld.set_epoch(epoch)
                batches = []
                for batch in ld:
                    rays = batch["num_rays"].sum().reshape(1).float()
                    dist.all_reduce(rays)  # a rank short of batches would block here
                    batches.append(batch)
                result["batches"][epoch] = batches
                result["requests"][epoch] = [
                    [tuple(r) for r in b] for b in ld.sampler.batches(epoch)
                ]
            lengths = [None] * world_size
            dist.all_gather_object(lengths, len(result["batches"][0]))
            result["lengths"] = lengths
            ld.set_epoch(1)
            it = iter(ld)
            next(it)
            state = ld.state_dict()
            del it
        with make_loader(dirs, drop_last=drop_last) as fresh:  # after a restart
            fresh.load_state_dict(state)
            result["resumed"] = list(fresh)
        torch.save(result, out / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size,drop_last", [(2, False), (4, False), (3, True)])
def test_processes_with_gloo(data_dirs, tmp_path, world_size, drop_last):
    mp.spawn(
        _rank_main,
        args=(world_size, _free_port(), data_dirs, tmp_path, drop_last),
        nprocs=world_size,
        join=True,
    )
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    with make_loader(data_dirs, drop_last=drop_last) as one:
        for epoch in EPOCHS:
            one.set_epoch(epoch)
            glob = list(one)
            glob_requests = [[tuple(r) for r in b] for b in one.sampler.batches(epoch)]
            n = len(glob)
            assert n == len(glob_requests) > world_size
            # (22 batches, 20 with drop_last: 4 ranks pad 2, 3 ranks drop 2)
            assert world_size == 2 or n % world_size
            per = n // world_size if drop_last else -(-n // world_size)
            # equal lengths on every rank
            assert all(len(res["batches"][epoch]) == per for res in results)
            assert results[0]["lengths"] == [per] * world_size
            # identical batches: rank r holds global batches r, r + world_size, ...
            for r, res in enumerate(results):
                want = shard_batches(glob, r, world_size, drop_last)
                assert_batches_equal(res["batches"][epoch], want)
            # disjoint and complete: every sample of the epoch once (padding only repeats)
            shards = [res["requests"][epoch] for res in results]
            interleaved = [shards[j % world_size][j // world_size] for j in range(per * world_size)]
            kept = n - n % world_size if drop_last else n
            assert interleaved[:kept] == glob_requests[:kept]
            assert interleaved[kept:] == (glob_requests * world_size)[: per * world_size - kept]
            seen = [req[0] for b in interleaved[:kept] for req in b]
            assert len(seen) == len(set(seen))
            if not drop_last:
                assert sorted(seen) == list(range(len(one.dataset)))
    for res in results:  # the resumed rank goes on with its own shard
        assert_batches_equal(res["resumed"], res["batches"][1][1:])
