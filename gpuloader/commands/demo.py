"""Generate the demo data, run the GPU loader over it with augmentations, and check the result.

Generates the ``demo`` preset into ``--out`` when it is not there yet (a same-config folder is
resumed, so an interrupted run picks up where it stopped), builds the train split and a
:class:`~gpuloader.loading.loader.GPURayLoader` with random rotations, flips and ray subsampling,
iterates ``--epochs`` epochs, re-traces the rays of a few batches through their augmented
grids (the labels must still match), and prints the back end, the device and the
throughput (measured over ``--time-seconds`` of further, unchecked epochs: the median of
several spans, as one short epoch is too short to time). ``--plot`` saves a figure of one
augmented grid with a few of its rays and the histogram of ray distances.
"""

from __future__ import annotations

import argparse
import os
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
    "set_torch_threads",
    "usable_cores",
]

#: Where the demo (and every example) keeps its data by default.
DEFAULT_OUT = Path("demo_data")
#: Largest allowed |trace(augmented grid, augmented rays) - distance|, in voxels.
TOLERANCE = 1e-3


def data_dirs(out: Path | str) -> tuple[Path, Path]:
    """(voxel dataset root, ray dataset root) of a generated folder."""
    out = Path(out)
    return out / "dataset", out / "ray_dataset_hierarchical"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. ``taskset``), shared among the
    processes ``torchrun`` starts on this node (``LOCAL_WORLD_SIZE``); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_ranks = 1
    return max(1, cores // local_ranks)


def set_torch_threads(workers: int = 0, cores: int | None = None) -> int:
    """Give torch's intra-op pool the cores the loader's reader workers leave free.

    torch starts one intra-op thread per core; the loader's worker processes (and its one
    batch-building thread) want cores too, and on a small machine the two fight (the
    neural-rendering example ran 5x slower on 2 cores). Sets
    ``torch.set_num_threads(max(1, cores - workers))``, so 1 when the workers take every
    core, unless the user chose a count with ``OMP_NUM_THREADS`` (then nothing changes).

    Args:
        workers: reader worker processes of the loader(s) this process drives.
        cores: cores to share (default :func:`usable_cores`).

    Returns:
        torch's intra-op thread count afterwards.
    """
    import torch

    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return int(torch.get_num_threads())
    free = max(1, (usable_cores() if cores is None else int(cores)) - max(0, int(workers)))
    torch.set_num_threads(free)
    return int(torch.get_num_threads())


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
    one, zero = _int_at_least(1), _int_at_least(0)
    options: list[tuple[str, Any, Any, str]] = [  # flag, type, default, help
        ("--out", Path, DEFAULT_OUT, f"data folder ({DEFAULT_OUT})"),
        ("--epochs", one, 1, "checked epochs to iterate, >= 1 (1)"),
        ("--device", _device, "auto", "auto (CUDA when usable, else CPU), cpu, cuda, cuda:N"),
        ("--rays-per-batch", one, 4096, "rays per batch, >= 1 (4096)"),
        ("--subvolumes-per-batch", one, 8, "sub-volumes per batch, >= 1 (8)"),
        ("--num-workers", zero, 2, "reader workers, >= 0 (2)"),
        ("--check-batches", zero, 3, "batches re-traced per epoch, >= 0 (3)"),
        ("--time-seconds", float, 1.0, "seconds of further, unchecked epochs that time the "
         "throughput (1; 0: only a rough figure from the checked epochs)"),
        ("--seed", int, 0, "seed of order and augmentation (0)"),
    ]  # fmt: skip
    for flag, kind, default, text in options:
        parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="save a figure here")
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


def _time_epochs(loader: Any, first: int, seconds: float, spans: int = 5) -> np.ndarray:
    """Whole epochs back to back from epoch ``first``, in ``spans`` spans of at least
    ``seconds / spans`` each: (spans, 3) float64 of (rays/s, samples/s, seconds) per span."""
    import torch

    out, epoch = np.zeros((spans, 3)), first
    cuda = str(getattr(loader, "device", "cpu")).startswith("cuda")
    for k in range(spans):
        rays = samples = 0
        tick, took = time.perf_counter(), 0.0
        while took < seconds / spans:
            loader.set_epoch(epoch)
            epoch += 1
            for batch in loader:
                rays, samples = rays + len(batch["origins"]), samples + len(batch["voxels"])
            if cuda:
                torch.cuda.synchronize()
            took = time.perf_counter() - tick
            if rays == 0:
                break
        out[k] = rays / max(took, 1e-9), samples / max(took, 1e-9), took
    return out


