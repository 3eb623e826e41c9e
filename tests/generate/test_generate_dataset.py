"""The generated dataset on disk: layout, keys, dtypes, dedup, splits, rays, resume, errors."""

from __future__ import annotations

import dataclasses
import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from gpuloader.errors import GenerationError
from gpuloader.format import layout
from gpuloader.generate import PRESETS, GeneratorConfig, generate_dataset, octree
from gpuloader.generate.writer import EmptySplitWarning
from gpuloader.tracer import trace

# the fixtures here make datasets of 1-2 objects on purpose: their empty val/test splits
# are announced (EmptySplitWarning), which is not what these tests check
pytestmark = pytest.mark.filterwarnings("ignore::gpuloader.generate.writer.EmptySplitWarning")


SMALL = GeneratorConfig(
    shapes=["asym", "torus", "torus_rod", "box", "box_minus_sphere"],
    resolution=16,
    min_resolution=4,
    divisions=2,
    samples_per_view=30,
    seed=3,
    workers=1,
)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gen") / "out"
    return out, generate_dataset(out, dataclasses.replace(SMALL), progress=False)


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def maps(ds: Path) -> dict[str, list[dict]]:
    out = {}
    for d in sorted((ds / "objects").iterdir()):
        out[d.name.split("_", 1)[1]] = layout.read_json(d / "subdivision_map.json")
    return out


def test_layout_and_metadata(small):
    out, summary = small
    ds, rd = out / "dataset", out / "ray_dataset_hierarchical"
    meta = layout.read_json(ds / "metadata.json")
    assert meta["base_resolution"] == 16 and meta["min_resolution"] == 4
    assert meta["num_levels"] == 3 and meta["level_resolutions"] == [16, 8, 4]
    assert meta["num_objects"] == 5 == summary["num_objects"]
    for oid in meta["object_ids"]:
        odir = layout.object_dir(ds, oid)
        grid = load(odir / "level_0.npz")
        assert list(grid) == ["voxels"]
        assert grid["voxels"].dtype == bool and grid["voxels"].shape == (16, 16, 16)
        om = layout.read_json(odir / "metadata.json")
        assert om["object_id"] == oid and om["num_occupied_voxels"] == grid["voxels"].sum()
    ps = layout.read_json(rd / "processing_summary.json")
    assert ps["sphere_divisions"] == 2 and ps["samples_per_view"] == 30
    assert ps["adaptive_sampling"] is False and ps["seed"] == 3
    assert ps["num_ray_files"] == summary["num_ray_files"]


def test_subvolumes_stored_once_and_dedup(small):
    out, _ = small
    ds = out / "dataset"
    records = list(itertools.chain.from_iterable(maps(ds).values()))
    unique = {(r["level"], r["hash"]) for r in records}
    files = sorted((ds / "subvolumes").glob("level_*/*/*.npz"))
    assert len(files) == len(unique)  # each unique hash exactly once
    for level, h in unique:
        path = layout.subvolume_voxel_path(ds, level, h)
        v = load(path)
        assert list(v) == ["voxels"] and v["voxels"].dtype == bool
        assert v["voxels"].shape == (16 >> level,) * 3
        assert octree.grid_hash(v["voxels"]) == h
    # torus and torus_rod (and box / box_minus_sphere) share non-trivial octants.
    users: dict[str, set] = {}
    for r in records:
        users.setdefault(r["hash"], set()).add(r["object_id"])
    shared = [
        h
        for (lv, h) in unique
        if len(users[h]) > 1
        and not octree.is_trivial(load(layout.subvolume_voxel_path(ds, lv, h))["voxels"])
    ]
    assert shared, "expected two objects sharing a non-trivial octant"


