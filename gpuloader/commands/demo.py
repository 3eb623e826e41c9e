"""Generate the demo data, run the GPU loader over it with augmentations, and check the result.

Generates the ``demo`` preset into ``--out`` when it is not there yet (a same-config folder is
resumed, so an interrupted run picks up where it stopped), builds the train split and a
:class:`~gpuloader.loading.loader.GPURayLoader` with random rotations, flips and ray subsampling,
iterates ``--epochs`` epochs, re-traces the rays of a few batches through their augmented
grids (the labels must still match), and prints the back end, the device and the
throughput. ``--plot`` saves a figure of one augmented grid with a few of its rays and the
histogram of ray distances.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_OUT",
    "add_arguments",
    "data_dirs",
    "ensure_data",
    "resolve_data_dirs",
    "retrace_error",
    "run",
]

#: Where the demo (and every example) keeps its data by default.
DEFAULT_OUT = Path("demo_data")
#: Largest allowed |trace(augmented grid, augmented rays) - distance|, in voxels.
TOLERANCE = 1e-3


def data_dirs(out: Path | str) -> tuple[Path, Path]:
    """(voxel dataset root, ray dataset root) of a generated folder."""
    out = Path(out)
    return out / "dataset", out / "ray_dataset_hierarchical"


def ensure_data(
    out: Path | str = DEFAULT_OUT, preset: str = "demo", progress: bool = True
) -> tuple[Path, Path]:
    """Generate ``preset`` into ``out`` unless it is already complete; return its two roots.

    Resume-safe: a folder holding a (possibly interrupted) run of the same preset is
    completed, not rewritten; a complete one costs a fraction of a second to check. A kept
    file that fails its check is rewritten, with one ``rewrote FILE: why`` line on stderr.

    Raises:
        GenerationError: ``out`` holds a dataset of another configuration (it is never
            replaced here), or is a dataset or ray root itself.
    """
    import dataclasses

    from gpuloader.errors import GenerationError
    from gpuloader.generate import PRESETS, generate_dataset
    from gpuloader.generate.writer import MANIFEST, manifest_matches

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    out = Path(out)
    config = dataclasses.replace(PRESETS[preset])
    if manifest_matches(out, config.identity()) is False:
        raise GenerationError(
            f"{out} holds a dataset generated with another configuration (see "
            f"{out / MANIFEST}), not the {preset!r} preset; give another folder (demo --out) "
            "or delete this one"
        )
    done_before = (out / "ray_dataset_hierarchical" / "processing_summary.json").is_file()
    summary = generate_dataset(out, config, progress=progress and not done_before)
    for item in summary.get("rewritten", []):
        print(f"rewrote {item['file']}: {item['reason']}", file=sys.stderr)
    return data_dirs(out)


def resolve_data_dirs(
    dataset_dir: Path | str | None,
    ray_dataset_dir: Path | str | None,
    demo_dir: Path | str = DEFAULT_OUT,
    progress: bool = True,
) -> tuple[Path, Path]:
    """The two roots the examples read: the ones given, else the demo data (made if missing).

    ``ray_dataset_dir`` defaults to ``ray_dataset_hierarchical`` beside ``dataset_dir``.
    """
    if dataset_dir is None and ray_dataset_dir is None:
        return ensure_data(demo_dir, "demo", progress=progress)
    if dataset_dir is None:
        raise ValueError("--ray-dataset-dir needs --dataset-dir too")
    dataset_dir = Path(dataset_dir)
    if ray_dataset_dir is None:
        ray_dataset_dir = dataset_dir.parent / "ray_dataset_hierarchical"
    return dataset_dir, Path(ray_dataset_dir)


def _shapes(batch: dict[str, Any]) -> np.ndarray:
    """(B, 3) own grid shape of each sample (``voxel_shapes``, else the stacked shape)."""
    if "voxel_shapes" in batch:
        return np.asarray(batch["voxel_shapes"].cpu().numpy()).reshape(-1, 3)
    b, *_, d, h, w = batch["voxels"].shape
    return np.tile(np.array([d, h, w]), (b, 1))


def retrace_error(batch: dict[str, Any]) -> tuple[float, int]:
    """Re-trace every ray of a collated batch through its own (augmented) grid.

    Returns:
        (largest |trace - distance| in world units, number of rays checked).
    """
    from gpuloader.tracer import trace

    voxels = batch["voxels"].detach().cpu().numpy()
    shapes = _shapes(batch)
    origins = batch["origins"].detach().cpu().numpy()
    directions = batch["directions"].detach().cpu().numpy()
    distances = batch["distances"].detach().cpu().numpy()
    owner = batch["ray_to_voxel"].cpu().numpy()
    worst = 0.0
    for b in range(voxels.shape[0]):
        rows = owner == b
        if not rows.any():
            continue
        d, h, w = shapes[b]
        grid = voxels[b, 0, :d, :h, :w] != 0
        err = np.abs(trace(grid, origins[rows], directions[rows]) - distances[rows])
        worst = max(worst, float(err.max()))
    return worst, int(owner.size)


def _int_at_least(low: int) -> Any:
    """argparse type: an integer >= ``low``; otherwise a one-line error naming the bound."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {low}; got {text!r}"
            ) from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}; got {value}")
        return value

    return parse


