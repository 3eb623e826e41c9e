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
whole ``worker_timeout``. Where the iterator reads the workers' pipe itself (no pin-memory
thread), a daemon thread reads it instead and the iterator waits on that thread, checking the
workers' sentinels every 50 ms: a worker stopped half-way through writing a batch blocks that
thread, not the caller, and a dead one (also one killed just before the next epoch) is seen at
once. The workers' pids are taken off torch's SIGCHLD handler, which would
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

Modules: :mod:`~gpuloader.reading.processes` (liveness, exit reasons, the errors of a death
or a hang, kill), :mod:`~gpuloader.reading.dali_guard` (:class:`DaliGuard`,
:func:`stop_pipeline`, :func:`reraise_worker_error`), :mod:`~gpuloader.reading.torch_guard`
(:func:`guarded_batches`, :func:`stop_loader`, :func:`worker_message_first`). This module
holds the design above and gathers their public names.
"""

from __future__ import annotations

from gpuloader.reading.dali_guard import (
    POLL,
    DaliGuard,
    build_bounded,
    reraise_worker_error,
    stop_pipeline,
)
from gpuloader.reading.processes import DEFAULT_TIMEOUT, exit_reason
from gpuloader.reading.torch_guard import TICK, guarded_batches, stop_loader, worker_message_first

__all__ = [
    "DEFAULT_TIMEOUT",
    "POLL",
    "TICK",
    "DaliGuard",
    "build_bounded",
    "exit_reason",
    "guarded_batches",
    "reraise_worker_error",
    "stop_loader",
    "stop_pipeline",
    "worker_message_first",
]
