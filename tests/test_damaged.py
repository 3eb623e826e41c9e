"""A corpus of damaged copies of the tiny dataset, through every CPU path (issue 8).

Each case damages one file of one train sample (:func:`damage`); every case runs through
the dataset, a DataLoader with worker processes, ``verify`` and ``pack`` under
``on_error='raise'`` (a named error that names the file in its first line) and through the
dataset and a DataLoader under ``on_error='skip'`` (every clean sample delivered unchanged,
the bad one replaced and reported).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gpuloader.commands.verify import verify_dataset
from gpuloader.errors import (
    BadDirectionError,
    BadGridError,
    CorruptArchiveError,
    DamagedFileError,
    EmptyRayFileError,
    FileCheckError,
    MissingKeyError,
    NonFiniteValueError,
    NotAnNpzError,
    PickledArrayError,
    UnreadableFileError,
)
from gpuloader.format import validate
from gpuloader.loading.collate import collate_ray_batch
from gpuloader.loading.dataset import HierarchicalVoxelRayDataset, SkippedFileWarning
from gpuloader.loading.sampler import RayBatchSampler
from gpuloader.stores.packed import pack_rays

try:
    from tests._tiny_dataset import tiny_dataset  # noqa: F401
except ImportError:
    from _tiny_dataset import tiny_dataset  # noqa: F401

ROOT = os.geteuid() == 0
#: damage -> (the file it damages, the error it must raise)
CASES: dict[str, tuple[str, type[DamagedFileError]]] = {
    "nan_distance": ("ray", NonFiniteValueError),
    "inf_distance": ("ray", NonFiniteValueError),
    "zero_direction": ("ray", BadDirectionError),
    "zero_rays": ("ray", EmptyRayFileError),
    "non_cubic_grid": ("voxel", BadGridError),
    "crc_damaged": ("ray", CorruptArchiveError),
    "voxel_not_zip": ("voxel", NotAnNpzError),
    "missing_distances": ("ray", MissingKeyError),
    "pickled_array": ("ray", PickledArrayError),
    "bare_npy_voxels": ("voxel", NotAnNpzError),
    "symlink_loop": ("ray", UnreadableFileError),
    "unreadable": ("ray", UnreadableFileError),
}
BAD_ROW = 3


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def damage(kind: str, sample: dict) -> Path:
    """Damage one file of ``sample`` in place (a copy of the data); returns the file."""
    ray, vox = Path(sample["ray_path"]), Path(sample["voxel_path"])
    if kind in ("nan_distance", "inf_distance", "zero_direction", "missing_distances"):
        a = _arrays(ray)
        if kind == "missing_distances":
            del a["distances"]
        elif kind == "zero_direction":
            a["directions"][BAD_ROW] = 0.0
        else:
            a["distances"][BAD_ROW] = np.nan if kind == "nan_distance" else np.inf
        np.savez_compressed(ray, **a)
        return ray
    if kind == "zero_rays":
        a = _arrays(ray)
        for k in ("origins", "directions", "distances", "hits", "face_ids", "view_ids"):
            a[k] = a[k][:0]
        np.savez_compressed(ray, **a)
        return ray
    if kind == "pickled_array":
        a = _arrays(ray)
        a["distances"] = np.array(list(a["distances"]), dtype=object)
        np.savez_compressed(ray, **a)
        return ray
    if kind == "crc_damaged":
        data = bytearray(ray.read_bytes())
        with np.load(ray) as z:  # flip bytes inside the compressed 'distances' member
            info = z.zip.getinfo("distances.npy")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
        for off in range(8, min(info.compress_size, 40)):
            data[start + off] ^= 0x5A
        ray.write_bytes(bytes(data))
        return ray
    if kind == "symlink_loop":
        ray.unlink()
        os.symlink(ray.name, ray)  # a link to itself
        return ray
    if kind == "unreadable":
        os.chmod(ray, 0)
        return ray
    if kind == "non_cubic_grid":
        g = _arrays(vox)["voxels"]
        np.savez_compressed(vox, voxels=g[:, :, : g.shape[2] // 2])
        return vox
    if kind == "voxel_not_zip":
        vox.write_bytes(b"this is not a zip archive\n")
        return vox
    if kind == "bare_npy_voxels":
        g = _arrays(vox)["voxels"]
        with open(vox, "wb") as f:
            np.save(f, g)
        return vox
    raise ValueError(kind)


@pytest.fixture(params=sorted(CASES))
def case(request, tiny_dataset, tmp_path):
    """(kind, clean dirs, damaged dirs, the damaged file, the bad sample's (level, hash))."""
    kind = request.param
    if kind == "unreadable" and ROOT:
        pytest.skip("permissions do not apply to root")
    ds, rays = tiny_dataset
    cds = Path(shutil.copytree(ds, tmp_path / "dataset"))
    crays = Path(shutil.copytree(rays, tmp_path / "ray_dataset_hierarchical"))
    clean = HierarchicalVoxelRayDataset(cds, crays, "train", cache_size=0)
    victim = clean.samples[-1]  # a level-1 sample
    bad = damage(kind, victim)
    yield kind, (ds, rays), (cds, crays), bad, (victim["level"], victim["hash"])
    if bad.exists() and not bad.is_symlink():
        os.chmod(bad, 0o644)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0]


