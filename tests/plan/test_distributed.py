"""Distributed sharding: each rank gets a disjoint shard of the epoch's batches, the ranks
together cover the epoch once, and every rank yields the same number of batches.

The sampler's sharding is checked directly for many sizes; then 2 and 4 processes (spawned,
``torch.distributed`` with the gloo back end on 127.0.0.1) each run a ``GPURayLoader``
(host store, CPU) whose rank and world size come from ``torch.distributed``, and their
batches are compared with a single-process run of the same seed, bit for bit.

``shard="samples"`` (each rank owns a fixed subset of the samples): the subsets are fixed
over epochs, disjoint and complete, every rank yields as many batches, a rank's batches read
only its subset and hold ``rays_per_batch`` rays; checked with explicit ranks for many sizes,
then with 2 and 4 gloo processes reading through a DataLoader.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from gpuloader.augment import transforms as T
from gpuloader.dataset.collate import collate_ray_batch
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.loading.loader import GPURayLoader
from gpuloader.plan.sampler import RayBatchSampler, allocate_rays, shard_batches
from support import loading_helpers as _loading

RAYS, SPB = 200, 3
EPOCHS = (0, 1)


assert_batches_equal = partial(_loading.assert_batches_equal, list_dtypes=False)


def full_transform() -> T.Compose:
    return _loading.full_transform(30, occupancy_jitter=False)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _loading.generate(tmp_path_factory, "dist_data", ("asym", "torus", "box"), 30)


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


def _init_gloo(rank: int, world_size: int, port: int) -> None:
    """This process as ``rank`` of a gloo group on 127.0.0.1 (one CPU thread)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )


def _rank_main(rank: int, world_size: int, port: int, dirs, out: Path, drop_last: bool) -> None:
    """One rank: its loader's batches of every epoch, a collective per batch (as DDP's
    gradient all-reduce), a resume from a mid-epoch state; saved to ``out/rank<r>.pt``."""
    _init_gloo(rank, world_size, port)
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


# -- shard="samples": a fixed subset of the samples per rank --------------------------------------


def _fake_dataset(n: int, seed: int = 0) -> SimpleNamespace:
    """``n`` samples over 3 levels (uneven), 5..80 rays each (many below a batch's share)."""
    gen = np.random.default_rng(seed)
    levels, rays = gen.choice(3, n, p=[0.5, 0.3, 0.2]), gen.integers(5, 80, n)
    samples = [{"level": int(lv), "num_rays": int(k)} for lv, k in zip(levels, rays, strict=True)]
    return SimpleNamespace(samples=samples, seed=11)


def _rank_samplers(ds, world_size: int, **kw) -> list[RayBatchSampler]:
    return [
        RayBatchSampler(ds, RAYS, SPB, rank=r, world_size=world_size, shard="samples", **kw)
        for r in range(world_size)
    ]


def check_sample_shards(ds, shards: list[np.ndarray], batches: list[list[list[tuple]]], kw: dict):
    """The properties of ``shard="samples"`` for one epoch: ``shards[r]`` is rank r's
    ``shard_indices()``, ``batches[r]`` its batches as ``(index, epoch, num_rays)`` tuples.
    A sample's capacity: ``ds.available_rays(i)`` where the dataset has it, else its
    ``num_rays``."""
    n, ws = len(ds.samples), len(shards)
    drop_last, mixed = kw.get("drop_last", False), kw.get("mixed_levels", False)
    owned = np.concatenate(shards)
    assert np.array_equal(np.sort(owned), np.arange(n))  # disjoint, complete
    sizes = [len(k) for k in shards]
    assert max(sizes) - min(sizes) <= 1
    assert len({len(b) for b in batches}) == 1  # equal batch counts
    avail = getattr(ds, "available_rays", lambda i: ds.samples[i]["num_rays"])
    capacity = [avail(i) for i in range(n)]
    for shard, mine in zip(shards, batches, strict=True):
        assert shard.dtype == np.int64 and np.all(np.diff(shard) > 0)
        seen = [q[0] for b in mine for q in b]
        assert set(seen) <= set(shard.tolist())  # only its own samples
        for b in mine:
            idx = [q[0] for q in b]
            assert 1 <= len(b) <= SPB and len(set(idx)) == len(idx)
            assert mixed or len({ds.samples[i]["level"] for i in idx}) == 1
            want = allocate_rays([capacity[i] for i in idx], RAYS)  # rays_per_batch honoured
            assert [q[2] for q in b] == want and sum(want) == min(
                RAYS, sum(capacity[i] for i in idx)
            )
        own = len({tuple(q[0] for q in b) for b in mine})
        if not drop_last:  # its samples once, then its first batches repeated
            first = [q[0] for b in mine[:own] for q in b]
            assert sorted(first) == shard.tolist()
            assert mine[own:] == (mine[:own] * ws)[: len(mine) - own]
        else:
            assert len(seen) == len(set(seen))


