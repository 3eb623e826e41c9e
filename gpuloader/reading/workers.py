"""Health of the reader worker processes: liveness checks, bounded waits, named errors, teardown.

Every back end reads in worker processes: DALI's parallel external source (a pool of spawned
processes behind a pipeline) or torch DataLoader workers. A worker that dies or hangs must
not leave the training process waiting forever, nor raise a foreign error from wherever it
stands: it surfaces within the loader's ``worker_timeout`` as a
:class:`~gpuloader.errors.WorkerError` raised where the batch is waited for, and the broken
workers are stopped first, so that the next pass starts fresh ones.

DALI (:class:`DaliGuard`): the pipeline's ``run`` runs in a helper thread while this thread
waits for it, checking every :data:`POLL` seconds that the pool's processes are alive, up to
``worker_timeout``. DALI's own waits cannot be bounded from outside: a worker killed while it
waited for a task leaves the task queue's condition counting a sleeper that will never wake,
so the next schedule (the next epoch) blocks for good; a stopped worker never answers. The
guard checks the processes before each run, and on a fault kills the pool's processes and
wakes a run stuck in DALI's queues before the pipeline is shut down.

torch (:func:`guarded_batches`): the DataLoader's iterator waits :data:`TICK` seconds at a time
(its ``_timeout``; torch checks its workers are alive after each wait and raises "exited
unexpectedly"), retried up to ``worker_timeout``; the restart of persistent workers waits the
whole ``worker_timeout``. The workers' pids are taken off torch's SIGCHLD handler, which would
otherwise raise a bare RuntimeError from whatever the main thread runs when a worker dies
(the training step, between epochs); they are checked here instead. A named error a worker
raised comes back through torch as ``Caught X in DataLoader worker process N`` first: its
message is reordered so that the first line is the error's own (the file it names). Batches
must cross as numpy arrays (pickled by value): a torch tensor crosses as a file descriptor
that this process fetches from the worker, a wait that no timeout bounds.

A WorkerError carries the back end's report in its message, not as its cause: raised out of
the handler, it holds neither the broken iterator nor the pipeline (their frames), whose
queues and shared memory are then freed at once, not when the error is.

Both rely on internals of DALI 2.x (``Pipeline._py_pool.pool._processes``, the task queues'
``cv_not_empty``) and torch 2.x (``_workers``, ``_timeout``, ``_worker_pids_set``), each used
only when present; without them the waits are still bounded (the DataLoader's ``timeout``).
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from gpuloader.errors import GPULoaderError, WorkerError, _worker_message_first

__all__ = [
    "DEFAULT_TIMEOUT",
    "DaliGuard",
    "guarded_batches",
    "reraise_worker_error",
    "stop_loader",
    "stop_pipeline",
    "worker_message_first",
]

log = logging.getLogger("gpuloader")

#: seconds a loader waits for a batch before it raises WorkerError (``worker_timeout``)
DEFAULT_TIMEOUT = 60.0
#: seconds between liveness checks while waiting on DALI workers
POLL = 0.1
#: seconds one wait of a DataLoader iterator lasts before its workers are checked again
TICK = 1.0
#: seconds a run stuck in DALI's queues gets to end once the workers are killed
_UNBLOCK_WAIT = 5.0
#: seconds a graceful shutdown of a DALI pool gets before its workers are killed
_CLOSE_WAIT = 20.0


# -- descriptions ---------------------------------------------------------------------------


def exit_reason(exitcode: int | None) -> str:
    """``killed by signal 9 (SIGKILL)`` / ``exited with code 1`` for a process's exit code."""
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "?"
        return f"killed by signal {-exitcode} ({name})"
    return f"exited with code {exitcode}"


