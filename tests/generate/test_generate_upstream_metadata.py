"""The generator's JSON files against recorded upstream examples (tests/data/upstream/).

Every key of upstream's files must be in ours, with a value of the same type (data-keyed
mappings such as ``hash_object_usage`` are compared entry by entry), and the values must mean
what upstream's code means (ratios, counts, trivial hashes, resume hash).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpuloader.format import layout
from gpuloader.generate import GeneratorConfig, generate_dataset, metadata, rays

# the fixtures here make datasets of 1-2 objects on purpose: their empty val/test splits
# are announced (EmptySplitWarning), which is not what these tests check
pytestmark = pytest.mark.filterwarnings("ignore::gpuloader.generate.writer.EmptySplitWarning")


UPSTREAM = Path(__file__).resolve().parents[1] / "data" / "upstream"

#: Our file -> its recorded example and the dotted paths of mappings keyed by data.
FILES: dict[str, tuple[str, set[str]]] = {
    "metadata.json": ("dataset_metadata.json", {"deduplication_stats"}),
    "splits.json": ("splits.json", {"object_splits", "hash_object_usage", "hash_object_usage.*"}),
    "registry.json": ("registry.json", {"registry", "stats.level_stats"}),
    "object metadata.json": ("object_metadata.json", set()),
    "processing_summary.json": ("processing_summary_uniform.json", set()),
}

CONFIG = GeneratorConfig(
    shapes=["asym", "torus", "torus_rod", "box"],
    resolution=16,
    min_resolution=4,
    divisions=2,
    samples_per_view=30,
    seed=1,
    workers=1,
)


def upstream(name: str) -> Any:
    return json.loads((UPSTREAM / name).read_text())


def assert_like(up: Any, ours: Any, data_keyed: set[str], where: str = "") -> None:
    """``ours`` has every key of ``up`` (recursively) with a value of the same JSON type."""
    at = where or "(top)"
    if up is None:
        assert ours is None, f"{at}: upstream writes null here, we wrote {ours!r}"
    elif isinstance(up, bool):
        assert isinstance(ours, bool), f"{at}: expected a bool, got {ours!r}"
    elif isinstance(up, int):
        assert isinstance(ours, int) and not isinstance(ours, bool), f"{at}: expected an int"
    elif isinstance(up, float):
        ok = isinstance(ours, (int, float)) and not isinstance(ours, bool)
        assert ok, f"{at}: expected a number, got {ours!r}"
    elif isinstance(up, str):
        assert isinstance(ours, str), f"{at}: expected a string, got {ours!r}"
    elif isinstance(up, list):
        assert isinstance(ours, list), f"{at}: expected a list, got {type(ours).__name__}"
        if up and ours:
            for i, item in enumerate(ours):
                assert_like(up[0], item, data_keyed, f"{where}[{i}]")
    elif isinstance(up, dict):
        assert isinstance(ours, dict), f"{at}: expected an object, got {type(ours).__name__}"
        if where in data_keyed:
            assert all(isinstance(k, str) for k in ours)
            star = f"{where}.*" if where else "*"
            for k, v in ours.items():
                assert_like(
                    next(iter(up.values())),
                    v,
                    data_keyed,
                    star if star in data_keyed else f"{where}.{k}",
                )
        else:
            missing = [k for k in up if k not in ours]
            assert not missing, f"{at}: missing upstream key(s) {missing}"
            for k, v in up.items():
                assert_like(v, ours[k], data_keyed, f"{where}.{k}" if where else k)
    else:  # pragma: no cover - JSON has no other types
        raise AssertionError(f"{at}: unexpected example type {type(up)}")


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("up") / "out"
    summary = generate_dataset(out, dataclasses.replace(CONFIG), progress=False)
    return Path(summary["dataset_dir"]), Path(summary["ray_dir"])


def ours(ds: Path, rd: Path, file: str) -> Any:
    if file == "processing_summary.json":
        return layout.read_json(rd / file)
    if file == "object metadata.json":
        return layout.read_json(layout.object_dir(ds, "0000") / "metadata.json")
    return layout.read_json(ds / file)


def test_recorded_examples_match_the_key_tables():
    """UPSTREAM_KEYS (what verify checks) is the recorded examples' key list, in order."""
    for file, (example, _) in FILES.items():
        assert tuple(upstream(example)) == metadata.UPSTREAM_KEYS[file], file
    assert tuple(upstream("processing_summary.json")) == tuple(
        upstream("processing_summary_uniform.json")
    )
    for (file, path), keys in metadata.UPSTREAM_NESTED_KEYS.items():
        example = upstream(FILES[file][0])
        nodes = [n for _, n in metadata._walk(example, path.split("."))]
        assert nodes, (file, path)
        for node in nodes:
            assert tuple(node) == keys, (file, path)
    records = upstream("subdivision_map.json")
    assert all(tuple(r) == layout.SUBDIVISION_RECORD_KEYS for r in records)