@pytest.mark.parametrize("world_size", [2, 3, 4, 7])
@pytest.mark.parametrize("kw", [{}, {"drop_last": True}, {"mixed_levels": True}])
def test_sample_shards_fixed_disjoint_complete_equal(world_size, kw):
    ds = _fake_dataset(61)
    ranks = _rank_samplers(ds, world_size, **kw)
    shards = [s.shard_indices() for s in ranks]
    for epoch in range(4):
        batches = [[[tuple(q) for q in b] for b in s.batches(epoch)] for s in ranks]
        check_sample_shards(ds, shards, batches, kw)
        assert all(len(b) == len(s) for b, s in zip(batches, ranks, strict=True))
        for r, s in enumerate(ranks):  # iteration, and the interleaved global list
            s.set_epoch(epoch)
            assert list(s) == s.batches(epoch)
            assert shard_batches(s.global_batches(epoch), r, world_size, s.drop_last) == s.batches(
                epoch
            )
            assert np.array_equal(s.shard_indices(), shards[r])  # fixed over epochs
        if epoch:
            assert ranks[0].batches(epoch) != ranks[0].batches(epoch - 1)  # reshuffled
    again = _rank_samplers(ds, world_size, **kw)  # a pure function of the seed
    assert all(np.array_equal(a.shard_indices(), b) for a, b in zip(again, shards, strict=True))
    other = _rank_samplers(ds, world_size, seed=12, **kw)
    assert any(not np.array_equal(a.shard_indices(), b) for a, b in zip(other, shards, strict=True))


def test_sample_shards_world_size_one_equals_batches(data_dirs):
    """One process: ``shard="samples"`` gives exactly the ``shard="batches"`` batches."""
    real = HierarchicalVoxelRayDataset(data_dirs[0], data_dirs[1], split="train")
    for ds in (real, _fake_dataset(40)):
        for kw in ({}, {"drop_last": True}, {"mixed_levels": True}, {"shuffle": False}):
            a = RayBatchSampler(ds, RAYS, SPB, rank=0, world_size=1, shard="samples", **kw)
            b = RayBatchSampler(ds, RAYS, SPB, rank=0, world_size=1, **kw)
            assert len(a) == len(b)
            assert np.array_equal(a.shard_indices(), np.arange(len(ds.samples)))
            assert np.array_equal(b.shard_indices(), a.shard_indices())
            for epoch in range(3):
                assert a.batches(epoch) == b.batches(epoch) == a.global_batches(epoch)


def test_sample_shards_resume_and_arguments():
    ds = _fake_dataset(50)
    s = RayBatchSampler(ds, RAYS, SPB, rank=1, world_size=3, shard="samples")
    s.set_epoch(2)
    it = iter(s)
    next(it), next(it)
    state = s.state_dict()
    assert state["shard"] == "samples" and state["batches_yielded"] == 2
    fresh = RayBatchSampler(ds, RAYS, SPB, rank=1, world_size=3, shard="samples")
    fresh.load_state_dict(state)
    assert list(fresh) == s.batches(2)[2:]
    plain = RayBatchSampler(ds, RAYS, SPB, rank=1, world_size=3)
    with pytest.raises(ValueError, match="shard"):
        plain.load_state_dict(dict(state, num_batches=len(plain)))
    with pytest.raises(ValueError, match="shard"):
        RayBatchSampler(ds, RAYS, SPB, shard="levels")
    with pytest.raises(ValueError, match="owns no samples"):
        RayBatchSampler(_fake_dataset(3), RAYS, SPB, rank=0, world_size=4, shard="samples")
    tiny = RayBatchSampler(  # fewer samples than ranks, but nothing to yield anyway
        _fake_dataset(3), RAYS, SPB, rank=3, world_size=4, shard="samples", drop_last=True
    )
    assert len(tiny) == 0 and list(tiny) == []


def _sample_rank_main(rank: int, world_size: int, port: int, dirs, out: Path) -> None:
    """One rank of ``shard="samples"``: a DataLoader over its sampler (rank and world size from
    ``torch.distributed``), a collective per batch; saved to ``out/rank<r>.pt``."""
    _init_gloo(rank, world_size, port)
    try:
        ds = HierarchicalVoxelRayDataset(dirs[0], dirs[1], split="train")
        sampler = RayBatchSampler(ds, RAYS, SPB, seed=9, shard="samples")
        assert (sampler.rank, sampler.world_size) == (rank, world_size)
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_ray_batch)
        result: dict = {"shard": {}, "requests": {}, "hashes": {}, "rays": {}}
        for epoch in EPOCHS:
            sampler.set_epoch(epoch)
            result["shard"][epoch] = sampler.shard_indices()
            result["requests"][epoch] = [[tuple(q) for q in b] for b in sampler.batches(epoch)]
            result["hashes"][epoch], result["rays"][epoch] = [], []
            for batch in loader:
                rays = batch["num_rays"].sum().reshape(1).float()
                dist.all_reduce(rays)  # a rank short of batches would block here
                result["hashes"][epoch].append(list(batch["hashes"]))
                result["rays"][epoch].append(batch["num_rays"].tolist())
        torch.save(result, out / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 4])
