"""The dataset generator: procedural shapes or meshes -> the upstream on-disk format.

``generate_dataset(out_dir, config)`` writes ``out_dir/dataset`` (voxel side: objects,
deduplicated sub-volumes, splits.json) and ``out_dir/ray_dataset_hierarchical`` (one ray file
per object and per non-empty unique sub-volume), as described in shared/format.md.
The output is a pure function of the config except for one time stamp, ``created_at`` in
``dataset/metadata.json`` (upstream writes it; it is kept across resumed runs and fixed by the
``SOURCE_DATE_EPOCH`` environment variable), and a run into a folder that holds a run of the
same config resumes it. The JSON files carry upstream's keys (see
:mod:`gpuloader.generate.metadata`).
"""

from __future__ import annotations

import errno as errno_codes
import shutil
from pathlib import Path
from typing import Any

from gpuloader.errors import GenerationSpaceError
from gpuloader.generate.config import PRESETS, GeneratorConfig
from gpuloader.generate.shapes import SHAPES

__all__ = ["GeneratorConfig", "PRESETS", "generate_dataset", "SHAPES"]


def generate_dataset(
    out_dir: str | Path, config: GeneratorConfig | None = None, progress: bool = True
) -> dict[str, Any]:
    """Write a dataset for ``config`` into ``out_dir`` (resuming a same-config run there).

    Returns a summary dict: out_dir, dataset_dir, ray_dir, num_objects, unique sub-volumes
    and ray files per level, total_rays, total_hits, resumed (files found done), seconds.
    Raises GenerationError for a bad config, mesh or output folder, and
    GenerationSpaceError when a write fails for want of space (every file is written
    through a temporary one and a rename, so what is there is whole; the same call resumes).
    """
    from gpuloader.generate.writer import write_dataset

    config = config or GeneratorConfig()
    config.validate()
    out = Path(out_dir)
    try:
        return write_dataset(out, config, progress=progress)
    except OSError as exc:
        if exc.errno not in SPACE_ERRNOS or isinstance(exc, GenerationSpaceError):
            raise
        raise _space_error(out, exc) from exc


#: the errors of a write that ran out of room: no space, over quota, file too large
SPACE_ERRNOS = (errno_codes.ENOSPC, errno_codes.EDQUOT, errno_codes.EFBIG)


def _space_error(out: Path, exc: OSError) -> GenerationSpaceError:
    """One line for a failed write: the folder, the errno, the free space, the fix."""
    free = None
    try:
        free = shutil.disk_usage(out if out.exists() else out.parent).free
    except OSError:
        pass
    room = f" ({free:,} bytes free there)" if free is not None else ""
    return GenerationSpaceError(
        f"{out}: cannot write the dataset: [Errno {exc.errno}] {exc.strerror}{room}; the "
        "files written so far are whole. Free space (or raise the quota or file size "
        "limit) and run the same command again: it resumes where it stopped",
        errno=exc.errno,
        free=free,
    )
