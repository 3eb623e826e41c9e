"""The seed's benchmark suite, every figure next to the upstream-behaviour baseline.

Benchmarks (``--benchmarks``; default ``all``):

* ``single``    time to load one sample (cold voxel cache, then warm)
* ``loader``    DataLoader throughput (batch_size sub-volumes, shuffled)
* ``batch``     RayBatchSampler throughput and the rays each batch really holds
* ``cache``     throughput against the voxel cache size
* ``transform`` per-sample cost of rotations, flips and ray subsampling
* ``memory``    Python-heap peak per loaded sample and resident memory
* ``workers``   throughput against the number of DataLoader workers

The baseline (benchmarks/upstream_baseline.py) re-implements how the upstream loader spends
its time; it runs in the same process on the same data with the same settings, so each
``ratio`` is measured, not quoted (> 1: gpuloader is better). Runs with no arguments on the
demo data::

    python examples/benchmark_dataset.py                     # GPURayLoader, store="auto"
    python examples/benchmark_dataset.py --loader cpu        # the seed's CPU API only
    python examples/benchmark_dataset.py --store stream      # the per-sample reader
    python examples/benchmark_dataset.py --benchmarks single loader cache
    python examples/benchmark_dataset.py --batch-size 16 --num-workers 8 --benchmarks all
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from gpuloader import transforms
from gpuloader.commands.demo import DEFAULT_OUT, resolve_data_dirs
from gpuloader.dataset.collate import collate_ray_batch
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.plan.sampler import RayBatchSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import upstream_baseline as up  # noqa: E402  (baseline only, not part of gpuloader)

BENCHMARKS = ("single", "loader", "batch", "cache", "transform", "memory", "workers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset-dir", type=Path, help="voxel dataset root (default: demo data)")
    p.add_argument("--ray-dataset-dir", type=Path, help="ray dataset root")
    p.add_argument("--demo-dir", type=Path, default=DEFAULT_OUT, help="where demo data lives")
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument(
        "--benchmarks",
        nargs="+",
        default=["all"],
        choices=[*BENCHMARKS, "all"],
        metavar="NAME",
        help=f"any of {', '.join(BENCHMARKS)}, or all",
    )
    p.add_argument("--batch-size", type=int, default=8, help="sub-volumes per batch (8)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (2)")
    p.add_argument("--rays-per-sample", type=int, default=512, help="rays kept per sample (512)")
    p.add_argument("--max-batches", type=int, help="batches per timed epoch (all)")
    p.add_argument("--samples", type=int, default=30, help="single loads timed (30)")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads of the main process (1, as in DataLoader workers: on a busy "
        "machine several threads make tiny tensor ops slower, not faster)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    p.add_argument(
        "--loader",
        choices=["gpu", "cpu"],
        default="gpu",
        help="what the loader/batch/workers benchmarks time for gpuloader: GPURayLoader "
        "(gpu, default: the fast path) or the seed's DataLoader + RayBatchSampler (cpu)",
    )
    p.add_argument(
        "--store",
        choices=["auto", "gpu", "host", "stream"],
        default="auto",
        help="GPURayLoader's store (auto)",
    )
    p.add_argument("--device", default="auto", help="GPURayLoader's device (auto)")
    return p.parse_args(argv)


class Suite:
    """Builds both datasets with matching settings and records result rows."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        dd, rd = resolve_data_dirs(args.dataset_dir, args.ray_dataset_dir, args.demo_dir)
        self.common = {"dataset_dir": dd, "ray_dataset_dir": rd, "split": args.split}
        self.rows: list[dict[str, Any]] = []

    def ours(self, **kw: Any) -> HierarchicalVoxelRayDataset:
        kw.setdefault("samples_per_subvolume", self.args.rays_per_sample)
        return HierarchicalVoxelRayDataset(**self.common, **kw)

    def base(self, **kw: Any) -> up.UpstreamDataset:
        kw.setdefault("samples_per_subvolume", self.args.rays_per_sample)
        return up.UpstreamDataset(**self.common, **kw)

    def loaders(
        self, ours: Any, base: Any, workers: int, ray_sampler: bool = True
    ) -> tuple[DataLoader, DataLoader]:
        """gpuloader (RayBatchSampler or plain batching) and baseline DataLoaders."""
        bs = self.args.batch_size
        extra: dict[str, Any] = {"num_workers": workers, "persistent_workers": workers > 0}
        if self.args.loader == "gpu":
            from gpuloader import GPURayLoader

            lo: Any = GPURayLoader(
                ours,
                rays_per_batch=bs * self.args.rays_per_sample if ray_sampler else None,
                subvolumes_per_batch=bs,
                num_workers=max(1, workers),
                store=self.args.store,
                device=self.args.device,
            )
        elif ray_sampler:
            s = RayBatchSampler(ours, bs * self.args.rays_per_sample, bs)
            lo = DataLoader(ours, batch_sampler=s, collate_fn=collate_ray_batch, **extra)
        else:
            lo = DataLoader(
                ours, batch_size=bs, shuffle=True, collate_fn=collate_ray_batch, **extra
            )
        sb = up.UpstreamRayBatchSampler(
            base, bs * self.args.rays_per_sample, bs, group_by_level=True
        )
        lb = DataLoader(base, batch_sampler=sb, collate_fn=up.upstream_collate, **extra)
        return lo, lb

    def _epoch(self, loader: Iterable[dict]) -> tuple[float, float, float]:
        """(rays/s, samples/s, rays per batch) of one epoch (or ``--max-batches``)."""
        limit = self.args.max_batches
        tick = time.perf_counter()
        rays = samples = batches = 0
        for batch in loader:
            rays += int(batch["origins"].shape[0])
            samples += int(batch["voxels"].shape[0])
            batches += 1
            if limit is not None and batches >= limit:
                break
        secs = max(time.perf_counter() - tick, 1e-9)
        return rays / secs, samples / secs, rays / max(batches, 1)

    def throughput_pair(
        self, ours: Iterable[dict], base: Iterable[dict], epochs: int = 3
    ) -> tuple[dict[str, float], dict[str, float]]:
        """One warm-up epoch of each, then ``epochs`` epochs of each, alternately (a noisy
        machine drifts: the side timed in a quiet spell would win), and the medians of each
        side's rays/s, samples/s and rays per batch."""
        self._epoch(ours), self._epoch(base)
        got: tuple[list, list] = ([], [])
        for _ in range(epochs):
            got[0].append(self._epoch(ours))
            got[1].append(self._epoch(base))
        keys = ("rays_per_s", "samples_per_s", "rays_per_batch")
        o, b = (
            {k: statistics.median(r[j] for r in side) for j, k in enumerate(keys)} for side in got
        )
        return o, b

    def add(
        self,
        bench: str,
        name: str,
        ours: float,
        base: float,
        unit: str,
        higher_is_better: bool = True,
    ) -> None:
        ratio = ours / base if higher_is_better else base / ours
        self.rows.append(
            {
                "benchmark": bench,
                "name": name,
                "gpuloader": ours,
                "upstream": base,
                "unit": unit,
                "ratio": ratio,
            }
        )
        print(f"  {name:38s} {ours:12,.2f} {base:12,.2f} {unit:10s} {ratio:7.2f}x")


