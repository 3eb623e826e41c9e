"""The DALI guard: bounded runs of a DALI pipeline whose parallel external source reads in a
pool of worker processes; a dead or hung worker raised as a named error (design:
:mod:`gpuloader.reading.workers`).

:class:`DaliGuard` runs ``pipe.run`` in a helper thread and checks the pool's processes every
:data:`POLL` seconds, up to the timeout; on a fault it kills the pool, wakes a run stuck in
DALI's task queues and shuts the pipeline down. :func:`reraise_worker_error` turns the text
DALI passes on back into the named error the reader raised; :func:`stop_pipeline` stops a
built pipeline and its pool. Relies on DALI 2.x internals (``Pipeline._py_pool``, the task
queues' ``cv_not_empty``), each used only when present.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from gpuloader.errors import GPULoaderError, WorkerError
from gpuloader.reading.processes import (
    DEFAULT_TIMEOUT,
    dead_processes,
    death_error,
    hang_error,
    is_stopped,
    kill_processes,
)
from gpuloader.reading.reader import decode_error

__all__ = ["POLL", "DaliGuard", "reraise_worker_error", "stop_pipeline"]

log = logging.getLogger("gpuloader")

#: seconds between liveness checks while waiting on DALI workers
POLL = 0.1
#: seconds a run stuck in DALI's queues gets to end once the workers are killed
_UNBLOCK_WAIT = 5.0
#: seconds a graceful shutdown of a DALI pool gets before its workers are killed
_CLOSE_WAIT = 20.0


def reraise_worker_error(exc: BaseException) -> None:
    """DALI passes a worker's exception on as ``Exception(worker traceback)`` caused by
    ``RuntimeError(str(original))``: raise the original named error (a GPULoaderError that
    the reader encoded in that text) instead, the worker traceback attached as a note."""
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        named = cur if isinstance(cur, GPULoaderError) else None
        if named is None and cur.args and isinstance(cur.args[0], str):
            named = decode_error(cur.args[0])
        if named is not None:
            if named is exc:
                return
            if hasattr(named, "add_note"):
                named.add_note(f"raised in a DALI reader worker:{exc}")
            raise named from None
        cur = cur.__cause__ or cur.__context__


def stop_pipeline(pipe: Any) -> None:
    """Stop a built DALI pipeline: its Python worker pool (processes joined, shared memory
    freed), then the pipeline itself. ``None`` is a no-op."""
    if pipe is None:
        return
    pool = getattr(pipe, "_py_pool", None)
    try:
        if pool is not None:
            pool.close()
    finally:
        shutdown = getattr(pipe, "_shutdown", None)
        if shutdown is not None:
            shutdown()


class _Runner:
    """One daemon thread running submitted calls in order (a stuck call cannot block the
    interpreter's exit, as a ThreadPoolExecutor's thread would)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="gpuloader-dali-run", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, fn, args = job
            job = None
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                    fut.set_exception(exc)
            fut = fn = args = None  # hold nothing between jobs: a closed pipeline is freed

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        self._jobs.put((fut, fn, args))
        return fut

    def stop(self, wait: float = 0.0) -> None:
        """End the thread after the jobs already submitted (joined up to ``wait`` seconds)."""
        if not self._stopping:
            self._stopping = True
            self._jobs.put(None)
        if wait > 0:
            self._thread.join(wait)


