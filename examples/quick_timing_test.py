"""Quick timing check of the seed API, each figure next to the upstream-behaviour baseline.

Times dataset initialization (repeated in this process, and the first construction in a new
process, which is what upstream's own script times), single-sample loads, the voxel cache,
DataLoader throughput, the ray batch sampler and the transform overhead, for gpuloader and
for the upstream baseline (benchmarks/upstream_baseline.py) in the same run, and prints the
ratios (> 1 means gpuloader is faster). Constructions and DataLoader epochs alternate between the
two and print the median of several. The last rows time the fast path, ``GPURayLoader`` with a
resident store (``--store``: auto, host, gpu or stream; ``--loader cpu`` leaves it out), on
augmented batches after one warm-up epoch. Runs with no arguments on the demo data::

    python examples/quick_timing_test.py
    python examples/quick_timing_test.py --store host --num-workers 2
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time
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

RAYS_PER_SAMPLE = 512
#: dataset constructions and DataLoader epochs timed per figure (the median is printed)
REPEATS, EPOCHS = 7, 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset-dir", type=Path, help="voxel dataset root (default: demo data)")
    p.add_argument("--ray-dataset-dir", type=Path, help="ray dataset root")
    p.add_argument("--demo-dir", type=Path, default=DEFAULT_OUT, help="where demo data lives")
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--batch-size", type=int, default=8, help="sub-volumes per batch (8)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (0)")
    p.add_argument("--samples", type=int, default=30, help="single loads timed (30)")
    p.add_argument(
        "--fresh-runs",
        type=int,
        default=5,
        help="new processes timed for the first construction in a process, each (5; 0: skip)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads of the main process (1, as in DataLoader workers: on a busy "
        "machine several threads make tiny tensor ops slower, not faster)",
    )
    p.add_argument(
        "--loader",
        choices=["gpu", "cpu"],
        default="gpu",
        help="also time GPURayLoader (gpu, default) or only the seed's CPU API (cpu)",
    )
    p.add_argument(
        "--store",
        choices=["auto", "gpu", "host", "stream"],
        default="auto",
        help="GPURayLoader's store (auto: GPU memory, else host RAM, else streaming)",
    )
    p.add_argument("--device", default="auto", help="GPURayLoader's device (auto)")
    return p.parse_args(argv)


def _timed(fn: Callable[[], object]) -> float:
    """Seconds of one call, garbage collected before (a pending collection of what came before
    would land in whichever call runs first)."""
    gc.collect()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


_FIRST = """
import gc, sys, time
sys.path.insert(0, sys.argv[5])
import torch
if sys.argv[1] == "gpuloader":
    from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset as Dataset
else:
    from upstream_baseline import UpstreamDataset as Dataset
