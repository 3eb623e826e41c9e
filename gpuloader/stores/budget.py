"""Where a split can live: host RAM, GPU memory, and ``store="auto"``'s choice between them.

``choose_store`` compares a store's size (:func:`gpuloader.stores.layout.store_bytes`) with a
budget of the free GPU memory (CuPy) and of the host's available RAM (``MemAvailable``).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["choose_store", "device_free_bytes", "host_memory_available"]


def host_memory_available() -> int:
    """Bytes of RAM available now (``MemAvailable``), or 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def device_free_bytes(device_index: int) -> int:
    import cupy

    with cupy.cuda.Device(device_index):
        free, _ = cupy.cuda.runtime.memGetInfo()
    return int(free)


def choose_store(
    nbytes: int,
    device: Any,
    gpu_budget: float | int | None = None,
    host_budget: float | int | None = None,
) -> tuple[str, str]:
    """``store="auto"``: ("gpu" | "host" | "stream", why).

    GPU when the device is CUDA and the split takes at most ``gpu_budget`` (bytes, or a
    fraction of the free device memory; default 0.5), else host RAM when it takes at most
    ``host_budget`` (bytes, or a fraction of MemAvailable; default 0.5), else streaming.
    """

    def budget(value: float | int | None, free: int) -> int:
        if value is None:
            value = 0.5
        return int(value * free) if isinstance(value, float) and value <= 1.0 else int(value)

    size = f"{nbytes / 2**30:.2f} GiB"
    if getattr(device, "type", str(device)) == "cuda":
        free = device_free_bytes(device.index or 0)
        limit = budget(gpu_budget, free)
        if nbytes <= limit:
            return "gpu", f"the split ({size}) fits the GPU budget ({limit / 2**30:.2f} GiB)"
    free = host_memory_available()
    limit = budget(host_budget, free)
    if nbytes <= limit:
        return "host", f"the split ({size}) fits the host-RAM budget ({limit / 2**30:.2f} GiB)"
    return "stream", f"the split ({size}) fits neither GPU nor host budget: streaming"
