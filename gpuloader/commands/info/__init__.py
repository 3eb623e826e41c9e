"""Summarize a dataset per split and per level, and optionally plot it.

Prints objects per split; unique sub-volumes, ray files, rays, occupancy and hit rate per
level; and cross-split leakage (non-trivial sub-volume hashes used by objects of two splits),
recounted from splits.json's hash_object_usage and trivial_hashes and compared with what its
statistics claim. Ray counts come from the .npy header of each ray file's 'origins' member
(nothing decompressed beyond the header); hit rates read only the 'hits' member.
"""

from gpuloader.commands.info.command import add_arguments, run
from gpuloader.commands.info.plot import plot_info
from gpuloader.commands.info.splits import SPLIT_ORDER
from gpuloader.commands.info.stats import dataset_info, npy_member_shape
from gpuloader.commands.info.text import format_info

# The package's modules, one job each: stats (dataset_info: one pass over the files), splits
# (per-split rows and leakage), text (format_info), plot (plot_info), command (arguments and
# run).

__all__ = [
    "dataset_info",
    "format_info",
    "plot_info",
    "npy_member_shape",
    "add_arguments",
    "run",
    "SPLIT_ORDER",
]
