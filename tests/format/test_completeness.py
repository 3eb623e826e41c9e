"""A ray dataset a generator left unfinished (ray files missing, no processing_summary.json,
or fewer files than the summary records) loads with one IncompleteDatasetWarning that names
how many files are missing, a few of them and how to finish it; pack warns the same; a
whole dataset, or files that are present but refused, do not warn."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.errors import IncompleteDatasetWarning
from gpuloader.format import layout
from gpuloader.format.completeness import missing_ray_files
from gpuloader.format.index import build_index
from gpuloader.format.listing import scan_ray_tree
from gpuloader.stores.pack import pack_rays


def _ray_files(rays: Path, level: int) -> list[Path]:
    return sorted((rays / f"level_{level}").rglob("*_rays.npz"))


def _load_quietly(ds: Path, rays: Path, split: str = "train") -> list[IncompleteDatasetWarning]:
    """Build the train dataset; the incomplete-dataset warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        HierarchicalVoxelRayDataset(ds, rays, split, cache_size=0)
    return [w.message for w in caught if issubclass(w.category, IncompleteDatasetWarning)]


def _non_trivial_hashes(ds: Path) -> set[str]:
    splits = layout.read_json(ds / "splits.json")
    return set(splits["hash_object_usage"]) - set(splits["trivial_hashes"])


@pytest.mark.parametrize("summary", [True, False])
def test_whole_dataset_does_not_warn(tiny_copy, summary) -> None:
    ds, rays = tiny_copy
    if not summary:  # copied without it (rsync of the level folders): still whole
        (rays / "processing_summary.json").unlink()
    assert _load_quietly(ds, rays) == []
    assert missing_ray_files(rays, layout.read_json(ds / "splits.json"), []) is not None


def test_interrupted_tracer_names_what_is_missing(tiny_copy) -> None:
    """No summary (the tracer writes it last) and two level-1 files gone: counted against
    splits.json, the missing sub-volumes named, the dataset still loads what is there."""
    ds, rays = tiny_copy
    (rays / "processing_summary.json").unlink()
    level1 = [p for p in _ray_files(rays, 1) if p.name[:-9] in _non_trivial_hashes(ds)]
    gone = level1[:2]
    for p in gone:
        p.unlink()
    with pytest.warns(IncompleteDatasetWarning) as record:
        data = HierarchicalVoxelRayDataset(ds, rays, "train", cache_size=0)
    assert len(record) == 1
    text = str(record[0].message)
    total = len(_ray_files(rays, 0)) + len(_non_trivial_hashes(ds))
    assert f"2 of {total} ray files are missing" in text
    assert str(rays) in text and "processing_summary.json" in text
    for p in gone:
        assert f"sub-volume {p.name[:12]}" in text
    assert "gpuloader generate" in text and "gpuloader verify" in text
    kept = {s["hash"] for s in data.samples}
    assert not kept & {p.name[:-9] for p in gone}
    assert len(data) > 0


def test_missing_object_is_named(tiny_copy) -> None:
    ds, rays = tiny_copy
    (rays / "processing_summary.json").unlink()
    victim = _ray_files(rays, 0)[-1]
    victim.unlink()
    (message,) = _load_quietly(ds, rays)
    assert f"object {victim.name[:-9]}" in str(message)


def test_summary_count_decides_when_present(tiny_copy) -> None:
    """With the summary kept, its ``processed`` count is what the tree is held to."""
    ds, rays = tiny_copy
    recorded = layout.read_json(rays / "processing_summary.json")["processed"]
    _ray_files(rays, 1)[0].unlink()
    (message,) = _load_quietly(ds, rays)
    text = str(message)
    assert f"records {recorded} ray files" in text
    assert f"1 of {recorded} ray files are missing" in text
    assert re.search(rf"Loading the {recorded - 1} present", text)


def test_every_split_sees_the_same_shortfall(tiny_copy) -> None:
    """The check is of the whole ray tree, not of the split asked for: a val loader on a
    dataset whose missing file is a train object's still warns."""
    ds, rays = tiny_copy
    (rays / "processing_summary.json").unlink()
    _ray_files(rays, 0)[0].unlink()
    for split in ("train", "val", "test"):
        assert len(_load_quietly(ds, rays, split)) == 1, split


def test_refused_files_are_not_missing(tiny_copy) -> None:
    """A file the scan refused (a symlink leading outside the root, skipped) exists: it
    is named by the skip warning, not counted missing."""
    ds, rays = tiny_copy
    outside = tiny_copy[0].parent / "elsewhere"
    outside.mkdir()
    victim = _ray_files(rays, 1)[0]
    moved = outside / victim.name
    victim.rename(moved)
    victim.symlink_to(moved)
    errors: list = []
    found = scan_ray_tree(rays, errors)
    assert [Path(p) for p, _ in errors] == [victim]
    splits = layout.read_json(ds / "splits.json")
    keys = [(lv, h) for lv, h, _ in found]
    assert missing_ray_files(rays, splits, keys, [victim]) is None
    assert missing_ray_files(rays, splits, keys) is not None  # the same, counted missing
    skipped: list = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_index(ds, rays, "train", errors=skipped)
    assert IncompleteDatasetWarning not in {w.category for w in caught}
    assert victim in [Path(p) for p, _ in skipped]  # named by the skip machinery instead


def test_pack_warns_of_an_incomplete_source(tiny_copy, tmp_path) -> None:
    ds, rays = tiny_copy
    (rays / "processing_summary.json").unlink()  # splits.json found beside: counted by it
    [p for p in _ray_files(rays, 1) if p.name[:-9] in _non_trivial_hashes(ds)][0].unlink()
    with pytest.warns(IncompleteDatasetWarning, match="1 of .* ray files are missing"):
        pack_rays(rays, tmp_path / "pack", progress=False, workers=1)


def test_pack_of_a_whole_dataset_does_not_warn(tiny_dataset, tmp_path) -> None:
    ds, rays = tiny_dataset
    with warnings.catch_warnings():
        warnings.simplefilter("error", IncompleteDatasetWarning)
        pack_rays(rays, tmp_path / "pack", progress=False, workers=1)
