"""Soak test: many epochs through each loader, watching the parent's resources.

Runs ``--epochs`` epochs (200) over the train split of the demo data through each loader,
with an augmenting transform (90-degree rotation, flips, a ray subsample to 512 rays per
sub-volume), one loader after another in this process:

* ``host``          GPURayLoader(store="host"), filled by 2 workers;
* ``stream_dali``   GPURayLoader(store="stream") on the npz files, DALI back end, 2 workers;
* ``stream_torch``  GPURayLoader(store="stream") on the npz files, torch back end, 2 workers;
* ``cpu_api``       DataLoader(2 persistent workers) + RayBatchSampler + collate_ray_batch.

For each it records, before the loader is built, after epoch 1 (warm), after every epoch and
after ``close()``:

* ``rss_mib``    the parent's resident memory (VmRSS of /proc/self/status);
* ``children``   live descendant processes (from /proc; zombies and multiprocessing's
  resource tracker left out);
* ``shm``        entries of /dev/shm (every process's on the machine: others come and go);
* ``shm_ours``   the /dev/shm entries this process or its children map;
* ``shm_maps``   this process's shared-memory mappings (memfd or /dev/shm lines of
  /proc/self/maps);
* ``fds``        open file descriptors (/proc/self/fd; the pipe to the resource tracker,
  opened once per process, left out).

After close the script waits up to ``--settle`` seconds (5) for exiting workers to go and
the descriptors opened since to close, then
lists what appeared since before the loader was built (``new_after_close``: child
processes, /dev/shm entries, shared mappings, file descriptors). ``--warmup`` first runs one
unmeasured epoch of every loader, so that what a process sets up once (the first fill's
imports and arenas, a semaphore) is not counted. Prints a table and writes
``OUT/soak-<timestamp>.json`` and a PNG of RSS per epoch per loader beside it.

    python benchmarks/soak.py                                  # 200 epochs, every loader
    python benchmarks/soak.py --epochs 20 --loaders host cpu_api
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LOADERS = ("host", "stream_dali", "stream_torch", "cpu_api")
WORKERS = 2


# -- what the process holds --------------------------------------------------------------


def rss_mib() -> float:
    """VmRSS of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _proc_stat(pid: str) -> tuple[int, str] | None:
    """(ppid, state) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    rest = stat[stat.rfind(")") + 2 :].split()  # the name may hold spaces and parentheses
    return int(rest[1]), rest[0]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def children() -> dict[int, str]:
    """Live descendants of this process: pid -> command line (zombies and multiprocessing's
    resource tracker left out)."""
    parent: dict[int, tuple[int, str]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_stat(name)
            if st is not None:
                parent[int(name)] = st
    me = os.getpid()
    out: dict[int, str] = {}
    for pid, (ppid, state) in parent.items():
        if state == "Z" or pid == me:
            continue
        p, seen = ppid, 0
        while p not in (0, 1, me) and p in parent and seen < 64:
            p, seen = parent[p][0], seen + 1
        if p != me:
            continue
        cmd = _cmdline(pid)
        if "resource_tracker" in cmd:
            continue
        out[pid] = cmd[:160]
    return out


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def shm_maps(pid: int | str = "self") -> list[str]:
    """Lines of /proc/PID/maps that map shared memory (memfd or /dev/shm): their names."""
    out = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                name = parts[5].strip() if len(parts) > 5 else ""
                if name.startswith("/dev/shm/") or name.startswith("/memfd:"):
                    out.append(name)
    except OSError:  # gone
        pass
    return out


def shm_mapped(pids: Iterable[int | str]) -> set[str]:
    """/dev/shm entries that any of ``pids`` maps (the names, as listed in /dev/shm)."""
    out = set()
    for pid in pids:
        for name in shm_maps(pid):
            if name.startswith("/dev/shm/") and not name.endswith(" (deleted)"):
                out.add(name[len("/dev/shm/") :])
    return out


def fds() -> dict[int, str]:
    """Open descriptors: fd -> target (the listing's own descriptor and the pipe to
    multiprocessing's resource tracker, started once per process, left out)."""
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker._resource_tracker, "_fd", None)
    out = {}
    for name in os.listdir("/proc/self/fd"):
        if name == str(tracker):
            continue
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the descriptor of the listing itself, closed by now
    return out