def test_sample_shards_processes_with_gloo(data_dirs, tmp_path, world_size):
    mp.spawn(
        _sample_rank_main,
        args=(world_size, _free_port(), data_dirs, tmp_path),
        nprocs=world_size,
        join=True,
    )
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    ds = HierarchicalVoxelRayDataset(data_dirs[0], data_dirs[1], split="train")
    ranks = _rank_samplers(ds, world_size, seed=9)
    shards = [res["shard"][EPOCHS[0]] for res in results]
    for epoch in EPOCHS:
        batches = [res["requests"][epoch] for res in results]
        check_sample_shards(ds, shards, batches, {})
        for r, res in enumerate(results):
            assert np.array_equal(res["shard"][epoch], shards[r])  # fixed over epochs
            assert np.array_equal(ranks[r].shard_indices(), shards[r])  # as a lone process
            assert batches[r] == [[tuple(q) for q in b] for b in ranks[r].batches(epoch)]
            # what the DataLoader read is what the sampler asked for
            want = [[ds.samples[q[0]]["hash"] for q in b] for b in batches[r]]
            assert res["hashes"][epoch] == want
            assert res["rays"][epoch] == [[q[2] for q in b] for b in batches[r]]
        full = [sum(k) == RAYS for res in results for k in res["rays"][epoch]]
        assert sum(full) > len(full) // 2  # most batches' sub-volumes hold RAYS rays or more


@pytest.mark.parametrize("new_world", [1, 3, 4])
def test_resume_with_another_world_size_skips_nothing(new_world):
    """shard="batches": a state of 2 ranks after 3 batches each (6 global batches taken)
    resumes each of ``new_world`` ranks at floor(6 / new_world): no global batch skipped,
    fewer than new_world taken twice, none when it divides."""
    from gpuloader.plan.resume import ResumeWorldSizeWarning

    ds = _fake_dataset(60)
    old = [RayBatchSampler(ds, RAYS, SPB, rank=r, world_size=2, seed=1) for r in range(2)]
    for s in old:
        s.set_epoch(1)
        it = iter(s)
        for _ in range(3):
            next(it)
    state = old[0].state_dict()
    total = len(RayBatchSampler(ds, RAYS, SPB, rank=0, world_size=1, seed=1))
    positions = set()  # the global batches the new ranks yield (padding left out)
    for r in range(new_world):
        s = RayBatchSampler(ds, RAYS, SPB, rank=r, world_size=new_world, seed=1)
        with pytest.warns(ResumeWorldSizeWarning, match="world_size=2"):
            s.load_state_dict(state)
        got = list(s)
        assert got == s.batches(1)[len(s) - len(got) :]
        first = len(s) - len(got)
        positions |= {(first + j) * new_world + r for j in range(len(got))}
    positions = {p for p in positions if p < total}
    assert set(range(6, total)) <= positions  # nothing skipped
    again = {p for p in positions if p < 6}  # taken before the stop, taken again
    assert len(again) == 6 - (6 // new_world) * new_world < new_world


def test_resume_shard_samples_with_another_world_size_keeps_the_fraction():
    from gpuloader.plan.resume import ResumeWorldSizeWarning

    ds = _fake_dataset(80)
    a = RayBatchSampler(ds, RAYS, SPB, rank=0, world_size=2, shard="samples")
    a.set_epoch(0)
    it = iter(a)
    half = len(a) // 2
    for _ in range(half):
        next(it)
    state = a.state_dict()
    b = RayBatchSampler(ds, RAYS, SPB, rank=0, world_size=4, shard="samples")
    with pytest.warns(ResumeWorldSizeWarning, match="same fraction"):
        b.load_state_dict(state)
    assert len(list(b)) == len(b) - (half * len(b)) // len(a)
    done = dict(state, batches_yielded=len(a))  # a finished epoch: the next one, exactly
    c = RayBatchSampler(ds, RAYS, SPB, rank=0, world_size=4, shard="samples")
    c.load_state_dict(done)
    assert c.state_dict()["epoch"] == 1 and list(c) == c.batches(1)
