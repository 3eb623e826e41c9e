"""Write a dataset in the upstream format from procedural shapes and/or mesh files.

Writes OUT/dataset and OUT/ray_dataset_hierarchical. Say what to generate with --preset,
--shapes or --mesh (one of them is required); a preset gives defaults, explicit options
override them. Re-running with the same config into the same OUT resumes it: files already
there are kept when they pass their check and rewritten when not (one "rewrote FILE: why"
line each), so the same command repairs a damaged file. OUT is the folder that will hold
both roots, not a dataset root; a folder holding another config's dataset is refused unless
--overwrite.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings

from gpuloader.errors import GenerationError
from gpuloader.generate import PRESETS, SHAPES, GeneratorConfig, generate_dataset
from gpuloader.generate.writer import EmptySplitWarning


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``gpuloader generate``; unset options keep the preset's (or default) value."""
    parser.add_argument("out", metavar="OUT", help="output folder (holds dataset/ and rays)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="demo: seconds; bench: minutes")
    parser.add_argument(
        "--shapes", nargs="+", metavar="SHAPE", help=f"procedural shapes: {', '.join(SHAPES)}"
    )
    parser.add_argument("--mesh", nargs="+", metavar="FILE", help="STL/OBJ/PLY files (solid)")
    parser.add_argument("--resolution", type=int, help="level-0 side, power of two (64)")
    parser.add_argument("--min-resolution", type=int, help="smallest octant side (4)")
    parser.add_argument("--divisions", type=int, help="views = divisions^2 (4)")
    parser.add_argument("--samples-per-view", type=int, help="ray points per view (3000)")
    parser.add_argument(
        "--adaptive",
        action="store_true",
        default=None,
        help="halve samples per view at each level",
    )
    parser.add_argument(
        "--min-samples-per-view",
        type=int,
        help="fewest samples per view under --adaptive (100, as upstream)",
    )
    parser.add_argument(
        "--split",
        nargs=3,
        type=float,
        metavar=("TRAIN", "VAL", "TEST"),
        help="split ratios summing to 1 (0.7 0.15 0.15)",
    )
    parser.add_argument("--seed", type=int, help="random seed (0)")
    parser.add_argument("--num-objects", type=int, help="objects made from --shapes (cycled)")
    parser.add_argument("--workers", type=int, help="ray-tracing processes (all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> GeneratorConfig:
    """Preset (or defaults) updated with every option given on the command line.

    Raises GenerationError when none of --preset, --shapes, --mesh is given (the defaults
    alone would start a multi-gigabyte job).
    """
    if args.preset is None and not args.shapes and not args.mesh:
        raise GenerationError(
            "say what to generate: give --preset (demo: seconds, bench: about 2.8 GB), "
            "--shapes SHAPE ... or --mesh FILE ..."
        )
    if args.preset is not None:
        config = dataclasses.replace(PRESETS[args.preset])
    else:
        config = GeneratorConfig()
        if args.mesh and not args.shapes:
            config.shapes = []  # only the meshes
    updates = {
        "shapes": args.shapes,
        "meshes": args.mesh,
        "resolution": args.resolution,
        "min_resolution": args.min_resolution,
        "divisions": args.divisions,
        "samples_per_view": args.samples_per_view,
        "adaptive": args.adaptive,
        "min_samples_per_view": args.min_samples_per_view,
        "split": tuple(args.split) if args.split is not None else None,
        "seed": args.seed,
        "num_objects": args.num_objects,
        "workers": args.workers,
    }
    for key, value in updates.items():
        if value is not None:
            setattr(config, key, list(value) if key in ("shapes", "meshes") else value)
    if args.shapes and args.num_objects is None and args.preset is not None:
        config.num_objects = None  # one object per given shape
    config.overwrite = bool(args.overwrite)
    return config


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EmptySplitWarning)
        summary = generate_dataset(args.out, config, progress=not args.quiet)
    for w in caught:
        if issubclass(w.category, EmptySplitWarning):
            print(f"gpuloader generate: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    for item in summary.get("rewritten", []):
        print(f"rewrote {item['file']}: {item['reason']}")
    if summary["num_ray_files"] == 0:
        raise GenerationError(f"no ray files were written to {summary['ray_dir']}")
    state = "resumed" if summary["resumed"] else "generated"
    per_level = ", ".join(f"L{k}: {v}" for k, v in summary["ray_files_per_level"].items())
    print(
        f"{state} {summary['num_objects']} objects in {summary['seconds']:.1f} s: "
        f"{summary['num_ray_files']} ray files ({per_level}), {summary['total_rays']:,} rays, "
        f"{summary['leaked_hashes']} leaked hashes\n"
        f"  voxels: {summary['dataset_dir']}\n  rays:   {summary['ray_dir']}"
    )
    return 0
