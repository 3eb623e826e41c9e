"""Reader workers that die or hang (issue 8, "worker faults").

For the per-sample stream (DALI and torch DataLoader workers) and the pack stream (whole
batches; DALI and DataLoader workers): a worker killed with SIGKILL mid-epoch or between
epochs, or stopped with SIGSTOP (a hang), raises ``WorkerError`` in this process within the
loader's ``worker_timeout``; the loader then starts new workers and its next epoch equals
that of an undisturbed loader. A bad file read in a worker raises an error whose first line
names the file, on every one of these back ends.

Every test runs under :func:`_alarm`, so that a regression fails instead of hanging.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from gpuloader import GPURayLoader, PackedRayStore, pack_rays
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.errors import DatasetLayoutError, WorkerError
from gpuloader.loading.sources.pack_stream import StreamBatches
from gpuloader.reading.pipeline import dali_available
from support.loading_helpers import assert_batches_equal, full_transform
from support.processes import alarm, children, send_signal

RAYS, SPB = 64, 1  # one sample per batch: 7 batches per epoch, most of them read after a fault
TIMEOUT = 20.0  # worker_timeout of the death tests: a death must be reported long before
HANG = 3.0  # worker_timeout of the hang tests
SLACK = 3.0  # seconds of scheduling slack on two busy cores

no_dali = pytest.mark.skipif(not dali_available(), reason="no DALI")
PATHS = [
    pytest.param("dali", marks=no_dali),
    "torch",
    pytest.param("pack-dali", marks=no_dali),
    "pack-torch",
]


def _kill(pid: int) -> None:
    """SIGKILL ``pid`` and wait until it has ended (not reaped here): a zombie whose threads
    are all gone, for its files (the sentinel the loader watches) close with the last one."""
    os.kill(pid, signal.SIGKILL)
    for _ in range(500):
        try:
            threads = os.listdir(f"/proc/{pid}/task")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in ("Z", "X") and len(threads) <= 1:
            return
        time.sleep(0.01)


@pytest.fixture(scope="module")
def datasets(tiny_dataset, tmp_path_factory):
    """path -> dataset: npz rays for the per-sample stream, a pack for the pack stream."""
    ds_dir, rays = tiny_dataset
    pack = tmp_path_factory.mktemp("faults") / "pack"
    pack_rays(rays, pack, progress=False)
    npz = HierarchicalVoxelRayDataset(ds_dir, rays, "train", cache_size=0)
    packed = HierarchicalVoxelRayDataset(
        ds_dir, rays, "train", cache_size=0, ray_store=PackedRayStore(pack)
    )
    return {"npz": npz, "pack": packed}


def _loader(datasets, path: str, workers: int = 2, **kw) -> GPURayLoader:
    ds = datasets["pack" if path.startswith("pack") else "npz"]
    ld = GPURayLoader(ds, RAYS, SPB, transform=full_transform(num_rays=32), device="cpu",
                      store="stream", backend=path.split("-")[-1], num_workers=workers,
                      prefetch=1, **kw)  # fmt: skip
    assert isinstance(ld.source, StreamBatches) == path.startswith("pack")
    return ld


def _shared_mappings() -> list[str]:
    """This process's shared-memory mappings (DALI's buffers and queues, semaphores)."""
    with open("/proc/self/maps") as f:
        return sorted(line.strip() for line in f if "memfd" in line or "/dev/shm" in line)


@contextmanager
def _watched(datasets, path: str, timeout: float):
    """``(loader, workers)`` under :func:`_alarm`; ``workers()``: the pids of the processes
    started since. Once the loader is closed, none of them is left, nor any shared memory
    mapped since (within 5 s)."""
    with alarm(60):
        gc.collect()
        before, maps = children(), _shared_mappings()
        with _loader(datasets, path, worker_timeout=timeout) as ld:
            yield ld, lambda: sorted(children() - before)
        gc.collect()
        assert not (children() - before)
        # nothing new stays mapped: a pool's last semaphore may go a moment after close (its
        # threads end), and an earlier test's leftovers may go meanwhile (not this test's)
        deadline = time.monotonic() + 5.0
        while set(_shared_mappings()) - set(maps) and time.monotonic() < deadline:
            time.sleep(0.05)
            gc.collect()
        assert sorted(set(_shared_mappings()) - set(maps)) == []


@pytest.fixture(scope="module")
def undisturbed(datasets):
    """path kind -> epochs 0..2 of an undisturbed loader (read in this process)."""
    out = {}
    for kind in ("npz", "pack"):
        with _loader(datasets, "pack-torch" if kind == "pack" else "torch", workers=0) as ld:
            out[kind] = [list(ld) for _ in range(3)]
    return out


def _want(undisturbed, path: str, epoch: int) -> list[dict]:
    return undisturbed["pack" if path.startswith("pack") else "npz"][epoch]


@pytest.mark.parametrize("path", PATHS)
def test_worker_killed_mid_epoch(datasets, undisturbed, path):
    with _watched(datasets, path, TIMEOUT) as (ld, started):
        it = iter(ld)
        got = [next(it)]
        workers = started()
        assert len(workers) == 2
        _kill(workers[0])
        tick = time.monotonic()
        with pytest.raises(WorkerError) as err:
            for batch in it:
                got.append(batch)
        waited = time.monotonic() - tick
        assert waited < TIMEOUT / 2, waited  # a death is not waited out
        first = str(err.value).splitlines()[0]
        assert "died" in first and f"pid {workers[0]}" in first, first
        assert len(got) < len(_want(undisturbed, path, 0))
        assert_batches_equal(got, _want(undisturbed, path, 0)[: len(got)])
        assert not (set(workers) & children())  # the broken workers are gone
        if path == "torch":  # the failed pass again, from where it stopped
            ld.load_state_dict(ld.state_dict())
            rest = list(ld)
            assert_batches_equal(got + rest, _want(undisturbed, path, 0))
        assert_batches_equal(list(ld), _want(undisturbed, path, 1))  # new workers


@pytest.mark.parametrize("path", PATHS)
def test_worker_killed_between_epochs(datasets, undisturbed, path):
    with _watched(datasets, path, TIMEOUT) as (ld, started):
        assert_batches_equal(list(ld), _want(undisturbed, path, 0))
        workers = started()
        _kill(workers[0])
        time.sleep(0.1)  # SIGCHLD comes between epochs: torch's handler must not raise
        tick = time.monotonic()
        with pytest.raises(WorkerError) as err:
            list(ld)  # epoch 1: its workers are found dead at its start
        assert time.monotonic() - tick < SLACK
        assert f"pid {workers[0]}" in str(err.value).splitlines()[0]
        assert_batches_equal(list(ld), _want(undisturbed, path, 2))


@pytest.mark.parametrize("path", PATHS)
def test_hung_worker(datasets, undisturbed, path):
    with _watched(datasets, path, HANG) as (ld, started):
        it = iter(ld)
        next(it)
        workers = started()
        send_signal(workers, signal.SIGSTOP)
        try:
            tick = time.monotonic()
            with pytest.raises(WorkerError) as err:
                list(it)
            waited = time.monotonic() - tick
        finally:
            send_signal(workers, signal.SIGCONT)
        assert HANG - 0.5 < waited < HANG + SLACK, waited
        first = str(err.value).splitlines()[0]
        assert f"within {HANG:g} s" in first, first
        assert err.value.timeout == HANG
        assert set(err.value.pids) <= set(workers) and err.value.pids
        assert not (set(workers) & children())
        assert_batches_equal(list(ld), _want(undisturbed, path, 1))


@pytest.mark.parametrize("path", [p for p in PATHS if "dali" in str(p)])
def test_one_stopped_worker_of_two_is_noticed(datasets, undisturbed, path):
    """One DALI worker stopped while the other serves every batch: the epochs go on (each
    batch the undisturbed one) until it has been stopped for ``worker_timeout``, then
    WorkerError names it; the pool would otherwise run on at half its workers, unnoticed."""
    with _watched(datasets, path, HANG) as (ld, started):
        it = iter(ld)
        got = [next(it)]
        stopped = started()[:1]
        send_signal(stopped, signal.SIGSTOP)
        tick = time.monotonic()
        epochs = [got]
        try:
            with pytest.raises(WorkerError) as err:
                while time.monotonic() - tick < 60:
                    got.extend(it)
                    got = []
                    epochs.append(got)
                    it = iter(ld)
            waited = time.monotonic() - tick
        finally:
            send_signal(stopped, signal.SIGCONT)
        assert waited < HANG + 2 * SLACK, waited
        first = str(err.value).splitlines()[0]
        assert f"worker pid {stopped[0]} is stopped" in first, first
        assert list(err.value.pids) == stopped
        for epoch, batches in enumerate(epochs[:3]):  # what came was right (the fixture's
            assert_batches_equal(batches, _want(undisturbed, path, epoch)[: len(batches)])
        assert all(len(b) == len(epochs[0]) for b in epochs[1:-1])  # epochs came whole
        assert not (set(stopped) & children())


@pytest.mark.parametrize("path", PATHS)
def test_bad_file_in_a_worker_is_named_first(tiny_dataset, tmp_path, path):
    """A voxel file gone after the loader was built: the worker's named error keeps its first
    line (the file) through DALI's channel and through torch's re-raise."""
    ds_dir = Path(shutil.copytree(tiny_dataset[0], tmp_path / "dataset"))
    rays = tiny_dataset[1]
    kw = {}
    if path.startswith("pack"):
        pack_rays(rays, tmp_path / "pack", progress=False)
        kw["ray_store"] = PackedRayStore(tmp_path / "pack")
    ds = HierarchicalVoxelRayDataset(ds_dir, rays, "train", cache_size=0, **kw)
    with alarm(60):
        with _loader({"npz": ds, "pack": ds}, path, worker_timeout=TIMEOUT) as ld:
            gone = Path(ds.samples[-1]["voxel_path"])
            gone.unlink()
            with pytest.raises(DatasetLayoutError) as err:
                list(ld)
    assert str(gone) in str(err.value).splitlines()[0], str(err.value)[:300]
