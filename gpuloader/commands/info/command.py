"""The command line of ``gpuloader info``: its arguments and its run.

Prints the text report; ``--json`` also writes the numbers, ``--plot`` the PNG.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpuloader.commands.info.folders import check_roots, default_ray_dir
from gpuloader.commands.info.plot import plot_info
from gpuloader.commands.info.stats import dataset_info
from gpuloader.commands.info.text import format_info
from gpuloader.format import layout

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gpuloader info``."""
    parser.add_argument("dataset_dir", metavar="DATASET_DIR", help="voxel side (dataset/)")
    parser.add_argument(
        "ray_dir",
        metavar="RAY_DIR",
        nargs="?",
        help="ray side (default: ray_dataset_hierarchical/ beside DATASET_DIR)",
    )
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the summary as a PNG")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``gpuloader info``; 0 on success.

    Raises:
        DatasetLayoutError: the folders are the wrong way round, one level too high, empty
            or missing (:func:`~gpuloader.commands.info.folders.check_roots`).
    """
    ray_dir = args.ray_dir if args.ray_dir is not None else default_ray_dir(args.dataset_dir)
    check_roots(args.dataset_dir, ray_dir, "info")
    info = dataset_info(args.dataset_dir, ray_dir, progress=args.progress)
    print(format_info(info))
    if args.json:
        out = Path(args.json)
        layout.atomic_write_json(out, info)
        print(f"wrote {out}")
    if args.plot:
        print(f"wrote {plot_info(info, args.plot)}")
    return 0
