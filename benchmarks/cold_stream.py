"""Data larger than memory: cold-cache streaming under a cgroup memory limit (issue 15).

Each loader runs in its own child process placed in a memory cgroup whose limit is below the
striped pack's size (``--limit-fraction`` of it; the page cache counts against the limit, so
the pack cannot stay cached), after the page cache was dropped. The child times
``--epochs`` epochs from cold (no warm-up epoch: with the data larger than the limit every
epoch is cold) and reads the block device's counters (``/proc/diskstats``) around them:

* ``upstream``     benchmarks/upstream_baseline.py on the npz files (a torch DataLoader);
* ``pack_stream``  ``GPURayLoader(store="stream")`` on the rows pack (exact per-epoch draws);
* ``striped``      ``GPURayLoader(store="striped")`` on the striped pack;
* ``host``         ``GPURayLoader(store="host")``, outside the limit: the split resident in
  RAM (filled before timing), the in-memory reference.

Every loader reads the train split of ``--levels`` in batches of ``--subvolumes-per-batch``
sub-volumes x ``--rays-per-batch`` rays with random flips and a ray subsample to
rays_per_batch / subvolumes per sub-volume. Figures: rays/s, and bytes read from the block
device per ray delivered; medians of ``--repeats`` runs, with ratios in the same run.
The packs are built in ``DATA/`` first when missing (the command says what, where and how
big). Writes ``benchmarks/results/cold_<timestamp>.json`` and a PNG beside it.

    python benchmarks/cold_stream.py --data /tmp/bench            # bench preset, levels 3 4

Needs root for the cgroup; without it, it says so and runs without a limit. The data files
are evicted from the page cache before each run (``posix_fadvise(DONTNEED)``), the code is
not, so the device counters (machine-wide) count the data reads.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LOADERS = ("upstream", "pack_stream", "striped", "host")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder of the bench preset")
    p.add_argument("--levels", type=int, nargs="+", default=[3, 4])
    p.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rays-per-batch", type=int, default=4096)
    p.add_argument("--subvolumes-per-batch", type=int, default=8)
    p.add_argument("--stripe-rays", type=int, default=512)
    p.add_argument(
        "--limit-fraction", type=float, default=1 / 3, help="cgroup limit / striped pack size"
    )
    p.add_argument("--limit-mb", type=float, help="the cgroup limit in MB (else the fraction)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one child may run")
    p.add_argument("--child", choices=LOADERS, help=argparse.SUPPRESS)
    p.add_argument("--cgroup", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the machine: block device counters, page cache, cgroups ---------------------------------


def block_device(path: Path) -> str | None:
    """The /proc/diskstats name of the device holding ``path`` (the whole disk)."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if int(f[0]) == major and int(f[1]) == minor:
            return f[2]
    return None


def bytes_read(device: str | None) -> int:
    """Bytes read from ``device`` since boot (sectors read x 512), 0 when unknown."""
    if device is None:
        return 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if f[2] == device:
            return int(f[5]) * 512
    return 0


def evict(paths: list[Path]) -> str:
    """Evict the data files under ``paths`` from the page cache (``posix_fadvise(DONTNEED)``
    after a sync): the data is cold, the code (python, torch, numba's cache) stays cached,
    so the block device's counters count data reads only; says what was done."""
    os.sync()
    n = 0
    for root in paths:
        for f in root.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    n += 1
                finally:
                    os.close(fd)
    return f"data cold: {n} data files evicted from the page cache (fadvise DONTNEED)"