def test_subdivision_maps_match_level0(small):
    out, _ = small
    ds = out / "dataset"
    for oid, recs in maps(ds).items():
        grid = load(layout.level0_voxel_path(ds, oid))["voxels"]
        assert len(recs) == 8 + 64
        for r in recs:
            s = 16 >> r["level"]
            i, j, k = (r[f"global_position_{a}"] for a in "xyz")
            assert r["hash"] == octree.grid_hash(grid[i : i + s, j : j + s, k : k + s])


def test_splits_bookkeeping_against_brute_force(small):
    out, _ = small
    ds = out / "dataset"
    doc = layout.read_json(ds / "splits.json")
    obj_split = doc["object_splits"]
    assert set(obj_split.values()) <= {"train", "val", "test"}
    by_map = maps(ds)
    assert sorted(obj_split) == sorted(by_map)
    usage: dict[str, dict[str, str]] = {}
    trivial = set()
    for oid, recs in by_map.items():
        for r in recs:
            usage.setdefault(r["hash"], {})[oid] = obj_split[oid]
            v = load(layout.subvolume_voxel_path(ds, r["level"], r["hash"]))["voxels"]
            if not v.any():  # upstream's pipeline: trivial = all-empty (all-full is a sample)
                trivial.add(r["hash"])
    assert doc["hash_object_usage"] == usage
    assert set(doc["trivial_hashes"]) == trivial
    leaks = {"train-val": 0, "train-test": 0, "val-test": 0}
    total = 0
    for h, u in usage.items():
        used = set(u.values())
        if h in trivial or len(used) < 2:
            continue
        total += 1
        for a, b in itertools.combinations(["train", "val", "test"], 2):
            leaks[f"{a}-{b}"] += a in used and b in used
    st = doc["statistics"]
    assert st["leaked_hashes"] == total
    assert st["leaked_hashes_per_split_pair"] == leaks
    assert st["objects"]["total"] == len(obj_split)
    assert sum(st["objects"][s] for s in ("train", "val", "test")) == len(obj_split)
    assert doc["config"] == {"train_ratio": 0.7, "val_ratio": 0.15, "test_ratio": 0.15, "seed": 3}
    assert st["trivial_hashes"] == {"count": len(trivial)}
    assert st["unique_nontrivial_hashes"]["total"] == len(usage) - len(trivial)


def ray_files(rd: Path) -> list[Path]:
    return sorted(rd.glob("level_*/*/*_rays.npz"))


def test_one_ray_file_per_object_and_nonempty_subvolume(small):
    out, summary = small
    ds, rd = out / "dataset", out / "ray_dataset_hierarchical"
    expected = {(0, oid) for oid in maps(ds)}
    for recs in maps(ds).values():
        expected |= {(r["level"], r["hash"]) for r in recs if not r["is_empty"]}
    found = {layout.parse_ray_filename(p) for p in ray_files(rd)}
    assert found == expected
    assert summary["num_ray_files"] == len(expected)
    assert all(p.parent.name == key[:2] for p in ray_files(rd) for key in [p.name.split("_")[0]])


