"""Reader worker processes, seen from the process that waits for them: liveness, exit
reasons, the named errors of a death or a hang, and a kill that reaps.

Shared by the DALI guard (:mod:`gpuloader.reading.dali_guard`) and the torch DataLoader guard
(:mod:`gpuloader.reading.torch_guard`); the design is in :mod:`gpuloader.reading.workers`.
A process here is a ``multiprocessing.Process``-like object (``pid``, ``sentinel``,
``exitcode``, ``join``).
"""

from __future__ import annotations

import multiprocessing.connection
import os
import signal
import time
from collections.abc import Sequence
from typing import Any

from gpuloader.errors import WorkerError

__all__ = [
    "DEFAULT_TIMEOUT",
    "dead_processes",
    "death_error",
    "exit_code",
    "exit_reason",
    "hang_error",
    "is_stopped",
    "kill_processes",
]

#: seconds a loader waits for a batch before it raises WorkerError (``worker_timeout``)
DEFAULT_TIMEOUT = 60.0


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


def is_stopped(pid: int | None) -> bool:
    """The process is stopped (SIGSTOP, a debugger): state T or t in ``/proc``."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("T", "t")


def dead_processes(procs: Sequence[Any]) -> list[Any]:
    """The processes of ``procs`` that have exited: their sentinel (a pipe the kernel closes
    when the process ends) is ready. Their exit codes may not be known yet: another thread
    (DALI's observer) may be reaping them (:func:`exit_code` waits for it)."""
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


def exit_code(p: Any, wait: float = 1.0) -> int | None:
    """``p.exitcode``, waiting up to ``wait`` seconds for the thread that reaps it."""
    deadline = time.monotonic() + wait
    while p.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return p.exitcode


def death_error(
    kind: str, dead: list[Any], total: int, detail: str | None = None, when: str = ""
) -> WorkerError:
    """``a DALI reader worker (pid N) died (killed by signal 9 (SIGKILL))``, then ``detail``
    (what the back end reported)."""
    codes = {p.pid: exit_code(p) for p in dead}
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


def hang_error(timeout: float, pids: Sequence[int], detail: str | None = None) -> WorkerError:
    """``no batch from the reader workers within T s (worker pid N is stopped)``: the stopped
    workers of ``pids`` named where there are any (else all, "hung?"), then ``detail``."""
    stopped = [p for p in pids if is_stopped(p)]
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


def kill_processes(procs: Sequence[Any]) -> None:
    """SIGKILL every process of ``procs`` still running (a stopped one too), then reap it."""
    dead = dead_processes(procs)
    for p in procs:  # only those not ended: an unreaped pid cannot have been reused
        if p not in dead and p.pid is not None:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        if p.pid is not None:
            p.join(1.0)
