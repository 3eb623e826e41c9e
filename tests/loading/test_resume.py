"""Exact resume: ``state_dict()`` / ``load_state_dict()`` on the sampler, the dataset and
``GPURayLoader``.

The contract (torchdata's ``StatefulDataLoader``): after ``load_state_dict`` of a state taken
mid-epoch, the next batch is exactly the batch an uninterrupted run would yield, and the
epochs after it are those of the uninterrupted run too. Checked on every store and back end
(host store; whole batches streamed from a pack by DALI, torch workers or in process; the
per-sample reader over npz by DALI, torch workers or in process), on the same loader and on a
new loader object (as after a restart), bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from gpuloader import PackedRayStore, pack_rays
from gpuloader.dataset.collate import collate_ray_batch
from gpuloader.loading.loader import GPURayLoader
from gpuloader.loading.sources.pack_stream import StreamBatches
from gpuloader.plan.sampler import RayBatchSampler
from gpuloader.reading.pipeline import dali_available
from support import loading_helpers as _loading

RAYS, SPB = 300, 4
needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")


full_transform = _loading.full_transform
make_dataset = _loading.make_dataset
assert_batches_equal = _loading.assert_batches_equal


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _loading.generate(tmp_path_factory, "resume_data", ("asym", "torus", "box"), 40)


@pytest.fixture(scope="module")
def pack_dir(data_dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume_pack") / "pack"
    pack_rays(data_dirs[1], out, progress=False)
    return out


def as_requests(batches) -> list[list[tuple]]:
    return [[tuple(r) for r in b] for b in batches]


# -- the sampler ---------------------------------------------------------------------------------


def test_sampler_resumes_mid_epoch_on_a_new_object(data_dirs):
    ds = make_dataset(data_dirs)
    ref = RayBatchSampler(ds, RAYS, SPB, seed=3)
    ref.set_epoch(5)
    epoch5, epoch6 = as_requests(ref), as_requests(ref)
    assert len(epoch5) == len(ref) > 4 and epoch5 != epoch6

    run = RayBatchSampler(ds, RAYS, SPB, seed=3)
    run.set_epoch(5)
    it = iter(run)
    head = [tuple(r) for r in next(it)], [tuple(r) for r in next(it)], [tuple(r) for r in next(it)]
    state = run.state_dict()
    assert state["epoch"] == 5 and state["batches_yielded"] == 3
    assert state["seed"] == 3 and state["world_size"] == 1 and state["num_batches"] == len(ref)
    assert list(head) == epoch5[:3]

    restarted = RayBatchSampler(ds, RAYS, SPB, seed=3)
    restarted.load_state_dict(state)
    assert restarted.state_dict() == state
    restarted.set_epoch(5)  # a training loop's set_epoch of the resumed epoch keeps the place
    assert as_requests(restarted) == epoch5[3:]
    assert as_requests(restarted) == epoch6
    # the same object, after more of the pass
    next(it)
    run.load_state_dict(state)
    assert as_requests(run) == epoch5[3:]


def test_sampler_state_between_epochs_and_checks(data_dirs):
    ds = make_dataset(data_dirs)
    s = RayBatchSampler(ds, RAYS, SPB)
    assert s.state_dict()["epoch"] == 0 and s.state_dict()["batches_yielded"] == 0
    list(s)
    assert (s.state_dict()["epoch"], s.state_dict()["batches_yielded"]) == (1, 0)
    it = iter(s)
    for _ in range(len(s)):  # every batch handed out, the pass not closed yet
        next(it)
    assert (s.state_dict()["epoch"], s.state_dict()["batches_yielded"]) == (2, 0)
    other = RayBatchSampler(ds, RAYS, SPB)
    other.load_state_dict({"epoch": 2, "batches_yielded": len(s)})  # the end = the next epoch
    assert other.epoch == 3
    other.load_state_dict({"epoch": 4, "batches_yielded": 2})
    other.set_epoch(7)  # another epoch: the restored place is dropped
    assert as_requests(other) == as_requests(s.batches(7))
    with pytest.raises(ValueError, match="seed"):
        RayBatchSampler(ds, RAYS, SPB, seed=99).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="num_batches"):
        RayBatchSampler(ds, RAYS, SPB + 1).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="batches_yielded"):
        other.load_state_dict({"epoch": 1})


def test_cpu_api_dataloader_resumes(data_dirs):
    """DataLoader + RayBatchSampler + collate: the sampler's state after k batches (in
    process), or one built from a step count, gives the rest of the epoch."""
    ds = make_dataset(data_dirs, full_transform())

    def loader(sampler):
        return DataLoader(ds, batch_sampler=sampler, collate_fn=collate_ray_batch)

    s = RayBatchSampler(ds, RAYS, SPB)
    s.set_epoch(2)
    want = list(loader(s))
    s2 = RayBatchSampler(ds, RAYS, SPB)
    s2.set_epoch(2)
    it = iter(loader(s2))
    next(it), next(it)
    state = s2.state_dict()
    assert state["batches_yielded"] == 2
    fresh = RayBatchSampler(ds, RAYS, SPB)
    fresh.load_state_dict(state)
    assert_batches_equal(list(loader(fresh)), want[2:])
    counted = RayBatchSampler(ds, RAYS, SPB)
    counted.load_state_dict({"epoch": 2, "batches_yielded": 5})
    assert_batches_equal(list(loader(counted)), want[5:])


def test_dataset_state(data_dirs):
    ds = make_dataset(data_dirs, seed=7)
    ds.set_epoch(4)
    state = ds.state_dict()
    assert state["epoch"] == 4 and state["seed"] == 7 and state["num_samples"] == len(ds)
    other = make_dataset(data_dirs, seed=7)
    other.load_state_dict(state)
    assert other.epoch == 4 and other.state_dict() == state
    with pytest.raises(ValueError, match="seed"):
        make_dataset(data_dirs, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples|fingerprint"):
        make_dataset(data_dirs, seed=7, levels=[1]).load_state_dict(state)


# -- the loader: every store and back end -------------------------------------------------------


CASES = [
    pytest.param("host", None, "torch", 0, id="host-store"),
    pytest.param("stream", "pack", "torch", 0, id="pack-stream-in-process"),
    pytest.param("stream", "pack", "torch", 2, id="pack-stream-torch-workers"),
    pytest.param("stream", "pack", "dali", 2, id="pack-stream-dali", marks=needs_dali),
    pytest.param("stream", None, "torch", 0, id="per-sample-in-process"),
    pytest.param("stream", None, "torch", 2, id="per-sample-torch-workers"),
    pytest.param("stream", None, "dali", 2, id="per-sample-dali", marks=needs_dali),
]


@pytest.mark.parametrize("store,ray_store,backend,workers", CASES)
def test_loader_resumes_exactly(data_dirs, pack_dir, store, ray_store, backend, workers):
    kw = {}
    if ray_store == "pack":
        kw["ray_store"] = PackedRayStore(pack_dir)

    def new_loader() -> GPURayLoader:
        ds = make_dataset(data_dirs, **kw)
        return GPURayLoader(ds, RAYS, SPB, transform=full_transform(), device="cpu",
                            store=store, backend=backend, num_workers=workers)  # fmt: skip

    k = 3
    with new_loader() as ld:
        assert ld.store == store and ld.backend == backend
        if ray_store == "pack":
            assert isinstance(ld.source, StreamBatches)
        ld.set_epoch(2)
        want2 = list(ld)
        want3 = list(ld)
        assert len(want2) == len(ld) > k + 1

        # interrupted after k batches, then resumed on the same object
        ld.set_epoch(2)
        it = iter(ld)
        got = [next(it) for _ in range(k)]
        assert_batches_equal(got, want2[:k])
        state = ld.state_dict()
        assert (state["epoch"], state["batches_yielded"]) == (2, k)
        assert state["dataset"]["num_samples"] == len(ld.dataset)
        next(it)  # read on past the saved place, then go back to it
        del it
        ld.load_state_dict(state)
        ld.set_epoch(2)  # as a training loop does: keeps the restored place
        assert_batches_equal(list(ld), want2[k:])
        assert_batches_equal(list(ld), want3)  # then the next epoch, whole

    # a new loader object, as after a restart
    with new_loader() as fresh:
        fresh.load_state_dict(state)
        assert fresh.state_dict()["epoch"] == 2 and fresh.state_dict()["batches_yielded"] == k
        it = iter(fresh)
        first = next(it)
        assert fresh.state_dict()["batches_yielded"] == k + 1
        assert_batches_equal([first, *it], want2[k:])
        assert (fresh.state_dict()["epoch"], fresh.state_dict()["batches_yielded"]) == (3, 0)
        assert_batches_equal(list(fresh), want3)


def test_resume_reads_nothing_before_the_place(data_dirs, pack_dir, monkeypatch):
    """In process: the per-sample reader and the pack's batch reader start at the restored
    batch; they do not read and discard the batches before it."""
    from gpuloader.reading.pack_reader import PackBatchReader
    from gpuloader.reading.reader import RayReader

    reads: list = []
    real_read, real_batch = RayReader.read, PackBatchReader.read
    monkeypatch.setattr(
        RayReader, "read", lambda self, r: reads.append(tuple(r)) or real_read(self, r)
    )
    monkeypatch.setattr(
        PackBatchReader, "read", lambda self, e, i: reads.append((e, i)) or real_batch(self, e, i)
    )
    k = 4
    packed = make_dataset(data_dirs, ray_store=PackedRayStore(pack_dir))
    with GPURayLoader(packed, RAYS, SPB, transform=full_transform(), device="cpu",
                      store="stream", backend="torch", num_workers=0) as ld:  # fmt: skip
        ld.load_state_dict({"epoch": 1, "batches_yielded": k})
        n = len(list(ld))
        assert reads == [(1, i) for i in range(k, k + n)]
    reads.clear()
    ds = make_dataset(data_dirs)
    with GPURayLoader(ds, RAYS, SPB, transform=full_transform(), device="cpu",
                      store="stream", backend="torch", num_workers=0) as ld:  # fmt: skip
        ld.load_state_dict({"epoch": 1, "batches_yielded": k})
        list(ld)
        want = [tuple(r) for b in ld.sampler.batches(1)[k:] for r in b]
        assert reads == want


def test_loader_state_checks(data_dirs):
    ds = make_dataset(data_dirs)
    with GPURayLoader(ds, RAYS, SPB, device="cpu", store="host", num_workers=0) as ld:
        state = ld.state_dict()
    with GPURayLoader(ds, RAYS, SPB, seed=5, device="cpu", store="host", num_workers=0) as ld:
        with pytest.raises(ValueError, match="seed"):
            ld.load_state_dict(state)
    other = make_dataset(data_dirs, levels=[1])
    with GPURayLoader(other, RAYS, SPB, device="cpu", store="host", num_workers=0) as ld:
        with pytest.raises(ValueError):
            ld.load_state_dict(state)