@pytest.mark.parametrize("file", sorted(FILES))
def test_every_upstream_key_with_its_type(generated, file):
    ds, rd = generated
    example, data_keyed = FILES[file]
    doc = ours(ds, rd, file)
    assert_like(upstream(example), doc, data_keyed)
    assert list(doc)[: len(metadata.UPSTREAM_KEYS[file])] == list(metadata.UPSTREAM_KEYS[file])
    assert metadata.missing_keys(file, doc) == []


def test_every_object_metadata_and_subdivision_map(generated):
    ds, _ = generated
    for odir in sorted((ds / "objects").iterdir()):
        assert_like(
            upstream("object_metadata.json"), layout.read_json(odir / "metadata.json"), set()
        )
        assert_like(
            upstream("subdivision_map.json"), layout.read_json(odir / "subdivision_map.json"), set()
        )


def test_adaptive_processing_summary(tmp_path):
    cfg = dataclasses.replace(CONFIG, shapes=["torus"], adaptive=True, samples_per_view=240)
    summary = generate_dataset(tmp_path, cfg, progress=False)
    doc = layout.read_json(Path(summary["ray_dir"]) / "processing_summary.json")
    assert_like(upstream("processing_summary.json"), doc, {"samples_per_level"})
    assert doc["min_samples"] == 100
    assert doc["samples_per_level"] == {"0": 240, "1": 120, "2": 100}


def test_dedup_stats_are_unique_over_total(generated):
    ds, _ = generated
    meta = layout.read_json(ds / "metadata.json")
    reg = layout.read_json(ds / "registry.json")
    records = [
        r for d in (ds / "objects").iterdir() for r in layout.read_json(d / "subdivision_map.json")
    ]
    for key, entry in meta["deduplication_stats"].items():
        level = int(key)
        at = [r for r in records if r["level"] == level]
        unique = {r["hash"] for r in at}
        assert entry["level"] == level
        assert entry["total"] == len(at) and entry["unique"] == len(unique)
        assert entry["empty"] == len({r["hash"] for r in at if r["is_empty"]})
        assert entry["deduplication_ratio"] == pytest.approx(len(unique) / len(at))
        assert 0 < entry["deduplication_ratio"] <= 1
    overall = meta["overall_stats"]
    assert overall["total_subvolumes"] == len(records)
    assert overall["unique_subvolumes"] == len({r["hash"] for r in records})
    assert overall["deduplication_ratio"] == pytest.approx(
        overall["unique_subvolumes"] / overall["total_subvolumes"]
    )
    assert reg["stats"]["level_stats"] == meta["deduplication_stats"]
    assert reg["stats"]["overall_deduplication_ratio"] == overall["deduplication_ratio"]
    assert isinstance(meta["created_at"], str) and meta["created_at"]


def test_registry_entries(generated):
    ds, _ = generated
    reg = layout.read_json(ds / "registry.json")
    records = [
        r for d in (ds / "objects").iterdir() for r in layout.read_json(d / "subdivision_map.json")
    ]
    assert set(reg["registry"]) == {r["hash"] for r in records}
    assert sum(e["count"] for e in reg["registry"].values()) == len(records)
    for h, e in reg["registry"].items():
        assert e["count"] == sum(r["hash"] == h for r in records)
        path = ds / e["path"]  # relative to dataset/
        assert path == layout.subvolume_voxel_path(ds, e["level"], h)
        with np.load(path) as z:
            grid = z["voxels"]
        assert e["resolution"] == grid.shape[0] == 16 >> e["level"]
        assert e["is_empty"] == (not grid.any())
    assert reg["stats"]["levels"] == [1, 2]


