"""Every wait on reader workers is bounded (issue 18, items 1 and 10).

The torch guard (:func:`gpuloader.reading.torch_guard.guarded_batches`) on a plain DataLoader
of large numpy items: a worker stopped while its batch is half written into the result pipe
(the main thread would block in a ``read`` no timeout bounds), a persistent worker killed just
before the next epoch (reported at once, not after the timeout); the pack stream keeps its
DataLoader workers across epochs and gives them back on close; DALI's pool start-up is bounded
and a worker that dies there raises WorkerError; stopping a DALI pipeline joins every
ended worker (DALI's pool can miss one, whose pipes then stay open).

Every test runs under :func:`_alarm`, so that a regression fails instead of hanging.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
import traceback

import numpy as np
import pytest
import torch

from gpuloader.errors import WorkerError
from gpuloader.reading.torch_guard import guarded_batches, stop_loader
from support.processes import alarm, children, send_signal

BIG = 1 << 20  # bytes of one item: far more than a pipe holds (64 KiB)
HANG = 3.0
SLACK = 3.0


class _Big(torch.utils.data.Dataset):
    """Item i: (BIG,) uint8 filled with i % 256."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> np.ndarray:
        return np.full(BIG, i % 256, np.uint8)


def _as_is(x):
    return x


def _loader(persistent: bool = False, timeout: float = HANG) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        _Big(), batch_size=None, num_workers=2, prefetch_factor=1, timeout=timeout,
        persistent_workers=persistent, collate_fn=_as_is,
    )  # fmt: skip


def _reader_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("gpuloader-dl-read")}


def _assert_readers_ended(before: set[threading.Thread], wait: float = 3.0) -> None:
    """Every reading thread started since ``before`` ends within ``wait`` seconds (another
    test's are not this one's); the message shows where a live one stands."""
    deadline = time.monotonic() + wait
    while _reader_threads() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    live = _reader_threads() - before
    frames = sys._current_frames()
    stacks = {t.ident: "".join(traceback.format_stack(frames[t.ident])) for t in live
              if t.ident in frames}  # fmt: skip
    assert not live, stacks


def test_worker_stopped_mid_message_is_bounded():
    """Both workers stopped once their batches fill the result pipe: the main thread would
    read half a message and block for good; it raises WorkerError within the timeout."""
    with alarm(30):
        before, readers = children(), _reader_threads()
        dl = _loader()
        it = guarded_batches(dl, HANG)
        assert next(it)[0] == 0
        workers = sorted(children() - before)
        assert len(workers) == 2
        time.sleep(0.5)  # the next batches are half written: the pipe is full
        send_signal(workers, signal.SIGSTOP)
        try:
            tick = time.monotonic()
            with pytest.raises(WorkerError) as err:
                for _ in it:
                    pass
            waited = time.monotonic() - tick
        finally:
            send_signal(workers, signal.SIGCONT)
        assert waited < HANG + SLACK, waited
        assert f"within {HANG:g} s" in str(err.value).splitlines()[0]
        assert not (set(workers) & children())
        _assert_readers_ended(readers)  # the read stuck mid-message ended too
        # the loader again: new workers, whole batches
        assert [int(b[0]) for b in guarded_batches(dl, HANG)] == [i % 256 for i in range(12)]
        assert not (children() - before)


def test_persistent_worker_killed_just_before_next_epoch():
    """A persistent worker killed right before the next pass: raised at once (its sentinel),
    not after the timeout (20 s here)."""
    with alarm(30):
        before, readers = children(), _reader_threads()
        dl = _loader(persistent=True, timeout=20.0)
        try:
            assert len(list(guarded_batches(dl, 20.0))) == 12
            workers = sorted(children() - before)
            assert len(workers) == 2
            os.kill(workers[0], signal.SIGKILL)  # no wait: the next pass starts at once
            tick = time.monotonic()
            with pytest.raises(WorkerError) as err:
                list(guarded_batches(dl, 20.0))
            assert time.monotonic() - tick < SLACK
            assert f"pid {workers[0]}" in str(err.value).splitlines()[0]
            assert len(list(guarded_batches(dl, 20.0))) == 12  # new workers
        finally:
            stop_loader(dl)
        assert not (children() - before)
        _assert_readers_ended(readers)


def test_pack_stream_torch_workers_last_across_epochs(tiny_dataset, tmp_path):
    """The torch pack stream starts its DataLoader workers once, not every epoch; close()
    gives every one of them back."""
    from gpuloader import GPURayLoader, PackedRayStore, pack_rays
    from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
    from gpuloader.loading.sources.pack_stream import StreamBatches

    ds_dir, rays = tiny_dataset
    pack_rays(rays, tmp_path / "pack", progress=False)
    ds = HierarchicalVoxelRayDataset(
        ds_dir, rays, "train", cache_size=0, ray_store=PackedRayStore(tmp_path / "pack")
    )
    with alarm(60):
        before = children()
        with GPURayLoader(ds, None, 4, device="cpu", store="stream", backend="torch",
                          num_workers=2, prefetch=1, worker_timeout=10) as ld:  # fmt: skip
            assert isinstance(ld.source, StreamBatches)
            seen = []
            for _ in range(4):
                assert len(list(ld)) > 0
                seen.append(children() - before)
            assert len(seen[0]) == 2 and all(s == seen[0] for s in seen), seen
        assert not (children() - before)


def test_stopping_a_pipeline_joins_every_ended_worker() -> None:
    """DALI's pool joins each worker for 1 s, then joins only those whose exit code is still
    unknown: a worker that ends in between is never joined and would stay in
    multiprocessing's children, its spawn pipes open (the soak's 'fds left after close').
    ``stop_pipeline`` joins it; a pipeline shut down once."""
    import multiprocessing
    from types import SimpleNamespace

    from gpuloader.reading.dali_guard import stop_pipeline

    ctx = multiprocessing.get_context("fork")
    worker = ctx.Process(target=os._exit, args=(0,))
    worker.start()
    with alarm(30):
        while worker.exitcode is None:  # ended, reaped by the poll: what DALI's check saw
            time.sleep(0.01)
    assert worker in multiprocessing.process._children  # ended, never joined
    link = f"/proc/self/fd/{worker.sentinel}"
    pipe_name = os.readlink(link)  # the spawn pipe, still open
    assert pipe_name.startswith("pipe:")
    shut: list[bool] = []
    pool = SimpleNamespace(pool=SimpleNamespace(_processes=[worker]), close=lambda: None)
    pipe = SimpleNamespace(_py_pool=pool, _shutdown=lambda: shut.append(True))
    stop_pipeline(pipe)
    assert shut == [True]
    assert worker not in multiprocessing.process._children
    del pipe, pool, worker
    gc.collect()
    try:
        now = os.readlink(link)
    except FileNotFoundError:
        now = None
    assert now != pipe_name  # closed with the Popen (the number may be reused since)
