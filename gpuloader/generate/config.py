"""What to generate: :class:`GeneratorConfig` (shapes or meshes, resolution, octree depth, rays
per view, splits, seed, workers) and the named :data:`PRESETS` (``demo``, ``bench``)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuloader.errors import GenerationError
from gpuloader.generate.octree import is_power_of_two
from gpuloader.generate.shapes import SHAPES

__all__ = ["GeneratorConfig", "PRESETS"]


@dataclass
class GeneratorConfig:
    """What to generate.

    ``shapes`` are cycled to make ``num_objects`` objects (default: one per shape); the first
    use of a shape is its canonical form, repeats are jittered variants drawn from ``seed``.
    Each of ``meshes`` (STL/OBJ/PLY paths) adds one object after them. ``adaptive`` halves the
    samples per view at each level, down to ``min_samples_per_view`` (upstream's
    ``--min-samples``, default 100). ``workers`` (default ``os.cpu_count()``) and
    ``overwrite`` do not change the output.
    """

    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    meshes: list[str] = field(default_factory=list)
    resolution: int = 64
    min_resolution: int = 4
    divisions: int = 4
    samples_per_view: int = 3000
    adaptive: bool = False
    min_samples_per_view: int = 100
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    num_objects: int | None = None
    workers: int | None = None
    overwrite: bool = False

    def validate(self) -> None:
        """Raise GenerationError naming the first bad field and how to fix it."""
        if not is_power_of_two(self.resolution) or self.resolution < 2:
            raise GenerationError(
                f"--resolution must be a power of two >= 2 (e.g. 32, 64, 128); "
                f"got {self.resolution}"
            )
        if not is_power_of_two(self.min_resolution):
            raise GenerationError(
                f"--min-resolution must be a power of two (e.g. 4); got {self.min_resolution}"
            )
        if self.min_resolution > self.resolution:
            raise GenerationError(
                f"--min-resolution {self.min_resolution} is larger than --resolution "
                f"{self.resolution}; it must be <= the resolution"
            )
        if self.divisions < 1:
            raise GenerationError(f"--divisions must be >= 1; got {self.divisions}")
        if self.samples_per_view < 3:
            raise GenerationError(
                f"--samples-per-view must be >= 3 (split over the faces); "
                f"got {self.samples_per_view}"
            )
        if self.min_samples_per_view < 3:
            raise GenerationError(
                f"--min-samples-per-view must be >= 3 (split over the faces); "
                f"got {self.min_samples_per_view}"
            )
        ratios = tuple(float(r) for r in self.split)
        if len(ratios) != 3 or any(r < 0 or not math.isfinite(r) for r in ratios):
            raise GenerationError(
                f"--split needs three ratios >= 0 (train val test); got {list(self.split)}"
            )
        if abs(sum(ratios) - 1.0) > 1e-6:
            raise GenerationError(
                f"--split ratios must sum to 1; got {list(ratios)} (sum {sum(ratios):g})"
            )
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise GenerationError(f"unknown shape(s) {unknown}; choose from: {', '.join(SHAPES)}")
        for m in self.meshes:
            if not Path(m).is_file():
                raise GenerationError(
                    f"mesh file {m} does not exist; check the path given to --mesh"
                )
        if self.num_objects is not None and self.num_objects < 1 and self.shapes:
            raise GenerationError(
                f"--num-objects must be >= 1 (the number of objects made from --shapes); "
                f"got {self.num_objects}"
            )
        if self.num_objects is not None and self.num_objects < 0:
            raise GenerationError(f"--num-objects must be >= 0; got {self.num_objects}")
        if self.num_objects and not self.shapes:
            raise GenerationError("--num-objects needs at least one shape (--shapes ...)")
        if self.num_shape_objects() + len(self.meshes) == 0:
            raise GenerationError("nothing to generate: give --shapes, --mesh or --preset")
        if self.seed < 0:
            raise GenerationError(f"--seed must be >= 0; got {self.seed}")
        if self.workers is not None and self.workers < 1:
            raise GenerationError(f"--workers must be >= 1; got {self.workers}")

    def num_shape_objects(self) -> int:
        return len(self.shapes) if self.num_objects is None else self.num_objects

    def identity(self) -> dict[str, Any]:
        """The fields that decide the output (for resume checks), JSON-ready.

        The ``created_at`` time stamp is not part of it (a resumed run keeps the first one).
        """
        out = dataclasses.asdict(self)
        for key in ("workers", "overwrite", "meshes"):
            out.pop(key)
        if not self.adaptive:  # unused without adaptive sampling: older manifests still match
            out.pop("min_samples_per_view")
        out["split"] = [float(r) for r in self.split]
        out["num_objects"] = self.num_shape_objects()
        out["meshes"] = [
            {"path": str(Path(m).resolve()), "sha256": _file_sha256(m)} for m in self.meshes
        ]
        return out

    def resolved_workers(self) -> int:
        return int(self.workers or os.cpu_count() or 1)


def _file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#: Named configurations. ``demo``: seconds; ``bench``: the throughput-benchmark dataset.
PRESETS: dict[str, GeneratorConfig] = {
    # 6 objects of 32^3, levels 0-2. torus/torus_rod and box/box_minus_sphere share
    # non-trivial octants (dedup); asym has no symmetry of the cube (rotation tests).
    "demo": GeneratorConfig(
        shapes=["asym", "torus", "torus_rod", "box", "box_minus_sphere", "blobs"],
        resolution=32,
        min_resolution=8,
        divisions=4,
        samples_per_view=300,
    ),
    # 12 objects of 64^3, levels 0-4, 16 views x 3000 samples per view.
    "bench": GeneratorConfig(
        shapes=list(SHAPES),
        num_objects=12,
        resolution=64,
        min_resolution=4,
        divisions=4,
        samples_per_view=3000,
    ),
}