def run(args: argparse.Namespace) -> int:
    """Generate (if needed), load, check, time, report; 0 when every re-traced label matches."""
    from gpuloader.augment import transforms as T
    from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset

    threads = set_torch_threads(args.num_workers)
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
    backend, device = (str(getattr(loader, k, None) or "?") for k in ("backend", "device"))

    batches = rays = subvolumes = checked = 0
    worst = 0.0
    kept: dict[str, Any] | None = None
    all_distances: list[np.ndarray] = []
    tick = time.perf_counter()
    for epoch in range(args.epochs):  # the checked epochs: re-traced, kept for the figure
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for i, batch in enumerate(loader):
            batches += 1
            rays += int(batch["origins"].shape[0])
            subvolumes += int(batch["voxels"].shape[0])
            if i < args.check_batches:
                err, n = retrace_error(batch)
                worst, checked = max(worst, err), checked + n
            if kept is None or int(_shapes(batch)[0, 0]) > int(_shapes(kept)[0, 0]):
                kept = batch  # the largest grid seen, for the figure
            if args.plot is not None:
                all_distances.append(batch["distances"].detach().cpu().numpy())
    loop_seconds = time.perf_counter() - tick

    ok = worst <= TOLERANCE
    print(
        f"data       {dataset_dir.parent} ({len(dataset)} train samples, "
        f"levels {dataset.get_level_distribution()}; ready in {t_gen:.1f} s)"
    )
    store = getattr(loader, "store", None)
    where = f"store {store} ({loader.store_reason}), " if store else ""
    print(
        f"loader     {where}back end {backend}, device {device}, workers {args.num_workers}, "
        f"torch threads {threads}"
    )
    print(
        f"epochs     {args.epochs}: {batches} batches, {subvolumes} sub-volumes, {rays:,} rays "
        f"in {loop_seconds:.2f} s (start-up and re-tracing included)"
    )
    if batches and args.time_seconds > 0:
        spans = _time_epochs(loader, args.epochs, args.time_seconds)
        rays_s, samples_s = np.median(spans[:, :2], axis=0)
        print(
            f"throughput {rays_s:,.0f} rays/s, {samples_s:,.0f} samples/s: median of "
            f"{len(spans)} spans of back-to-back epochs ({spans[:, 2].sum():.1f} s in all; "
            f"spans {spans[:, 0].min():,.0f}-{spans[:, 0].max():,.0f} rays/s)"
        )
    elif batches:
        print(
            f"throughput {rays / max(loop_seconds, 1e-9):,.0f} rays/s over {loop_seconds:.2f} s "
            "with start-up and checks (rough; --time-seconds > 0 measures it)"
        )
    print(
        f"check      {checked:,} rays re-traced through their augmented grids: max error "
        f"{worst:.2e} voxels ({'OK' if ok else 'FAIL'}, tolerance {TOLERANCE:g})"
    )
    if args.plot is not None and kept is not None:
        plot_batch(args.plot, kept, np.concatenate(all_distances) if all_distances else None)
        print(f"plot       {args.plot}")
    if batches == 0:
        print("error: the loader yielded no batch")
        return 1
    return 0 if ok else 1


def box_span(origin: np.ndarray, direction: np.ndarray, half: np.ndarray) -> tuple[float, float]:
    """(enter, leave) ray parameters, t >= 0, of the box ``[-half, half]``; enter > leave
    when the ray misses it. ``origin``, ``direction``, ``half``: (3,) float."""
    inside = np.abs(origin) <= half
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (-half - origin) / direction, (half - origin) / direction
    moving = direction != 0
    lo = np.where(moving, np.minimum(t1, t2), np.where(inside, -np.inf, np.inf))
    hi = np.where(moving, np.maximum(t1, t2), np.where(inside, np.inf, -np.inf))
    return float(max(0.0, lo.max())), float(hi.min())


def pick_rays(dist: np.ndarray, misses_box: np.ndarray, hits: int = 6) -> dict[str, np.ndarray]:
    """Rows to draw: up to ``hits`` hit rays, two rays through the box hitting nothing, one
    missing the box. ``dist``: (R,) float; ``misses_box``: (R,) bool."""
    empty = dist == 0
    return {
        "hit": np.flatnonzero(~empty)[:hits],
        "through": np.flatnonzero(empty & ~misses_box)[:2],
        "outside": np.flatnonzero(empty & misses_box)[:1],
    }