def test_ray_file_keys_dtypes_geometry_and_distances(small):
    out, _ = small
    ds, rd = out / "dataset", out / "ray_dataset_hierarchical"
    views = SMALL.divisions**2
    for path in ray_files(rd):
        level, key = layout.parse_ray_filename(path)
        r = load(path)
        assert set(r) == set(layout.RAY_ROW_KEYS) | set(layout.RAY_SCALAR_KEYS) | {"view_positions"}
        n = r["origins"].shape[0]
        assert n > 0
        for k, dt in layout.RAY_DTYPES.items():
            assert r[k].dtype == dt, (path, k)
        assert r["origins"].shape == r["directions"].shape == (n, 3)
        for k in ("distances", "hits", "face_ids", "view_ids"):
            assert r[k].shape == (n,)
        assert r["view_positions"].shape == (views, 3)
        voxels = load(layout.voxel_path(ds, level, key))["voxels"]
        side = voxels.shape[0]
        assert tuple(r["grid_shape"]) == voxels.shape
        assert str(r["hash"]) == key and int(r["level"]) == level
        assert float(r["voxel_size"]) == 1.0 and str(r["sampling_mode"]) == "sphere"
        # Directions are unit and point at the camera of their view.
        d = r["directions"].astype(np.float64)
        np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-6)
        to_cam = r["view_positions"][r["view_ids"]].astype(np.float64) - r["origins"]
        to_cam /= np.linalg.norm(to_cam, axis=1, keepdims=True)
        np.testing.assert_allclose(d, to_cam, atol=1e-5)
        assert r["view_ids"].min() >= 0 and r["view_ids"].max() < views
        # Origins lie on the face their face_id names; the ray enters the box from there.
        o = r["origins"].astype(np.float64)
        axis, sign = r["face_ids"] // 2, np.where(r["face_ids"] % 2, 1.0, -1.0)
        rows = np.arange(n)
        np.testing.assert_array_equal(o[rows, axis], sign * side / 2)
        assert np.all(np.abs(o) <= side / 2 + 1e-6)
        assert np.all(d[rows, axis] * sign < 0)
        # Camera radius 2 x half extent.
        np.testing.assert_allclose(np.linalg.norm(r["view_positions"], axis=1), side, rtol=1e-6)
        # Distances are the tracer's, hits = distances > 0.
        expected = trace(voxels, r["origins"], r["directions"], voxel_size=1.0)
        np.testing.assert_allclose(r["distances"], expected, rtol=1e-6, atol=1e-5)
        np.testing.assert_array_equal(r["hits"], (r["distances"] > 0).astype(np.uint8))
        if level == 0:
            assert r["hits"].any()


def _without_created_at(path: Path) -> bytes:
    """File bytes, with dataset/metadata.json's ``created_at`` (the one time stamp) blanked."""
    if path.name == "metadata.json" and path.parent.name == "dataset":
        doc = json.loads(path.read_text())
        assert isinstance(doc.pop("created_at"), str)
        return json.dumps(doc).encode()
    return path.read_bytes()


def test_deterministic_bytes(small, tmp_path):
    """Byte-identical whatever --workers, except ``created_at`` (a wall-clock time stamp)."""
    out, _ = small
    other = tmp_path / "again"
    generate_dataset(other, dataclasses.replace(SMALL, workers=2), progress=False)
    a = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    b = sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    assert a == b
    for rel in a:
        assert _without_created_at(out / rel) == _without_created_at(other / rel), rel


def test_source_date_epoch_makes_every_byte_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    cfg = dataclasses.replace(SMALL, shapes=["asym", "torus"])
    generate_dataset(tmp_path / "a", cfg, progress=False)
    generate_dataset(tmp_path / "b", dataclasses.replace(cfg, workers=2), progress=False)
    files = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    meta = layout.read_json(tmp_path / "a" / "dataset" / "metadata.json")
    assert meta["created_at"] == "2023-11-14T22:13:20+00:00"


def test_resume_keeps_created_at(tmp_path):
    cfg = dataclasses.replace(SMALL, shapes=["asym"])
    out = tmp_path / "out"
    generate_dataset(out, cfg, progress=False)
    meta_path = out / "dataset" / "metadata.json"
    doc = layout.read_json(meta_path)
    doc["created_at"] = "2001-02-03T04:05:06"  # as if made long ago
    meta_path.write_text(json.dumps(doc))
    generate_dataset(out, dataclasses.replace(cfg), progress=False)
    assert layout.read_json(meta_path)["created_at"] == "2001-02-03T04:05:06"
    generate_dataset(out, dataclasses.replace(cfg, overwrite=True), progress=False)
    assert layout.read_json(meta_path)["created_at"] != "2001-02-03T04:05:06"


def _stamps(root: Path) -> dict[str, tuple[int, int, int]]:
    """(mtime_ns, ctime_ns, inode) of every file and folder below ``root``."""
    out = {}
    for p in [root, *root.rglob("*")]:
        st = p.stat()
        out[str(p.relative_to(root))] = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    return out


