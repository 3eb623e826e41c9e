"""Pack a ray dataset once into uncompressed, memory-mapped arrays for fast reading.

Reads RAY_DIR (level_<L>/<hh>/<hash>_rays.npz) and writes OUT: per level, contiguous .npy
arrays, an offsets index and a manifest that detects when the ray files change. Use it with
``HierarchicalVoxelRayDataset(..., ray_store=PackedRayStore(OUT))``. Re-running on an
up-to-date OUT does nothing; a stale or interrupted OUT needs --force.

Bad ray files: with --on-error raise (default) the first bad file stops the run (exit code
2, the error names the file) and no pack is written. With --on-error skip every bad file is
left out of the pack and recorded in its manifest, a warning names each, the summary ends
with "N bad files left out: ..." and the exit code stays 0; reading such a sample from the
pack raises the recorded error, which a dataset with on_error='skip' replaces. A later
--on-error raise run refuses a pack that left files out (exit code 2, naming the first).

--layout striped writes the striped pack (gpuloader.stores.pack.striped): each file's rays
permuted once (--seed), cut into stripes of --stripe-rays W rows (default 512), stored
stripe-major with the voxel grids (from --dataset-dir, default the dataset the rays were
made from) and the views, so that an epoch reads one stripe per level sequentially. The
summary adds each level's stripe count and record size.

OUT may be an object-storage URL (``s3://bucket/prefix``, any fsspec URL; the ``s3`` extra):
the striped pack (the default layout there) is built in a local staging folder (--staging,
default the temporary folder; it must hold the whole pack), then uploaded, the manifest last
(gpuloader.stores.pack.publish). Credentials and the endpoint come from fsspec's usual
configuration (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ~/.aws) or
--storage-options JSON; nothing of them is written into the pack.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from gpuloader.stores.pack import pack_rays
from gpuloader.stores.pack.publish import pack_to_url
from gpuloader.stores.remote.urls import is_url

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gpuloader pack``."""
    parser.add_argument("ray_dir", metavar="RAY_DIR", help="ray side (ray_dataset_hierarchical/)")
    parser.add_argument(
        "out", metavar="OUT", help="pack folder to write, or a URL (s3://bucket/prefix)"
    )
    parser.add_argument(
        "--levels", type=int, nargs="+", metavar="L", help="pack only these levels (all)"
    )
    parser.add_argument("--workers", type=int, help="processes inflating files (all cores)")
    parser.add_argument(
        "--force", action="store_true", help="replace a stale or interrupted pack in OUT"
    )
    parser.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="a bad ray file: stop (raise, default) or leave it out and record it (skip)",
    )
    parser.add_argument(
        "--layout",
        choices=("rows", "striped"),
        default=None,
        help="rows (default for a folder: row arrays) or striped (stripes of W permuted rows "
        "per sample; the default, and the only layout, for a URL)",
    )
    parser.add_argument(
        "--stripe-rays",
        type=int,
        default=512,
        metavar="W",
        help="rows per stripe of a striped pack (512)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of a striped pack's permutations (0)"
    )
    parser.add_argument(
        "--dataset-dir",
        metavar="DIR",
        help="a striped pack's voxel side (default: the dataset the rays were made from)",
    )
    parser.add_argument(
        "--staging",
        metavar="DIR",
        help="for a URL: the local folder the pack is built in before the upload (temp)",
    )
    parser.add_argument(
        "--storage-options",
        metavar="JSON",
        help='for a URL: fsspec options, e.g. \'{"client_kwargs": {"endpoint_url": "..."}}\'',
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run ``gpuloader pack``; 0 on success (also when --on-error skip left files out)."""
    remote = is_url(args.out)
    try:
        options = _storage_options(args.storage_options)
        if not remote and (args.staging is not None or options is not None):
            raise ValueError(
                "--staging and --storage-options are for a URL OUT (s3://...); "
                f"{args.out} is a folder"
            )
    except ValueError as exc:
        print(f"gpuloader pack: error: {exc}", file=sys.stderr)
        return 2
    if args.layout is None:
        args.layout = "striped" if remote else "rows"
    common = {
        "levels": args.levels,
        "progress": not args.quiet,
        "workers": args.workers,
        "force": args.force,
        "on_error": args.on_error,
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if remote:
            s = pack_to_url(
                args.ray_dir,
                args.out,
                storage_options=options,
                staging=args.staging,
                **common,
                **(_layout_options(args) or {"layout": args.layout}),
            )
        else:
            s = pack_rays(args.ray_dir, args.out, **common, **_layout_options(args))
    for w in caught:
        text = str(w.message).removeprefix("gpuloader pack: ")
        print(f"gpuloader pack: warning: {text}", file=sys.stderr)
    striped = s.get("layout") == "striped"
    if s["up_to_date"]:
        print(f"{s['out_dir']}: up to date ({s['files']} files, {s['rays']:,} rays); nothing done")
    else:
        for level, info in s["levels"].items():
            line = (
                f"  level {level}: {info['files']:6d} files {info['rays']:12,d} rays "
                f"{info['views']:8,d} views"
            )
            if striped:
                line += f" {info['stripes']:6d} stripes of {s['stripe_rays']} rays"
                line += f", {info['record_bytes']} bytes per ray"
            print(line)
        layout = f" as stripes of {s['stripe_rays']} rays (seed {s['seed']})" if striped else ""
        print(
            f"packed {s['files']} files, {s['rays']:,} rays ({s['bytes'] / 2**20:,.1f} MiB) "
            f"into {s['out_dir']}{layout} in {s['seconds']:.1f} s"
        )
    if s["bad"]:
        print(f"{len(s['bad'])} bad files left out: " + ", ".join(b["file"] for b in s["bad"]))
        for b in s["bad"]:
            print(f"  {b['error']}: {b['message'].removeprefix(b['file'] + ': ')}")
    return 0


def _storage_options(text: str | None) -> dict | None:
    """``--storage-options`` parsed: a JSON object, or None."""
    if text is None:
        return None
    try:
        got = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--storage-options is not JSON ({exc}): {text!r}") from exc
    if not isinstance(got, dict):
        raise ValueError(f"--storage-options must be a JSON object; got {text!r}")
    return got


def _layout_options(args: argparse.Namespace) -> dict:
    """pack_rays' layout arguments from the command line (none for the rows layout)."""
    if getattr(args, "layout", "rows") == "rows":
        return {}
    return {
        "layout": args.layout,
        "stripe_rays": args.stripe_rays,
        "seed": args.seed,
        "dataset_dir": args.dataset_dir,
    }
