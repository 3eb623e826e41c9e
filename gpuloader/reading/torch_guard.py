"""The torch DataLoader guard: the batches of a DataLoader whose workers read, a dead or hung
worker raised as a named error, and a named error from a worker re-raised with its own
first line (design: :mod:`gpuloader.reading.workers`).

:func:`guarded_batches` waits :data:`TICK` seconds at a time (the iterator's ``_timeout``),
retried up to the timeout, with the workers taken off torch's SIGCHLD handler and checked
here; :func:`stop_loader` stops persistent workers (killed where one is dead or stopped);
:func:`worker_message_first` reorders torch's ``Caught X in DataLoader worker process N``.
Relies on torch 2.x internals (``_workers``, ``_timeout``, ``_worker_pids_set``), each used
only when present.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from gpuloader.errors import GPULoaderError, WorkerError, reorder_worker_message
from gpuloader.reading.processes import (
    DEFAULT_TIMEOUT,
    dead_processes,
    death_error,
    hang_error,
    is_stopped,
    kill_processes,
)

__all__ = ["TICK", "guarded_batches", "stop_loader", "worker_message_first"]

#: seconds one wait of a DataLoader iterator lasts before its workers are checked again
TICK = 1.0
#: seconds between checks of the workers' sentinels while a batch is awaited
_POLL = 0.05
#: how torch's messages of a timeout and of a dead worker begin
_TORCH_TIMEOUT = "DataLoader timed out"
_TORCH_DEATH = "DataLoader worker (pid"


class _Broken:
    """What the reader thread hands on when the result pipe failed (EOF: its writers gone)."""

    def __init__(self, exc: BaseException) -> None:
        self.text = f"{type(exc).__name__}: {exc}"


class _BoundedQueue:
    """Stands in for a DataLoader iterator's result queue (no pin-memory thread): a daemon
    thread reads the workers' pipe, the iterator waits here, bounded, checking the workers'
    sentinels every :data:`_POLL` seconds. A worker stopped half-way through writing a batch
    leaves the reading thread blocked (a ``read`` no timeout bounds), not the caller; once
    the workers are killed, :meth:`release` closes this process's write end, so that the
    read meets EOF and the thread ends. The thread also ends once every worker is gone."""

    def __init__(self, source: Any, workers: list[Any]) -> None:
        self._source = source
        self._workers = workers
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="gpuloader-dl-read", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        src, items, stop = self._source, self._items, self._stop
        while not stop.is_set():
            try:
                items.put(src.get(timeout=0.1))
            except queue.Empty:
                if len(dead_processes(self._workers)) == len(self._workers):
                    return  # shut down (or all dead): nothing more will come
            except Exception as exc:  # noqa: BLE001 - EOF, closed: handed to the waiter
                items.put(_Broken(exc))
                return

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """The next item, within ``timeout`` seconds (``queue.Empty`` else); a worker found
        dead raises at once (a RuntimeError worded as torch's)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = _POLL if deadline is None else min(_POLL, deadline - time.monotonic())
            try:
                item = self._items.get(timeout=max(0.0, wait))
            except queue.Empty:
                dead = dead_processes(self._workers)
                if dead:
                    pids = ", ".join(str(p.pid) for p in dead)
                    raise RuntimeError(f"{_TORCH_DEATH}(s) {pids}) exited unexpectedly") from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                continue
            if isinstance(item, _Broken):
                raise RuntimeError(f"the DataLoader result pipe failed: {item.text}")
            return item

    def release(self) -> None:
        """End the reading thread (the workers are gone): closes this process's write end
        of the pipe, which wakes a read stuck in a half-written batch with EOF."""
        self._stop.set()
        writer = getattr(self._source, "_writer", None)
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass
        self._thread.join(1.0)  # it holds the queue (its semaphores) until it ends
        while True:  # items read ahead hold workers' shared memory: drop them now, not at a GC
            try:
                self._items.get_nowait()
            except queue.Empty:
                break


def _bound_queue(it: Any) -> None:
    """Put a :class:`_BoundedQueue` in front of a DataLoader iterator's result queue, where
    the iterator reads it itself (no pin-memory thread); once per iterator."""
    data = getattr(it, "_data_queue", None)
    if data is None or isinstance(data, _BoundedQueue):
        return
    if data is not getattr(it, "_worker_result_queue", None):
        return  # a pin-memory thread reads the pipe: the iterator waits on a thread queue
    it._data_queue = _BoundedQueue(data, list(getattr(it, "_workers", ())))


def _release_queue(it: Any) -> None:
    data = getattr(it, "_data_queue", None)
    if isinstance(data, _BoundedQueue):
        data.release()


def worker_message_first(exc: BaseException) -> BaseException:
    """A named error a DataLoader worker raised, its message reordered so that the first line
    is its own (``errors.reorder_worker_message``) instead of torch's ``Caught X in DataLoader
    worker process N``; ``exc`` itself."""
    if isinstance(exc, GPULoaderError) and exc.args and isinstance(exc.args[0], str):
        text = exc.args[0]
        if text.startswith("Caught "):
            exc.args = (reorder_worker_message(text, type(exc)), *exc.args[1:])
    return exc


def _release_sigchld(it: Any) -> None:
    """Take a DataLoader iterator's workers off torch's SIGCHLD handler (module doc)."""
    if not getattr(it, "_worker_pids_set", False):
        return
    try:
        from torch.utils.data._utils import signal_handling

        signal_handling._remove_worker_pids(id(it))
    except Exception:  # noqa: BLE001 - another torch: keep its handler
        return
    it._worker_pids_set = False


def stop_loader(loader: Any) -> None:
    """Stop a DataLoader's persistent workers: gracefully, or at once (killed) where one is
    dead or stopped (a graceful shutdown would wait for it)."""
    it = getattr(loader, "_iterator", None)
    if it is None:
        return
    workers = list(getattr(it, "_workers", ()))
    if dead_processes(workers) or any(is_stopped(w.pid) for w in workers):
        _stop_iterator(it)
    elif hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
        _release_queue(it)
    loader._iterator = None


def _stop_iterator(it: Any) -> None:
    """Stop a DataLoader iterator's workers at once: killed, joined, queues closed."""
    _release_sigchld(it)
    kill_processes(list(getattr(it, "_workers", ())))
    shutdown = getattr(it, "_shutdown_workers", None)
    try:
        if shutdown is not None:
            shutdown()
    finally:
        _release_queue(it)


def _suspects(it: Any) -> list[int]:
    """The pid of the worker whose batch is awaited, else of every worker."""
    workers = list(getattr(it, "_workers", ()))
    try:
        wid = it._task_info[it._rcvd_idx][0]
        return [workers[wid].pid]
    except (AttributeError, KeyError, IndexError, TypeError):
        return [w.pid for w in workers]


def _fault(
    loader: Any, it: Any, exc: BaseException, timeout: float, late: bool
) -> WorkerError | None:
    """The WorkerError for ``exc`` (a RuntimeError of the iterator ``it``) if it is a worker
    fault, the workers stopped first; else None."""
    workers = list(getattr(it, "_workers", ()))
    dead = dead_processes(workers)
    text = str(exc)
    timed_out = text.startswith(_TORCH_TIMEOUT)
    if not dead and not (timed_out and late) and not text.startswith(_TORCH_DEATH):
        return None
    pids = _suspects(it)
    if dead:
        error = death_error("DataLoader", dead, len(workers), f"torch: {text}")
    elif timed_out:
        error = hang_error(timeout, pids)  # before the kill: it tells a stopped worker
    else:
        error = WorkerError(f"a DataLoader reader worker died: {text}", pids=tuple(pids))
    _stop_iterator(it)
    if getattr(loader, "_iterator", None) is it:
        loader._iterator = None
    return error


def _start(loader: Any, timeout: float) -> Any:
    """``iter(loader)``; persistent workers found dead raise at once, their restart waits up
    to ``timeout``."""
    it = getattr(loader, "_iterator", None)
    error = None
    if it is not None:
        workers = list(getattr(it, "_workers", ()))
        dead = dead_processes(workers)
        if dead:
            error = death_error("DataLoader", dead, len(workers), when=" between epochs")
            _stop_iterator(it)
            loader._iterator = None
        elif hasattr(it, "_timeout"):
            it._timeout = timeout
    if error is None:
        try:
            it = iter(loader)
        except RuntimeError as exc:
            error = None if it is None else _fault(loader, it, exc, timeout, late=True)
            if error is None:
                raise
    if error is not None:
        it = workers = dead = None  # raised out here, holding no iterator (module doc)
        raise error
    _release_sigchld(it)
    _bound_queue(it)
    if getattr(it, "_workers", None) and hasattr(it, "_timeout"):
        it._timeout = min(TICK, timeout)
    return it


def guarded_batches(loader: Any, timeout: float = DEFAULT_TIMEOUT) -> Iterator[Any]:
    """The batches of a torch DataLoader, its worker faults raised as WorkerError (module doc).

    Build the DataLoader with ``timeout=worker_timeout`` (a bound even where torch's
    internals differ). A named error from a worker is re-raised with its own first line.

    Raises:
        WorkerError: a worker died, or no batch came within ``timeout`` seconds (the
            loader's workers are stopped first; iterating it again starts new ones).
    """
    try:
        it = _start(loader, timeout)
    except GPULoaderError as exc:
        worker_message_first(exc)
        raise
    while True:
        deadline = time.monotonic() + timeout
        error = None
        while True:
            try:
                item = next(it)
                break
            except StopIteration:
                if not getattr(it, "_persistent_workers", False):
                    _release_queue(it)  # torch shut its workers down: end the reading thread
                return
            except GPULoaderError as exc:
                worker_message_first(exc)
                raise
            except RuntimeError as exc:
                error = _fault(loader, it, exc, timeout, time.monotonic() >= deadline)
                if error is None and not str(exc).startswith(_TORCH_TIMEOUT):
                    raise
            if error is not None:  # raised out of the except block: it holds no iterator,
                it = None  # nor torch's error (whose frames hold it): their memory is freed
                raise error
            # one tick passed, the workers alive: wait on
        yield item