def test_resume_of_a_complete_dataset_moves_no_stamp(tmp_path):
    """A resumed run that has nothing to do rewrites nothing (``ensure_data`` runs one before
    every example): a reader's remembered index stays valid. (The first resume records its
    own counts in processing_summary.json, ``skipped_already_exists``, as upstream's does.)"""
    cfg = dataclasses.replace(SMALL, shapes=["asym", "torus"])
    out = tmp_path / "out"
    generate_dataset(out, cfg, progress=False)
    generate_dataset(out, dataclasses.replace(cfg), progress=False)
    before = _stamps(out)
    again = generate_dataset(out, dataclasses.replace(cfg), progress=False)
    assert again["resumed"] and again["files_written"] == 0
    after = _stamps(out)
    del before["."], after["."]  # OUT itself: the run's write test comes and goes there
    assert after == before
    # a file whose content a resumed run does change is still rewritten
    meta_path = out / "dataset" / "metadata.json"
    doc = layout.read_json(meta_path)
    doc["num_objects"] = -1
    meta_path.write_text(json.dumps(doc))
    generate_dataset(out, dataclasses.replace(cfg), progress=False)
    assert layout.read_json(meta_path)["num_objects"] != -1
    cfg = dataclasses.replace(SMALL, shapes=["sphere"], min_resolution=16)
    a = generate_dataset(tmp_path / "a", cfg, progress=False)
    b = generate_dataset(tmp_path / "b", dataclasses.replace(cfg, seed=4), progress=False)
    ra = load(next(iter(ray_files(Path(a["ray_dir"])))))
    rb = load(next(iter(ray_files(Path(b["ray_dir"])))))
    assert not np.array_equal(ra["origins"], rb["origins"])


def test_resume_finishes_and_refuses_other_config(tmp_path):
    cfg = dataclasses.replace(SMALL, shapes=["asym", "torus"])
    out = tmp_path / "out"
    first = generate_dataset(out, cfg, progress=False)
    files = {p: p.read_bytes() for p in out.rglob("*.npz")}
    victims = sorted(files)[::3]
    for p in victims:
        p.unlink()
    again = generate_dataset(out, dataclasses.replace(cfg), progress=False)
    assert again["resumed"] and again["files_written"] == len(victims)
    assert again["num_ray_files"] == first["num_ray_files"]
    for p, data in files.items():
        assert p.read_bytes() == data
    with pytest.raises(GenerationError, match="--overwrite"):
        generate_dataset(out, dataclasses.replace(cfg, seed=9), progress=False)
    replaced = generate_dataset(
        out, dataclasses.replace(cfg, seed=9, overwrite=True), progress=False
    )
    assert not replaced["resumed"]
    assert json.loads((out / "generation_config.json").read_text())["config"]["seed"] == 9


def test_refuses_foreign_dataset_folder(tmp_path):
    (tmp_path / "dataset").mkdir()
    with pytest.raises(GenerationError, match="--overwrite"):
        generate_dataset(tmp_path, dataclasses.replace(SMALL, shapes=["box"]), progress=False)


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(GenerationError, match="output folder") as info:
        generate_dataset(blocker / "out", dataclasses.replace(SMALL), progress=False)
    assert str(blocker) in str(info.value)


