"""Throughput suite: upstream baseline vs gpuloader's CPU API vs GPURayLoader, same data.

Seven loaders read the train split of one dataset with the same batch shape
(``--subvolumes-per-batch`` sub-volumes of ``--rays-per-batch / subvolumes`` rays each):

* ``upstream``   benchmarks/upstream_baseline.py (the upstream loader's behaviour), with a
  torch DataLoader;
* ``cpu_api``    HierarchicalVoxelRayDataset + RayBatchSampler + collate_ray_batch in a torch
  DataLoader (the seed's API);
* ``gpu_loader`` GPURayLoader, ``store="stream"`` on the npz files: the per-sample reader
  (DALI pipeline, on the CPU when there is no GPU);
* ``cpu_packed`` the CPU API with ``ray_store=PackedRayStore`` (the one-time packed cache of
  gpuloader.stores.pack.store, built before timing, its build timed on its own);
* ``gpu_packed`` GPURayLoader, ``store="stream"`` on the pack: whole batches gathered from the
  pack by the workers, then the fused pass;
* ``resident_host``, ``resident_gpu``: GPURayLoader with the split resident in RAM or in GPU
  memory (filled once, the fill timed on its own), one fused pass per batch.

Each runs for every ``--workers`` count, in two scenarios: ``plain`` (no transform) and
``augment`` (rotation + flip + ray subsample). After one warm-up epoch (worker start-up,
pipeline build) ``--epochs`` epochs are timed. Every figure is also given as a ratio against
the baseline measured in this run with the same workers and scenario. Writes
``benchmarks/results/<timestamp>.json`` and a PNG bar plot beside it.

    python benchmarks/run_benchmarks.py --quick          # demo data, < 1 minute
    python benchmarks/run_benchmarks.py                  # demo data, more workers/epochs
    python benchmarks/run_benchmarks.py --data bench_data  # the bench preset (made if missing)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import upstream_baseline as up  # noqa: E402  (baseline only, not part of gpuloader)

from gpuloader import transforms  # noqa: E402
from gpuloader.commands.demo import DEFAULT_OUT, ensure_data  # noqa: E402
from gpuloader.dataset.collate import collate_ray_batch  # noqa: E402
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset  # noqa: E402
from gpuloader.errors import GPULoaderError  # noqa: E402
from gpuloader.plan.sampler import RayBatchSampler  # noqa: E402
from gpuloader.stores.pack import PackedRayStore, PackError, pack_rays  # noqa: E402

LOADERS = (
    "upstream",
    "cpu_api",
    "gpu_loader",
    "cpu_packed",
    "gpu_packed",
    "resident_host",
    "resident_gpu",
)
#: the batch shapes of ``--sweep`` (rays per batch x sub-volumes per batch)
SWEEP_SHAPES = ((4096, 8), (16384, 32), (65536, 128), (262144, 512))
SCENARIOS = ("plain", "augment")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        type=Path,
        help="folder of the bench preset (generated if missing); "
        f"default: the demo preset in {DEFAULT_OUT}",
    )
    p.add_argument("--preset", choices=["demo", "bench"], help="preset in --data (bench)")
    p.add_argument("--quick", action="store_true", help="demo-sized run in under a minute")
    p.add_argument("--workers", type=int, nargs="+", help="num_workers values (0 1 2 4)")
    p.add_argument("--epochs", type=int, help="timed epochs after the warm-up (2; quick 3)")
    p.add_argument(
        "--max-batches",
        type=int,
        help="batches per epoch (all); a cut epoch costs "
        "GPURayLoader a pipeline restart, so leave it off when timing it",
    )
    p.add_argument("--rays-per-batch", type=int, default=4096, help="rays per batch (4096)")
    p.add_argument("--subvolumes-per-batch", type=int, default=8, help="sub-volumes (8)")
    p.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS))
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--device", default="auto", help="GPURayLoader device (auto)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    p.add_argument("--torch-threads", type=int, default=1, help="main-process torch threads (1)")
    p.add_argument(
        "--pack-dir", type=Path, help="ray pack of the packed loaders (DATA/ray_pack; made once)"
    )
    p.add_argument("--repack", action="store_true", help="rebuild the pack (and time it)")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="also time the resident store (GPU on CUDA, else host) at batch shapes "
        + ", ".join(f"{r}x{s}" for r, s in SWEEP_SHAPES),
    )
    p.add_argument(
        "--fill",
        action="store_true",
        help="time the resident store's fill against inflating every file of the split on "
        "all cores (a process pool doing np.load of every array)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.workers = args.workers or [0, 2]
        args.epochs = args.epochs or 3
    args.workers = args.workers or [0, 1, 2, 4]
    args.epochs = args.epochs or 2
    return args


def _time_epochs(
    loader: Iterable[dict],
    epochs: int,
    max_batches: int | None,
    set_epoch: Callable[[int], None] | None,
) -> dict[str, float]:
    """Warm-up epoch, then ``epochs`` timed ones: totals of rays, samples, batches, seconds."""
    out = {"rays": 0, "samples": 0, "batches": 0, "seconds": 0.0}
    for e in range(epochs + 1):
        if set_epoch is not None:
            set_epoch(e)
        tick = time.perf_counter()
        n = rays = samples = 0
        for batch in loader:
            rays += int(batch["origins"].shape[0])
            samples += int(batch["voxels"].shape[0])
            n += 1
            if max_batches is not None and n >= max_batches:
                break
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        secs = time.perf_counter() - tick
        if e > 0:
            out["rays"] += rays
            out["samples"] += samples
            out["batches"] += n
            out["seconds"] += secs
    s = max(out["seconds"], 1e-9)
    return out | {"rays_per_s": out["rays"] / s, "samples_per_s": out["samples"] / s}


class Runner:
    """Builds each loader on the same data and settings."""

    def __init__(
        self,
        args: argparse.Namespace,
        dataset_dir: Path,
        ray_dir: Path,
        pack_dir: Path | None = None,
    ) -> None:
        self.args = args
        self.pack_dir = pack_dir
        self.kw = {"dataset_dir": dataset_dir, "ray_dataset_dir": ray_dir, "split": "train"}
        self.spb = args.subvolumes_per_batch
        self.per_sample = max(1, args.rays_per_batch // self.spb)
        self.rays_per_batch = args.rays_per_batch
        self.resident: dict[str, Any] = {}  # location -> ResidentStore, filled once
        self.fill: dict[str, float] = {}

    def _ours_transform(self, scenario: str) -> Any:
        if scenario == "plain":
            return None
        return transforms.Compose(
            [
                transforms.RandomRotation90(p=0.5),
                transforms.RandomFlip(p=0.5),
                transforms.RandomRaySubsample(self.per_sample),
            ]
        )

    def upstream(self, scenario: str, workers: int) -> tuple[Any, Any, dict]:
        tf = (
            None
            if scenario == "plain"
            else up.UpstreamCompose(
                [
                    up.UpstreamRotation90(p=0.5),
                    up.UpstreamFlip(p=0.5),
                    up.UpstreamRaySubsample(self.per_sample),
                ]
            )
        )
        ds = up.UpstreamDataset(**self.kw, samples_per_subvolume=self.per_sample, transform=tf)
        sampler = up.UpstreamRayBatchSampler(
            ds, self.args.rays_per_batch, self.spb, group_by_level=True
        )
        dl = DataLoader(
            ds,
            batch_sampler=sampler,
            collate_fn=up.upstream_collate,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
        return dl, None, {"backend": "torch DataLoader", "device": "cpu"}

    def _store(self, packed: bool) -> PackedRayStore | None:
        if not packed:
            return None
        if self.pack_dir is None:
            raise RuntimeError("no ray pack (the pack step failed or was skipped)")
        return PackedRayStore(self.pack_dir, check="fast")

    def cpu_api(self, scenario: str, workers: int, packed: bool = False) -> tuple[Any, Any, dict]:
        ds = HierarchicalVoxelRayDataset(
            **self.kw, transform=self._ours_transform(scenario), ray_store=self._store(packed)
        )
        sampler = RayBatchSampler(ds, self.args.rays_per_batch, self.spb)
        dl = DataLoader(
            ds,
            batch_sampler=sampler,
            collate_fn=collate_ray_batch,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
        return dl, sampler.set_epoch, {"backend": "torch DataLoader", "device": "cpu"}

    def gpu_loader(
        self, scenario: str, workers: int, packed: bool = False
    ) -> tuple[Any, Any, dict]:
        from gpuloader.loading.loader import GPURayLoader

        ds = HierarchicalVoxelRayDataset(**self.kw, ray_store=self._store(packed))
        loader = GPURayLoader(
            ds,
            rays_per_batch=self.args.rays_per_batch,
            subvolumes_per_batch=self.spb,
            transform=self._ours_transform(scenario),
            shuffle=True,
            drop_last=False,
            seed=0,
            num_workers=workers,
            prefetch=2,
            device=self.args.device,
            backend="auto",
            store="stream",  # npz: the per-sample reader; a pack: whole batches from it
        )
        info = {
            "backend": str(getattr(loader, "backend", "?")),
            "device": str(getattr(loader, "device", "?")),
        }
        return loader, getattr(loader, "set_epoch", None), info

    def _resident(self, location: str, workers: int) -> Any:
        from gpuloader.reading.fill import fill_store

        if location not in self.resident:
            ds = HierarchicalVoxelRayDataset(**self.kw)
            device = torch.device("cuda") if location == "gpu" else None
            store = fill_store(ds, location, device=device, num_workers=max(workers, 2))
            self.resident[location] = store
            self.fill[location] = store.fill_seconds
            print(f"  filled {store} in {store.fill_seconds:.1f} s")
        return self.resident[location]

    def _resident_loader(self, location: str, scenario: str, workers: int) -> tuple:
        from gpuloader.loading.loader import GPURayLoader

        if location == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        store = self._resident(location, workers)
        ds = HierarchicalVoxelRayDataset(**self.kw)
        device = "cuda" if location == "gpu" else self.args.device
        loader = GPURayLoader(
            ds,
            rays_per_batch=self.rays_per_batch,
            subvolumes_per_batch=self.spb,
            transform=self._ours_transform(scenario),
            seed=0,
            num_workers=workers,
            device="cpu" if device == "auto" and location == "host" else device,
            store=store,
            threads=1,
        )
        tick = time.perf_counter()
        loader.source.plan(0)
        info = {
            "backend": f"{location} store",
            "device": str(loader.device),
            "fill_seconds": round(self.fill[location], 3),
            "epoch_plan_seconds": round(time.perf_counter() - tick, 5),
        }
        return loader, loader.set_epoch, info

    def resident_host(self, scenario: str, workers: int) -> tuple[Any, Any, dict]:
        return self._resident_loader("host", scenario, workers)

    def resident_gpu(self, scenario: str, workers: int) -> tuple[Any, Any, dict]:
        return self._resident_loader("gpu", scenario, workers)

    def sweep(self, workers: int) -> list[dict[str, Any]]:
        """The resident store (GPU on CUDA, else host) at every shape of SWEEP_SHAPES."""
        location = "gpu" if torch.cuda.is_available() else "host"
        rows = []
        for rays, spb in SWEEP_SHAPES:
            self.rays_per_batch, self.spb = rays, spb
            self.per_sample = max(1, rays // spb)
            row: dict[str, Any] = {"shape": f"{rays}x{spb}", "location": location}
            try:
                loader, set_epoch, info = self._resident_loader(location, "augment", workers)
                row |= info | _time_epochs(loader, self.args.epochs, None, set_epoch)
            except Exception as exc:  # noqa: BLE001 - a shape that fails must not lose the rest
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            print(
                f"  sweep {row['shape']:>12s} [{location}]: "
                + (row["error"] if "error" in row else f"{row['rays_per_s']:14,.0f} rays/s")
            )
        self.rays_per_batch, self.spb = self.args.rays_per_batch, self.args.subvolumes_per_batch
        self.per_sample = max(1, self.rays_per_batch // self.spb)
        return rows

    def cpu_packed(self, scenario: str, workers: int) -> tuple[Any, Any, dict]:
        return self.cpu_api(scenario, workers, packed=True)

    def gpu_packed(self, scenario: str, workers: int) -> tuple[Any, Any, dict]:
        return self.gpu_loader(scenario, workers, packed=True)


def _inflate(paths: tuple[str, str]) -> int:
    """Read every array of one sample's ray and voxel files (the work a fill must do)."""
    import numpy as np

    total = 0
    for path in paths:
        with np.load(path, allow_pickle=False) as npz:
            total += sum(int(npz[k].nbytes) for k in npz.files)
    return total


