"""Where a split can live: host RAM, GPU memory, and ``store="auto"``'s choice between them.

``choose_store`` compares a store's size (:func:`gpuloader.stores.layout.store_bytes`) with a
budget of the free GPU memory (CuPy) and of the host's available RAM: the smaller of
``MemAvailable`` (``/proc/meminfo``) and what the process's cgroup still allows
(:func:`cgroup_memory_available`, cgroup v1 or v2), so a job under a Slurm ``--mem`` or a
Kubernetes memory limit is budgeted by its limit, not by the machine's RAM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = [
    "cgroup_memory_available",
    "choose_store",
    "device_free_bytes",
    "host_memory_available",
    "host_memory_limits",
]

#: Where :func:`host_memory_available` looks (module attributes, so tests can point them at a
#: fake tree).
CGROUP_ROOT = "/sys/fs/cgroup"
PROC_SELF_CGROUP = "/proc/self/cgroup"
MEMINFO = "/proc/meminfo"

#: cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit value
#: (9223372036854771712 with 4 KiB pages); anything this large is no limit.
V1_UNLIMITED = 1 << 62


def read_int(path: Path) -> int | None:
    """The integer in a one-value cgroup file; None when unreadable, "max" or not a number."""
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def read_stat(path: Path, keys: tuple[str, ...]) -> int:
    """The first of ``keys`` found in a ``memory.stat`` file, or 0 when none is readable."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return 0
    values: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(" ")
        values[name] = value.strip()
    for key in keys:
        try:
            return max(int(values[key]), 0)
        except (KeyError, ValueError):
            continue
    return 0


