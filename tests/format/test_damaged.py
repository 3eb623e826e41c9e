"""A corpus of damaged copies of the tiny dataset, through every CPU path (issue 8).

Each case damages one file of one train sample (:func:`damage`); every case runs through
the dataset, a DataLoader with worker processes, ``verify`` and ``pack`` under
``on_error='raise'`` (a named error that names the file in its first line) and through the
dataset and a DataLoader under ``on_error='skip'`` (every clean sample delivered unchanged,
the bad one replaced and reported).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gpuloader.commands.verify import verify_dataset
from gpuloader.dataset.collate import collate_ray_batch
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset, SkippedFileWarning
from gpuloader.errors import (
    BadDirectionError,
    BadGridError,
    DamagedFileError,
    FileCheckError,
    NonFiniteValueError,
)
from gpuloader.format import validate
from gpuloader.plan.sampler import RayBatchSampler
from gpuloader.stores.pack import pack_rays
from support.damage import BAD_ROW, CASES, first_line, same_sample
from support.tiny_dataset import blank_rays


def test_raise_names_the_file_dataset_and_workers(case) -> None:
    kind, _, (ds, rays), bad, key = case
    want = CASES[kind][1]
    try:  # a file damaged before indexing may already stop the index build
        dataset = HierarchicalVoxelRayDataset(ds, rays, "train", cache_size=0)
    except DamagedFileError as exc:
        assert isinstance(exc, want) and str(bad) in first_line(exc)
        return
    i = [(s["level"], s["hash"]) for s in dataset.samples].index(key)
    with pytest.raises(want) as err:
        dataset[i]
    assert str(bad) in first_line(err.value)
    if isinstance(err.value, (NonFiniteValueError, BadDirectionError)):
        assert f"row {BAD_ROW}" in first_line(err.value)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_ray_batch)
    with pytest.raises(want) as err:
        list(loader)
    assert str(bad) in first_line(err.value)  # first line, also from a worker


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
        assert str(bad) in first_line(err.value)
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
            assert rep != key and same_sample(sample, clean[ckeys.index(rep)])
            assert len(sample["distances"]) == clean.available_rays(ckeys.index(key))
        else:
            assert "skipped_from" not in sample
            delivered[k] = sample
    for k in ckeys:  # every clean sample, unchanged
        if k != key:
            assert same_sample(delivered[k], clean[ckeys.index(k)])
    assert dataset.skipped == (1 if key in keys else 0)


@pytest.mark.filterwarnings("ignore::gpuloader.dataset.hierarchical.SkippedFileWarning")
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
    a = blank_rays(n, views=2)
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
        assert first_line(exc.value).startswith(f"f.npz: {key!r} row {row}: ")
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
    assert first_line(exc.value).startswith("b.npz: 'distances' row 1: ")