def test_adaptive_halves_rays_per_level(tmp_path):
    cfg = dataclasses.replace(
        SMALL, shapes=["torus"], samples_per_view=240, adaptive=True, min_samples_per_view=30
    )
    summary = generate_dataset(tmp_path, cfg, progress=False)
    ps = layout.read_json(Path(summary["ray_dir"]) / "processing_summary.json")
    assert ps["samples_per_view_per_level"] == {"0": 240, "1": 120, "2": 60}
    assert ps["samples_per_level"] == {"0": 240, "1": 120, "2": 60}  # upstream's key
    assert ps["min_samples"] == 30 and ps["adaptive_sampling"] is True
    for p in ray_files(Path(summary["ray_dir"])):
        level, _ = layout.parse_ray_filename(p)
        r = load(p)
        pairs = r["view_ids"] * 6 + r["face_ids"]
        per_face = np.bincount(pairs)[np.unique(pairs)]
        assert set(per_face.tolist()) == {(240 >> level) // 3}


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"resolution": 48}, "power of two"),
        ({"min_resolution": 32}, "min-resolution"),
        ({"min_resolution": 3}, "power of two"),
        ({"split": (0.5, 0.3, 0.3)}, "sum to 1"),
        ({"split": (1.2, -0.1, -0.1)}, ">= 0"),
        ({"shapes": ["dodecahedron"]}, "unknown shape"),
        ({"meshes": ["/nonexistent/thing.stl"]}, "does not exist"),
        ({"shapes": [], "meshes": []}, "nothing to generate"),
        ({"shapes": ["sphere"], "num_objects": 0}, "--num-objects must be >= 1"),
        ({"min_samples_per_view": 2}, "--min-samples-per-view"),
    ],
)
def test_bad_config_raises(tmp_path, changes, match):
    with pytest.raises(GenerationError, match=match):
        generate_dataset(tmp_path / "o", dataclasses.replace(SMALL, **changes), progress=False)
    assert not (tmp_path / "o").exists()


def test_presets():
    demo, bench = PRESETS["demo"], PRESETS["bench"]
    demo.validate()
    bench.validate()
    assert "asym" in demo.shapes and demo.resolution == 32 and demo.min_resolution == 8
    assert bench.num_shape_objects() == 12 and bench.resolution == 64
    assert bench.min_resolution == 4 and bench.divisions == 4 and bench.samples_per_view == 3000


def test_adaptive_minimum_is_upstreams_100(tmp_path):
    assert GeneratorConfig().min_samples_per_view == 100
    cfg = dataclasses.replace(SMALL, shapes=["torus"], samples_per_view=240, adaptive=True)
    summary = generate_dataset(tmp_path, cfg, progress=False)
    ps = layout.read_json(Path(summary["ray_dir"]) / "processing_summary.json")
    assert ps["samples_per_level"] == {"0": 240, "1": 120, "2": 100}
    assert ps["min_samples"] == 100


def test_non_adaptive_resume_ignores_min_samples(tmp_path):
    """--min-samples-per-view changes nothing without --adaptive, so resume still matches."""
    cfg = dataclasses.replace(SMALL, shapes=["asym"])
    generate_dataset(tmp_path, cfg, progress=False)
    again = generate_dataset(
        tmp_path, dataclasses.replace(cfg, min_samples_per_view=7), progress=False
    )
    assert again["resumed"] and again["files_written"] == 0


@pytest.mark.parametrize("n", [3, 4, 6])
def test_three_or_more_objects_fill_every_split(tmp_path, n):
    cfg = dataclasses.replace(
        SMALL, shapes=["asym"], num_objects=n, resolution=8, split=(0.9, 0.05, 0.05)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no EmptySplitWarning
        summary = generate_dataset(tmp_path, cfg, progress=False)
    assert set(summary["object_splits"].values()) == {"train", "val", "test"}
    assert summary["empty_splits"] == []


def test_too_few_objects_warn_naming_the_empty_split(tmp_path):
    cfg = dataclasses.replace(SMALL, shapes=["asym", "torus"], resolution=8)
    with pytest.warns(EmptySplitWarning) as record:
        summary = generate_dataset(tmp_path, cfg, progress=False)
    empty = {"train", "val", "test"} - set(summary["object_splits"].values())
    assert empty
    messages = [str(w.message) for w in record]
    for name in empty:
        assert any(f"split {name!r} is empty" in m for m in messages), messages
    assert summary["empty_splits"] == messages
