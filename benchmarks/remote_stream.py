"""The striped store from an S3 server against the same pack on local disk (issue 16).

Starts an S3-compatible server on 127.0.0.1 (moto in server mode, its own process: a
stand-in for an object store on the network), uploads the bench striped pack there once
(``pack_to_url``'s upload: manifest last), then times ``--epochs`` epochs of
``GPURayLoader(store="striped")`` on the train split of ``--levels`` twice per repeat, in
alternating order: reading the pack from local disk (its files evicted from the page cache
first, so every stripe comes from the disk) and from the S3 server, after one uncounted
warm-up run of each (the first run in a process pays one-off costs). Figures: rays/s and
bytes fetched per ray delivered (local: read from the block device, /proc/diskstats; S3:
the bytes the store's range requests received), medians of ``--repeats``, the ratio S3 /
local per repeat. Writes ``benchmarks/results/remote_<timestamp>.json`` and a PNG.

    python benchmarks/remote_stream.py --data /tmp/bench          # bench preset, levels 3 4

The pack is the one of benchmarks/cold_stream.py (built in DATA/ when missing). Needs the
``s3`` extra and ``moto[server]`` (the dev extra).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cold_stream  # noqa: E402  (the pack, eviction and disk counters)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder of the bench preset")
    p.add_argument("--levels", type=int, nargs="+", default=[3, 4])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rays-per-batch", type=int, default=4096)
    p.add_argument("--subvolumes-per-batch", type=int, default=8)
    p.add_argument("--stripe-rays", type=int, default=512)
    p.add_argument("--part-mib", type=float, default=8.0, help="bytes per range request")
    p.add_argument("--concurrency", type=int, default=8, help="range requests in flight")
    p.add_argument(
        "--gap-kib",
        type=float,
        default=1024.0,
        help="spans this close are one range request, the bytes between dropped (1024)",
    )
    p.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="time the first run of each too (by default one run of each is not counted)",
    )
    p.add_argument("--out", type=Path, default=HERE / "results")
    return p.parse_args(argv)


def start_server() -> tuple[subprocess.Popen, str]:
    """moto_server on a free port of 127.0.0.1, in its own process; (process, endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen(
        [*cmd, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, endpoint
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"moto_server did not start on {endpoint}")


def options(endpoint: str) -> dict[str, Any]:
    return {
        "key": "bench",
        "secret": "bench",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }


def run_once(args: argparse.Namespace, where: str, url: str, opts: dict) -> dict[str, Any]:
    """``--epochs`` epochs of the striped store over the pack at ``where`` ("local"/"s3")."""
    from gpuloader import GPURayLoader, HierarchicalVoxelRayDataset, PackedRayStore
    from gpuloader import transforms as T

    pack = cold_stream.striped_pack(args)
    device = cold_stream.block_device(pack)
    if where == "local":
        cold_stream.evict([pack])
        store = PackedRayStore(pack)
    else:
        store = PackedRayStore(url, storage_options=opts)
        store.files.part_bytes = int(args.part_mib * 2**20)
        store.files.max_concurrency = args.concurrency
        store.files.gap_bytes = int(args.gap_kib * 1024)
    ds_dir, ray_dir = args.data / "dataset", args.data / "ray_dataset_hierarchical"
    per = args.rays_per_batch // args.subvolumes_per_batch
    ds = HierarchicalVoxelRayDataset(ds_dir, ray_dir, levels=args.levels, ray_store=store)
    tf = T.Compose([T.RandomFlip(p=0.5), T.RandomRaySubsample(num_rays=per)])
    disk0 = cold_stream.bytes_read(device)
    net0 = getattr(store.files, "fetched_bytes", 0)
    start = time.perf_counter()
    loader = GPURayLoader(
        ds, args.rays_per_batch, args.subvolumes_per_batch, transform=tf, seed=0,
        device="cpu", progress=False, store="striped", threads=1,
    )  # fmt: skip
    rays = 0
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            rays += int(batch["origins"].shape[0])
    seconds = time.perf_counter() - start
    fetched = (
        cold_stream.bytes_read(device) - disk0
        if where == "local"
        else store.files.fetched_bytes - net0
    )
    return {
        "where": where,
        "rays": rays,
        "seconds": seconds,
        "rays_per_s": rays / seconds,
        "bytes_per_ray": fetched / max(rays, 1),
        "requests": getattr(store.files, "requests", None),
    }


def plot(path: Path, med: dict[str, dict], ratio: float, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no plot)")
        return
    names = ["local", "s3"]
    labels = ["local disk (cold)", "S3 server (127.0.0.1)"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2))
    a.bar(labels, [med[k]["rays_per_s"] / 1e6 for k in names], color=["#4477aa", "#228833"])
    a.set_ylabel("rays delivered per second (millions)")
    a.set_title(f"striped store throughput (S3 / local = {ratio:.2f}x)")
    b.bar(labels, [med[k]["bytes_per_ray"] for k in names], color=["#4477aa", "#228833"])
    b.set_ylabel("bytes fetched per ray delivered")
    b.set_title("traffic: disk reads / range-request bytes")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    # the pack of cold_stream.py (built when missing)
    cold_stream.ensure_packs(argparse.Namespace(**{**vars(args), "limit_fraction": 1 / 3}))
    pack = cold_stream.striped_pack(args)
    from gpuloader.stores.remote.upload import upload_pack

    proc, endpoint = start_server()
    try:
        import s3fs

        opts = options(endpoint)
        s3fs.S3FileSystem(skip_instance_cache=True, **opts).call_s3("create_bucket", Bucket="bench")
        url = "s3://bench/striped"
        size = cold_stream.du(pack)
        print(f"uploading {pack} ({size / 2**30:.2f} GiB) to {url} on {endpoint}")
        t = time.perf_counter()
        upload_pack(pack, url, opts, progress=True)
        print(f"  uploaded in {time.perf_counter() - t:.1f} s")
        runs: dict[str, list[dict]] = {"local": [], "s3": []}
        for where in ("local", "s3") if args.warmup else ():
            got = run_once(args, where, url, opts)  # first-run costs (imports, page tables)
            print(f"  warm-up {where:6s} {got['rays_per_s']:>12,.0f} rays/s (not counted)")
        for r in range(args.repeats):
            order = ("local", "s3") if r % 2 == 0 else ("s3", "local")
            for where in order:
                got = run_once(args, where, url, opts)
                runs[where].append(got)
                print(
                    f"  run {r + 1}/{args.repeats} {where:6s} {got['rays_per_s']:>12,.0f} rays/s "
                    f"{got['bytes_per_ray']:>8.1f} B/ray"
                )
    finally:
        proc.kill()
        proc.wait()
    med = {
        k: {
            m: statistics.median(x[m] for x in v) for m in ("rays_per_s", "bytes_per_ray")
        }  # fmt: skip
        for k, v in runs.items()
    }
    ratios = [
        s["rays_per_s"] / lo["rays_per_s"] for s, lo in zip(runs["s3"], runs["local"], strict=True)
    ]
    ratio = statistics.median(ratios)
    print(
        f"median: local {med['local']['rays_per_s']:,.0f} rays/s, S3 {med['s3']['rays_per_s']:,.0f}"
        f" rays/s; S3 / local {ratio:.2f}x (per repeat {', '.join(f'{x:.2f}' for x in ratios)});"
        f" target >= 0.8x: {'met' if ratio >= 0.8 else 'missed'}"
    )
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"remote_{stamp}.json"
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {"config": config, "runs": runs, "medians": med, "ratio_s3_local": ratio,
              "ratios": ratios, "cpu_count": os.cpu_count()}  # fmt: skip
    out.write_text(json.dumps(result, indent=1))
    title = (
        f"{args.epochs} epochs, levels {args.levels}, W={args.stripe_rays}, "
        f"{args.rays_per_batch} rays/batch, {os.cpu_count()} cores; medians of {args.repeats}"
    )
    plot(out.with_suffix(".png"), med, ratio, title)
    print(f"wrote {out} and {out.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
