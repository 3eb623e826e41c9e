"""Write the small example mesh the README's ``--mesh`` command uses (``vase.stl``).

The mesh is generated, not scanned: a closed surface of revolution (a vase with a neck,
a lip and a foot) bent off its axis, so its voxel grid has no rotational symmetry and the
rotation augmentations change it. Run ``python examples/meshes/make_meshes.py`` to write it
again (2,080 triangles, 104 KB binary STL).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh

HERE = Path(__file__).resolve().parent


def vase() -> trimesh.Trimesh:
    """A closed, watertight vase: a revolved (radius, height) profile, its top bent sideways."""
    t = np.linspace(0.0, 1.0, 26)
    height = 2.0 * t
    radius = (
        0.55 + 0.35 * np.sin(np.pi * 1.6 * t + 0.3) + 0.12 * np.exp(-(((t - 0.97) / 0.03) ** 2))
    )
    profile = np.column_stack([radius, height])
    profile = np.vstack([[0.0, 0.0], profile, [0.0, height[-1]]])  # closed at both ends
    mesh = trimesh.creation.revolve(profile, sections=40)
    # bend: shift each vertex in x by a quadratic of its height (breaks the axial symmetry)
    v = mesh.vertices.copy()
    v[:, 0] += 0.35 * (v[:, 2] / 2.0) ** 2
    mesh.vertices = v
    return mesh


def main() -> None:
    mesh = vase()
    assert mesh.is_watertight, "the vase must be closed to voxelize as a solid"
    out = HERE / "vase.stl"
    mesh.export(out)
    print(f"wrote {out} ({len(mesh.faces)} triangles, {out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