def _median_ms(
    ours: Callable[[int], object], base: Callable[[int], object], n: int
) -> tuple[float, float]:
    """Median milliseconds of ``ours(i)`` and ``base(i)`` for i < n, called alternately
    (each collected before: a pending collection would land in whichever runs next)."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(n):
        for side, fn in enumerate((ours, base)):
            gc.collect()
            t = time.perf_counter()
            fn(i)
            times[side].append(time.perf_counter() - t)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def bench_single(s: Suite) -> None:
    ours, base = s.ours(), s.base()
    n = min(s.args.samples, len(ours))
    s.add(
        "single",
        "cold voxel cache",
        *_median_ms(ours.__getitem__, base.__getitem__, n),
        "ms/sample",
        False,
    )
    s.add(
        "single",
        "warm voxel cache",
        *_median_ms(ours.__getitem__, base.__getitem__, n),
        "ms/sample",
        False,
    )


def bench_loader(s: Suite) -> None:
    lo, lb = s.loaders(s.ours(), s.base(), s.args.num_workers, ray_sampler=False)
    o, b = s.throughput_pair(lo, lb)
    s.add(
        "loader",
        f"DataLoader, {s.args.num_workers} workers",
        o["rays_per_s"],
        b["rays_per_s"],
        "rays/s",
    )
    s.add(
        "loader",
        f"DataLoader, {s.args.num_workers} workers",
        o["samples_per_s"],
        b["samples_per_s"],
        "samples/s",
    )


def bench_batch(s: Suite) -> None:
    ours, base = s.ours(samples_per_subvolume=None), s.base(samples_per_subvolume=None)
    bs = s.args.batch_size
    for rpb in (1024, 4096):
        sampler = RayBatchSampler(ours, rays_per_batch=rpb, subvolumes_per_batch=bs)
        lo = DataLoader(
            ours,
            batch_sampler=sampler,
            collate_fn=collate_ray_batch,
            num_workers=s.args.num_workers,
            persistent_workers=s.args.num_workers > 0,
        )
        sb = up.UpstreamRayBatchSampler(base, rpb, bs, group_by_level=True)
        lb = DataLoader(
            base,
            batch_sampler=sb,
            collate_fn=up.upstream_collate,
            num_workers=s.args.num_workers,
            persistent_workers=s.args.num_workers > 0,
        )
        o, b = s.throughput_pair(lo, lb, epochs=2)
        print(
            f"  rays_per_batch={rpb}: gpuloader batches hold {o['rays_per_batch']:,.0f} rays, "
            f"upstream {b['rays_per_batch']:,.0f} (it ignores rays_per_batch)"
        )
        s.add(
            "batch",
            f"rays_per_batch={rpb}: time per wanted ray",
            1e6 / o["rays_per_s"] * o["rays_per_batch"] / rpb,
            1e6 / b["rays_per_s"] * b["rays_per_batch"] / rpb,
            "us/ray",
            False,
        )
        s.add(
            "batch",
            f"rays_per_batch={rpb}: batches/s",
            o["rays_per_s"] / o["rays_per_batch"],
            b["rays_per_s"] / b["rays_per_batch"],
            "batches/s",
        )


def bench_cache(s: Suite) -> None:
    n = len(s.ours())
    for size in sorted({0, 10, 100, n}):
        ours, base = s.ours(cache_size=size), s.base(cache_size=size)
        lo, lb = s.loaders(ours, base, 0)
        o, b = s.throughput_pair(lo, lb)
        s.add("cache", f"cache_size={size}", o["samples_per_s"], b["samples_per_s"], "samples/s")
        hit_b = base.cache_hits / max(1, base.cache_hits + base.cache_misses)
        print(f"  {'':38s} {_cache_use(ours, lo)} vs upstream's hit rate {hit_b:.0%}")


def _cache_use(ours: HierarchicalVoxelRayDataset, loader: Any) -> str:
    """What gpuloader did with the voxel cache in the timed epoch (the main process's counts).

    A resident store (``GPURayLoader`` with store host/gpu) holds every grid, read once when
    it is filled, so ``cache_size`` is not used; the pack stream reads grids in its workers.
    """
    store = getattr(loader, "store", None)
    if store in ("host", "gpu"):
        return f"grids resident in the {store} store (read once; cache_size unused)"
    if store == "stream":
        return "grids read by the stream's workers (their own caches)"
    info = ours.cache_info()
    return f"hit rate {info['hit_rate']:.0%} ({info['hits']} hits, {info['misses']} misses)"


def bench_transform(s: Suite) -> None:
    k = s.args.rays_per_sample
    cases = {
        "none": (None, None),
        "RandomRotation90": (transforms.RandomRotation90(p=1.0), up.UpstreamRotation90(p=1.0)),
        "RandomFlip": (transforms.RandomFlip(p=0.5), up.UpstreamFlip(p=0.5)),
        f"RandomRaySubsample({k})": (transforms.RandomRaySubsample(k), up.UpstreamRaySubsample(k)),
        "rotation + flip + subsample": (
            transforms.Compose(
                [
                    transforms.RandomRotation90(p=1.0),
                    transforms.RandomFlip(p=0.5),
                    transforms.RandomRaySubsample(k),
                ]
            ),
            up.UpstreamCompose(
                [up.UpstreamRotation90(p=1.0), up.UpstreamFlip(p=0.5), up.UpstreamRaySubsample(k)]
            ),
        ),
    }
    n = min(s.args.samples, len(s.ours()))
    for name, (to, tb) in cases.items():
        # the subsample transforms choose the rays themselves: no dataset-level limit
        spv = None if "Subsample" in name or "subsample" in name else k
        ours = s.ours(transform=to, samples_per_subvolume=spv)
        base = s.base(transform=tb, samples_per_subvolume=spv)
        for i in range(n):  # warm both voxel caches
            ours[i], base[i]
        s.add(
            "transform",
            name,
            *_median_ms(ours.__getitem__, base.__getitem__, n),
            "ms/sample",
            False,
        )


def bench_memory(s: Suite) -> None:
    def peak(ds: Any, n: int) -> float:
        gc.collect()
        tracemalloc.start()
        for i in range(n):
            ds[i]
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top / 2**20

    n = min(s.args.samples, len(s.ours()))
    # what a process pays once (codec tables, module caches) is paid before either is traced,
    # by whichever runs first: one sample past the measured ones, from another dataset object
    last = len(s.ours()) - 1
    if last >= n:
        s.ours()[last], s.base()[last]
    s.add(
        "memory",
        f"Python-heap peak over {n} samples",
        peak(s.ours(), n),
        peak(s.base(), n),
        "MiB",
        False,
    )
    ours, base = s.ours(), s.base()
    for i in range(n):
        ours[i], base[i]
    cached_o = sum(ours.voxels(i).nbytes for i in range(min(n, 100)))
    cached_b = sum(v.nbytes for v in base._cache.values())
    s.add(
        "memory",
        "voxel cache after those samples",
        cached_o / 2**20,
        cached_b / 2**20,
        "MiB",
        False,
    )
    rss = _rss_mib()
    if rss is not None:
        print(f"  resident memory of this process now: {rss:,.0f} MiB")


def _rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def bench_workers(s: Suite) -> None:
    counts = sorted({0, 1, 2, s.args.num_workers})
    for w in counts:
        lo, lb = s.loaders(s.ours(), s.base(), w)
        o, b = s.throughput_pair(lo, lb)
        s.add("workers", f"num_workers={w}", o["rays_per_s"], b["rays_per_s"], "rays/s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    chosen = BENCHMARKS if "all" in args.benchmarks else tuple(args.benchmarks)
    suite = Suite(args)
    print(
        f"data: {suite.common['dataset_dir'].parent}  split: {args.split}  "
        f"batch {args.batch_size} x {args.rays_per_sample} rays, {args.num_workers} workers; "
        + (
            f"gpuloader = GPURayLoader (store={args.store})"
            if args.loader == "gpu"
            else "gpuloader = DataLoader + RayBatchSampler"
        )
    )
    print(f"  {'(ratio > 1: gpuloader is better)':38s} {'gpuloader':>12s} {'upstream':>12s}")
    for name in chosen:
        print(f"\n[{name}]")
        globals()[f"bench_{name}"](suite)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "results": suite.rows},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
