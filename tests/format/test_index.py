"""Index: split membership and isolation, level 0, filters, errors that name the path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpuloader.errors import DamagedFileError, DatasetLayoutError, NoSamplesError
from gpuloader.format import layout
from gpuloader.format.index import build_index, npz_member_header


def _splits(ds: Path) -> dict:
    return json.loads((ds / "splits.json").read_text())


def test_sample_records(tiny_dataset):
    ds, rays = tiny_dataset
    samples = build_index(ds, rays, "train")
    keys = {"level", "hash", "object_ids", "ray_path", "voxel_path", "num_rays"}
    keys |= {"is_empty", "is_trivial"}
    for s in samples:
        assert keys <= set(s)
        assert s["voxel_path"].is_file() and s["ray_path"].is_file()
        with np.load(s["ray_path"]) as z:
            assert s["num_rays"] == z["origins"].shape[0]
    assert [(s["level"], s["hash"]) for s in samples] == sorted(
        (s["level"], s["hash"]) for s in samples
    )


def test_level0_samples_use_object_folders(tiny_dataset):
    ds, rays = tiny_dataset
    samples = [s for s in build_index(ds, rays, "val") if s["level"] == 0]
    assert sorted(s["hash"] for s in samples) == ["0002", "0004"]
    for s in samples:
        assert s["voxel_path"] == ds / "objects" / f"object_{s['hash']}" / "level_0.npz"
        assert s["object_ids"] == [s["hash"]]
        assert not s["is_trivial"]


def _train_only_hashes(ds: Path) -> set[str]:
    sp = _splits(ds)
    trivial = set(sp["trivial_hashes"])
    return {
        h
        for h, users in sp["hash_object_usage"].items()
        if h not in trivial and set(users.values()) == {"train"}
    }


@pytest.mark.parametrize("split", ["val", "test"])
def test_shared_isolation_follows_format(tiny_dataset, split):
    ds, rays = tiny_dataset
    sp = _splits(ds)
    samples = build_index(ds, rays, split, include_empty=True)
    hashes = {s["hash"] for s in samples if s["level"] > 0}
    assert not hashes & _train_only_hashes(ds)
    for h in hashes:  # trivial, or some user in the split
        users = sp["hash_object_usage"][h]
        assert h in sp["trivial_hashes"] or split in users.values()
    # and every member of the split is there
    want = {
        h
        for h, users in sp["hash_object_usage"].items()
        if h in sp["trivial_hashes"] or split in users.values()
    }
    assert hashes == want
    # shared mode keeps the leak of the tiny dataset (block A in val, D in test)
    assert any(
        "train" in sp["hash_object_usage"][h].values() for h in hashes - set(sp["trivial_hashes"])
    )


@pytest.mark.parametrize("split", ["val", "test"])
def test_strict_isolation_leaks_nothing(tiny_dataset, split):
    ds, rays = tiny_dataset
    sp = _splits(ds)
    trivial = set(sp["trivial_hashes"])
    shared = {s["hash"] for s in build_index(ds, rays, split)}
    strict = build_index(ds, rays, split, isolation="strict")
    train = {s["hash"] for s in build_index(ds, rays, "train")}
    for s in strict:
        if s["level"] > 0 and not s["is_trivial"]:
            assert "train" not in sp["hash_object_usage"][s["hash"]].values()
            assert s["hash"] not in train
    strict_hashes = {s["hash"] for s in strict}
    assert strict_hashes < shared  # something was dropped ...
    assert {h for h in shared if h in trivial} <= strict_hashes  # ... but not trivial ones


def test_strict_train_is_unchanged(tiny_dataset):
    ds, rays = tiny_dataset
    a = build_index(ds, rays, "train")
    b = build_index(ds, rays, "train", isolation="strict")
    assert [s["hash"] for s in a] == [s["hash"] for s in b]


def test_empty_filter_and_flags(tiny_dataset):
    ds, rays = tiny_dataset
    default = build_index(ds, rays, "train")
    with_empty = build_index(ds, rays, "train", include_empty=True)
    assert not any(s["is_empty"] for s in default)
    empties = [s for s in with_empty if s["is_empty"]]
    assert len(empties) == 1 and empties[0]["is_trivial"]
    with np.load(empties[0]["voxel_path"]) as z:
        assert not z["voxels"].any()
    assert len(with_empty) == len(default) + 1


def test_level_filter(tiny_dataset):
    ds, rays = tiny_dataset
    only1 = build_index(ds, rays, "train", levels=[1])
    assert only1 and {s["level"] for s in only1} == {1}


def test_npz_member_header_matches(tiny_dataset):
    ds, rays = tiny_dataset
    s = build_index(ds, rays, "train")[0]
    shape, dtype = npz_member_header(s["ray_path"], "origins")
    assert shape == (s["num_rays"], 3) and dtype == np.float32
    shape, dtype = npz_member_header(s["voxel_path"], "voxels")
    assert len(shape) == 3 and dtype == np.bool_


def test_subdivision_map_fallback(tiny_copy):
    ds, rays = tiny_copy
    before = [(s["level"], s["hash"], s["object_ids"]) for s in build_index(ds, rays, "val")]
    sp = _splits(ds)
    del sp["hash_object_usage"]
    (ds / "splits.json").write_text(json.dumps(sp))
    after = [(s["level"], s["hash"], s["object_ids"]) for s in build_index(ds, rays, "val")]
    assert after == before


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["metadata.json", "splits.json"])
def test_missing_json_names_path(tiny_copy, name):
    ds, rays = tiny_copy
    (ds / name).unlink()
    with pytest.raises(DatasetLayoutError) as err:
        build_index(ds, rays, "train")
    assert str(ds / name) in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_wrong_dirs_name_the_path(tiny_dataset, tmp_path):
    ds, rays = tiny_dataset
    with pytest.raises(DatasetLayoutError, match=str(tmp_path / "nope")):
        build_index(tmp_path / "nope", rays)
    with pytest.raises(DatasetLayoutError, match=str(tmp_path / "nope")):
        build_index(ds, tmp_path / "nope")
    with pytest.raises(NoSamplesError, match="no \\*_rays.npz"):
        build_index(ds, tmp_path)


def test_missing_voxel_file_names_both(tiny_copy):
    ds, rays = tiny_copy
    s = next(s for s in build_index(ds, rays, "train") if s["level"] == 1)
    s["voxel_path"].unlink()
    with pytest.raises(DatasetLayoutError) as err:
        build_index(ds, rays, "train")
    assert str(s["voxel_path"]) in str(err.value)
    assert str(s["ray_path"]) in str(err.value)


def test_missing_level0_voxels_names_both(tiny_copy):
    ds, rays = tiny_copy
    layout.level0_voxel_path(ds, "0000").unlink()
    with pytest.raises(DatasetLayoutError) as err:
        build_index(ds, rays, "train")
    assert "object_0000/level_0.npz" in str(err.value)
    assert "0000_rays.npz" in str(err.value)


def test_no_samples_says_which_filter(tiny_dataset):
    ds, rays = tiny_dataset
    with pytest.raises(NoSamplesError) as err:
        build_index(ds, rays, "train", levels=[7])
    msg = str(err.value)
    assert "split 'train' had" in msg and "level filter levels=[7] left 0" in msg
    assert "levels present: [0, 1]" in msg
    # only the fix that helps: the levels the split has, not include_empty
    assert "choose levels among those split 'train' has: [0, 1]" in msg
    assert "include_empty" not in msg


def test_strict_test_level1_keeps_own_and_trivial(tiny_dataset):
    ds, rays = tiny_dataset
    sp = _splits(ds)
    kept = build_index(ds, rays, "test", levels=[1], isolation="strict")
    for s in kept:
        assert s["is_trivial"] or set(sp["hash_object_usage"][s["hash"]].values()) <= {
            "val",
            "test",
        }


def _all_train(ds: Path, trivial: list[str]) -> None:
    sp = _splits(ds)
    sp["object_splits"] = {k: "train" for k in sp["object_splits"]}
    sp["hash_object_usage"] = {
        h: {o: "train" for o in users} for h, users in sp["hash_object_usage"].items()
    }
    sp["trivial_hashes"] = trivial
    (ds / "splits.json").write_text(json.dumps(sp))


def test_no_samples_empty_filter(tiny_copy):
    ds, rays = tiny_copy
    empty = next(s for s in build_index(ds, rays, "train", include_empty=True) if s["is_empty"])
    _all_train(ds, [empty["hash"]])
    assert [s["hash"] for s in build_index(ds, rays, "test", include_empty=True)] == [empty["hash"]]
    with pytest.raises(NoSamplesError) as err:
        build_index(ds, rays, "test")
    msg = str(err.value)
    assert "split 'test' had 1" in msg and "empty filter (include_empty=False) left 0" in msg
    assert "pass include_empty=True" in msg and "choose levels" not in msg


def test_no_samples_for_split_without_objects(tiny_copy):
    ds, rays = tiny_copy
    _all_train(ds, [])
    with pytest.raises(NoSamplesError, match="split 'test' had 0") as err:
        build_index(ds, rays, "test")
    assert "splits.json" in str(err.value)


def test_damaged_ray_file_named(tiny_copy):
    ds, rays = tiny_copy
    s = build_index(ds, rays, "train")[3]
    s["ray_path"].write_bytes(b"not a zip file at all")
    with pytest.raises(DamagedFileError, match=str(s["ray_path"])):
        build_index(ds, rays, "train")


def test_damaged_json_named(tiny_copy):
    ds, rays = tiny_copy
    (ds / "splits.json").write_text("{ not json")
    with pytest.raises(DamagedFileError, match="splits.json"):
        build_index(ds, rays, "train")


def test_bad_arguments(tiny_dataset):
    ds, rays = tiny_dataset
    with pytest.raises(ValueError, match="split"):
        build_index(ds, rays, "training")
    with pytest.raises(ValueError, match="isolation"):
        build_index(ds, rays, "val", isolation="paranoid")


def _full_hash(ds: Path) -> str:
    """Hash of the tiny dataset's all-full level-1 block ``F``."""
    for p in sorted((ds / "subvolumes" / "level_1").glob("*/*.npz")):
        with np.load(p) as z:
            if z["voxels"].all():
                return p.stem
    raise AssertionError("the tiny dataset has no all-full block")


