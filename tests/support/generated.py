"""A small generated dataset (levels 0-2) for the command tests."""

from __future__ import annotations

from pathlib import Path

from support.tiny_dataset import write_tiny_dataset

#: ``gpuloader generate`` options of a tiny dataset (3 objects at 8^3, levels 0-1; ~1 s)
TINY_GENERATE = ["--shapes", "asym", "torus", "box", "--resolution", "8", "--min-resolution", "4"]
TINY_GENERATE += ["--divisions", "2", "--samples-per-view", "6", "--workers", "1", "--quiet"]


def generate_small(out: Path) -> tuple[Path, Path]:
    """A small dataset from the generator (levels 0-2), or the hand-made one without it."""
    try:
        from gpuloader.generate import GeneratorConfig, generate_dataset
    except ImportError:  # pragma: no cover - generator not installed
        return write_tiny_dataset(out, max_level=2)
    config = GeneratorConfig(
        shapes=["asym", "torus", "box", "box_minus_sphere"],
        resolution=16,
        min_resolution=4,
        divisions=2,
        samples_per_view=60,
        workers=1,
    )
    summary = generate_dataset(out, config, progress=False)
    return Path(summary["dataset_dir"]), Path(summary["ray_dir"])
