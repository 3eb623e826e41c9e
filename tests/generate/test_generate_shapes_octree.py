"""Procedural shapes, mesh voxelizing, octree cutting and split bookkeeping (no files)."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from gpuloader.errors import GenerationError
from gpuloader.format.layout import SUBDIVISION_RECORD_KEYS
from gpuloader.generate import octree, shapes, splits

RECORD_KEYS = set(SUBDIVISION_RECORD_KEYS)


def cube_symmetries(grid: np.ndarray):
    """The 48 images of ``grid`` under the symmetries of the cube (axis permutations x flips)."""
    for perm in itertools.permutations(range(3)):
        t = grid.transpose(perm)
        for flips in itertools.product((False, True), repeat=3):
            axes = tuple(a for a in range(3) if flips[a])
            yield perm, flips, np.flip(t, axis=axes) if axes else t


@pytest.mark.parametrize("name", sorted(shapes.SHAPES))
def test_shapes_are_cubic_bool_and_deterministic(name):
    g = shapes.make_shape(name, 16)
    assert g.shape == (16, 16, 16) and g.dtype == bool and g.flags.c_contiguous
    assert 0 < g.sum() < g.size
    assert np.array_equal(g, shapes.make_shape(name, 16))
    rng = np.random.default_rng(3)
    v1 = shapes.make_shape(name, 16, rng)
    v2 = shapes.make_shape(name, 16, np.random.default_rng(3))
    assert np.array_equal(v1, v2)


def test_asym_has_no_symmetry_of_the_cube():
    g = shapes.make_shape("asym", 32)
    same = [(p, f) for p, f, img in cube_symmetries(g) if np.array_equal(img, g)]
    assert same == [((0, 1, 2), (False, False, False))]


def test_variants_differ_from_canonical():
    canon = shapes.make_shape("sphere", 32)
    variant = shapes.make_shape("sphere", 32, np.random.default_rng(1))
    assert not np.array_equal(canon, variant)


def test_world_x_is_axis_2():
    # The box is longest along world x: half sides 0.6 (x) > 0.45 (y) > 0.3 (z).
    g = shapes.make_shape("box", 32)
    extent = [
        np.flatnonzero(g.any(axis=tuple(a for a in range(3) if a != ax))).size for ax in range(3)
    ]
    assert extent[2] > extent[1] > extent[0]


def test_grid_hash_is_sha256_of_bool_bytes():
    g = np.random.default_rng(0).random((4, 4, 4)) < 0.5
    assert octree.grid_hash(g) == hashlib.sha256(g.astype(bool).tobytes()).hexdigest()
    assert octree.grid_hash(g.astype(np.uint8)) == octree.grid_hash(g)


def test_subdivision_order_keys_offsets_and_reconstruction():
    rng = np.random.default_rng(0)
    grid = rng.random((16, 16, 16)) < 0.3
    grid[:8, :8, :8] = False  # an empty octant
    sub = octree.subdivide(grid, "0003", min_resolution=4)
    assert len(sub.records) == 8 + 64
    assert all(set(r) == RECORD_KEYS for r in sub.records)
    assert [r["level"] for r in sub.records] == [1] * 8 + [2] * 64
    lvl1 = sub.records[:8]
    order = [(i, j, k) for i in (0, 8) for j in (0, 8) for k in (0, 8)]
    assert [(r["position_x"], r["position_y"], r["position_z"]) for r in lvl1] == order
    assert [r["octant_index"] for r in lvl1] == list(range(8))
    assert lvl1[0]["is_empty"] and not lvl1[7]["is_empty"]
    # Level 2: children of parent p are records 8p..8p+7; global = parent global + position.
    for n, r in enumerate(sub.records[8:]):
        parent = lvl1[n // 8]
        assert r["octant_index"] == n % 8
        for ax in "xyz":
            assert (
                r[f"global_position_{ax}"] == parent[f"global_position_{ax}"] + r[f"position_{ax}"]
            )
    # Every record's grid is the slice of the level-0 grid at its global offset.
    for r in sub.records:
        s = 16 >> r["level"]
        i, j, k = (r[f"global_position_{ax}"] for ax in "xyz")
        piece = grid[i : i + s, j : j + s, k : k + s]
        assert r["hash"] == octree.grid_hash(piece)
        assert np.array_equal(sub.grids[(r["level"], r["hash"])], piece)
        assert r["is_empty"] == (not piece.any())
        assert r["object_id"] == "0003"


def test_subdivide_rejects_bad_grids():
    with pytest.raises(ValueError):
        octree.subdivide(np.zeros((12, 12, 12), bool), "0000", 4)
    with pytest.raises(ValueError):
        octree.subdivide(np.zeros((8, 8, 8), bool), "0000", 16)


@pytest.mark.parametrize("n", [1, 2, 3, 6, 12, 100])
def test_split_counts(n):
    counts = splits.split_counts(n, (0.7, 0.15, 0.15))
    assert sum(counts) == n and min(counts) >= 0
    if n >= 3:
        assert min(counts) >= 1


def test_split_counts_zero_ratio_gets_nothing():
    assert splits.split_counts(1, (0.5, 0.5, 0.0)) in ([1, 0, 0], [0, 1, 0])
    assert splits.split_counts(5, (1.0, 0.0, 0.0)) == [5, 0, 0]
    assert splits.split_counts(12, (0.7, 0.15, 0.15)) == [8, 2, 2]
    assert splits.split_counts(6, (0.7, 0.15, 0.15)) == [4, 1, 1]


def test_assign_splits_deterministic_and_complete():
    ids = [f"{i:04d}" for i in range(10)]
    a = splits.assign_splits(ids, (0.6, 0.2, 0.2), seed=5)
    assert a == splits.assign_splits(ids, (0.6, 0.2, 0.2), seed=5)
    assert sorted(a) == ids
    assert [list(a.values()).count(s) for s in splits.SPLITS] == [6, 2, 2]


def test_build_splits_counts_leaks():
    object_splits = {"0000": "train", "0001": "val", "0002": "test"}
    usage = {
        "a": ["0000", "0001"],
        "b": ["0000", "0001", "0002"],
        "c": ["0002"],
        "e": ["0000", "0002"],
    }
    doc = splits.build_splits(
        object_splits, usage, {h: 1 for h in usage}, ["e"], (0.5, 0.25, 0.25), seed=7
    )
    st = doc["statistics"]
    assert st["leaked_hashes"] == 2  # "e" is trivial
    assert st["leaked_hashes_per_split_pair"] == {"train-val": 2, "train-test": 1, "val-test": 1}
    assert doc["hash_object_usage"]["a"] == {"0000": "train", "0001": "val"}
    assert doc["trivial_hashes"] == ["e"]
    # upstream's keys and meaning
    assert list(doc) == [
        "config",
        "object_splits",
        "hash_object_usage",
        "trivial_hashes",
        "statistics",
    ]
    assert doc["config"] == {"train_ratio": 0.5, "val_ratio": 0.25, "test_ratio": 0.25, "seed": 7}
    assert st["objects"] == {"train": 1, "val": 1, "test": 1, "total": 3}
    assert st["unique_nontrivial_hashes"] == {
        "total": 3,
        "distribution": {
            "only_train": 0,
            "only_val": 0,
            "only_test": 1,
            "train_val": 1,
            "train_test": 0,
            "val_test": 0,
            "all_splits": 1,
            "trivial": 1,
        },
    }
    assert st["trivial_hashes"] == {"count": 1}


@pytest.mark.parametrize("n", [3, 4, 5, 7, 10])
@pytest.mark.parametrize(
    "ratios", [(0.7, 0.15, 0.15), (0.98, 0.01, 0.01), (0.01, 0.01, 0.98), (0.34, 0.33, 0.33)]
)
def test_every_split_gets_an_object_from_three_objects(n, ratios):
    for seed in range(5):
        got = splits.assign_splits([f"{i:04d}" for i in range(n)], ratios, seed)
        assert set(got.values()) == {"train", "val", "test"}
        assert splits.empty_split_warnings(got, ratios) == []


def test_empty_split_warnings_name_the_split_and_the_reason():
    two = splits.assign_splits(["0000", "0001"], (0.7, 0.15, 0.15), seed=0)
    msgs = splits.empty_split_warnings(two, (0.7, 0.15, 0.15))
    empty = {"train", "val", "test"} - set(two.values())
    assert len(msgs) == len(empty) >= 1
    for name, msg in zip(sorted(empty, key=splits.SPLITS.index), msgs, strict=True):
        assert f"split {name!r} is empty" in msg
        assert "2 object(s) cannot fill 3 splits" in msg
    zero = splits.assign_splits(["0000", "0001", "0002"], (0.5, 0.5, 0.0), seed=0)
    (msg,) = splits.empty_split_warnings(zero, (0.5, 0.5, 0.0))
    assert "split 'test' is empty" in msg and "ratio is 0" in msg


# ---------------------------------------------------------------- meshes


def test_voxelize_closed_mesh_is_solid(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    from gpuloader.generate.meshes import voxelize_file

    path = tmp_path / "ball.stl"
    trimesh.creation.icosphere(subdivisions=3, radius=2.0).export(path)
    grid, meta = voxelize_file(path, 16)
    assert grid.shape == (16, 16, 16) and grid.dtype == bool
    assert grid[8, 8, 8] and grid[4:12, 4:12, 4:12].all()  # filled interior
    assert not grid[0, 0, 0]
    assert meta["voxel_pitch"] == pytest.approx(4.0 / 16, rel=1e-3)
    z, y, x = shapes.voxel_centres(16)
    ball = x**2 + y**2 + z**2 <= 0.9**2
    assert (grid | ~ball).all()


def test_voxelize_box_extent_and_axes(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    from gpuloader.generate.meshes import voxelize_file

    path = tmp_path / "box.obj"
    trimesh.creation.box(extents=(4.0, 2.0, 1.0)).export(path)
    grid, _ = voxelize_file(path, 16)
    # x (axis 2) spans the grid; y 8 voxels; z 4 voxels, centred.
    assert grid.sum() == 16 * 8 * 4
    assert grid[6:10, 4:12, :].all()


@pytest.mark.parametrize(
    "content, suffix, match",
    [
        (b"this is not a mesh at all", ".stl", "mesh file"),
        (b"", ".obj", "mesh file"),
        (b"v 0 0 0\nv 1 0 0\n", ".obj", "no triangles"),
        (b"solid x\nendsolid x\n", ".txt", "unsupported type"),
    ],
)
def test_bad_mesh_files_raise_generation_error(tmp_path, content, suffix, match):
    pytest.importorskip("trimesh")
    from gpuloader.generate.meshes import voxelize_file

    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(GenerationError, match=match) as info:
        voxelize_file(path, 16)
    assert str(path) in str(info.value)


def test_missing_mesh_file(tmp_path):
    from gpuloader.generate.meshes import voxelize_file

    with pytest.raises(GenerationError, match="does not exist"):
        voxelize_file(tmp_path / "nope.stl", 16)
