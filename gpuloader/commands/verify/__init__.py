"""Check a dataset's layout and re-trace a sample of its rays.

Reads both roots of the on-disk format (dataset/ and ray_dataset_hierarchical/) and reports
every problem it finds, each naming its file: missing or unreadable files, and folders that
cannot be listed (a symlink loop); files and folders that a symlink leads outside their root
(reported, not read) and object IDs of splits.json that are paths; wrong keys, shapes,
dtypes or values in voxel and ray files; sub-volume hashes that do not match their contents;
ray files without a voxel file and non-empty sub-volumes without a ray file; splits.json
bookkeeping that disagrees with the subdivision maps; JSON files (metadata, splits, registry,
processing summary, object metadata) that lack keys upstream's generator writes; and stored
ray distances that the exact tracer does not reproduce, on a random fraction of the rays of
every ray file. It never stops at the first bad file. Exit status: 0 when clean, 1 when any
problem was found.
"""

from gpuloader.commands.verify.check import verify_dataset
from gpuloader.commands.verify.command import add_arguments, run
from gpuloader.commands.verify.files import UNIT_TOL
from gpuloader.commands.verify.objects import MAP_KEYS
from gpuloader.commands.verify.report import (
    FORMAT,
    HASH,
    INTERNAL,
    KINDS,
    MAP,
    MISPLACED,
    MISSING,
    OUTSIDE,
    PAIRING,
    SPLITS,
    TRACE,
    UNREADABLE,
    VALUES,
    Problem,
    VerifyReport,
)
from gpuloader.commands.verify.retrace import ABS_TOL, REL_TOL
from gpuloader.commands.verify.tree import SPLIT_NAMES

# The package's modules, one job each: report (problem kinds, Problem, VerifyReport and its
# printed form), tree (top-level JSON files, upstream keys, splits.json), objects (object
# folders and subdivision maps), files (voxel and ray files, per sample), retrace (the exact
# tracer against stored distances), units (running checks in a pool), check (verify_dataset),
# command (arguments and run).

__all__ = [
    "Problem",
    "VerifyReport",
    "verify_dataset",
    "add_arguments",
    "run",
    "KINDS",
    "MISSING",
    "UNREADABLE",
    "OUTSIDE",
    "MISPLACED",
    "FORMAT",
    "VALUES",
    "HASH",
    "PAIRING",
    "MAP",
    "SPLITS",
    "TRACE",
    "INTERNAL",
    "ABS_TOL",
    "REL_TOL",
    "UNIT_TOL",
    "MAP_KEYS",
    "SPLIT_NAMES",
]