def snapshot() -> dict[str, Any]:
    kids, shm, maps, fd = children(), shm_entries(), shm_maps(), fds()
    ours = shm_mapped(["self", *kids]) & shm
    return {
        "rss_mib": round(rss_mib(), 2),
        "children": len(kids),
        "shm": len(shm),
        "shm_ours": len(ours),
        "shm_maps": len(maps),
        "fds": len(fd),
        "_children": kids,
        "_shm": shm,
        "_shm_ours": ours,
        "_shm_maps": maps,
        "_fds": fd,
    }


def public(snap: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in snap.items() if not k.startswith("_")}


def appeared(
    before: dict[str, Any], after: dict[str, Any], ours: set[str] | None = None
) -> dict[str, list]:
    """What ``after`` holds that ``before`` did not: child processes, /dev/shm entries,
    shared mappings (by name, counting repeats) and file descriptors (fd and target).

    /dev/shm is shared with every process of the machine: ``shm`` lists the new entries that
    this process or its children were seen mapping (``ours``: names seen in any snapshot),
    ``shm_unattributed`` the others (another process's, or one of ours never seen mapped)."""
    ours = after["_shm_ours"] if ours is None else ours
    new_shm = after["_shm"] - before["_shm"]
    maps_before = list(before["_shm_maps"])
    new_maps = []
    for name in after["_shm_maps"]:
        if name in maps_before:
            maps_before.remove(name)
        else:
            new_maps.append(name)
    fd_before = set(before["_fds"].items())
    return {
        "children": [
            f"{p} {c}" for p, c in after["_children"].items() if p not in before["_children"]
        ],
        "shm": sorted(new_shm & ours),
        "shm_unattributed": sorted(new_shm - ours),
        "shm_maps": sorted(set(new_maps)) + ([f"({len(new_maps)} lines)"] if new_maps else []),
        "fds": [
            f"{fd} -> {t}" for fd, t in sorted(after["_fds"].items()) if (fd, t) not in fd_before
        ],
    }


# -- the loaders -------------------------------------------------------------------------


def augment(per_sample: int) -> Any:
    from gpuloader import transforms

    return transforms.Compose(
        [
            transforms.RandomRotation90(p=0.5),
            transforms.RandomFlip(p=0.5),
            transforms.RandomRaySubsample(per_sample),
        ]
    )


