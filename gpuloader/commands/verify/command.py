"""The command line of ``gpuloader verify``: its arguments and its run.

Exit status: 0 when clean, 1 when any problem was found; a root that is missing or not a
folder is an argument error (DatasetLayoutError, exit 2 through ``gpuloader``'s main).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpuloader.commands.verify.check import verify_dataset
from gpuloader.errors import DatasetLayoutError

__all__ = ["add_arguments", "run"]


def _fraction(text: str) -> float:
    """argparse type of ``--fraction``: a float in [0, 1]."""
    value = float(text)
    if not (0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be in [0, 1]; got {text}")
    return value


def _positive_int(text: str) -> int:
    """argparse type of ``--workers``: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gpuloader verify``."""
    parser.add_argument("dataset_dir", metavar="DATASET_DIR", help="voxel side (dataset/)")
    parser.add_argument("ray_dir", metavar="RAY_DIR", help="ray side (ray_dataset_hierarchical/)")
    parser.add_argument(
        "--fraction",
        type=_fraction,
        default=0.01,
        help="fraction of each ray file's rays to re-trace (at least 1 per file; default 0.01)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the ray sample (default 0)")
    parser.add_argument(
        "--workers", type=_positive_int, default=1, help="processes checking files (default 1)"
    )
    parser.add_argument(
        "--max-per-kind",
        type=int,
        default=20,
        help="problems listed per kind (0 = all; default 20)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar and no counts; problems only"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``gpuloader verify``; 0 when clean, 1 on any problem, 2 when a root is no folder."""
    for root, arg in ((Path(args.dataset_dir), "DATASET_DIR"), (Path(args.ray_dir), "RAY_DIR")):
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "does not exist"
            raise DatasetLayoutError(f"{root} {what}; check the {arg} argument")
    report = verify_dataset(
        args.dataset_dir,
        args.ray_dir,
        fraction=args.fraction,
        seed=args.seed,
        progress=not args.quiet,
        workers=args.workers,
    )
    print(report.format(max_per_kind=args.max_per_kind, summary=not args.quiet))
    return 0 if report.ok else 1