def _device(text: str) -> str:
    """argparse type of ``--device``: auto, cpu, cuda or cuda:N, and CUDA only when usable."""
    value = text.strip().lower()
    accepted = "auto, cpu, cuda or cuda:N"
    if value not in ("auto", "cpu", "cuda") and not (
        value.startswith("cuda:") and value[5:].isdigit()
    ):
        raise argparse.ArgumentTypeError(f"expected {accepted}; got {text!r}")
    if value.startswith("cuda"):
        from gpuloader.loading.setup import cuda_usable

        if not cuda_usable():
            raise argparse.ArgumentTypeError(
                f"{text!r}: no CUDA device usable here (torch sees no GPU, or CuPy is missing: "
                "install the cuda12 or cuda13 extra); use auto or cpu"
            )
        import torch

        if ":" in value and int(value[5:]) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``gpuloader demo``."""
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"data folder ({DEFAULT_OUT})"
    )
    parser.add_argument(
        "--epochs", type=_int_at_least(1), default=1, help="epochs to iterate, >= 1 (1)"
    )
    parser.add_argument(
        "--device",
        type=_device,
        default="auto",
        help="auto (CUDA when usable, else CPU), cpu, cuda or cuda:N (auto)",
    )
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="save a figure here")
    parser.add_argument(
        "--rays-per-batch", type=_int_at_least(1), default=4096, help="rays per batch, >= 1 (4096)"
    )
    parser.add_argument(
        "--subvolumes-per-batch",
        type=_int_at_least(1),
        default=8,
        help="sub-volumes per batch, >= 1 (8)",
    )
    parser.add_argument(
        "--num-workers", type=_int_at_least(0), default=2, help="reader workers, >= 0 (2)"
    )
    parser.add_argument(
        "--check-batches",
        type=_int_at_least(0),
        default=3,
        help="batches re-traced per epoch, >= 0 (3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of order and augmentation (0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar while generating")


def _make_loader(dataset: Any, args: argparse.Namespace, transform: Any) -> Any:
    from gpuloader.loading.loader import GPURayLoader

    return GPURayLoader(
        dataset,
        rays_per_batch=args.rays_per_batch,
        subvolumes_per_batch=args.subvolumes_per_batch,
        transform=transform,
        shuffle=True,
        drop_last=False,
        seed=args.seed,
        num_workers=args.num_workers,
        prefetch=2,
        device=args.device,
        backend="auto",
    )


def _describe(loader: Any) -> tuple[str, str]:
    backend = getattr(loader, "backend", None) or "?"
    device = getattr(loader, "device", None) or "?"
    return str(backend), str(device)


def run(args: argparse.Namespace) -> int:
    """Generate (if needed), load, check, report; 0 when every re-traced label matches."""
    from gpuloader.augment import transforms as T
    from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset

    t0 = time.perf_counter()
    dataset_dir, ray_dir = ensure_data(args.out, "demo", progress=not args.quiet)
    t_gen = time.perf_counter() - t0
    dataset = HierarchicalVoxelRayDataset(dataset_dir, ray_dir, split="train", seed=args.seed)
    transform = T.Compose(
        [
            T.RandomRotation90(p=0.75),
            T.RandomFlip(axes=[0, 1, 2], p=0.5),
            T.RandomRaySubsample(num_rays=1024),
        ]
    )
    loader = _make_loader(dataset, args, transform)
    backend, device = _describe(loader)

    batches = rays = subvolumes = checked = 0
    worst = 0.0
    loop_seconds = 0.0
    startup = 0.0  # time to each epoch's first batch (worker and pipeline start-up)
    steady_rays = steady_subvolumes = 0
    kept: dict[str, Any] | None = None
    all_distances: list[np.ndarray] = []
    for epoch in range(args.epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        tick = time.perf_counter()
        for i, batch in enumerate(loader):
            batches += 1
            rays += int(batch["origins"].shape[0])
            subvolumes += int(batch["voxels"].shape[0])
            if i == 0:
                startup += time.perf_counter() - tick
            else:
                steady_rays += int(batch["origins"].shape[0])
                steady_subvolumes += int(batch["voxels"].shape[0])
            if i < args.check_batches:
                # re-tracing is a check, not loading: keep it out of the throughput figure
                loop_seconds += time.perf_counter() - tick
                err, n = retrace_error(batch)
                worst, checked = max(worst, err), checked + n
                tick = time.perf_counter()
            if kept is None or int(_shapes(batch)[0, 0]) > int(_shapes(kept)[0, 0]):
                kept = batch  # the largest grid seen, for the figure
            if args.plot is not None:
                all_distances.append(batch["distances"].detach().cpu().numpy())
        loop_seconds += time.perf_counter() - tick

    ok = worst <= TOLERANCE
    steady = max(loop_seconds - startup, 1e-9)
    print(
        f"data       {dataset_dir.parent} ({len(dataset)} train samples, "
        f"levels {dataset.get_level_distribution()}; ready in {t_gen:.1f} s)"
    )
    store = getattr(loader, "store", None)
    where = f"store {store} ({loader.store_reason}), " if store else ""
    print(f"loader     {where}back end {backend}, device {device}, workers {args.num_workers}")
    print(
        f"epochs     {args.epochs}: {batches} batches, {subvolumes} sub-volumes, {rays:,} rays "
        f"in {loop_seconds:.2f} s"
    )
    print(
        f"throughput {steady_rays / steady:,.0f} rays/s, {steady_subvolumes / steady:,.0f} "
        f"samples/s after the first batch ({startup:.2f} s to it: start-up)"
    )
    print(
        f"check      {checked:,} rays re-traced through their augmented grids: max error "
        f"{worst:.2e} voxels ({'OK' if ok else 'FAIL'}, tolerance {TOLERANCE:g})"
    )
    if args.plot is not None and kept is not None:
        _plot(args.plot, kept, np.concatenate(all_distances) if all_distances else None)
        print(f"plot       {args.plot}")
    if batches == 0:
        print("error: the loader yielded no batch")
        return 1
    return 0 if ok else 1


def _box_exit(origin: np.ndarray, direction: np.ndarray, half: np.ndarray) -> float:
    """Ray parameter where ``origin + t * direction`` leaves the box ``[-half, half]``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(direction != 0, (np.sign(direction) * half - origin) / direction, np.inf)
    return float(max(0.0, t.min()))