def make_cgroup(limit: int) -> tuple[str | None, str]:
    """A memory cgroup below this process's, limited to ``limit`` bytes (page cache
    included): ``(its cgroup.procs path, what was done)``, or ``(None, why not)``."""
    name = f"gpuloader_cold_{os.getpid()}"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrl, rel = line.split(":", 2)
        if "memory" in ctrl.split(","):  # cgroup v1
            d = Path("/sys/fs/cgroup/memory") / rel.lstrip("/") / name
            knob = "memory.limit_in_bytes"
            break
    else:
        rel = next(
            (ln.split(":", 2)[2] for ln in Path("/proc/self/cgroup").read_text().splitlines()
             if ln.startswith("0::")), "/",
        )  # fmt: skip
        d = Path("/sys/fs/cgroup") / rel.lstrip("/") / name
        knob = "memory.max"
    try:
        d.mkdir()
        (d / knob).write_text(str(int(limit)))
        if knob == "memory.limit_in_bytes" and (d / "memory.memsw.limit_in_bytes").exists():
            try:  # no swap either, where the kernel accounts it
                (d / "memory.memsw.limit_in_bytes").write_text(str(int(limit)))
            except OSError:
                pass
    except OSError as exc:
        return None, f"could not create a memory cgroup at {d} ({exc}): no limit"
    return str(d / "cgroup.procs"), f"cgroup {d}: {knob} = {limit / 2**20:,.0f} MiB"


def remove_cgroup(procs: str | None) -> None:
    if procs is not None:
        try:
            Path(procs).parent.rmdir()
        except OSError:
            pass


# -- the child: one loader, timed from cold --------------------------------------------------


def _transform(per_sample: int, upstream: bool) -> Any:
    if upstream:
        import upstream_baseline as up

        return up.UpstreamCompose([up.UpstreamFlip(p=0.5), up.UpstreamRaySubsample(per_sample)])
    from gpuloader import transforms as T

    return T.Compose([T.RandomFlip(p=0.5), T.RandomRaySubsample(num_rays=per_sample)])


def build_loader(args: argparse.Namespace, kind: str) -> tuple[Any, Any, str]:
    """(iterable, set_epoch or None, what it is) of loader ``kind``."""
    ds_dir, ray_dir = args.data / "dataset", args.data / "ray_dataset_hierarchical"
    spb, per = args.subvolumes_per_batch, args.rays_per_batch // args.subvolumes_per_batch
    if kind == "upstream":
        sys.path.insert(0, str(HERE))
        import upstream_baseline as up
        from torch.utils.data import DataLoader

        ds = up.UpstreamDataset(
            ds_dir, ray_dir, levels=args.levels, samples_per_subvolume=per,
            transform=_transform(per, True),
        )  # fmt: skip
        sampler = up.UpstreamRayBatchSampler(ds, args.rays_per_batch, spb, group_by_level=True)
        dl = DataLoader(
            ds, batch_sampler=sampler, collate_fn=up.upstream_collate,
            num_workers=args.workers, persistent_workers=args.workers > 0,
        )  # fmt: skip
        return dl, None, "upstream behaviour, npz, torch DataLoader"
    from gpuloader import GPURayLoader, HierarchicalVoxelRayDataset, PackedRayStore

    pack = {"pack_stream": rows_pack(args), "striped": striped_pack(args)}.get(kind)
    store = PackedRayStore(pack) if pack is not None else None
    ds = HierarchicalVoxelRayDataset(ds_dir, ray_dir, levels=args.levels, ray_store=store)
    loader = GPURayLoader(
        ds, args.rays_per_batch, spb, transform=_transform(per, False), seed=0,
        num_workers=args.workers, device="cpu", progress=False,
        store={"pack_stream": "stream", "striped": "striped", "host": "host"}[kind],
        threads=1,
    )  # fmt: skip
    return loader, loader.set_epoch, f"GPURayLoader store={loader.store}, {loader.backend}"


def child(args: argparse.Namespace) -> int:
    if args.cgroup:  # join the limit before anything is imported or read
        Path(args.cgroup).write_text(str(os.getpid()))
    import torch

    torch.set_num_threads(1)
    dev = block_device(args.data)
    t0, b0 = time.perf_counter(), bytes_read(dev)
    loader, set_epoch, what = build_loader(args, args.child)
    setup_s, setup_b = time.perf_counter() - t0, bytes_read(dev) - b0
    epochs = []
    for e in range(args.epochs):
        if set_epoch is not None:
            set_epoch(e)
        b, tick, rays = bytes_read(dev), time.perf_counter(), 0
        for batch in loader:
            rays += int(batch["origins"].shape[0])
        epochs.append(
            {"rays": rays, "seconds": time.perf_counter() - tick, "bytes": bytes_read(dev) - b}
        )
    close = getattr(loader, "close", None)
    if close is not None:
        close()
    rays = sum(e["rays"] for e in epochs)
    secs = sum(e["seconds"] for e in epochs)
    out = {
        "loader": args.child,
        "what": what,
        "setup_seconds": setup_s,
        "setup_bytes": setup_b,
        "epochs": epochs,
        "rays_per_s": rays / max(secs, 1e-9),
        "bytes_per_ray": sum(e["bytes"] for e in epochs) / max(rays, 1),
        "device": dev,
    }
    args.result.write_text(json.dumps(out))
    return 0