def _same(a: dict, b: dict) -> bool:
    keys = set(a) - {"skipped_from", "skip_error"}
    return all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in keys
    )


# ------------------------------------------------------------------------------ raise


def test_raise_names_the_file_dataset_and_workers(case) -> None:
    kind, _, (ds, rays), bad, key = case
    want = CASES[kind][1]
    try:  # a file damaged before indexing may already stop the index build
        dataset = HierarchicalVoxelRayDataset(ds, rays, "train", cache_size=0)
    except DamagedFileError as exc:
        assert isinstance(exc, want) and str(bad) in _first_line(exc)
        return
    i = [(s["level"], s["hash"]) for s in dataset.samples].index(key)
    with pytest.raises(want) as err:
        dataset[i]
    assert str(bad) in _first_line(err.value)
    if isinstance(err.value, (NonFiniteValueError, BadDirectionError)):
        assert f"row {BAD_ROW}" in _first_line(err.value)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_ray_batch)
    with pytest.raises(want) as err:
        list(loader)
    assert str(bad) in _first_line(err.value)  # first line, also from a worker


def test_raise_names_the_file_verify_and_pack(case, tmp_path) -> None:
    kind, _, (ds, rays), bad, _ = case
    report = verify_dataset(ds, rays, fraction=0.05, progress=False)
    assert str(bad) in {p.file for p in report.problems}, report.format()
    if kind in ("symlink_loop", "unreadable"):
        msgs = [p.message for p in report.problems if p.file == str(bad)]
        assert any(w in " ".join(msgs) for w in ("symlink loop", "permission denied"))
        assert not any("damaged" in m for m in msgs)
    if CASES[kind][0] == "ray":
        with pytest.raises(DamagedFileError) as err:
            pack_rays(rays, tmp_path / "pack", progress=False, workers=1)
        assert str(bad) in _first_line(err.value)
        assert not (tmp_path / "pack").exists()


# ------------------------------------------------------------------------------ skip


def test_skip_delivers_every_clean_sample_unchanged(case) -> None:
    kind, (cds, crays), (ds, rays), bad, key = case
    clean = HierarchicalVoxelRayDataset(cds, crays, "train", cache_size=0, seed=3)
    with pytest.warns(SkippedFileWarning, match=str(bad)):
        dataset = HierarchicalVoxelRayDataset(
            ds, rays, "train", cache_size=0, seed=3, on_error="skip"
        )
        dataset.set_epoch(1)
        clean.set_epoch(1)
        got = [dataset[i] for i in range(len(dataset))]
    keys = [(s["level"], s["hash"]) for s in dataset.samples]
    ckeys = [(s["level"], s["hash"]) for s in clean.samples]
    assert [f for f, _ in dataset.errors] == [str(bad)]
    delivered = {}
    for k, sample in zip(keys, got, strict=True):
        if k == key:
            j = sample["skipped_from"]
            assert keys[j] == key and str(bad) in sample["skip_error"]
            rep = (sample["level"], sample["hash"])
            assert rep != key and _same(sample, clean[ckeys.index(rep)])
            assert len(sample["distances"]) == clean.available_rays(ckeys.index(key))
        else:
            assert "skipped_from" not in sample
            delivered[k] = sample
    for k in ckeys:  # every clean sample, unchanged
        if k != key:
            assert _same(delivered[k], clean[ckeys.index(k)])
    assert dataset.skipped == (1 if key in keys else 0)


