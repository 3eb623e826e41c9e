"""Helpers of tests on worker processes: a bound on a test that could hang (SIGALRM raises
:class:`Hung`), the live children, signals to a set of pids."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager


class Hung(Exception):
    """The code under test was still running when the alarm rang."""


@contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """Fail with :class:`Hung` instead of hanging for more than ``seconds`` (main thread)."""

    def ring(signum: int, frame: object) -> None:
        raise Hung(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def children() -> set[int]:
    """pids of this process's live multiprocessing children."""
    return {p.pid for p in mp.active_children()}


def send_signal(pids: object, sig: int) -> None:
    """Send ``sig`` to each pid of ``pids`` (an iterable of int); ones already gone are skipped."""
    for pid in pids:  # type: ignore[attr-defined]
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
