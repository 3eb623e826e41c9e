"""Bad grids never reach a sample (issue 18 item 2): values other than 0/1 and sides other
than the level's are named errors naming the file under ``on_error='raise'`` and skipped
under ``'skip'``, on the dataset, the header estimate, the resident store fill and the
striped pack (which stores the grids); with ``check_grid_hash=True`` so is a grid whose
SHA-256 is not its name (another sub-volume's)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset, SkippedFileWarning
from gpuloader.errors import (
    BadGridError,
    BadVoxelValueError,
    GridHashError,
    InvalidValueError,
    WrongDtypeError,
    WrongGridSideError,
    WrongShapeError,
)
from gpuloader.format import validate
from gpuloader.reading.fill import fill_store
from gpuloader.reading.headers import estimate_layout, voxel_side
from gpuloader.stores.npz import level_side, read_voxel_file, voxel_file_side
from support.damage import first_line, same_sample


def _victim(dirs) -> tuple[HierarchicalVoxelRayDataset, dict]:
    clean = HierarchicalVoxelRayDataset(*dirs, "train", cache_size=0, seed=3)
    victim = clean.samples[-1]
    assert victim["level"] == 1
    return clean, victim


def _grid(path: Path) -> np.ndarray:
    with np.load(path) as z:
        return z["voxels"]


def _damage(kind: str, victim: dict) -> Path:
    """Rewrite the victim's voxel file (``nan``/``neg``/``tiny``: a float grid with that value
    where empty; ``side4``/``side16``: a bool grid of another side) or, ``ray_grid_shape``,
    its ray file's ``grid_shape``; returns the file."""
    vox, ray = Path(victim["voxel_path"]), Path(victim["ray_path"])
    if kind == "ray_grid_shape":
        with np.load(ray) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["grid_shape"] = np.array([16, 16, 16], np.int64)
        np.savez_compressed(ray, **arrays)
        return ray
    if kind.startswith("side"):
        np.savez_compressed(vox, voxels=np.ones((int(kind[4:]),) * 3, bool))
        return vox
    g = _grid(vox).astype(np.float32)
    g[g == 0] = {"nan": np.nan, "neg": -1.0, "tiny": 1e-30}[kind]
    np.savez_compressed(vox, voxels=g)
    return vox


KINDS = {
    "nan": BadVoxelValueError,
    "neg": BadVoxelValueError,
    "tiny": BadVoxelValueError,
    "side4": WrongGridSideError,
    "side16": WrongGridSideError,
    "ray_grid_shape": WrongGridSideError,
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_raise_names_the_file(tiny_copy, kind) -> None:
    clean, victim = _victim(tiny_copy)
    bad = _damage(kind, victim)
    ds = HierarchicalVoxelRayDataset(*tiny_copy, "train", cache_size=0, seed=3)
    i = len(ds) - 1
    assert ds.samples[i]["hash"] == victim["hash"]
    with pytest.raises(KINDS[kind]) as err:
        ds[i]
    assert first_line(err.value).startswith(str(bad))
    if kind.startswith("side"):  # the header estimate that sizes a store refuses it too
        with pytest.raises(WrongGridSideError) as err:
            estimate_layout(ds)
        assert first_line(err.value).startswith(str(bad))


@pytest.mark.parametrize("kind", ["nan", "side16", "ray_grid_shape"])
def test_skip_gives_every_other_sample(tiny_copy, kind) -> None:
    clean, victim = _victim(tiny_copy)
    bad = _damage(kind, victim)
    with pytest.warns(SkippedFileWarning, match=str(bad)):
        ds = HierarchicalVoxelRayDataset(*tiny_copy, "train", cache_size=0, seed=3, on_error="skip")
        got = [ds[i] for i in range(len(ds))]
    assert [f for f, _ in ds.errors] == [str(bad)]
    for i, sample in enumerate(got[:-1]):
        assert "skipped_from" not in sample and same_sample(sample, clean[i])
    assert got[-1]["skipped_from"] == len(ds) - 1 and got[-1]["hash"] != victim["hash"]


def test_fill_store_skips_a_wrong_side_grid(tiny_copy) -> None:
    """The header estimate marks it bad before the store is sized: no 16^3 grid is held."""
    _, victim = _victim(tiny_copy)
    bad = _damage("side16", victim)
    ds = HierarchicalVoxelRayDataset(*tiny_copy, "train", cache_size=0, on_error="skip")
    layout = estimate_layout(ds)
    i = len(ds) - 1
    assert set(layout.bad) == {i} and layout.side[i] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedFileWarning)
        store = fill_store(ds, "host", num_workers=0, progress=False)
    assert set(store.bad) == {i} and str(bad) in store.bad[i][1]
    assert int((store.layout.side**3).sum()) == sum(
        8**3 if s["level"] else 16**3 for s in ds.samples[:-1]
    )