@pytest.mark.filterwarnings("ignore::gpuloader.loading.dataset.SkippedFileWarning")
def test_skip_is_reproducible_and_reported_through_workers(case) -> None:
    kind, _, (ds, rays), bad, key = case
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train", cache_size=0, on_error="skip")
    runs = []
    for workers in (0, 2):
        sampler = RayBatchSampler(dataset, subvolumes_per_batch=2, rays_per_batch=64, seed=5)
        sampler.set_epoch(2)
        loader = DataLoader(
            dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_ray_batch
        )
        runs.append(list(loader))
    one, two = runs
    assert len(one) == len(two) == len(sampler)
    for a, b in zip(one, two, strict=True):
        assert a["hashes"] == b["hashes"] and torch.equal(a["distances"], b["distances"])
        assert a.get("skipped") == b.get("skipped")
        assert int(a["num_rays"].sum()) == 64
    skipped = [s for batch in two for s in batch.get("skipped", [])]
    in_index = key in [(s["level"], s["hash"]) for s in dataset.samples]
    assert len(skipped) == (1 if in_index else 0)
    assert all(str(bad) in err for _, _, err in skipped)


# ------------------------------------------------------------------------------ units


def test_validate_rays_names_key_and_first_bad_row() -> None:
    n = 10
    a = {
        "origins": np.zeros((n, 3), np.float32),
        "directions": np.tile(np.float32([0, 0, 1]), (n, 1)),
        "distances": np.zeros(n, np.float32),
        "hits": np.zeros(n, np.uint8),
        "face_ids": np.zeros(n, np.int32),
        "view_ids": np.zeros(n, np.int32),
        "view_positions": np.zeros((2, 3), np.float32),
    }
    assert validate.validate_rays("f.npz", a) == n
    for key, row, value, err in (
        ("distances", 4, -1.0, "NegativeDistanceError"),
        ("hits", 6, 1, "HitsMismatchError"),
        ("directions", 2, [0, 0, 1.01], "BadDirectionError"),
        ("face_ids", 7, 6, "OutOfRangeError"),
        ("view_ids", 1, 2, "OutOfRangeError"),
    ):
        b = {k: v.copy() for k, v in a.items()}
        b[key][row] = value
        with pytest.raises(FileCheckError) as exc:
            validate.validate_rays("f.npz", b)
        assert type(exc.value).__name__ == err
        assert _first_line(exc.value).startswith(f"f.npz: {key!r} row {row}: ")
        assert (exc.value.key, exc.value.row) == (key, row)
        assert validate.classify(exc.value) == "invalid"
    b = dict(a, directions=a["directions"] * (1 + 0.9 * validate.UNIT_TOL))
    validate.validate_rays("f.npz", b)  # within the documented tolerance
    with pytest.raises(BadGridError, match="power of two"):
        validate.validate_voxels("g.npz", np.zeros((6, 6, 6), bool))
    assert validate.classify(ValueError("x")) is None


def test_resident_fill_check_names_the_sample_file() -> None:
    arrays = {"distances": np.zeros(7, np.float32), "hits": np.zeros(7, np.uint8)}
    arrays["distances"][5] = np.nan
    with pytest.raises(NonFiniteValueError) as exc:
        validate.check_ray_batch(arrays, ["a.npz", "b.npz"], [4, 3])
    assert _first_line(exc.value).startswith("b.npz: 'distances' row 1: ")
