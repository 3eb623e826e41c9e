"""Chunks: a sample list cut into runs of consecutive rays (``rays_per_chunk``, as the
newer upstream), from the index alone. A chunk record adds ``ray_offset``, ``chunk_idx`` and
``file_num_rays`` to its sample's and has the chunk's ``num_rays``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["chunk_samples"]


def chunk_samples(samples: Sequence[dict[str, Any]], rays_per_chunk: int) -> list[dict[str, Any]]:
    """Cut each sample's ray file into chunks of ``rays_per_chunk`` consecutive rays.

    From the index alone (``num_rays`` came from the npz headers): nothing is inflated. Each
    chunk is a copy of its sample's record with ``num_rays`` (the chunk's rows, the last
    chunk of a file may be shorter), ``ray_offset`` (its first row in the file),
    ``chunk_idx`` (0, 1, ... within the file) and ``file_num_rays`` (the file's rows). A file
    without rays gives no chunk, as upstream.

    Returns:
        the chunks, in the order of ``samples`` and, within a file, of their rows.
    """
    size = int(rays_per_chunk)
    if size < 1:
        raise ValueError(f"rays_per_chunk must be >= 1 or None; got {rays_per_chunk}")
    out: list[dict[str, Any]] = []
    for s in samples:
        n = int(s["num_rays"])
        for c, start in enumerate(range(0, n, size)):
            out.append(
                {
                    **s,
                    "num_rays": min(size, n - start),
                    "ray_offset": start,
                    "chunk_idx": c,
                    "file_num_rays": n,
                }
            )
    return out