@pytest.mark.parametrize("kind", ["side4", "side16", "ray_grid_shape"])
def test_striped_pack_refuses_another_side(tiny_copy, tmp_path, kind) -> None:
    """A striped pack stores the grids: one of another side than its level's (or rays traced
    for another grid) is refused when packing, named; under skip it is left out."""
    from gpuloader.stores.pack import pack_rays

    _, victim = _victim(tiny_copy)
    bad = _damage(kind, victim)
    kw = {"layout": "striped", "stripe_rays": 8, "dataset_dir": tiny_copy[0], "workers": 1}
    with pytest.raises(WrongGridSideError) as err:
        pack_rays(tiny_copy[1], tmp_path / "p", progress=False, **kw)
    assert first_line(err.value).startswith(str(bad))
    with pytest.warns(SkippedFileWarning, match=str(bad)):
        pack_rays(tiny_copy[1], tmp_path / "q", progress=False, on_error="skip", **kw)


def test_sides_come_from_the_metadata(tiny_dataset, tmp_path) -> None:
    ds, _ = tiny_dataset
    assert level_side(ds, 0) == 16 and level_side(ds, 1) == 8 and level_side(ds, 5) is None
    sample = HierarchicalVoxelRayDataset(*tiny_dataset, "train", cache_size=0).samples
    assert {voxel_file_side(s["voxel_path"]) for s in sample} == {16, 8}
    assert {voxel_side(s["voxel_path"]) for s in sample} == {16, 8}
    outside = tmp_path / "g.npz"
    np.savez_compressed(outside, voxels=np.zeros((32,) * 3, bool))
    assert voxel_file_side(outside) is None  # not in the layout: any power of two
    assert read_voxel_file(outside).shape == (32,) * 3
    with pytest.raises(WrongGridSideError, match="g.npz"):
        read_voxel_file(outside, expected_side=8)


@pytest.mark.parametrize(
    "values, ok",
    [
        (np.array([0, 1], np.float32), True),
        (np.array([0, 1], np.uint8), True),
        (np.array([0, 1], np.int64), True),
        (np.array([0, 1], bool), True),
        (np.array([0, np.nan], np.float64), False),
        (np.array([0, -1.0], np.float32), False),
        (np.array([0, 1e-30], np.float32), False),
        (np.array([0, 2], np.int16), False),
        (np.array([0, -1], np.int8), False),
        (np.array([0, 2], np.uint8).view(bool), False),  # a "True" byte that is not 1
    ],
)
def test_only_zero_and_one_are_voxels(values, ok) -> None:
    g = np.zeros((4, 4, 4), values.dtype)
    g.reshape(-1)[:2] = values
    if ok:
        assert validate.validate_voxels("g.npz", g).dtype == np.bool_
        assert not validate.voxel_problems("g.npz", g.astype(bool))
        return
    with pytest.raises(BadVoxelValueError) as err:
        validate.validate_voxels("g.npz", g)
    assert isinstance(err.value, InvalidValueError) and err.value.key == "voxels"
    assert "1 of 64 voxels" in first_line(err.value) and "(0, 0, 1)" in first_line(err.value)
    kinds = {type(p) for p in validate.voxel_problems("g.npz", g)}  # verify sees both
    assert BadVoxelValueError in kinds and (values.dtype == np.bool_ or WrongDtypeError in kinds)


