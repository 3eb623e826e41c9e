"""``pack_rays(..., on_error='skip')`` / ``gpuloader pack --on-error skip`` (issue 8).

Every ray-file case of the damaged corpus (tests/test_damaged.py): the pack leaves exactly
the bad file out and records it; its arrays are a clean pack's minus that file; the packed
store raises the recorded error for it (``bad`` lists it ahead of time); a dataset over the
pack replaces it under ``on_error='skip'`` and delivers every clean sample unchanged, and
names it under ``'raise'``; the CLI exits 0 and names it; repairing it makes the pack stale.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from gpuloader.commands.cli import main
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.errors import (
    DamagedFileError,
    NonFiniteValueError,
    PackError,
    SkippedFileWarning,
    StalePackError,
)
from gpuloader.format.validate import classify
from gpuloader.stores.pack import PackedRayStore, pack_rays, read_manifest
from support.damage import CASES, ROOT, damage
from support.damage import same_sample as _same

RAY_CASES = sorted(k for k, (what, _) in CASES.items() if what == "ray")
KEYS = ("origins", "directions", "distances", "hits", "face_ids", "view_ids", "view_positions")


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0]


def _key(s: dict) -> tuple[int, str]:
    return int(s["level"]), str(s["hash"])


@pytest.fixture(scope="module")
def clean(tiny_dataset, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(dataset, rays, pack) of a clean copy, packed once."""
    ds, rays = tiny_dataset
    pack = tmp_path_factory.mktemp("clean_pack") / "pack"
    pack_rays(rays, pack, progress=False, workers=1)
    return ds, rays, pack


@pytest.fixture(params=RAY_CASES)
def case(request, clean, tmp_path):
    """(kind, damaged dataset dir, damaged rays dir, the bad file, its (level, hash))."""
    kind = request.param
    if kind == "unreadable" and ROOT:
        pytest.skip("permissions do not apply to root")
    ds, rays, _ = clean
    dds = Path(shutil.copytree(ds, tmp_path / "dataset"))
    drays = Path(shutil.copytree(rays, tmp_path / "ray_dataset_hierarchical"))
    victim = HierarchicalVoxelRayDataset(dds, drays, "train", cache_size=0).samples[-1]
    bad = damage(kind, victim)
    yield kind, dds, drays, bad, _key(victim)
    if bad.exists() and not bad.is_symlink():
        os.chmod(bad, 0o644)


def _pack_skip(rays: Path, out: Path, bad: Path, workers: int = 1) -> dict:
    with pytest.warns(SkippedFileWarning, match=re.escape(str(bad))):
        return pack_rays(rays, out, progress=False, workers=workers, on_error="skip")


def _assert_pack_is_clean_minus(pack: Path, clean_pack: Path, left_out: set) -> None:
    """Every level array of ``pack`` equals ``clean_pack``'s without the ``left_out``
    samples' slices; every other sample reads the same."""
    got, want = PackedRayStore(pack, check="none"), PackedRayStore(clean_pack, check="none")
    for level in want.levels:
        wl = want.open_level(level)
        gl = got.open_level(level)
        hashes = sorted(wl.row, key=wl.row.get)
        kept = [h for h in hashes if (level, h) not in left_out]
        if gl is None:
            assert not kept
            continue
        assert sorted(gl.row, key=gl.row.get) == kept
        for k in KEYS:
            col = 2 if k == "view_positions" else 0
            parts = [
                wl.arrays[k][o[col] : o[col] + o[col + 1]]
                for o in wl.offsets[[wl.row[h] for h in kept]]
            ]
            np.testing.assert_array_equal(gl.arrays[k], np.concatenate(parts))
        for h in kept:
            s = {"level": level, "hash": h}
            a, b = got.read(s, None), want.read(s, None)
            assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in KEYS)