def build(
    name: str, dataset_dir: Path, ray_dir: Path, rays: int, spb: int
) -> tuple[Iterable[dict], Callable[[int], None], Callable[[], None], str]:
    """(loader, set_epoch, close, description) of loader ``name``."""
    from torch.utils.data import DataLoader

    from gpuloader.dataset.collate import collate_ray_batch
    from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
    from gpuloader.loading.loader import GPURayLoader
    from gpuloader.plan.sampler import RayBatchSampler

    tf = augment(max(1, rays // spb))
    if name == "cpu_api":
        ds = HierarchicalVoxelRayDataset(dataset_dir, ray_dir, split="train", transform=tf)
        sampler = RayBatchSampler(ds, rays, spb, shuffle=True, seed=0)
        dl = DataLoader(
            ds,
            batch_sampler=sampler,
            collate_fn=collate_ray_batch,
            num_workers=WORKERS,
            persistent_workers=True,
        )

        def close() -> None:
            it = getattr(dl, "_iterator", None)
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
            dl._iterator = None

        return dl, sampler.set_epoch, close, f"DataLoader, {WORKERS} persistent workers"
    ds = HierarchicalVoxelRayDataset(dataset_dir, ray_dir, split="train")
    store, backend = {
        "host": ("host", "auto"),
        "stream_dali": ("stream", "dali"),
        "stream_torch": ("stream", "torch"),
    }[name]
    loader = GPURayLoader(
        ds,
        rays_per_batch=rays,
        subvolumes_per_batch=spb,
        transform=tf,
        seed=0,
        num_workers=WORKERS,
        device="cpu",
        backend=backend,
        store=store,
        progress=False,
    )
    return loader, loader.set_epoch, loader.close, repr(loader)


def soak_one(
    name: str,
    dataset_dir: Path,
    ray_dir: Path,
    epochs: int,
    rays: int = 4096,
    spb: int = 8,
    settle: float = 5.0,
) -> dict[str, Any]:
    """Run ``epochs`` epochs of loader ``name``; the figures of the module doc."""
    gc.collect()
    before = snapshot()
    tick = time.perf_counter()
    loader, set_epoch, close, desc = build(name, dataset_dir, ray_dir, rays, spb)
    build_s = time.perf_counter() - tick
    keys = ("rss_mib", "children", "shm", "shm_ours", "shm_maps", "fds")
    series: dict[str, list] = {k: [] for k in keys}
    seen: set[str] = set()  # /dev/shm entries this process or its children mapped
    seconds: list[float] = []
    snaps: dict[str, Any] = {"before": before}
    batches = rays_seen = 0
    try:
        for e in range(epochs):
            set_epoch(e)
            tick = time.perf_counter()
            for batch in loader:
                batches += 1
                rays_seen += int(batch["origins"].shape[0])
                del batch
            seconds.append(time.perf_counter() - tick)
            snap = snapshot()
            seen |= snap["_shm_ours"]
            for k in series:
                series[k].append(snap[k])
            if e == 0:
                snaps["epoch1"] = snap
            if e == 1:
                snaps["epoch2"] = snap
            if e == epochs - 1:
                snaps["last"] = snap
    finally:
        close()
        del loader, set_epoch, close
        gc.collect()
    tick = time.perf_counter()
    closed = snapshot()
    # exiting workers, and the pipes to them that DALI's threads close after they exit
    while time.perf_counter() - tick < settle and (
        set(closed["_children"]) - set(before["_children"]) or appeared(before, closed)["fds"]
    ):
        time.sleep(0.1)
        closed = snapshot()
    snaps["closed"] = closed
    e2 = snaps.get("epoch2", snaps["epoch1"])
    return {
        "loader": name,
        "description": desc,
        "epochs": epochs,
        "batches": batches,
        "rays": rays_seen,
        "build_seconds": round(build_s, 3),
        "seconds": round(sum(seconds), 2),
        "seconds_per_epoch": round(sum(seconds) / max(1, epochs), 4),
        "settle_seconds": round(time.perf_counter() - tick, 2),
        **{k: public(v) for k, v in snaps.items()},
        "rss_growth_epoch2_to_last_mib": round(snaps["last"]["rss_mib"] - e2["rss_mib"], 2),
        "rss_growth_epoch1_to_last_mib": round(
            snaps["last"]["rss_mib"] - snaps["epoch1"]["rss_mib"], 2
        ),
        "new_after_close": appeared(before, closed, seen),
        "new_at_last_epoch": appeared(snaps["epoch1"], snaps["last"], seen),
        "per_epoch": series | {"seconds": [round(s, 4) for s in seconds]},
    }


# -- report ------------------------------------------------------------------------------


def table(results: list[dict[str, Any]]) -> str:
    cols = ("rss_mib", "children", "shm_ours", "shm", "shm_maps", "fds")
    head = "| loader | epochs | s/epoch | " + " | ".join(
        f"{c} before / epoch 1 / last / closed" for c in cols
    )
    lines = [head + " | RSS epoch 2 to last |", "|" + " --- |" * (len(cols) + 4)]
    for r in results:
        if "error" in r:
            lines.append(f"| `{r['loader']}` | error: {r['error']} |")
            continue
        cells = []
        for c in cols:
            vals = [r[s][c] for s in ("before", "epoch1", "last", "closed")]
            fmt = "{:.0f}" if c == "rss_mib" else "{}"
            cells.append(" / ".join(fmt.format(v) for v in vals))
        lines.append(
            f"| `{r['loader']}` | {r['epochs']} | {r['seconds_per_epoch']:.3f} | "
            + " | ".join(cells)
            + f" | {r['rss_growth_epoch2_to_last_mib']:+.1f} MiB |"
        )
    return "\n".join(lines)


def plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if "error" not in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    for r in rows:
        ys = r["per_epoch"]["rss_mib"]
        ax.plot(range(1, len(ys) + 1), ys, label=r["loader"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("parent RSS after the epoch (MiB)")
    m = report["machine"]
    ax.set_title(f"soak: {report['data']}, {m['cpu_count']} CPUs", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=200, help="epochs per loader (200)")
    p.add_argument(
        "--epochs-for",
        nargs="+",
        default=[],
        metavar="LOADER=N",
        help="other epoch counts for some loaders (stream_dali=100)",
    )
    p.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS))
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    p.add_argument(
        "--data",
        type=Path,
        help="a generated folder (dataset/ and ray_dataset_hierarchical/); default: the "
        "demo preset in ./demo_data (made if missing)",
    )
    p.add_argument("--rays-per-batch", type=int, default=4096)
    p.add_argument("--subvolumes-per-batch", type=int, default=8)
    p.add_argument(
        "--warmup",
        action="store_true",
        help="one unmeasured epoch of every loader first (one-time set-up not counted)",
    )
    p.add_argument("--settle", type=float, default=5.0, help="seconds to wait for workers to go")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from gpuloader.commands.demo import DEFAULT_OUT, data_dirs, ensure_data

    torch.set_num_threads(1)
    if args.data is None:
        dataset_dir, ray_dir = ensure_data(DEFAULT_OUT, "demo")
        data = f"demo preset in {DEFAULT_OUT}"
    else:
        dataset_dir, ray_dir = data_dirs(args.data)
        data = str(args.data)
    epochs_for = {k: int(v) for k, v in (s.split("=", 1) for s in args.epochs_for)}
    # import what the loaders use before the first 'before' snapshot
    import gpuloader.loading.loader  # noqa: F401

    if "stream_dali" in args.loaders:
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            pass

    def run(name: str, epochs: int) -> dict:
        shape = (args.rays_per_batch, args.subvolumes_per_batch)
        return soak_one(name, dataset_dir, ray_dir, epochs, *shape, args.settle)

    if args.warmup:
        for name in args.loaders:
            print(f"{name}: warm-up epoch", flush=True)
            run(name, 1)
    results = []
    for name in args.loaders:
        n = epochs_for.get(name, args.epochs)
        print(f"{name}: {n} epochs ...", flush=True)
        try:
            r = run(name, n)
        except Exception as exc:  # noqa: BLE001 - one loader failing must not lose the rest
            r = {"loader": name, "error": f"{type(exc).__name__}: {exc}"}
        else:
            new = {k: v for k, v in r["new_after_close"].items() if v}
            print(
                f"  {r['seconds']:.1f} s ({r['seconds_per_epoch']:.3f} s/epoch), RSS "
                f"{r['before']['rss_mib']:.0f} -> {r['epoch1']['rss_mib']:.0f} -> "
                f"{r['last']['rss_mib']:.0f} -> {r['closed']['rss_mib']:.0f} MiB; "
                f"new after close: {new or 'nothing'}",
                flush=True,
            )
        results.append(r)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    report = {
        "timestamp": stamp,
        "data": data,
        "settings": {
            "warmup": args.warmup,
            "rays_per_batch": args.rays_per_batch,
            "subvolumes_per_batch": args.subvolumes_per_batch,
            "workers": WORKERS,
            "transform": "RandomRotation90(0.5), RandomFlip(0.5), RandomRaySubsample",
        },
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
        },
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"soak-{stamp}.json"
    path.write_text(json.dumps(report, indent=1))
    try:
        plot(path.with_suffix(".png"), report)
    except ImportError:
        pass
    print(table(results))
    print(f"wrote {path}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":  # DALI's spawned workers import this module
    sys.exit(main())
