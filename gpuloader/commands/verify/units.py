"""Running the units of ``gpuloader verify``: in this process or a pool, under a progress bar.

A unit is one call of a check (an object folder, a sample's files) that returns a
:class:`~gpuloader.commands.verify.report.UnitResult`; an unexpected exception in it becomes an
INTERNAL problem naming the file, never a crash.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gpuloader.commands.verify.report import INTERNAL, UnitResult, describe
from gpuloader.format import layout

__all__ = ["run_units"]


def _safe(fn: Callable[[Any], UnitResult], job: Any) -> UnitResult:
    """Run a unit; an unexpected exception becomes a problem, never a crash."""
    try:
        return fn(job)
    except Exception as exc:  # pragma: no cover - defensive
        if isinstance(job, dict):
            file = job.get("ray") or job.get("voxel")
        else:
            file = layout.object_dir(Path(job[0]), job[1])
        res = UnitResult()
        res.add(str(file), f"unexpected error while checking ({describe(exc)})", INTERNAL)
        return res


def run_units(
    fn: Callable[[Any], UnitResult],
    jobs: Sequence[Any],
    weights: Sequence[int],
    workers: int,
    desc: str,
    progress: bool,
) -> Iterator[UnitResult]:
    """``fn(job)`` for every job, in order with one worker, else as a pool finishes them.

    ``weights``: files per job, the progress bar's steps (on stderr; none unless
    ``progress``). ``workers > 1`` runs the jobs in a process pool (fork on Linux).
    """
    bar = tqdm(
        total=int(sum(weights)), desc=desc, unit="file", disable=not progress, file=sys.stderr
    )
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                res = _safe(fn, job)
                bar.update(res.weight)
                yield res
            return
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        ctx = mp.get_context(method)
        chunk = max(1, min(16, len(jobs) // (workers * 8)))
        with ctx.Pool(min(workers, len(jobs))) as pool:
            for res in pool.imap_unordered(functools.partial(_safe, fn), jobs, chunksize=chunk):
                bar.update(res.weight)
                yield res
    finally:
        bar.close()