def _assert_raises_recorded(store: PackedRayStore, key: tuple, bad: Path, want: type) -> None:
    sample = {"level": key[0], "hash": key[1], "ray_path": str(bad)}
    for call in (lambda: store.read(sample, None), lambda: store.locate(sample)):
        with pytest.raises(want) as err:
            call()
        line = _first_line(err.value)
        assert line.startswith(f"{bad}: left out of ray pack") and want.__name__ in line
        assert classify(err.value) is not None  # a bad file, not a pack problem


# ------------------------------------------------------------------------------ the pack


def test_skip_pack_records_exactly_the_bad_file(case, clean, tmp_path) -> None:
    kind, _, rays, bad, key = case
    want = CASES[kind][1]
    pack = tmp_path / "pack"
    summary = _pack_skip(rays, pack, bad)
    rel = bad.relative_to(rays).as_posix()
    assert [b["file"] for b in summary["bad"]] == [str(bad)]
    manifest = read_manifest(pack)
    rec = manifest["bad_files"]
    assert list(rec) == [rel]
    assert (rec[rel]["level"], rec[rel]["hash"], rec[rel]["error"]) == (*key, want.__name__)
    assert str(bad) in rec[rel]["message"] and "\n" not in rec[rel]["message"]
    assert rel in manifest["files"]  # still a source file (staleness)
    assert manifest["totals"]["files"] == len(manifest["files"]) - 1

    store = PackedRayStore(pack)
    assert store.bad == {key: (str(bad), rec[rel]["message"])}
    _assert_pack_is_clean_minus(pack, clean[2], {key})
    _assert_raises_recorded(store, key, bad, want)
    again = pickle.loads(pickle.dumps(store))  # travels to worker processes
    assert again.bad == store.bad
    _assert_raises_recorded(again, key, bad, want)


def test_dataset_over_skip_pack(case, clean, tmp_path) -> None:
    kind, ds, rays, bad, key = case
    want = CASES[kind][1]
    pack = tmp_path / "pack"
    _pack_skip(rays, pack, bad)
    cds, crays, cpack = clean
    ref = HierarchicalVoxelRayDataset(
        cds, crays, "train", cache_size=0, seed=3, ray_store=PackedRayStore(cpack)
    )
    with pytest.warns(SkippedFileWarning, match=re.escape(str(bad))):
        dataset = HierarchicalVoxelRayDataset(
            ds, rays, "train", cache_size=0, seed=3, on_error="skip", ray_store=PackedRayStore(pack)
        )
        dataset.set_epoch(1)
        ref.set_epoch(1)
        got = [dataset[i] for i in range(len(dataset))]
    keys = [_key(s) for s in dataset.samples]
    rkeys = [_key(s) for s in ref.samples]
    assert [f for f, _ in dataset.errors] == [str(bad)]
    delivered = {}
    for k, sample in zip(keys, got, strict=True):
        if k == key:  # replaced by another clean sample, unchanged
            assert str(bad) in sample["skip_error"]
            rep = _key(sample)
            assert rep != key and _same(sample, ref[rkeys.index(rep)])
        else:
            assert "skipped_from" not in sample
            delivered[k] = sample
    for k in rkeys:
        if k != key:
            assert _same(delivered[k], ref[rkeys.index(k)])
    assert dataset.skipped == (1 if key in keys else 0)

    try:  # a file the index build cannot read stops it, naming the file
        strict = HierarchicalVoxelRayDataset(
            ds, rays, "train", cache_size=0, ray_store=PackedRayStore(pack)
        )
    except DamagedFileError as exc:
        assert isinstance(exc, want) and str(bad) in _first_line(exc)
        return
    with pytest.raises(want) as err:
        strict[[_key(s) for s in strict.samples].index(key)]
    assert _first_line(err.value).startswith(f"{bad}: left out of ray pack")


# ------------------------------------------------------------------------------ CLI, staleness