def fill_benchmark(dataset_dir: Path, ray_dir: Path, repeats: int = 3) -> dict[str, Any]:
    """Median seconds of (a) inflating every file of the train split on all cores, (b) the
    host store's fill with as many reader workers; ratio = (a) / (b) (>= 0.8 is the goal)."""
    import multiprocessing as mp
    import statistics

    from gpuloader.reading.fill import fill_store

    ds = HierarchicalVoxelRayDataset(dataset_dir, ray_dir, split="train")
    paths = [(str(s["ray_path"]), str(s["voxel_path"])) for s in ds.samples]
    cores = os.cpu_count() or 1
    inflate, fill = [], []
    for _ in range(repeats):
        tick = time.perf_counter()
        with mp.get_context("spawn").Pool(cores) as pool:
            nbytes = sum(pool.imap_unordered(_inflate, paths, chunksize=8))
        inflate.append(time.perf_counter() - tick)
        tick = time.perf_counter()
        store = fill_store(ds, "host", num_workers=cores, progress=False)
        fill.append(time.perf_counter() - tick)
        del store
    out = {
        "cores": cores,
        "files": 2 * len(paths),
        "inflated_bytes": nbytes,
        "inflate_seconds": inflate,
        "fill_seconds": fill,
        "inflate_median": statistics.median(inflate),
        "fill_median": statistics.median(fill),
    }
    out["ratio"] = out["inflate_median"] / out["fill_median"]
    print(
        f"  fill: {out['fill_median']:.2f} s (runs {', '.join(f'{x:.2f}' for x in fill)}); "
        f"inflating every file on {cores} cores: {out['inflate_median']:.2f} s; "
        f"fill speed {out['ratio']:.2f}x of that"
    )
    return out