class DaliGuard:
    """Bounded runs of a built DALI pipeline with parallel external-source workers (module doc).

    Args:
        pipe: the built ``nvidia.dali.Pipeline``.
        timeout: seconds :meth:`run` waits for a batch (``worker_timeout``).
    """

    def __init__(self, pipe: Any, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.pipe = pipe
        self.timeout = float(timeout)
        self.closed = False
        self._pid = os.getpid()  # a forked copy (a DataLoader worker) must not touch the pool
        self._runner = _Runner()
        self._busy: Future | None = None

    def processes(self) -> list[Any]:
        """The pool's worker processes (``multiprocessing.Process``; empty if unknown)."""
        pool = getattr(getattr(self.pipe, "_py_pool", None), "pool", None)
        return list(getattr(pool, "_processes", None) or [])

    def run(self, *args: Any) -> Any:
        """``pipe.run(*args)``, waited for at most ``timeout`` seconds.

        Raises:
            StopIteration: the epoch is over.
            WorkerError: a worker died or none answered in time (the pipeline is stopped).
            GPULoaderError subclasses raised by the reader in a worker (re-raised here).
        """
        if self.closed:
            raise RuntimeError("the pipeline is closed")
        procs = self.processes()
        dead = dead_processes(procs)
        if dead:  # between epochs: scheduling work would block in DALI's task queue
            self._fail(death_error("DALI", dead, len(procs)))
        fut = self._busy = self._runner.submit(self.pipe.run, *args)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                out = fut.result(timeout=max(0.0, min(POLL, deadline - time.monotonic())))
            except FutureTimeout:
                pass
            except StopIteration:
                self._busy = None
                raise
            except Exception as exc:
                if not dead_processes(procs):  # an error of the reader, passed on by a live worker
                    self._busy = None
                    reraise_worker_error(exc)
                    raise
                # else DALI's "Worker data receiving interrupted": raised below, outside this
                # block, so that no DALI frame (holding the pipeline) rides on the WorkerError
            else:
                self._busy = None
                return out
            dead = dead_processes(procs)
            if dead:
                fut = None
                self._fail(death_error("DALI", dead, len(procs)))
            if time.monotonic() >= deadline:
                fut = None
                self._fail(hang_error(self.timeout, [p.pid for p in procs]))

    def reset(self) -> None:
        """Start the pipeline's next epoch (no waiting: the next :meth:`run` schedules it)."""
        if not self.closed:
            self.pipe.reset()

    def _fail(self, error: WorkerError) -> None:
        self.abort()
        raise error

    def abort(self) -> None:
        """Kill the workers, end a run stuck in DALI's queues, then shut the pipeline down
        (each wait bounded; what stays blocked is left to the garbage collector)."""
        if self.closed or os.getpid() != self._pid:
            return
        self.closed = True
        kill_processes(self.processes())
        fut, self._busy = self._busy, None
        if fut is not None and not _settled(fut, 0.5):
            _wake_task_queues(self.pipe)
        if fut is None or _settled(fut, _UNBLOCK_WAIT):
            self._stop(bounded=True)
        else:
            log.warning("gpuloader: a DALI run stayed blocked after its workers were killed")
            self._runner.stop()

    def close(self) -> None:
        """Stop the workers (joined; shared memory freed) and the pipeline. Idempotent; a
        no-op in a forked copy of this process (the pool is its parent's)."""
        if self.closed or os.getpid() != self._pid:
            return
        procs = self.processes()
        busy = self._busy is not None and not self._busy.done()
        if busy or dead_processes(procs) or any(is_stopped(p.pid) for p in procs):
            self.abort()  # interrupted while waiting, or broken workers: nothing to wait for
            return
        self.closed = True
        self._stop(bounded=False)

    def _stop(self, bounded: bool) -> None:
        """``stop_pipeline`` in the helper thread, which then ends; if it does not end in time
        (a worker that does not exit), the workers are killed and it gets a second wait.
        The pipeline is dropped here (its shared memory is freed with it)."""
        fut = self._runner.submit(stop_pipeline, self.pipe)
        self._runner.stop()
        if not _settled(fut, _UNBLOCK_WAIT if bounded else _CLOSE_WAIT):
            kill_processes(self.processes())
            _wake_task_queues(self.pipe)
            if not _settled(fut, _UNBLOCK_WAIT):
                log.warning("gpuloader: a DALI pipeline did not shut down; left behind")
                return
        self._runner.stop(wait=_UNBLOCK_WAIT)
        exc = fut.exception()
        if exc is not None:
            log.debug("gpuloader: stopping a DALI pipeline: %s", exc)
        self.pipe = None


def _settled(fut: Future, timeout: float) -> bool:
    try:
        fut.exception(timeout=timeout)
    except FutureTimeout:
        return False
    except BaseException:  # noqa: BLE001 - cancelled: settled too
        pass
    return True


def _wake_task_queues(pipe: Any) -> None:
    """Release a ``notify`` stuck on a task queue's condition: a worker killed while it waited
    is counted as a sleeper, and the notifier waits for it to wake (never)."""
    pool = getattr(getattr(pipe, "_py_pool", None), "pool", None)
    if pool is None:
        return
    queues = [getattr(pool, "_general_task_queue", None)]
    queues += [
        getattr(c, "dedicated_task_queue", None) for c in getattr(pool, "_workers_contexts", [])
    ]
    for q in queues:
        woken = getattr(getattr(q, "cv_not_empty", None), "_woken_count", None)
        if woken is not None:
            woken.release()