def cgroup_levels(base: Path, path: str) -> list[Path]:
    """The cgroup directory of ``path`` under ``base`` and each ancestor up to ``base``.

    Levels that do not exist under ``base`` are left out: in a container whose cgroup
    hierarchy is mounted at its own cgroup (no cgroup namespace), ``/proc/self/cgroup`` names a
    path the mount does not have, and the mount's root is then the process's own cgroup.
    """
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:  # outside this namespace's view: only the mount's root is ours to read
        parts = []
    levels = [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [level for level in levels if level.is_dir()]


def level_allowance(
    level: Path, limit_files: tuple[str, ...], usage_file: str, inactive_keys: tuple[str, ...]
) -> int | None:
    """Bytes one cgroup level still allows, or None when it sets no (readable) limit."""
    limits = [read_int(level / name) for name in limit_files]
    limits = [v for v in limits if v is not None and v < V1_UNLIMITED]
    if not limits:
        return None
    limit = min(limits)
    usage = read_int(level / usage_file)
    if usage is None:  # usage unknown: the limit itself is still an upper bound
        return max(limit, 0)
    used = max(usage - read_stat(level / "memory.stat", inactive_keys), 0)
    return max(limit - used, 0)


def cgroup_memory_available(
    root: str = "/sys/fs/cgroup", proc_self: str = "/proc/self/cgroup"
) -> int | None:
    """Bytes the process's memory cgroup still allows, or None when no limit applies.

    From the process's cgroup path in ``proc_self`` (``/proc/self/cgroup``), every level from
    its own cgroup up to the hierarchy's root is read, and the tightest allowance is returned
    (a parent's limit binds its children):

    * cgroup v2 (the ``0::<path>`` line; hierarchy at ``root``, or ``root/unified`` on a
      hybrid mount): ``min(memory.max, memory.high) - memory.current`` ("max" is no limit;
      past ``memory.high`` the kernel throttles the cgroup hard, so it binds too).
    * cgroup v1 (the line whose controllers include ``memory``; hierarchy at
      ``root/memory``): ``memory.limit_in_bytes - memory.usage_in_bytes``, the huge
      "no limit" value (>= 2**62) treated as none.

    Page cache counts against a cgroup: the kernel's usage includes the file pages the cgroup
    has read. The reclaimable part of it, ``memory.stat``'s ``inactive_file``
    (``total_inactive_file`` on v1, whose usage is hierarchical), is added back, as the
    kubelet's "working set" and ``MemAvailable`` do: the kernel drops those pages before it
    OOM-kills, and without this a job that just read its data would see almost no budget and
    never choose a resident store. Active file cache and everything else stays counted as
    used, so the budget is still conservative. A level's limit file that is missing or
    unreadable means no limit there; an unreadable usage file leaves that level's whole limit
    as the bound. Limits of ancestors outside the process's cgroup namespace are not visible.

    Args:
        root: where the cgroup hierarchies are mounted.
        proc_self: the process's cgroup membership file.

    Returns:
        Bytes (>= 0), or None when no level sets a limit or nothing could be read.
    """
    try:
        lines = Path(proc_self).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    base = Path(root)
    found: list[int] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and controllers == "":
            v2 = base if (base / "cgroup.controllers").exists() else base / "unified"
            levels = cgroup_levels(v2, path)
            spec = (("memory.max", "memory.high"), "memory.current", ("inactive_file",))
        elif "memory" in controllers.split(","):
            v1 = base / "memory"
            if not v1.is_dir():
                v1 = base / controllers
            levels = cgroup_levels(v1, path)
            spec = (
                ("memory.limit_in_bytes",),
                "memory.usage_in_bytes",
                ("total_inactive_file", "inactive_file"),
            )
        else:
            continue
        for level in levels:
            allowance = level_allowance(level, *spec)
            if allowance is not None:
                found.append(allowance)
    return min(found) if found else None


def meminfo_available() -> int:
    """Bytes of RAM available now (``MemAvailable``), or 0 when unknown."""
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def host_memory_limits() -> tuple[int, str | None]:
    """``(bytes, binding)``: host RAM available to this process and what binds it.

    ``binding`` is ``"cgroup limit"`` when the cgroup's allowance is below ``MemAvailable``
    (or ``MemAvailable`` is unknown), else None.
    """
    machine = meminfo_available()
    cgroup = cgroup_memory_available(CGROUP_ROOT, PROC_SELF_CGROUP)
    if cgroup is not None and (machine <= 0 or cgroup < machine):
        return cgroup, "cgroup limit"
    return machine, None


def host_memory_available() -> int:
    """Bytes of RAM available now: the smaller of ``MemAvailable`` and the cgroup's allowance
    (:func:`cgroup_memory_available`), or 0 when neither is known."""
    return host_memory_limits()[0]


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
    ``host_budget`` (bytes, or a fraction of :func:`host_memory_available`, the smaller of
    MemAvailable and the cgroup's allowance; default 0.5), else streaming. The reason names
    the cgroup when its limit set the host budget.
    """

    def is_fraction(value: float | int | None) -> bool:
        return value is None or (isinstance(value, float) and value <= 1.0)

    def budget(value: float | int | None, free: int) -> int:
        if value is None:
            value = 0.5
        return int(value * free) if is_fraction(value) else int(value)

    size = f"{nbytes / 2**30:.2f} GiB"
    if getattr(device, "type", str(device)) == "cuda":
        free = device_free_bytes(device.index or 0)
        limit = budget(gpu_budget, free)
        if nbytes <= limit:
            return "gpu", f"the split ({size}) fits the GPU budget ({limit / 2**30:.2f} GiB)"
    free, binding = host_memory_limits()
    limit = budget(host_budget, free)
    cgroup = binding is not None and is_fraction(host_budget)
    host = f"{limit / 2**30:.2f} GiB"
    if nbytes <= limit:
        host = f"{host}: {binding}" if cgroup else host
        return "host", f"the split ({size}) fits the host-RAM budget ({host})"
    if cgroup:
        return (
            "stream",
            f"the split ({size}) fits neither GPU nor host budget "
            f"(host budget {host}: {binding}): streaming",
        )
    return "stream", f"the split ({size}) fits neither GPU nor host budget: streaming"
