"""The damaged-file corpus (tests/test_damaged.py) through GPURayLoader, every store and
back end, under both ``on_error`` policies (issue 8).

``raise``: the named error of the case, naming the file in its first line. ``skip``: the
loader's batches equal the CPU API's under ``on_error='skip'`` (DataLoader + RayBatchSampler
+ collate_ray_batch, which tests/test_damaged.py checks delivers every clean sample
unchanged), bit for bit, with the same ``skipped`` lists; ``loader.errors`` names the bad file
and one warning per epoch names it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset, SkippedFileWarning
from gpuloader.errors import DamagedFileError
from gpuloader.loading.loader import GPURayLoader
from gpuloader.reading.fill import fill_store
from gpuloader.reading.pipeline import dali_available
from gpuloader.stores.pack import PackedRayStore, pack_rays
from support.damage import CASES
from support.loading_helpers import assert_batches_equal, cpu_api, full_transform

RAYS, SPB, SEED = 64, 2, 3
#: (store, backend, workers) of GPURayLoader: every store and back end on the CPU
PATHS = {
    "host-direct": ("host", "torch", 2),  # workers write into a shared-memory store
    "host-reader": ("host", "torch", 0),  # the per-sample reader's batches, in this process
    "stream-torch": ("stream", "torch", 2),  # per-sample reads in DataLoader workers
    "stream-dali": ("stream", "dali", 1),  # per-sample reads in DALI workers
}
#: DALI's spawned workers cost seconds per loader: a few cases of each file kind suffice
DALI_CASES = {"nan_distance", "crc_damaged", "voxel_not_zip", "non_cubic_grid"}


def _dataset(dirs, on_error: str, ray_store=None) -> HierarchicalVoxelRayDataset:
    return HierarchicalVoxelRayDataset(
        dirs[0],
        dirs[1],
        "train",
        cache_size=0,
        seed=SEED,
        transform=full_transform(num_rays=40),
        on_error=on_error,
        ray_store=ray_store,
    )


def _loader(ds, store: str, backend: str, workers: int) -> GPURayLoader:
    return GPURayLoader(
        ds,
        rays_per_batch=RAYS,
        subvolumes_per_batch=SPB,
        seed=SEED,
        device="cpu",
        store=store,
        backend=backend,
        num_workers=workers,
        progress=False,
    )


def _path(kind: str, path: str) -> tuple[str, str, int]:
    store, backend, workers = PATHS[path]
    if backend == "dali" and (kind not in DALI_CASES or not dali_available()):
        pytest.skip("DALI: a subset of the cases (spawned workers cost seconds each)")
    return store, backend, workers


def _skips(batches: list[dict]) -> list:
    return [b.pop("skipped", []) for b in batches]


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0]


def _check_skip(loader: GPURayLoader, ds, bad, key, epochs=(0, 1)) -> None:
    """The loader's epochs equal the CPU API's under skip; the bad file is reported."""
    in_index = key in [(s["level"], s["hash"]) for s in ds.samples]
    for epoch in epochs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedFileWarning)
            want = cpu_api(ds, epoch, RAYS, SPB, seed=SEED)
        loader.set_epoch(epoch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = list(loader)
        gs, ws = _skips(got), _skips(want)
        assert gs == ws
        assert_batches_equal(got, want, nonempty=True)
        replaced = sum(len(s) for s in gs)
        assert all(str(bad) in line for s in gs for _, _, line in s)
        if in_index:
            assert replaced >= 1  # the victim is in every epoch
            mine = [w for w in caught if issubclass(w.category, SkippedFileWarning)]
            assert any(
                "GPURayLoader: epoch" in str(w.message) and str(bad) in str(w.message) for w in mine
            )
        for b in got:  # nothing bad reaches training
            assert np.isfinite(b["distances"].numpy()).all()
            assert np.isfinite(b["origins"].numpy()).all()
    if in_index:
        assert str(bad) in [f for f, _ in loader.errors]
        assert loader.skipped >= 1


@pytest.mark.filterwarnings("ignore::gpuloader.dataset.hierarchical.SkippedFileWarning")
@pytest.mark.parametrize("path", sorted(PATHS))
def test_loader_skip_equals_cpu_api(case, path) -> None:
    kind, _, dirs, bad, key = case
    store, backend, workers = _path(kind, path)
    ds = _dataset(dirs, "skip")
    with _loader(ds, store, backend, workers) as loader:
        _check_skip(loader, ds, bad, key)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_loader_raise_names_the_file(case, path) -> None:
    kind, _, dirs, bad, key = case
    store, backend, workers = _path(kind, path)
    want = CASES[kind][1]
    try:
        ds = _dataset(dirs, "raise")
    except DamagedFileError as exc:  # found by the index build already (test_damaged)
        assert isinstance(exc, want) and str(bad) in _first_line(exc)
        return
    with pytest.raises(DamagedFileError) as err:
        with _loader(ds, store, backend, workers) as loader:
            for epoch in (0, 1):
                loader.set_epoch(epoch)
                list(loader)
    assert isinstance(err.value, want), repr(err.value)
    assert str(bad) in _first_line(err.value)


@pytest.mark.filterwarnings("ignore::gpuloader.dataset.hierarchical.SkippedFileWarning")
@pytest.mark.parametrize("fill", ["torch-0", "dali-1"])
def test_filled_store_records_bad_files_and_is_shared(case, fill) -> None:
    """fill_store under skip records the bad sample instead of refusing (one warning naming
    the file); a loader over that store replaces it as the CPU API does. The fill's reader:
    in this process, or DALI workers (which mark a bad sample in its ``meta``)."""
    kind, _, dirs, bad, key = case
    backend, workers = fill.split("-")
    if backend == "dali" and (kind not in DALI_CASES or not dali_available()):
        pytest.skip("DALI: a subset of the cases (spawned workers cost seconds each)")
    ds = _dataset(dirs, "skip")
    keys = [(s["level"], s["hash"]) for s in ds.samples]
    with pytest.warns(SkippedFileWarning, match="store left out") if key in keys else _nothing():
        store = fill_store(ds, "host", num_workers=int(workers), backend=backend, progress=False)
    if key not in keys:
        assert store.bad == {}
        return
    i = keys.index(key)
    assert set(store.bad) == {i} and str(bad) in store.bad[i][1]
    with pytest.raises(DamagedFileError):
        fill_store(ds, "host", num_workers=0, progress=False, on_error="raise")
    with _loader(ds, store, "torch", 0) as loader:
        _check_skip(loader, ds, bad, key, epochs=(2,))
    with pytest.raises(DamagedFileError) as err:  # no data for it: never served under raise
        GPURayLoader(ds, RAYS, SPB, seed=SEED, device="cpu", store=store, on_error="raise")
    assert str(bad) in _first_line(err.value) and "left out of the store" in str(err.value)


@pytest.mark.filterwarnings("ignore::gpuloader.dataset.hierarchical.SkippedFileWarning")
def test_pack_stream_skip_equals_cpu_api(case, tmp_path) -> None:
    """A pack built with on_error='skip' leaves the bad ray file out; the loader streaming
    whole batches from it replaces that sample as the CPU API over the pack does."""
    kind, _, dirs, bad, key = case
    if CASES[kind][0] != "ray":
        pytest.skip("voxel files are not packed")
    try:
        pack_rays(dirs[1], tmp_path / "pack", progress=False, workers=1, on_error="skip")
    except TypeError:
        pytest.skip("pack_rays has no on_error yet")
    ds = _dataset(dirs, "skip", ray_store=PackedRayStore(tmp_path / "pack"))
    for backend, workers in (("torch", 0), ("torch", 2)):
        with _loader(ds, "stream", backend, workers) as loader:
            assert "whole batches from the pack" in loader.store_reason
            _check_skip(loader, ds, bad, key)


def _cloned(batch: dict) -> dict:
    def one(v):
        if isinstance(v, list):
            return [one(x) for x in v]
        return v.clone() if hasattr(v, "clone") else v

    return {k: one(v) for k, v in batch.items()}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore::gpuloader.dataset.hierarchical.SkippedFileWarning")
@pytest.mark.parametrize("store", ["gpu", "stream"])
def test_cuda_skip_equals_the_cpu_fallback(case, store, tmp_path) -> None:
    """On a GPU: the GPU store (fill by DALI, CUDA fused kernels) and the pack stream
    (CUDA fused pass) under skip give the CPU fallback's batches and skipped lists
    (integers exactly, floats within 1e-5: ``support.gpu_helpers.assert_close``)."""
    from gpuloader.loading.setup import cuda_usable

    if not cuda_usable():
        pytest.skip("needs a CUDA GPU with CuPy")
    from support.gpu_helpers import assert_close

    kind, _, dirs, bad, key = case
    ray_store = None
    if store == "stream":
        if CASES[kind][0] != "ray":
            pytest.skip("voxel files are not packed")
        pack_rays(dirs[1], tmp_path / "pack", progress=False, workers=1, on_error="skip")
        ray_store = PackedRayStore(tmp_path / "pack")
    ds = _dataset(dirs, "skip", ray_store=ray_store)
    for epoch in (0, 1):
        with _loader(ds, "host", "torch", 0) as cpu:
            cpu.set_epoch(epoch)
            want = list(cpu)
        args = dict(rays_per_batch=RAYS, subvolumes_per_batch=SPB, seed=SEED, progress=False)
        with GPURayLoader(ds, device="cuda", store=store, num_workers=1, **args) as gpu:
            gpu.set_epoch(epoch)
            got = [_cloned(b) for b in gpu]  # the GPU store's ring reuses its tensors
        assert _skips(got) == _skips(want)
        assert_close(got, want)