gc.collect()
t = time.perf_counter()
Dataset(dataset_dir=sys.argv[2], ray_dataset_dir=sys.argv[3], split=sys.argv[4])
print(time.perf_counter() - t)
"""


def _first_construction(which: str, kw: dict) -> float:
    """Seconds of the first construction in a new Python process (after its imports), as
    upstream's script measures it: ``which`` is ``gpuloader`` or ``upstream``."""
    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    args = [which, str(kw["dataset_dir"]), str(kw["ray_dataset_dir"]), kw["split"], bench]
    out = subprocess.run(
        [sys.executable, "-c", _FIRST, *args], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def _paired(ours: Callable[[], float], base: Callable[[], float], n: int) -> tuple[float, float]:
    """Medians of ``n`` alternating measurements of each (a noisy machine drifts)."""
    got_o, got_b = [], []
    for _ in range(n):
        got_o.append(ours())
        got_b.append(base())
    return statistics.median(got_o), statistics.median(got_b)


def _alternating(ours: Any, base: Any, n: int) -> tuple[float, float]:
    """Median seconds of ``ours[i]`` and ``base[i]`` for i < n, read alternately (the one
    timed first would meet colder caches and a smaller heap than the other)."""
    got_o, got_b = [], []
    for i in range(n):
        got_o.append(_timed(lambda i=i: ours[i]))
        got_b.append(_timed(lambda i=i: base[i]))
    return statistics.median(got_o), statistics.median(got_b)


def _rays_per_second(loader: Iterable[dict]) -> tuple[float, int]:
    t = time.perf_counter()
    rays = 0
    for batch in loader:
        rays += int(batch["origins"].shape[0])
    return rays / max(time.perf_counter() - t, 1e-9), rays


def _row(name: str, ours: float, base: float, unit: str, higher_is_better: bool) -> None:
    ratio = ours / base if higher_is_better else base / ours
    print(f"{name:34s} {ours:12,.2f} {base:12,.2f} {unit:9s} {ratio:7.2f}x")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    dd, rd = resolve_data_dirs(args.dataset_dir, args.ray_dataset_dir, args.demo_dir)
    kw = {"dataset_dir": dd, "ray_dataset_dir": rd, "split": args.split}
    print(f"data: {dd.parent}  split: {args.split}  (ratio > 1: gpuloader is faster)\n")
    print(f"{'':34s} {'gpuloader':>12s} {'upstream':>12s} {'':9s} {'ratio':>8s}")

    t_ours, t_base = _paired(
        lambda: _timed(lambda: HierarchicalVoxelRayDataset(**kw)),
        lambda: _timed(lambda: up.UpstreamDataset(**kw)),
        REPEATS,
    )
    _row("dataset init, repeated", t_ours * 1e3, t_base * 1e3, "ms", False)
    if args.fresh_runs > 0:
        f_ours, f_base = _paired(
            lambda: _first_construction("gpuloader", kw),
            lambda: _first_construction("upstream", kw),
            args.fresh_runs,
        )
        _row("dataset init, first in a process", f_ours * 1e3, f_base * 1e3, "ms", False)

    ours = HierarchicalVoxelRayDataset(**kw, samples_per_subvolume=RAYS_PER_SAMPLE)
    base = up.UpstreamDataset(**kw, samples_per_subvolume=RAYS_PER_SAMPLE)
    n = min(args.samples, len(ours))
    cold_o, cold_b = _alternating(ours, base, n)  # each sample's first read, side by side
    _row(f"single sample, cold ({RAYS_PER_SAMPLE} rays)", cold_o * 1e3, cold_b * 1e3, "ms", False)
    warm_o, warm_b = _alternating(ours, base, n)
    _row("single sample, voxels cached", warm_o * 1e3, warm_b * 1e3, "ms", False)
    info = ours.cache_info()
    print(
        f"{'  cache hit rate (2 passes)':34s} {info['hit_rate']:12.0%} "
        f"{base.cache_hits / max(1, base.cache_hits + base.cache_misses):12.0%}"
    )

    workers = {"num_workers": args.num_workers}
    # the same batches for both: one level each (the baseline's collate cannot pad grids)
    bs_o = up.UpstreamRayBatchSampler(
        ours, subvolumes_per_batch=args.batch_size, group_by_level=True
    )
    plain_o = DataLoader(ours, batch_sampler=bs_o, collate_fn=collate_ray_batch, **workers)
    bs = up.UpstreamRayBatchSampler(base, subvolumes_per_batch=args.batch_size, group_by_level=True)
    plain_b = DataLoader(base, batch_sampler=bs, collate_fn=up.upstream_collate, **workers)
    o, b = _paired(
        lambda: _rays_per_second(plain_o)[0], lambda: _rays_per_second(plain_b)[0], EPOCHS
    )
    _row("DataLoader", o, b, "rays/s", True)

    rays_per_batch = args.batch_size * RAYS_PER_SAMPLE
    sampler = RayBatchSampler(
        ours, rays_per_batch=rays_per_batch, subvolumes_per_batch=args.batch_size
    )
    batched = DataLoader(ours, batch_sampler=sampler, collate_fn=collate_ray_batch, **workers)
    o, b = _paired(
        lambda: _rays_per_second(batched)[0], lambda: _rays_per_second(plain_b)[0], EPOCHS
    )
    _row("RayBatchSampler", o, b, "rays/s", True)

    aug_o = HierarchicalVoxelRayDataset(
        **kw,
        transform=transforms.Compose(
            [
                transforms.RandomRotation90(p=0.5),
                transforms.RandomFlip(p=0.5),
                transforms.RandomRaySubsample(num_rays=RAYS_PER_SAMPLE),
            ]
        ),
    )
    aug_b = up.UpstreamDataset(
        **kw,
        transform=up.UpstreamCompose(
            [
                up.UpstreamRotation90(p=0.5),
                up.UpstreamFlip(p=0.5),
                up.UpstreamRaySubsample(num_rays=RAYS_PER_SAMPLE),
            ]
        ),
    )
    ta = statistics.median(_timed(lambda i=i: aug_o[i]) for i in range(n))
    tb = statistics.median(_timed(lambda i=i: aug_b[i]) for i in range(n))
    _row("sample + rot/flip/subsample", ta * 1e3, tb * 1e3, "ms", False)
    print(
        f"{'  transform overhead':34s} {(ta - warm_o) * 1e3:12,.2f} {(tb - warm_b) * 1e3:12,.2f} ms"
    )
    if args.loader == "gpu":
        _fast_path(args, kw, aug_b)
    return 0


def _fast_path(args: argparse.Namespace, kw: dict, aug_b: up.UpstreamDataset) -> None:
    """Augmented batches: GPURayLoader (2nd epoch) against the upstream DataLoader."""
    from gpuloader import GPURayLoader

    rays_per_batch = args.batch_size * RAYS_PER_SAMPLE
    bs = up.UpstreamRayBatchSampler(aug_b, rays_per_batch, args.batch_size, group_by_level=True)
    b, _ = _rays_per_second(
        DataLoader(
            aug_b, batch_sampler=bs, collate_fn=up.upstream_collate, num_workers=args.num_workers
        )  # fmt: skip
    )
    augment = transforms.Compose(
        [
            transforms.RandomRotation90(p=0.5),
            transforms.RandomFlip(p=0.5),
            transforms.RandomRaySubsample(num_rays=RAYS_PER_SAMPLE),
        ]
    )
    t = time.perf_counter()
    with GPURayLoader(
        HierarchicalVoxelRayDataset(**kw),
        rays_per_batch=rays_per_batch,
        subvolumes_per_batch=args.batch_size,
        transform=augment,
        num_workers=max(1, args.num_workers),
        device=args.device,
        store=args.store,
    ) as loader:
        setup = time.perf_counter() - t
        _rays_per_second(loader)  # warm-up epoch
        o, _ = _rays_per_second(loader)
        what = f"GPURayLoader {loader.store}, {loader.device}"
    print(f"{'  loader setup (store fill)':34s} {setup * 1e3:12,.2f} {'':12s} ms")
    _row(what[:34], o, b, "rays/s", True)


if __name__ == "__main__":
    sys.exit(main())
