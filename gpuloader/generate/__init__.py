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

from pathlib import Path
from typing import Any

from gpuloader.generate.config import PRESETS, GeneratorConfig
from gpuloader.generate.shapes import SHAPES

__all__ = ["GeneratorConfig", "PRESETS", "generate_dataset", "SHAPES"]


def generate_dataset(
    out_dir: str | Path, config: GeneratorConfig | None = None, progress: bool = True
) -> dict[str, Any]:
    """Write a dataset for ``config`` into ``out_dir`` (resuming a same-config run there).

    Returns a summary dict: out_dir, dataset_dir, ray_dir, num_objects, unique sub-volumes
    and ray files per level, total_rays, total_hits, resumed (files found done), seconds.
    Raises GenerationError for a bad config, mesh or output folder.
    """
    from gpuloader.generate.writer import write_dataset

    config = config or GeneratorConfig()
    config.validate()
    return write_dataset(Path(out_dir), config, progress=progress)