def _plot(path: Path, batch: dict[str, Any], distances: np.ndarray | None) -> None:
    """One augmented grid (projected along z) with a few rays, and the distance histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gpuloader.tracer import trace

    d, h, w = _shapes(batch)[0]
    grid = batch["voxels"][0, 0, :d, :h, :w].detach().cpu().numpy() != 0
    owner = batch["ray_to_voxel"].cpu().numpy()
    rows = np.flatnonzero(owner == 0)
    o = batch["origins"].detach().cpu().numpy()[rows]
    dirs = batch["directions"].detach().cpu().numpy()[rows]
    dist = batch["distances"].detach().cpu().numpy()[rows]
    level = int(batch["levels"][0])

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.8))
    depth = grid.sum(axis=0)  # voxels along z per (y, x) column
    im = ax0.imshow(
        depth,
        origin="lower",
        extent=(-w / 2, w / 2, -h / 2, h / 2),
        cmap="Greys",
        vmin=0,
        vmax=max(1, int(depth.max())),
    )
    fig.colorbar(im, ax=ax0, fraction=0.046, pad=0.04, label="occupied voxels along z")
    hit_rows = np.flatnonzero(dist > 0)[:6]
    miss_rows = np.flatnonzero(dist == 0)[:2]
    half = np.array([w, h, d], dtype=np.float64) / 2.0
    ax0.plot(
        [-half[0], half[0], half[0], -half[0], -half[0]],
        [-half[1], -half[1], half[1], half[1], -half[1]],
        color="0.4",
        lw=0.8,
    )
    for j, r in enumerate(np.concatenate([hit_rows, miss_rows])):
        p0, p1 = o[r], o[r] + _box_exit(o[r], dirs[r], half) * dirs[r]
        hit = dist[r] > 0
        ax0.plot(
            [p0[0], p1[0]],
            [p0[1], p1[1]],
            color=f"C{j % 10}" if hit else "tab:red",
            ls="-" if hit else "--",
            lw=1.4,
            label=f"d={dist[r]:.1f} (re-trace {trace(grid, o[r : r + 1], dirs[r : r + 1])[0]:.1f})",
        )
        ax0.plot(p0[0], p0[1], "o", color=f"C{j % 10}" if hit else "tab:red", ms=4)
    lim = 0.6 * max(d, h, w)
    ax0.set_xlim(-lim, lim)
    ax0.set_ylim(-lim, lim)
    ax0.set_xlabel("world x")
    ax0.set_ylabel("world y")
    ax0.set_title(
        f"augmented level-{level} grid ({w}x{h}x{d}) seen along z\nwith rays to their exit"
    )
    ax0.legend(fontsize=7, loc="upper left", framealpha=0.8)

    if distances is not None and distances.size:
        hits = distances[distances > 0]
        ax1.hist(hits, bins=50, color="tab:blue", alpha=0.85)
        ax1.set_title(
            f"path length through occupied voxels\n{hits.size:,} hit rays "
            f"({hits.size / distances.size:.0%} of {distances.size:,} loaded)"
        )
        ax1.set_xlabel("distance (voxels)")
        ax1.set_ylabel("rays")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