# -- the parent ----------------------------------------------------------------------------


def _pack_dir(args: argparse.Namespace, kind: str) -> Path:
    return args.data / f"{kind}_L{'-'.join(str(L) for L in args.levels)}"


def rows_pack(args: argparse.Namespace) -> Path:
    return _pack_dir(args, "rows_pack")


def striped_pack(args: argparse.Namespace) -> Path:
    return _pack_dir(args, f"striped_pack_W{args.stripe_rays}")


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def ensure_packs(args: argparse.Namespace) -> None:
    """Build the rows and striped packs of the levels when missing, saying so first."""
    from gpuloader.stores.pack import pack_rays

    ray_dir = args.data / "ray_dataset_hierarchical"
    npz = sum(du(ray_dir / f"level_{L}") for L in args.levels)
    for out, layout in ((rows_pack(args), "rows"), (striped_pack(args), "striped")):
        if (out / "manifest.json").exists():
            continue
        print(
            f"building the {layout} pack of levels {args.levels} in {out} (the npz files hold "
            f"{npz / 2**30:.2f} GiB; the pack is about {1.7 if layout == 'rows' else 1.3:.1f}x "
            "that); once",
            flush=True,
        )
        kw = {"layout": "striped", "stripe_rays": args.stripe_rays} if layout == "striped" else {}
        pack_rays(ray_dir, out, levels=args.levels, **kw)


def run_child(args: argparse.Namespace, kind: str, procs: str | None, tag: str) -> dict:
    """One child run of loader ``kind`` (in the cgroup ``procs`` unless None)."""
    args.out.mkdir(parents=True, exist_ok=True)
    result = args.out / f".cold_{os.getpid()}_{tag}.json"
    cmd = [sys.executable, __file__, "--child", kind, "--result", str(result)]
    cmd += ["--data", str(args.data), "--levels", *map(str, args.levels)]
    cmd += ["--epochs", str(args.epochs), "--workers", str(args.workers)]
    cmd += ["--rays-per-batch", str(args.rays_per_batch)]
    cmd += ["--subvolumes-per-batch", str(args.subvolumes_per_batch)]
    cmd += ["--stripe-rays", str(args.stripe_rays)]
    if procs is not None:
        cmd += ["--cgroup", procs]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        p = subprocess.run(cmd, env=env, timeout=args.timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"loader": kind, "error": f"timed out after {args.timeout:g} s"}
    if p.returncode != 0 or not result.exists():
        why = "killed by signal 9 (out of memory in the cgroup?)" if p.returncode == -9 else ""
        last = (p.stderr.strip().splitlines() or [""])[-1]
        return {"loader": kind, "error": f"exit {p.returncode} {why} {last}".strip()}
    out = json.loads(result.read_text())
    result.unlink()
    return out


def summarize(runs: dict[str, list[dict]], record_bytes: int) -> dict[str, Any]:
    """Medians per loader, ratios of the medians and the targets of issue 15."""
    med: dict[str, dict] = {}
    for kind, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if ok:
            med[kind] = {
                "rays_per_s": statistics.median(r["rays_per_s"] for r in ok),
                "bytes_per_ray": statistics.median(r["bytes_per_ray"] for r in ok),
                "runs": len(ok),
            }
        else:
            med[kind] = {"error": rs[0]["error"] if rs else "not run"}
    ratios: dict[str, float] = {}

    def rate(k: str) -> float | None:
        return med.get(k, {}).get("rays_per_s")

    for k in med:
        for base in ("upstream", "host"):
            if rate(k) and rate(base) and k != base:
                ratios[f"{k}/{base}"] = rate(k) / rate(base)
    targets = {}
    if "striped/host" in ratios:
        targets["striped >= 0.8x host rays/s"] = ratios["striped/host"] >= 0.8
    if "striped/upstream" in ratios:
        targets["striped >= 10x upstream rays/s"] = ratios["striped/upstream"] >= 10
    if "bytes_per_ray" in med.get("striped", {}):
        targets[f"striped bytes/ray <= 1.25 x {record_bytes} B"] = (
            med["striped"]["bytes_per_ray"] <= 1.25 * record_bytes
        )
    return {"medians": med, "ratios": ratios, "targets": targets}


