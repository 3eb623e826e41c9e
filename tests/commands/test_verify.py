"""gpuloader verify: clean datasets pass; every kind of damage is reported, naming its file."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gpuloader.commands import verify
from gpuloader.commands.verify import VerifyReport, verify_dataset
from gpuloader.format import layout
from support.generated import generate_small
from support.tiny_dataset import write_tiny_dataset


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset, rays) of a clean generated dataset: read-only, copy before damaging."""
    return generate_small(tmp_path_factory.mktemp("gen"))


@pytest.fixture()
def copy(generated: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    ds, rays = generated
    return (
        Path(shutil.copytree(ds, tmp_path / "dataset")),
        Path(shutil.copytree(rays, tmp_path / "ray_dataset_hierarchical")),
    )


def _check(ds: Path, rays: Path, **kw) -> VerifyReport:
    return verify_dataset(ds, rays, progress=False, **kw)


def _files(report: VerifyReport, kind: str | None = None) -> set[str]:
    return {p.file for p in report.problems if kind is None or p.kind == kind}


def _ray_file(rays: Path, level: int, require_hit: bool = True) -> Path:
    """A ray file of ``level`` (one with hits when asked)."""
    for p in sorted((rays / f"level_{level}").glob("*/*_rays.npz")):
        with np.load(p) as f:
            if not require_hit or f["hits"].any():
                return p
    raise AssertionError(f"no ray file at level {level}")


def _rewrite(path: Path, **changes: np.ndarray) -> None:
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays.update(changes)
    np.savez_compressed(path, **arrays)


# ------------------------------------------------------------------ clean data


def test_clean_generated_dataset_passes(generated):
    ds, rays = generated
    report = _check(ds, rays)
    assert report.ok, report.format()
    n_ray_files = len(list(rays.glob("level_*/*/*_rays.npz")))
    assert report.counts["ray files"] == n_ray_files > 0
    assert report.counts["voxel files"] == len(list(ds.rglob("*.npz")))
    assert report.rays_checked >= n_ray_files  # at least one per file
    assert report.max_trace_error < 1e-3
    assert report.format().endswith("OK")


def test_clean_hand_made_dataset_passes(tmp_path):
    ds, rays = write_tiny_dataset(tmp_path, max_level=2)
    report = _check(ds, rays, fraction=1.0)
    assert report.ok, report.format()
    assert report.rays_checked == report.counts["rays"]


def test_fraction_zero_still_traces_one_ray_per_file(generated):
    ds, rays = generated
    report = _check(ds, rays, fraction=0.0)
    assert report.ok
    assert report.rays_checked == report.counts["ray files"]


def test_workers_give_the_same_report(copy):
    ds, rays = copy
    bad = _ray_file(rays, 1)
    _rewrite(bad, distances=np.zeros(1, np.float32))
    one = _check(ds, rays, workers=1)
    two = _check(ds, rays, workers=2)
    assert one.problems == two.problems and not one.ok
    assert one.counts == two.counts
    assert one.rays_checked == two.rays_checked


# ------------------------------------------------------------------ damage, one kind each


def test_truncated_npz_is_named(copy):
    ds, rays = copy
    ray = _ray_file(rays, 1)
    vox = layout.level0_voxel_path(ds, "0001")
    for p in (ray, vox):
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    report = _check(ds, rays)
    assert {str(ray), str(vox)} <= _files(report, verify.UNREADABLE)


def test_wrong_hash_renamed_file_is_named(copy):
    ds, rays = copy
    old = next(iter(sorted((ds / "subvolumes" / "level_1").glob("*/*.npz"))))
    fake = "0" + old.stem[1:] if old.stem[0] != "0" else "1" + old.stem[1:]
    new = old.parent.parent / fake[:2] / f"{fake}.npz"
    new.parent.mkdir(exist_ok=True)
    old.rename(new)
    report = _check(ds, rays)
    hash_problems = [p for p in report.problems if p.kind == verify.HASH]
    assert [p.file for p in hash_problems] == [str(new)]
    assert old.stem in hash_problems[0].message
    assert str(old) in _files(report, verify.MISSING)  # still used by subdivision maps


def test_missing_voxel_file_for_ray_file(copy):
    ds, rays = copy
    ray = _ray_file(rays, 2)
    level, name = layout.parse_ray_filename(ray)
    vox = layout.voxel_path(ds, level, name)
    vox.unlink()
    report = _check(ds, rays)
    assert str(ray) in _files(report, verify.PAIRING)
    assert str(vox) in _files(report, verify.MISSING)


def test_missing_ray_file_for_non_empty_subvolume(copy):
    ds, rays = copy
    ray = _ray_file(rays, 1)
    ray.unlink()
    report = _check(ds, rays)
    assert _files(report) == {str(ray)}
    assert report.problems[0].kind == verify.PAIRING


def test_nan_distance_is_named(copy):
    ds, rays = copy
    ray = _ray_file(rays, 0)
    with np.load(ray) as f:
        dist = f["distances"].copy()
    dist[3] = np.nan
    _rewrite(ray, distances=dist)
    report = _check(ds, rays)
    nan = [p for p in report.problems if "NaN" in p.message]
    assert [p.file for p in nan] == [str(ray)] and nan[0].kind == verify.VALUES


def test_wrong_dtype_is_named(copy):
    ds, rays = copy
    ray = _ray_file(rays, 1)
    with np.load(ray) as f:
        _rewrite(ray, distances=f["distances"].astype(np.float64))
    vox = next(iter(sorted((ds / "subvolumes" / "level_2").glob("*/*.npz"))))
    with np.load(vox) as f:
        np.savez_compressed(vox, voxels=f["voxels"].astype(np.uint8))
    report = _check(ds, rays)
    fmt = [p for p in report.problems if p.kind == verify.FORMAT]
    assert {p.file for p in fmt} == {str(ray), str(vox)}
    assert any("float64" in p.message for p in fmt)
    assert any("uint8" in p.message for p in fmt)


def test_changed_distance_fails_the_trace(copy):
    ds, rays = copy
    ray = _ray_file(rays, 1)
    with np.load(ray) as f:
        dist = f["distances"].copy()
    i = int(np.flatnonzero(dist > 0)[0])
    dist[i] += 0.5  # still a hit: only the re-trace can see it
    _rewrite(ray, distances=dist)
    report = _check(ds, rays, fraction=1.0)
    assert _files(report) == {str(ray)}
    assert report.problems[0].kind == verify.TRACE
    assert f"ray {i}" in report.problems[0].message
    assert report.max_trace_error == pytest.approx(0.5, abs=1e-3)


def test_missing_splits_json(copy):
    ds, rays = copy
    (ds / "splits.json").unlink()
    report = _check(ds, rays)
    assert _files(report) == {str(ds / "splits.json")}
    assert report.problems[0].kind == verify.MISSING


def test_bad_values_and_keys(copy):
    ds, rays = copy
    ray = _ray_file(rays, 2)
    with np.load(ray) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["directions"] = arrays["directions"] * 2
    arrays["face_ids"] = arrays["face_ids"] + 7
    arrays["view_ids"][0] = arrays["view_positions"].shape[0]
    del arrays["sampling_mode"]
    np.savez_compressed(ray, **arrays)
    report = _check(ds, rays)
    text = " | ".join(p.message for p in report.problems if p.file == str(ray))
    for words in ("not unit", "face_ids outside", "view_ids outside", "sampling_mode"):
        assert words in text


def test_splits_bookkeeping(copy):
    ds, rays = copy
    path = ds / "splits.json"
    doc = json.loads(path.read_text())
    doc["trivial_hashes"] = doc["trivial_hashes"][1:]
    gone = next(iter(doc["hash_object_usage"]))
    del doc["hash_object_usage"][gone]
    del doc["object_splits"][next(iter(doc["object_splits"]))]
    path.write_text(json.dumps(doc))
    report = _check(ds, rays)
    msgs = [p.message for p in report.problems if p.file == str(path)]
    assert all(p.kind == verify.SPLITS for p in report.problems)
    assert any("trivial_hashes lacks 1" in m for m in msgs)
    assert any("hash_object_usage lacks 1" in m and gone in m for m in msgs)
    assert any("no entry in object_splits" in m for m in msgs)


def test_subdivision_map_hash_disagrees_with_grid(copy):
    ds, rays = copy
    path = layout.object_dir(ds, "0000") / "subdivision_map.json"
    records = json.loads(path.read_text())
    records[0]["octant_index"] = 5
    del records[1]["hash"]
    path.write_text(json.dumps(records))
    report = _check(ds, rays)
    msgs = [p.message for p in report.problems if p.file == str(path)]
    assert any("octant_index" in m for m in msgs)
    assert any("lack key(s) ['hash']" in m for m in msgs)


def test_all_bad_files_are_reported(copy):
    ds, rays = copy
    files = sorted(rays.glob("level_2/*/*_rays.npz"))[:3]
    for p in files:
        p.write_bytes(b"not a zip")
    (ds / "splits.json").write_text("{broken")
    report = _check(ds, rays)
    assert {str(p) for p in files} | {str(ds / "splits.json")} == _files(report, verify.UNREADABLE)


def test_missing_roots_are_problems(tmp_path):
    report = _check(tmp_path / "nope", tmp_path / "nada")
    assert {str(tmp_path / "nope"), str(tmp_path / "nada")} <= _files(report, verify.MISSING)


# ------------------------------------------------------------------ command line


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    verify.add_arguments(parser)
    return verify.run(parser.parse_args(argv))


def test_cli_exit_codes(copy, capsys):
    ds, rays = copy
    assert _cli([str(ds), str(rays), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == "OK"
    ray = _ray_file(rays, 0)
    ray.write_bytes(b"")
    assert _cli([str(ds), str(rays), "--fraction", "0.05", "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert str(ray) in out and "[unreadable file] 1" in out and "FAILED" in out


def test_cli_through_gpuloader_main(generated, tmp_path, capsys):
    from gpuloader.commands.cli import main

    ds, rays = generated
    assert main(["verify", str(ds), str(rays), "--quiet"]) == 0
    # a root that is missing or not a folder is an argument error (exit 2), as for info
    assert main(["verify", str(tmp_path / "x"), str(tmp_path / "y"), "--quiet"]) == 2
    assert "does not exist; check the DATASET_DIR argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["verify", str(ds), str(rays), "--fraction", "2"])
    capsys.readouterr()


def _drop(path: Path, *keys: str) -> None:
    """Remove a (dotted) key from a JSON file."""
    doc = json.loads(path.read_text())
    for key in keys:
        node = doc
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        del node[last]
    path.write_text(json.dumps(doc))


def test_missing_upstream_metadata_keys_are_named(copy):
    """Every JSON file must hold the keys upstream's generator writes; each gap is named."""
    ds, rays = copy
    obj_meta = ds / "objects" / "object_0001" / "metadata.json"
    _drop(ds / "metadata.json", "created_at")
    _drop(ds / "splits.json", "config.seed", "statistics.trivial_hashes")
    _drop(obj_meta, "source_hash")
    _drop(rays / "processing_summary.json", "skipped_empty")
    registry = json.loads((ds / "registry.json").read_text())
    first = next(iter(registry["registry"]))
    del registry["registry"][first]["count"]
    (ds / "registry.json").write_text(json.dumps(registry))
    report = _check(ds, rays, fraction=0.0)
    found = {p.file: p.message for p in report.problems if "missing key(s)" in p.message}
    assert all(p.kind == verify.FORMAT for p in report.problems if "missing key(s)" in p.message)
    assert "created_at" in found[str(ds / "metadata.json")]
    assert "config.seed" in found[str(ds / "splits.json")]
    assert "statistics.trivial_hashes" in found[str(ds / "splits.json")]
    assert "source_hash" in found[str(obj_meta)]
    assert "skipped_empty" in found[str(rays / "processing_summary.json")]
    assert f"registry.{first}.count" in found[str(ds / "registry.json")]
    assert len(found) == 5 and not report.ok


def test_missing_registry_json_is_named(copy):
    ds, rays = copy
    (ds / "registry.json").unlink()
    report = _check(ds, rays, fraction=0.0)
    assert _files(report, verify.MISSING) == {str(ds / "registry.json")}


def test_missing_keys_unit():
    from gpuloader.generate.metadata import missing_keys

    assert missing_keys("splits.json", []) == ["(the file is not a JSON object)"]
    bad = {str(lv): {"level": lv} for lv in range(1, 6)}
    doc = {"deduplication_stats": bad}
    got = missing_keys("metadata.json", doc)
    assert "created_at" in got and "deduplication_stats.1.unique" in got
    assert "deduplication_stats.4.unique" not in got  # at most 3 faulty entries named ...
    assert any("5 entries of deduplication_stats.* lack keys" in g for g in got)  # ... counted
