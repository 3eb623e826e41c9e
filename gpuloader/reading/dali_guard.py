"""The DALI guard: bounded runs of a DALI pipeline whose parallel external source reads in a
pool of worker processes; a dead or hung worker raised as a named error (design:
:mod:`gpuloader.reading.workers`).

:class:`DaliGuard` runs ``pipe.run`` in a helper thread and checks the pool's processes every
:data:`POLL` seconds, up to the timeout; on a fault it kills the pool, wakes a run stuck in
DALI's task queues and shuts the pipeline down. :func:`reraise_worker_error` turns the text
DALI passes on back into the named error the reader raised; :func:`stop_pipeline` stops a
built pipeline and its pool; :func:`build_bounded` starts one (``pipe.build``, which starts the
pool) within the timeout, a worker lost during the start raised as a WorkerError. Relies on
DALI 2.x internals (``Pipeline._py_pool``, the task queues' ``cv_not_empty``) and on
multiprocessing's set of children, each used only when present.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
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

__all__ = ["POLL", "DaliGuard", "build_bounded", "reraise_worker_error", "stop_pipeline"]

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
    freed), then the pipeline itself. ``None`` is a no-op.

    DALI's pool joins each worker for 1 s, then terminates and joins only those whose exit
    code is still unknown: a worker that ends in between is never joined, and stays in
    multiprocessing's set of children with its two spawn pipes open for the rest of the
    process. Every ended worker is joined here."""
    if pipe is None:
        return
    pool = getattr(pipe, "_py_pool", None)
    procs = list(getattr(getattr(pool, "pool", None), "_processes", None) or [])
    try:
        if pool is not None:
            pool.close()
    finally:
        for p in procs:
            if getattr(p, "_popen", None) is not None and p.exitcode is not None:
                p.join(0)  # leaves multiprocessing's children: its Popen and pipes are freed
        shutdown = getattr(pipe, "_shutdown", None)
        if shutdown is not None:
            shutdown()


#: seconds between checks while a pool starts (its workers may die and be reaped in 0.1 s)
_START_POLL = 0.01
#: seconds a pool start may take while its workers keep working (CPU time growing)
_START_CAP = 60.0
#: seconds between checks that a slow start still makes progress
_START_PROGRESS = 0.5
#: what a pool start reports when one of its workers ended before it was up
_START_FAILURES = (BrokenPipeError, ConnectionError, EOFError)
_START_MESSAGES = ("Workers initialization failed", "Sending tasks to workers failed")


def build_bounded(pipe: Any, timeout: float = DEFAULT_TIMEOUT) -> None:
    """``pipe.build()`` (which starts the parallel external source's worker pool), bounded.

    The build runs in a helper thread; this one waits up to ``timeout`` seconds, longer (up
    to :data:`_START_CAP`) while no worker is stopped and their CPU time still grows (a
    spawn start importing on a loaded machine is slow, not hung). A worker
    that dies while the pool starts (killed, or failing on its own: a main module its spawn
    cannot import) makes DALI raise ``BrokenPipeError`` or ``RuntimeError: Workers
    initialization failed``, and a pool that never comes up would block for good: both end
    here in a :class:`WorkerError` naming the workers and the fix, the new workers killed.

    Raises:
        WorkerError: a worker died during the start, or the pool was not up in time.
    """
    seen: list[Any] = []  # the new workers, kept: DALI reaps (and forgets) those that die
    runner = _Runner()
    recording = _recording_children(seen, runner.ident)
    recording.__enter__()
    fut = runner.submit(pipe.build)
    runner.stop()
    start = time.monotonic()
    deadline = start + float(timeout)
    cpu: int | None = None  # the workers' CPU time when the deadline was last moved
    try:
        while True:
            try:
                fut.result(timeout=max(0.0, min(_START_POLL, deadline - time.monotonic())))
                return
            except FutureTimeout:
                _note_children(pipe, seen)
                now = time.monotonic()
                if now < deadline:
                    continue
                # workers still importing (none stopped, their CPU time growing) get more
                # time, up to _START_CAP: on a loaded machine a spawn start can take seconds
                busy = _cpu_ticks(seen)
                if (
                    now - start < max(float(timeout), _START_CAP)
                    and seen
                    and not any(is_stopped(p.pid) for p in seen)
                    and (cpu is None or busy > cpu)
                ):
                    cpu, deadline = busy, now + _START_PROGRESS
                    continue
                break
            except Exception as exc:
                if not _start_failure(exc):
                    raise
                _note_children(pipe, seen)
                dead = _wait_dead(seen, 1.0)  # a killed worker's pipe may close a bit later
                error = (
                    death_error("DALI", dead, len(seen), when=" while its pool started")
                    if dead
                    else WorkerError(f"the DALI reader workers failed to start ({exc})")
                )
                if hasattr(error, "add_note"):
                    error.add_note(_START_HINT)
                raise error from None
        error = hang_error(timeout, [p.pid for p in seen], "(the worker pool did not start)")
        kill_processes(seen)  # after naming the stopped ones: /proc forgets them
        _wake_task_queues(pipe)
        _settled(fut, _UNBLOCK_WAIT)
        raise error
    finally:
        recording.__exit__(None, None, None)
        if not fut.done() or fut.exception() is not None:
            _note_children(pipe, seen)
            kill_processes(seen)