def plot(path: Path, summary: dict[str, Any], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no plot)")
        return
    med = {k: v for k, v in summary["medians"].items() if "rays_per_s" in v}
    names = list(med)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.bar(names, [med[k]["rays_per_s"] / 1e6 for k in names], color="#4477aa")
    a.set_ylabel("rays delivered per second (millions)")
    a.set_title("throughput, cold, under the memory limit")
    b.bar(names, [max(med[k]["bytes_per_ray"], 1e-3) for k in names], color="#cc6677")
    b.set_yscale("log")
    b.set_ylabel("bytes read from disk per ray delivered (log)")
    b.set_title("disk traffic")
    for ax in (a, b):
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    sys.path.insert(0, str(HERE.parent))
    ensure_packs(args)
    from gpuloader.stores.pack import PackedRayStore

    pack = PackedRayStore(striped_pack(args))
    record = max(pack.striped_level(L).record_bytes for L in args.levels)
    size = du(striped_pack(args))
    limit = int(args.limit_mb * 2**20) if args.limit_mb else int(size * args.limit_fraction)
    procs, how = make_cgroup(limit)
    print(f"striped pack {size / 2**30:.2f} GiB, rows pack {du(rows_pack(args)) / 2**30:.2f} GiB")
    print(how, flush=True)
    data = [args.data / "ray_dataset_hierarchical", rows_pack(args), striped_pack(args)]
    data.append(args.data / "dataset")
    runs: dict[str, list[dict]] = {k: [] for k in args.loaders}
    evicted = ""
    try:
        for rep in range(args.repeats):
            for kind in args.loaders:
                evicted = evict(data)
                inside = None if kind == "host" else procs
                r = run_child(args, kind, inside, f"{kind}_{rep}")
                runs[kind].append(r)
                msg = r.get("error") or (
                    f"{r['rays_per_s']:12,.0f} rays/s  {r['bytes_per_ray']:9,.1f} B read/ray"
                )
                print(f"  run {rep + 1}/{args.repeats} {kind:12s} {msg}", flush=True)
    finally:
        remove_cgroup(procs)
    summary = summarize(runs, record)
    print(evicted)
    print(f"\nmedians of {args.repeats} runs, {args.epochs} epochs each from cold:")
    for k, m in summary["medians"].items():
        if "error" in m:
            print(f"  {k:12s} {m['error']}")
        else:
            print(f"  {k:12s} {m['rays_per_s']:12,.0f} rays/s  {m['bytes_per_ray']:9,.1f} B/ray")
    for k, v in summary["ratios"].items():
        print(f"  {k:24s} {v:8.2f}x")
    for k, ok in summary["targets"].items():
        print(f"  target {k}: {'met' if ok else 'MISSED'}")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "limit_bytes": limit if procs else None,
        "cgroup": how,
        "cache": evicted,
        "striped_pack_bytes": size,
        "record_bytes": record,
        "cpus": os.cpu_count(),
        "runs": runs,
        **summary,
    }
    out = args.out / f"cold_{stamp}.json"
    out.write_text(json.dumps(report, indent=1))
    title = (
        f"levels {args.levels} train, {args.subvolumes_per_batch} x "
        f"{args.rays_per_batch // args.subvolumes_per_batch} rays, {args.workers} workers, "
        f"{how.split(':')[-1].strip()}, medians of {args.repeats}"
    )
    plot(out.with_suffix(".png"), summary, title)
    print(f"wrote {out} and {out.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