def test_cli_skip_then_raise_then_repair(case, clean, tmp_path, capsys) -> None:
    kind, _, rays, bad, key = case
    want = CASES[kind][1]
    pack = tmp_path / "pack"
    args = ["pack", str(rays), str(pack), "--quiet", "--workers", "1"]
    assert main([*args, "--on-error", "skip"]) == 0
    out, err = capsys.readouterr()
    assert f"1 bad files left out: {bad}" in out and str(bad) in err
    assert main([*args, "--on-error", "skip"]) == 0  # up to date, still says what is missing
    out, _ = capsys.readouterr()
    assert "up to date" in out and f"1 bad files left out: {bad}" in out
    assert main(args) == 2  # a raise run refuses a pack with gaps, naming the file
    _, err = capsys.readouterr()
    assert str(bad) in err.splitlines()[0] and want.__name__ in err.splitlines()[0]
    with pytest.raises(want) as exc:
        pack_rays(rays, pack, progress=False, workers=1)
    assert str(bad) in _first_line(exc.value)

    # repair: the clean file back in place -> stale, naming it
    rel = bad.relative_to(rays).as_posix()
    if bad.is_symlink():
        bad.unlink()
    else:
        os.chmod(bad, 0o644)
    shutil.copyfile(clean[1] / rel, bad)
    with pytest.raises(StalePackError, match=re.escape(rel)):
        PackedRayStore(pack)
    with pytest.raises(PackError, match=re.escape(rel)):
        pack_rays(rays, pack, progress=False, workers=1, on_error="skip")
    s = pack_rays(rays, pack, progress=False, workers=1, force=True)
    assert s["bad"] == [] and PackedRayStore(pack, check="full").bad == {}
    _assert_pack_is_clean_minus(pack, clean[2], set())


# ------------------------------------------------------------------------------ more


def test_several_bad_files_with_worker_processes(clean, tmp_path) -> None:
    """Bad files in both levels, inflated by 2 processes; a whole level left out."""
    ds, rays, cpack = clean
    drays = Path(shutil.copytree(rays, tmp_path / "rays"))
    files = sorted(drays.rglob("*_rays.npz"))
    level0 = [f for f in files if f.parts[-3] == "level_0"]
    victims = [*level0, *[f for f in files if f.parts[-3] == "level_1"][1:3]]
    for f in victims:
        d = dict(np.load(f))
        d["distances"][0] = np.nan
        np.savez_compressed(f, **d)
    with pytest.warns(SkippedFileWarning):
        s = pack_rays(drays, tmp_path / "pack", progress=False, workers=2, on_error="skip")
    assert sorted(b["file"] for b in s["bad"]) == [str(f) for f in victims]
    assert 0 not in s["levels"]
    store = PackedRayStore(tmp_path / "pack")
    assert store.levels == [1] and len(store.bad) == len(victims)
    left = {(int(f.parts[-3][6:]), f.name[: -len("_rays.npz")]) for f in victims}
    assert set(store.bad) == left
    _assert_pack_is_clean_minus(tmp_path / "pack", cpack, left)
    for k in left:
        _assert_raises_recorded(store, k, Path(store.bad[k][0]), NonFiniteValueError)


def test_skip_on_a_clean_tree_and_bad_arguments(clean, tmp_path) -> None:
    _, rays, cpack = clean
    s = pack_rays(rays, cpack, progress=False, on_error="skip")  # a raise pack: up to date
    assert s["up_to_date"] and s["bad"] == []
    with pytest.raises(ValueError, match="on_error"):
        pack_rays(rays, tmp_path / "p", progress=False, on_error="ignore")
    with pytest.raises(DamagedFileError, match="nothing to pack"):
        drays = Path(shutil.copytree(rays, tmp_path / "rays"))
        for f in drays.rglob("*_rays.npz"):
            f.write_bytes(b"not a zip")
        pack_rays(drays, tmp_path / "p", progress=False, workers=1, on_error="skip")
    assert not (tmp_path / "p").exists()