def test_trivial_hashes_are_the_empty_grids_not_the_full_ones(tmp_path):
    """A sphere at 32^3 cut to 4^3 has all-full octants: ordinary samples, as upstream."""
    cfg = dataclasses.replace(CONFIG, shapes=["sphere", "box"], resolution=32)
    summary = generate_dataset(tmp_path, cfg, progress=False)
    ds, rd = Path(summary["dataset_dir"]), Path(summary["ray_dir"])
    doc = layout.read_json(ds / "splits.json")
    empty, full = set(), set()
    for p in (ds / "subvolumes").glob("level_*/*/*.npz"):
        with np.load(p) as z:
            v = z["voxels"]
        if not v.any():
            empty.add(p.stem)
        elif v.all():
            full.add(p.stem)
            assert layout.ray_path(rd, int(p.parent.parent.name[6:]), p.stem).is_file()
    assert full, "expected all-full octants"
    assert set(doc["trivial_hashes"]) == empty
    assert doc["statistics"]["trivial_hashes"] == {"count": len(empty)}
    assert doc["statistics"]["unique_nontrivial_hashes"]["total"] == (
        len(doc["hash_object_usage"]) - len(empty)
    )
    assert full <= set(doc["hash_object_usage"])


def test_object_metadata_values(generated):
    ds, _ = generated
    for odir in sorted((ds / "objects").iterdir()):
        meta = layout.read_json(odir / "metadata.json")
        with np.load(odir / "level_0.npz") as z:
            grid = z["voxels"]
        assert meta["source_hash"] == metadata.source_hash(meta["source_file"], grid)
        n = grid.shape[0]
        occ = np.argwhere(grid)[:, ::-1]  # (x, y, z)
        lo = -1 + 2 / n * occ.min(axis=0)
        hi = -1 + 2 / n * (occ.max(axis=0) + 1)
        np.testing.assert_allclose(meta["original_bbox_min"], lo)
        np.testing.assert_allclose(meta["original_bbox_max"], hi)
        np.testing.assert_allclose(meta["original_bbox_extents"], hi - lo)
        assert meta["voxel_pitch"] == 2 / n


def test_mesh_object_metadata(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    stl = tmp_path / "brick.stl"
    trimesh.creation.box(extents=(2.0, 1.0, 1.0)).export(stl)
    cfg = dataclasses.replace(CONFIG, shapes=[], meshes=[str(stl)])
    summary = generate_dataset(tmp_path / "out", cfg, progress=False)
    meta = layout.read_json(
        layout.object_dir(Path(summary["dataset_dir"]), "0000") / "metadata.json"
    )
    assert_like(upstream("object_metadata.json"), meta, set())
    assert meta["source_file"] == str(stl.resolve())
    # upstream's resume check: sha256 of the mesh path string
    assert meta["source_hash"] == hashlib.sha256(str(stl.resolve()).encode()).hexdigest()
    np.testing.assert_allclose(meta["original_bbox_extents"], [2.0, 1.0, 1.0])


def test_processing_summary_values(generated):
    ds, rd = generated
    doc = layout.read_json(rd / "processing_summary.json")
    n_files = len(list(rd.glob("level_*/*/*_rays.npz")))
    n_unique = len(list((ds / "subvolumes").glob("level_*/*/*.npz")))
    n_objects = len(list((ds / "objects").iterdir()))
    assert doc["processed"] == n_files and doc["errors"] == 0
    assert doc["total_subvolumes"] == n_objects + n_unique
    assert doc["skipped_empty"] == doc["total_subvolumes"] - n_files
    assert doc["skipped_already_exists"] == 0
    assert doc["min_level"] == 0 and doc["max_level"] is None
    assert doc["min_samples"] is None and doc["samples_per_level"] is None
    assert (rd.parent / doc["dataset_dir"]) == ds and (rd.parent / doc["output_dir"]) == rd


def test_face_rule_states_the_rule_the_code_applies(generated):
    _, rd = generated
    rule = layout.read_json(rd / "processing_summary.json")["face_rule"]
    assert "dot(outward normal, camera position) < 0" in rule
    assert "samples_per_view // 3" in rule
    rng = np.random.default_rng(0)
    cams = np.concatenate([rng.normal(size=(200, 3)), rays.view_positions(4, 8.0)])
    for cam in cams:
        want = [f for f in range(6) if float(rays.FACE_NORMALS[f] @ cam) < 0]
        assert rays.faces_for_view(cam, np.full(3, 8.0)) == want


def test_resume_counts_existing_ray_files(generated, tmp_path):
    cfg = dataclasses.replace(CONFIG, shapes=["asym"])
    generate_dataset(tmp_path, cfg, progress=False)
    again = generate_dataset(tmp_path, dataclasses.replace(cfg), progress=False)
    doc = layout.read_json(Path(again["ray_dir"]) / "processing_summary.json")
    assert doc["skipped_already_exists"] == doc["processed"] == again["num_ray_files"]