#: how each kind of drawn ray looks: (colours, one per ray, line style, label)
RAY_STYLES = {
    "hit": ([f"C{j}" for j in (0, 1, 2, 4, 5, 6)], "-", "hit: d={d:.1f} (re-trace {r:.1f})"),
    "through": (["black", "0.55"], "--", "crosses the box ({s:.0f} voxels), hits nothing: d=0 "
                "(re-trace {r:.1f})"),
    "outside": (["tab:red"], ":", "misses the grid's box: d=0 (re-trace {r:.1f})"),
}  # fmt: skip


def plot_batch(path: Path, batch: dict[str, Any], distances: np.ndarray | None) -> None:
    """Save a figure: the batch's first augmented grid (projected along z) with a few of its
    rays, each kind of ray drawn its own way, and the histogram of ``distances`` ((N,))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from gpuloader.tracer import trace

    d, h, w = _shapes(batch)[0]
    grid = batch["voxels"][0, 0, :d, :h, :w].detach().cpu().numpy() != 0
    rows = np.flatnonzero(batch["ray_to_voxel"].cpu().numpy() == 0)
    o = batch["origins"].detach().cpu().numpy()[rows].astype(np.float64)
    dirs = batch["directions"].detach().cpu().numpy()[rows].astype(np.float64)
    dist = batch["distances"].detach().cpu().numpy()[rows]
    half = np.array([w, h, d], dtype=np.float64) / 2.0
    spans = [box_span(o[r], dirs[r], half) for r in range(len(rows))]
    picked = pick_rays(dist, np.array([a > b for a, b in spans], dtype=bool))

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 6.2))
    depth = grid.sum(axis=0)  # voxels along z per (y, x) column
    im = ax0.imshow(depth, origin="lower", extent=(-w / 2, w / 2, -h / 2, h / 2), cmap="Greys",
                    vmin=0, vmax=max(1, int(depth.max())))  # fmt: skip
    fig.colorbar(im, ax=ax0, fraction=0.046, pad=0.04, label="occupied voxels along z")
    ax0.plot(half[0] * np.array([-1, 1, 1, -1, -1]), half[1] * np.array([-1, -1, 1, 1, -1]),
             color="0.4", lw=0.8)  # fmt: skip
    handles: list[Any] = []
    for kind, chosen in picked.items():
        colours, style, label = RAY_STYLES[kind]
        for j, r in enumerate(chosen):
            enter, leave = spans[r]
            far = leave if enter <= leave else 0.5 * float(max(d, h, w))  # to exit, or a stub
            p0, p1 = o[r], o[r] + far * dirs[r]
            c = colours[j % len(colours)]
            again = float(trace(grid, o[r : r + 1], dirs[r : r + 1])[0])
            text = label.format(d=float(dist[r]), r=again, s=max(0.0, leave - enter))
            (line,) = ax0.plot([p0[0], p1[0]], [p0[1], p1[1]], color=c, ls=style, lw=1.4,
                               label=text)  # fmt: skip
            ax0.plot(p0[0], p0[1], "o", color=c, ms=4)
            handles.append(line)
    handles.append(Line2D([], [], ls="", marker="o", color="0.3", ms=4, label="ray origin"))
    lim = 0.6 * max(d, h, w)
    ax0.set_xlim(-lim, lim)
    ax0.set_ylim(-lim, lim)
    ax0.set_xlabel("world x (voxels, grid centred on 0)")
    ax0.set_ylabel("world y (voxels)")
    level = int(batch["levels"][0])
    ax0.set_title(
        f"augmented level-{level} grid ({w}x{h}x{d}) seen along z\nwith rays to their exit"
    )
    # below the axes, so it covers no ray or origin
    ax0.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13),
               ncol=2, frameon=False)  # fmt: skip

    if distances is not None and distances.size:
        hits = distances[distances > 0]
        ax1.hist(hits, bins=50, color="tab:blue", alpha=0.85)
        ax1.set_title(
            f"path length through occupied voxels\n{hits.size:,} hit rays "
            f"({hits.size / distances.size:.0%} of {distances.size:,} loaded)"
        )
        ax1.set_xlabel("distance through occupied voxels (voxels)")
        ax1.set_ylabel("rays per bin (count)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": the legend below the axes
    plt.close(fig)