def test_grid_header_checks_before_inflating() -> None:
    validate.check_grid_header("g.npz", (8, 8, 8), np.dtype(bool), 8)
    for shape, side, cls in [((16,) * 3, 8, WrongGridSideError), ((6,) * 3, None, BadGridError)]:
        with pytest.raises(cls, match="g.npz"):
            validate.check_grid_header("g.npz", shape, np.dtype(bool), side)
    with pytest.raises(WrongDtypeError):
        validate.check_grid_header("g.npz", (8,) * 3, np.dtype("U3"), 8)
    assert issubclass(WrongGridSideError, WrongShapeError)


def test_ray_grid_shape_forms() -> None:
    from gpuloader.stores.npz import check_grid_shape

    check_grid_shape("r.npz", np.array([8, 8, 8]), 8)
    check_grid_shape("r.npz", np.array(8), 8)  # one side
    check_grid_shape("r.npz", np.array([16, 16, 16]), None)  # level side unknown
    check_grid_shape("r.npz", np.array("16x16"), 8)  # not numbers: verify's to name
    for bad in ([16, 16, 16], [8, 8, 4], 4):
        with pytest.raises(WrongGridSideError, match="r.npz: 'grid_shape'"):
            check_grid_shape("r.npz", np.array(bad), 8)


def _swap_grid(dirs) -> tuple[HierarchicalVoxelRayDataset, dict, Path]:
    """The last train sample's voxel file rewritten with another level-1 sub-volume's grid
    (same side, valid values: only its hash tells)."""
    clean, victim = _victim(dirs)
    other = next(
        s for s in clean.samples
        if s["level"] == 1 and s["hash"] != victim["hash"]
        and not np.array_equal(_grid(s["voxel_path"]), _grid(victim["voxel_path"]))
    )  # fmt: skip
    bad = Path(victim["voxel_path"])
    np.savez_compressed(bad, voxels=_grid(other["voxel_path"]))
    return clean, victim, bad


def test_another_sub_volumes_grid_is_found_by_its_hash_when_asked(tiny_copy) -> None:
    """Item 2c: with ``check_grid_hash=True`` a grid under another sub-volume's hash raises
    GridHashError naming the file (or is skipped); without it the swap goes unseen, as
    nothing else can tell."""
    clean, victim, bad = _swap_grid(tiny_copy)
    plain = HierarchicalVoxelRayDataset(*tiny_copy, "train", cache_size=0, seed=3)
    assert plain[len(plain) - 1]["hash"] == victim["hash"]  # not checked: served
    ds = HierarchicalVoxelRayDataset(
        *tiny_copy, "train", cache_size=0, seed=3, check_grid_hash=True
    )
    for i in range(len(ds) - 1):  # every honest grid passes
        assert same_sample(ds[i], clean[i])
    with pytest.raises(GridHashError) as err:
        ds[len(ds) - 1]
    assert first_line(err.value).startswith(str(bad)) and victim["hash"] in first_line(err.value)
    with pytest.raises(GridHashError):  # the fill of a resident store reads through the view
        fill_store(ds, "host", num_workers=0, progress=False)
    with pytest.warns(SkippedFileWarning, match=str(bad)):
        skip = HierarchicalVoxelRayDataset(
            *tiny_copy, "train", cache_size=0, seed=3, on_error="skip", check_grid_hash=True
        )
        got = skip[len(skip) - 1]
    assert got["skipped_from"] == len(skip) - 1 and got["hash"] != victim["hash"]
    assert [f for f, _ in skip.errors] == [str(bad)]