def _cpu_ticks(procs: list[Any]) -> int:
    """User + system CPU time of ``procs`` in clock ticks (``/proc/<pid>/stat``); 0 each for
    those gone or unreadable."""
    total = 0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        except (OSError, IndexError, ValueError, AttributeError, TypeError):
            continue
    return total


_START_HINT = (
    "DALI starts its reader workers with 'spawn': each imports the main module again, so the "
    "script must be a file (not stdin or -c) and start the loader under "
    "`if __name__ == '__main__':`; a worker killed by the OOM killer shows in `dmesg`"
)


class _RecordingSet(set):
    """multiprocessing's set of live children that also appends each added process to
    ``seen``: a worker that dies at once is joined (and dropped from the set) by DALI
    before any poll could see it."""

    seen: list[Any]
    thread: int | None

    def add(self, p: Any) -> None:
        super().add(p)
        if threading.get_ident() == self.thread:  # started by the build, not another thread
            self.seen.append(p)


@contextmanager
def _recording_children(seen: list[Any], thread: int | None) -> Iterator[None]:
    """Record in ``seen`` every process that thread ``thread`` starts while the block runs
    (``Process.start`` adds itself to ``multiprocessing.process._children``)."""
    mod = multiprocessing.process
    original = mod._children  # noqa: SLF001
    recording = _RecordingSet(original)
    recording.seen = seen
    recording.thread = thread
    mod._children = recording  # noqa: SLF001
    try:
        yield
    finally:
        mod._children = original  # noqa: SLF001
        original.clear()
        original.update(recording)


def _wait_dead(procs: list[Any], wait: float) -> list[Any]:
    """The ended processes of ``procs``, waiting up to ``wait`` seconds for a first one."""
    deadline = time.monotonic() + wait
    dead = dead_processes(procs)
    while not dead and procs and time.monotonic() < deadline:
        time.sleep(0.01)
        dead = dead_processes(procs)
    return dead


def _start_failure(exc: BaseException) -> bool:
    """``exc`` is how DALI reports a worker that ended while its pool started."""
    if isinstance(exc, _START_FAILURES):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _START_MESSAGES)


def _note_children(pipe: Any, seen: list[Any]) -> None:
    """Add the pool's worker processes to ``seen`` once the pool is known (while it starts,
    :func:`_recording_children` finds them)."""
    pool = getattr(getattr(pipe, "_py_pool", None), "pool", None)
    for p in list(getattr(pool, "_processes", None) or []):
        if p not in seen and getattr(p, "_popen", None) is not None:
            seen.append(p)


class _Runner:
    """One daemon thread running submitted calls in order (a stuck call cannot block the
    interpreter's exit, as a ThreadPoolExecutor's thread would)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="gpuloader-dali-run", daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        """The thread's identifier."""
        return self._thread.ident

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
        self._stopped: dict[int, float] = {}  # pid -> when it was first seen stopped

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
        self._check_stopped(procs)
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
            self._check_stopped(procs)

    def _check_stopped(self, procs: list[Any]) -> None:
        """A worker stopped (SIGSTOP) for ``timeout`` seconds is a hang even while the others
        serve every batch (the pool would run at a fraction of its workers, unnoticed)."""
        now = time.monotonic()
        for p in procs:
            if not is_stopped(p.pid):
                self._stopped.pop(p.pid, None)
            elif now - self._stopped.setdefault(p.pid, now) >= self.timeout:
                detail = "(stopped while the other workers served the batches)"
                self._fail(hang_error(self.timeout, [p.pid], detail))

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