def test_trivial_hashes_hold_only_empty_grids(tiny_dataset):
    """As upstream's pipeline: the all-empty block is trivial, the all-full one is not."""
    ds, rays = tiny_dataset
    sp = _splits(ds)
    full = _full_hash(ds)
    assert full not in sp["trivial_hashes"]
    (empty,) = sp["trivial_hashes"]
    for split in ("train", "val", "test"):
        by_hash = {s["hash"]: s for s in build_index(ds, rays, split, include_empty=True)}
        assert by_hash[empty]["is_trivial"] and by_hash[empty]["is_empty"]
        want = split in sp["hash_object_usage"][full].values()
        assert (full in by_hash) == want
        if want:
            assert not by_hash[full]["is_trivial"]


def test_listed_all_full_hash_is_an_ordinary_sample(tiny_copy):
    """A dataset that lists an all-full grid as trivial (older gpuloader output): the grid is
    still a sample of its users' splits only, and strict isolation treats it as shared."""
    ds, rays = tiny_copy
    full = _full_hash(ds)
    sp = _splits(ds)
    users = {o: s for o, s in sp["hash_object_usage"][full].items() if s == "train"}
    sp["hash_object_usage"][full] = users  # used by train objects only
    sp["trivial_hashes"] = sorted([*sp["trivial_hashes"], full])
    (ds / "splits.json").write_text(json.dumps(sp))
    train = {s["hash"]: s for s in build_index(ds, rays, "train")}
    assert full in train and not train[full]["is_trivial"]
    for split in ("val", "test"):
        assert full not in {s["hash"] for s in build_index(ds, rays, split)}


@pytest.mark.parametrize("exc", [SystemError("AST constructor"), RecursionError(), TypeError()])
def test_any_decoder_failure_is_the_named_error(tmp_path, monkeypatch, exc):
    """A damaged ``.npy`` header can make CPython's parser fail in odd ways (CI met a
    ``SystemError`` from ``ast.literal_eval``): every one is the named error, naming the file."""
    from gpuloader.errors import CorruptArchiveError
    from gpuloader.format.npz_files import load_npz

    path = tmp_path / "x_rays.npz"
    np.savez_compressed(path, origins=np.zeros((4, 3), np.float32))

    class Failing:
        files = ["origins"]

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def __getitem__(self, key):
            raise exc

    monkeypatch.setattr(np, "load", lambda *a, **k: Failing())
    with pytest.raises(CorruptArchiveError, match=str(path)):
        load_npz(path, ("origins",))