def build_pack(ray_dir: Path, pack_dir: Path, repack: bool) -> dict[str, Any]:
    """Pack ``ray_dir`` into ``pack_dir`` unless an up-to-date pack is there (not timed with
    the loaders); returns pack_rays' summary (``seconds``: this step, ``up_to_date``: kept)."""
    try:
        return pack_rays(ray_dir, pack_dir, progress=True, force=repack)
    except PackError as exc:  # stale or interrupted: rebuild it
        print(f"rebuilding the ray pack: {exc}")
        return pack_rays(ray_dir, pack_dir, progress=True, force=True)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import nvidia.dali as dali

        info["dali"] = dali.__version__
    except ImportError:
        info["dali"] = None
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Ratio of each figure to the baseline's with the same scenario and workers."""
    base = {
        (r["scenario"], r["num_workers"]): r
        for r in results
        if r["loader"] == "upstream" and "error" not in r
    }
    best = {}
    for (scen, _), r in base.items():
        best[scen] = max(best.get(scen, 0.0), r["rays_per_s"])
    for r in results:
        b = base.get((r["scenario"], r["num_workers"]))
        if "error" in r or b is None:
            continue
        r["ratio_rays_per_s"] = r["rays_per_s"] / b["rays_per_s"]
        r["ratio_samples_per_s"] = r["samples_per_s"] / b["samples_per_s"]
        r["ratio_vs_best_baseline"] = r["rays_per_s"] / best[r["scenario"]]


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Best rays/s of each loader per scenario, and its ratio to the best baseline."""
    out: dict[str, Any] = {}
    for scen in {r["scenario"] for r in results}:
        rows = [r for r in results if r["scenario"] == scen and "error" not in r]
        best: dict[str, Any] = {}
        for r in rows:
            if r["loader"] not in best or r["rays_per_s"] > best[r["loader"]]["rays_per_s"]:
                best[r["loader"]] = r
        base = best.get("upstream")
        out[scen] = {
            name: {
                "rays_per_s": r["rays_per_s"],
                "samples_per_s": r["samples_per_s"],
                "num_workers": r["num_workers"],
                "ratio_vs_best_baseline": r["rays_per_s"] / base["rays_per_s"] if base else None,
            }
            for name, r in best.items()
        }
    return out


def plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    results = [r for r in report["results"] if "error" not in r]
    if not results:
        return
    scenarios = [s for s in SCENARIOS if any(r["scenario"] == s for r in results)]
    workers = sorted({r["num_workers"] for r in results})
    loaders = [lo for lo in LOADERS if any(r["loader"] == lo for r in results)]
    fig, axes = plt.subplots(
        1,
        len(scenarios),
        figsize=(6.5 * len(scenarios), 5.2),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    width = 0.8 / max(1, len(loaders))
    lowest = min(r["rays_per_s"] for r in results)
    highest = max(r["rays_per_s"] for r in results)
    colors = {
        "upstream": "tab:gray",
        "cpu_api": "tab:blue",
        "gpu_loader": "tab:green",
        "cpu_packed": "tab:cyan",
        "gpu_packed": "tab:olive",
        "resident_host": "tab:orange",
        "resident_gpu": "tab:red",
    }
    for ax, scen in zip(axes[0], scenarios, strict=True):
        for j, lo in enumerate(loaders):
            xs, ys, labels = [], [], []
            for i, w in enumerate(workers):
                r = next(
                    (
                        r
                        for r in results
                        if r["scenario"] == scen and r["loader"] == lo and r["num_workers"] == w
                    ),
                    None,
                )
                if r is None:
                    continue
                xs.append(i + (j - (len(loaders) - 1) / 2) * width)
                ys.append(r["rays_per_s"])
                ratio = r.get("ratio_rays_per_s")
                label = "" if lo == "upstream" or ratio is None else f"{ratio:.2f}x"
                if lo in ("gpu_loader", "gpu_packed", "resident_host", "resident_gpu"):
                    label += f"\n{r['backend']}, {r['device']}"
                labels.append(label)
            bars = ax.bar(xs, ys, width, color=colors[lo], label=lo.replace("_", " "))
            ax.bar_label(bars, labels, fontsize=8, padding=2)
        ax.set_xticks(range(len(workers)), [f"{w} workers" for w in workers])
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(EngFormatter())
        ax.yaxis.set_minor_formatter(EngFormatter())
        ax.set_ylim(bottom=lowest / 3, top=highest * 2)
        missing = sorted(
            {r["loader"] for r in report["results"] if "error" in r and r["scenario"] == scen}
        )
        if missing:
            ax.text(
                0.99,
                0.98,
                "unavailable: " + ", ".join(missing),
                transform=ax.transAxes,
                ha="right",
                va="top",
                fontsize=8,
                color="tab:red",
            )
        ax.set_title(f"{scen}: rays/s (label: ratio to upstream, same workers)")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("rays per second (log)")
    # one legend for all panels, below them: inside an axes it covered bars
    handles, names = axes[0][0].get_legend_handles_labels()
    ncol = min(len(names), 3 * len(scenarios))
    fig.legend(handles, names, loc="outside lower center", ncol=ncol, frameon=False)
    d = report["data"]
    fig.suptitle(
        f"{d['preset']} data, {report['settings']['rays_per_batch']} rays x "
        f"{report['settings']['subvolumes_per_batch']} sub-volumes per batch, "
        f"{report['machine']['cpu_count']} CPUs"
        + (f", {report['machine']['gpu']}" if report["machine"]["gpu"] else ", no GPU")
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(path: Path, report: dict[str, Any]) -> None:
    """Rays/s of the resident store against the batch shape (``--sweep``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    rows = [r for r in report.get("sweep") or [] if "error" not in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
    xs = range(len(rows))
    ax.plot(xs, [r["rays_per_s"] for r in rows], marker="o")
    for x, r in zip(xs, rows, strict=True):
        ax.annotate(f"{r['rays_per_s'] / 1e6:,.1f} M", (x, r["rays_per_s"]), xytext=(0, 6),
                    textcoords="offset points", ha="center", fontsize=8)  # fmt: skip
    ax.set_xticks(list(xs), [r["shape"] for r in rows])
    ax.set_xlabel("rays per batch x sub-volumes per batch")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(EngFormatter())
    ax.set_ylabel("rays per second (log)")
    where = rows[0]["location"]
    ax.set_title(f"resident {where} store, augmented batches ({report['machine']['gpu'] or 'CPU'})")
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    if args.data is not None:
        preset, folder = args.preset or "bench", args.data
    else:
        preset, folder = args.preset or "demo", DEFAULT_OUT
    try:
        dataset_dir, ray_dir = ensure_data(folder, preset)
    except GPULoaderError as exc:  # another preset's data, a bad folder: one line, no traceback
        hint = " (or pass --preset with the one it was made with)" if args.data else ""
        print(f"run_benchmarks.py: {exc}{hint}", file=sys.stderr)
        return 2
    pack: dict[str, Any] | None = None
    pack_dir = None
    if any(name.endswith("_packed") for name in args.loaders):
        pack_dir = args.pack_dir or folder / "ray_pack"
        try:
            pack = build_pack(ray_dir, pack_dir, args.repack)
            print(
                f"ray pack: {pack_dir} ({pack['rays']:,} rays, {pack['bytes'] / 2**20:,.1f} MiB)"
                + (
                    f", up to date (checked in {pack['seconds']:.2f} s)"
                    if pack["up_to_date"]
                    else f", built in {pack['seconds']:.1f} s"
                )
            )
        except Exception as exc:  # the packed loaders report it; the others still run
            pack = {"error": f"{type(exc).__name__}: {exc}"}
            pack_dir = None
            print(f"ray pack: unavailable ({pack['error']})")
    runner = Runner(args, dataset_dir, ray_dir, pack_dir)
    n_train = len(HierarchicalVoxelRayDataset(dataset_dir, ray_dir, split="train"))
    print(
        f"data: {folder} ({preset} preset, {n_train} train samples); "
        f"workers {args.workers}; {args.epochs} timed epoch(s)"
        + (f" of at most {args.max_batches} batches" if args.max_batches else "")
    )
    results: list[dict[str, Any]] = []
    for scen in args.scenarios:
        for w in args.workers:
            for name in args.loaders:
                row: dict[str, Any] = {"loader": name, "scenario": scen, "num_workers": w}
                try:
                    loader, set_epoch, info = getattr(runner, name)(scen, w)
                    row |= info
                    row |= _time_epochs(loader, args.epochs, args.max_batches, set_epoch)
                    del loader
                except Exception as exc:  # a missing back end must not lose the others
                    row["error"] = f"{type(exc).__name__}: {exc}"
                results.append(row)
                if "error" in row:
                    print(f"  {scen:8s} {name:11s} w={w}: unavailable ({row['error']})")
                else:
                    print(
                        f"  {scen:8s} {name:11s} w={w}: {row['rays_per_s']:12,.0f} rays/s "
                        f"{row['samples_per_s']:9,.0f} samples/s  [{row['backend']}, "
                        f"{row['device']}]"
                    )
    sweep = runner.sweep(max(args.workers)) if args.sweep else None
    fill = fill_benchmark(dataset_dir, ray_dir) if args.fill else None
    add_ratios(results)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    report = {
        "timestamp": stamp,
        "machine": machine_info(),
        "data": {"dir": str(folder), "preset": preset, "train_samples": n_train},
        "pack": pack,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "summary": summarize(results),
        "sweep": sweep,
        "fill": fill,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{stamp}.json"
    json_path.write_text(json.dumps(report, indent=1))
    png_path = json_path.with_suffix(".png")
    plot(png_path, report)
    if sweep:
        plot_sweep(json_path.with_name(f"{stamp}-sweep.png"), report)
    print("\nratio to the upstream baseline (same workers, same scenario; > 1 is faster):")
    for r in results:
        if "ratio_rays_per_s" in r and r["loader"] != "upstream":
            print(
                f"  {r['scenario']:8s} {r['loader']:11s} w={r['num_workers']}: "
                f"{r['ratio_rays_per_s']:6.2f}x rays/s, {r['ratio_samples_per_s']:6.2f}x "
                f"samples/s"
            )
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
