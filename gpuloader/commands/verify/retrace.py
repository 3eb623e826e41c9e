"""The re-trace check of ``gpuloader verify``: stored distances against the exact tracer.

:func:`retrace` draws a random fraction of a ray file's rays (a pure function of the seed and
the file's key), traces them through the sample's voxel grid with :func:`gpuloader.tracer.trace`
and reports the rays whose stored distance differs by more than the tolerance.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from gpuloader.commands.verify.report import TRACE, UnitResult
from gpuloader.tracer import trace

__all__ = ["ABS_TOL", "REL_TOL", "retrace"]

#: Trace tolerance: files store float32 distances.
ABS_TOL = 1e-3
REL_TOL = 1e-5


def retrace(
    res: UnitResult,
    path: Path,
    key: str,
    grid: np.ndarray,
    rays: dict,
    fraction: float,
    seed: int,
) -> None:
    """Trace a random ``fraction`` of the rays (at least one) and compare with distances.

    ``grid``: (S, S, S) bool; ``rays``: ``origins`` (N, 3), ``directions`` (N, 3),
    ``distances`` (N,), ``finite`` (N,) bool (rays with no NaN or inf, the only ones traced)
    and the scalar ``voxel_size``. ``key`` (``level_<L>/<name>``) and ``seed`` pick the rays.
    Adds the rays traced and the largest error to ``res``; a mismatch is a TRACE problem.
    """
    n = rays["distances"].shape[0]
    if n == 0:
        return
    k = min(n, max(1, int(round(fraction * n))))
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    idx = np.sort(rng.choice(n, size=k, replace=False))
    idx = idx[rays["finite"][idx]]
    if idx.size == 0:
        return
    got = trace(grid, rays["origins"][idx], rays["directions"][idx], float(rays["voxel_size"]))
    stored = rays["distances"][idx].astype(np.float64)
    err = np.abs(got - stored)
    res.rays_checked += int(idx.size)
    res.max_err = max(res.max_err, float(err.max()))
    bad = err > ABS_TOL + REL_TOL * np.abs(got)
    if bad.any():
        j = int(np.argmax(np.where(bad, err, -1.0)))
        res.add(
            path,
            f"{int(bad.sum())} of {idx.size} re-traced ray(s) differ from distances "
            f"(worst: ray {int(idx[j])}, stored {stored[j]:.6g}, traced {got[j]:.6g})",
            TRACE,
        )
