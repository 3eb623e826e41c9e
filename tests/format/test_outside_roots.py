"""Nothing is read outside the dataset: object IDs of splits.json that are paths, and
symlinked files and folders that lead out of the roots, are refused (named) unless
``allow_outside=True``; under skip they are left out and named; ``verify`` reports them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from gpuloader.commands import verify
from gpuloader.errors import BadObjectIdError, OutsideRootError
from gpuloader.format import layout
from gpuloader.format.index import build_index
from gpuloader.stores.pack.manifest import source_files

BAD_ID = "0000/../../../outside"


@pytest.fixture
def tiny_copy(tiny_dataset, tmp_path) -> tuple[Path, Path]:
    ds, rays = tiny_dataset
    root = tmp_path / "data"
    return (
        Path(shutil.copytree(ds, root / "dataset")),
        Path(shutil.copytree(rays, root / "ray_dataset_hierarchical")),
    )


def _hostile_id(ds: Path, outside: Path) -> None:
    """splits.json names BAD_ID; a hash it lacks makes the index read subdivision maps; a
    map waits outside the dataset at the place the ID leads to."""
    splits = json.loads((ds / "splits.json").read_text())
    splits["object_splits"][BAD_ID] = "train"
    splits["hash_object_usage"].pop(next(iter(splits["hash_object_usage"])))
    (ds / "splits.json").write_text(json.dumps(splits))
    outside.mkdir()
    (outside / "subdivision_map.json").write_text("[]")
    assert (layout.object_dir(ds, BAD_ID) / "subdivision_map.json").resolve() == (
        outside / "subdivision_map.json"
    ).resolve()


def _spy_json(monkeypatch) -> list[Path]:
    opened: list[Path] = []
    real = layout.read_json

    def spy(path):
        opened.append(Path(path).resolve())
        return real(path)

    monkeypatch.setattr(layout, "read_json", spy)
    return opened


def test_object_id_that_is_a_path_is_refused(tiny_copy, tmp_path, monkeypatch) -> None:
    ds, rays = tiny_copy
    _hostile_id(ds, tmp_path / "data" / "outside")
    opened = _spy_json(monkeypatch)
    with pytest.raises(BadObjectIdError) as info:
        build_index(ds, rays, "train")
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{ds / 'splits.json'}: object ID {BAD_ID!r}")
    assert not any("outside" in str(p) for p in opened)


def test_object_id_that_is_a_path_is_left_out_under_skip(tiny_copy, tmp_path, monkeypatch):
    ds, rays = tiny_copy
    clean = build_index(ds, rays, "train")
    _hostile_id(ds, tmp_path / "data" / "outside")
    opened = _spy_json(monkeypatch)
    errors: list = []
    samples = build_index(ds, rays, "train", errors=errors)
    assert [type(e) for _, e in errors] == [BadObjectIdError]
    assert errors[0][0] == str(ds / "splits.json")
    assert not any("outside" in str(p) for p in opened)
    assert [s["hash"] for s in samples if s["level"] == 0] == [
        s["hash"] for s in clean if s["level"] == 0
    ]


def _link_out(path: Path, outside: Path) -> Path:
    """Move ``path`` (file or folder) to ``outside`` and leave a symlink to it in its place."""
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, outside)
    os.symlink(outside, path)
    return path


@pytest.mark.parametrize("what", ["ray file", "ray folder", "voxel file", "object folder"])
def test_links_out_of_the_roots_are_refused_skipped_or_allowed(tiny_copy, tmp_path, what):
    ds, rays = tiny_copy
    clean = build_index(ds, rays, "train")
    victim = next(s for s in clean if s["level"] == (0 if what == "object folder" else 1))
    target = {
        "ray file": victim["ray_path"],
        "ray folder": victim["ray_path"].parent,
        "voxel file": victim["voxel_path"],
        "object folder": victim["voxel_path"].parent,
    }[what]
    link = _link_out(target, tmp_path / "elsewhere" / target.name)

    with pytest.raises(OutsideRootError) as info:
        build_index(ds, rays, "train")
    first = str(info.value).splitlines()[0]
    named, sep, _ = first.partition(": resolves to ")
    assert sep and Path(named).is_relative_to(link) and "outside the" in first  # it or under it
    assert "allow_outside=True" in first

    errors: list = []
    kept = build_index(ds, rays, "train", errors=errors)
    assert [s["hash"] for s in kept] == [s["hash"] for s in clean if s is not victim]
    assert len(errors) == 1 and isinstance(errors[0][1], OutsideRootError)
    assert Path(errors[0][0]).is_relative_to(link)

    allowed = build_index(ds, rays, "train", allow_outside=True)
    assert [s["hash"] for s in allowed] == [s["hash"] for s in clean]


def test_links_inside_the_root_are_followed(tiny_copy, tmp_path) -> None:
    ds, rays = tiny_copy
    clean = build_index(ds, rays, "train")
    victim = next(s for s in clean if s["level"] == 1)
    spare = rays / "spare" / victim["ray_path"].name
    _link_out(victim["ray_path"], spare)  # "outside" its folder, inside the ray root
    assert [s["hash"] for s in build_index(ds, rays, "train")] == [s["hash"] for s in clean]


def test_pack_tree_walk_refuses_links_out(tiny_copy, tmp_path) -> None:
    ds, rays = tiny_copy
    clean = source_files(rays, None)
    link = _link_out(clean[-1][2], tmp_path / "elsewhere" / clean[-1][2].name)
    with pytest.raises(OutsideRootError, match=str(link)):
        source_files(rays, None)
    errors: list = []
    assert source_files(rays, None, errors) == clean[:-1]
    assert [p for p, _ in errors] == [str(link)]
    assert source_files(rays, None, allow_outside=True) == clean


def test_verify_reports_ids_and_links_out(tiny_copy, tmp_path) -> None:
    ds, rays = tiny_copy
    _hostile_id(ds, tmp_path / "data" / "outside")
    samples = build_index(ds, rays, "train", errors=[])
    level1 = [s for s in samples if s["level"] == 1]
    ray_link = _link_out(level1[0]["ray_path"], tmp_path / "elsewhere" / "a_rays.npz")
    folder_link = _link_out(level1[1]["voxel_path"].parent, tmp_path / "elsewhere" / "vox")
    report = verify.verify_dataset(ds, rays, fraction=0.0, progress=False)
    outside = {p.file: p.message for p in report.problems if p.kind == verify.OUTSIDE}
    assert str(ds / "splits.json") in outside and repr(BAD_ID) in outside[str(ds / "splits.json")]
    assert str(ray_link) in outside and "not read" in outside[str(ray_link)]
    assert str(folder_link) in outside
    # reported once, as outside: not as unreadable, damaged or missing
    others = [p for p in report.problems if p.kind != verify.OUTSIDE]
    assert not any(p.file in (str(ray_link), str(folder_link)) for p in others)