def _stopped(pid: int | None) -> bool:
    """The process is stopped (SIGSTOP, a debugger): state T or t in ``/proc``."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("T", "t")


def _dead(procs: Sequence[Any]) -> list[Any]:
    """The processes of ``procs`` that have exited: their sentinel (a pipe the kernel closes
    when the process ends) is ready. Their exit codes may not be known yet: another thread
    (DALI's observer) may be reaping them (:func:`_exit_code` waits for it)."""
    sentinels = {}
    for p in procs:
        try:
            sentinels[p.sentinel] = p
        except (ValueError, AttributeError):  # closed, or not started
            continue
    if not sentinels:
        return []
    ready = multiprocessing.connection.wait(list(sentinels), timeout=0)
    return [sentinels[s] for s in ready]


def _exit_code(p: Any, wait: float = 1.0) -> int | None:
    """``p.exitcode``, waiting up to ``wait`` seconds for the thread that reaps it."""
    deadline = time.monotonic() + wait
    while p.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return p.exitcode


def _death_error(
    kind: str, dead: list[Any], total: int, detail: str | None = None, when: str = ""
) -> WorkerError:
    """``a DALI reader worker (pid N) died (killed by signal 9 (SIGKILL))``, then ``detail``
    (what the back end reported)."""
    codes = {p.pid: _exit_code(p) for p in dead}
    # the worker killed first, not those its pool stopped after it (SIGTERM)
    dead = sorted(dead, key=lambda p: codes[p.pid] == -signal.SIGTERM)
    first = dead[0]
    msg = f"a {kind} reader worker (pid {first.pid}) died{when} ({exit_reason(codes[first.pid])})"
    if len(dead) > 1:
        others = ", ".join(f"pid {p.pid} {exit_reason(codes[p.pid])}" for p in dead[1:])
        msg += f"; {len(dead)} of {total} workers gone ({others})"
    if detail:
        msg += f"\n{detail}"
    msg += "\nthe workers were stopped; iterating the loader again starts new ones"
    return WorkerError(msg, pids=tuple(p.pid for p in dead))


def _hang_error(timeout: float, pids: Sequence[int], detail: str | None = None) -> WorkerError:
    stopped = [p for p in pids if _stopped(p)]
    suspects = stopped or list(pids)
    who = ", ".join(str(p) for p in suspects)
    many = len(suspects) > 1
    state = ("are" if many else "is") + " stopped" if stopped else "hung?"
    msg = f"no batch from the reader workers within {timeout:g} s"
    msg += f" (worker pid{'s' if many else ''} {who} {state})" if who else ""
    if detail:
        msg += f"\n{detail}"
    msg += (
        "\nthe workers were stopped; iterating the loader again starts new ones "
        "(raise worker_timeout if batches are just slow)"
    )
    return WorkerError(msg, pids=tuple(suspects), timeout=timeout)


def _kill(procs: Sequence[Any]) -> None:
    """SIGKILL every process of ``procs`` still running (a stopped one too), then reap it."""
    dead = _dead(procs)
    for p in procs:  # only those not ended: an unreaped pid cannot have been reused
        if p not in dead and p.pid is not None:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        if p.pid is not None:
            p.join(1.0)


# -- errors raised in a worker ------------------------------------------------------------------


def worker_message_first(exc: BaseException) -> BaseException:
    """A named error a DataLoader worker raised, its message reordered so that the first line
    is its own (``errors._worker_message_first``) instead of torch's ``Caught X in DataLoader
    worker process N``; ``exc`` itself."""
    if isinstance(exc, GPULoaderError) and exc.args and isinstance(exc.args[0], str):
        text = exc.args[0]
        if text.startswith("Caught "):
            exc.args = (_worker_message_first(text, type(exc)), *exc.args[1:])
    return exc


def reraise_worker_error(exc: BaseException) -> None:
    """DALI passes a worker's exception on as ``Exception(worker traceback)`` caused by
    ``RuntimeError(str(original))``: raise the original named error (a GPULoaderError that
    the reader encoded in that text) instead, the worker traceback attached as a note."""
    from gpuloader.reading.reader import decode_error

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


# -- DALI -----------------------------------------------------------------------------------------


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
        dead = _dead(procs)
        if dead:  # between epochs: scheduling work would block in DALI's task queue
            self._fail(_death_error("DALI", dead, len(procs)))
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
                if not _dead(procs):  # an error of the reader, passed on by a live worker
                    self._busy = None
                    reraise_worker_error(exc)
                    raise
                # else DALI's "Worker data receiving interrupted": raised below, outside this
                # block, so that no DALI frame (holding the pipeline) rides on the WorkerError
            else:
                self._busy = None
                return out
            dead = _dead(procs)
            if dead:
                fut = None
                self._fail(_death_error("DALI", dead, len(procs)))
            if time.monotonic() >= deadline:
                fut = None
                self._fail(_hang_error(self.timeout, [p.pid for p in procs]))

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
        _kill(self.processes())
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
        if busy or _dead(procs) or any(_stopped(p.pid) for p in procs):
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
            _kill(self.processes())
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


# -- torch DataLoader ---------------------------------------------------------------------------


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
    if _dead(workers) or any(_stopped(w.pid) for w in workers):
        _stop_iterator(it)
    elif hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None


def _stop_iterator(it: Any) -> None:
    """Stop a DataLoader iterator's workers at once: killed, joined, queues closed."""
    _release_sigchld(it)
    _kill(list(getattr(it, "_workers", ())))
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def _suspects(it: Any) -> list[int]:
    """The pid of the worker whose batch is awaited, else of every worker."""
    workers = list(getattr(it, "_workers", ()))
    try:
        wid = it._task_info[it._rcvd_idx][0]
        return [workers[wid].pid]
    except (AttributeError, KeyError, IndexError, TypeError):
        return [w.pid for w in workers]


#: how torch's messages of a timeout and of a dead worker begin
_TORCH_TIMEOUT = "DataLoader timed out"
_TORCH_DEATH = "DataLoader worker (pid"


def _fault(
    loader: Any, it: Any, exc: BaseException, timeout: float, late: bool
) -> WorkerError | None:
    """The WorkerError for ``exc`` (a RuntimeError of the iterator ``it``) if it is a worker
    fault, the workers stopped first; else None."""
    workers = list(getattr(it, "_workers", ()))
    dead = _dead(workers)
    text = str(exc)
    timed_out = text.startswith(_TORCH_TIMEOUT)
    if not dead and not (timed_out and late) and not text.startswith(_TORCH_DEATH):
        return None
    pids = _suspects(it)
    if dead:
        error = _death_error("DataLoader", dead, len(workers), f"torch: {text}")
    elif timed_out:
        error = _hang_error(timeout, pids)  # before the kill: it tells a stopped worker
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
        dead = _dead(workers)
        if dead:
            error = _death_error("DataLoader", dead, len(workers), when=" between epochs")
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
