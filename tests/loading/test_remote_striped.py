"""A striped pack on object storage (a local S3 server, moto): ``gpuloader pack RAY_DIR
s3://...``, the striped store reading it bit for bit as the same pack on disk, the stripe
cache, a pack replaced on the store, and two nodes under torchrun reading their ranges."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from gpuloader import GPURayLoader, HierarchicalVoxelRayDataset, PackedRayStore
from gpuloader.augment import transforms as T
from gpuloader.commands.cli import main
from gpuloader.errors import IncompletePackError, StalePackError
from gpuloader.stores.pack import pack_rays
from support.multinode_launch import check_ranks_cover_the_split, launch_nodes

W = 64
pytest.importorskip("s3fs", reason="the s3 extra (fsspec + s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] is not installed (the dev extra)")

from support.s3_server import FaultProxy, start_s3_server  # noqa: E402


@pytest.fixture(scope="module")
def s3():
    server = start_s3_server("gpuloader-loading")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def uploaded(s3, tiny_dataset, tmp_path_factory):
    """The tiny dataset's striped pack uploaded by the command, and the same pack on disk."""
    ds, rays = tiny_dataset
    url = s3.url("tiny/striped")
    opts = json.dumps(s3.storage_options)
    staging = tmp_path_factory.mktemp("staging")
    argv = ["pack", str(rays), url, "--stripe-rays", str(W), "--seed", "3", "--quiet"]
    assert main([*argv, "--storage-options", opts, "--staging", str(staging)]) == 0
    assert list(staging.iterdir()) == []  # the staging copy is gone
    local = tmp_path_factory.mktemp("local") / "striped"
    pack_rays(rays, local, layout="striped", stripe_rays=W, seed=3, progress=False, workers=1)
    return url, local


def _loader(ds, rays, store, **kw) -> GPURayLoader:
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train", ray_store=store, seed=2)
    tf = T.Compose([T.RandomFlip(), T.RandomRotation90(), T.RandomRaySubsample(num_rays=W)])
    return GPURayLoader(
        dataset, rays_per_batch=200, subvolumes_per_batch=4, transform=tf, store="striped", **kw
    )


def _epochs(loader: GPURayLoader, epochs=(0, 1)) -> list[dict]:
    out = []
    for e in epochs:
        loader.set_epoch(e)
        out.extend({k: v for k, v in b.items()} for b in loader)
    return out


def _eq(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_eq(a, b) for a, b in zip(x, y, strict=True))
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_eq(x[k], y[k]) for k in x)
    return x == y


def _same(a: list[dict], b: list[dict]) -> None:
    """Batch for batch, key for key, bit for bit."""
    assert len(a) == len(b) and a
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert _eq(x[k], y[k]), k


def test_the_command_says_up_to_date_and_refuses_other_options(s3, tiny_dataset, uploaded, capsys):
    ds, rays = tiny_dataset
    url, _ = uploaded
    opts = json.dumps(s3.storage_options)
    base = ["pack", str(rays), url, "--seed", "3", "--quiet", "--storage-options", opts]
    capsys.readouterr()
    assert main([*base, "--stripe-rays", str(W)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main([*base, "--stripe-rays", "32"]) == 2
    err = capsys.readouterr().err
    assert url in err and "does not match" in err and "--force" in err
    assert main([*base, "--layout", "rows"]) == 2
    assert "striped packs only" in capsys.readouterr().err


def test_striped_epochs_from_s3_equal_the_pack_on_disk(s3, tiny_dataset, uploaded):
    ds, rays = tiny_dataset
    url, local = uploaded
    remote = PackedRayStore(url, storage_options=s3.storage_options)
    assert remote.layout == "striped" and remote.check == "none"
    _same(_epochs(_loader(ds, rays, remote)), _epochs(_loader(ds, rays, PackedRayStore(local))))
    # the CPU API over the remote pack (rows fetched as byte spans of the stripes)
    a = HierarchicalVoxelRayDataset(ds, rays, "train", ray_store=remote, seed=2)
    b = HierarchicalVoxelRayDataset(ds, rays, "train", ray_store=PackedRayStore(local), seed=2)
    for i in (0, len(a) - 1):
        for k in ("origins", "distances", "view_ids", "view_positions"):
            assert np.array_equal(a[i][k], b[i][k]), k


def test_the_stripe_cache_serves_the_second_pass(s3, tiny_dataset, uploaded, tmp_path):
    ds, rays = tiny_dataset
    url, local = uploaded
    proxy = FaultProxy(s3.endpoint_url)
    try:
        store = PackedRayStore(
            url,
            storage_options=proxy.storage_options,
            cache_dir=tmp_path / "cache",
            cache_bytes=64 << 20,
        )
        # all S stripes once (the read-ahead of epoch S is stripe 0 again: cached)
        stripes = store.striped_level(store.levels[0]).stripes

        def stripe_gets() -> int:
            return sum(m == "GET" and "/stripe_" in p for m, p, _ in proxy.requests)

        first = _epochs(_loader(ds, rays, store), range(stripes))
        fetched = stripe_gets()
        assert fetched >= 2 * stripes  # two levels
        again = _epochs(_loader(ds, rays, store), (0, 1))
        assert stripe_gets() == fetched  # every stripe span from the cache
        _same(first[: len(again)], again)
        _same(again, _epochs(_loader(ds, rays, PackedRayStore(local)), (0, 1)))
    finally:
        proxy.stop()


def test_a_pack_replaced_on_the_store_is_refused(s3, tiny_dataset, tmp_path):
    ds, rays = tiny_dataset
    url = s3.url("tiny/replaced")
    opts = s3.storage_options
    argv = ["pack", str(rays), url, "--stripe-rays", str(W), "--quiet"]
    assert main([*argv, "--storage-options", json.dumps(opts)]) == 0
    loader = _loader(ds, rays, PackedRayStore(url, storage_options=opts))
    next(iter(loader))
    assert main([*argv, "--seed", "9", "--force", "--storage-options", json.dumps(opts)]) == 0
    with pytest.raises(StalePackError, match=url):
        _epochs(loader, (1, 2))


def test_no_pack_there_is_named(s3):
    with pytest.raises(IncompletePackError, match="no manifest.json"):
        PackedRayStore(s3.url("nothing/here"), storage_options=s3.storage_options)
    with pytest.raises(ValueError, match="cache_bytes"):
        PackedRayStore(s3.url("x"), storage_options=s3.storage_options, cache_dir="/tmp/c")


@pytest.mark.slow
def test_two_nodes_read_their_ranges_from_s3(s3, tiny_dataset, uploaded, tmp_path):
    ds, rays = tiny_dataset
    url, _ = uploaded
    env = {"GPULOADER_TEST_STORAGE_OPTIONS": json.dumps(s3.storage_options)}
    results = launch_nodes(ds, url, tmp_path / "run", env=env)
    assert {r["store"] for r in results} == {"striped"}
    check_ranks_cover_the_split(HierarchicalVoxelRayDataset(ds, rays, "train"), results)
    # stopped after 1 batch of epoch 0 on two nodes, restarted on one (README: the same
    # fraction of the epoch with shard_store)
    stop = tmp_path / "stop"
    launch_nodes(ds, url, stop, "--save-after", "1", env=env)
    saved = json.loads((stop / "state0.json").read_text())
    assert saved["world_size"] == 2 and saved["batches_yielded"] == 1 < saved["num_batches"]
    one = launch_nodes(ds, url, tmp_path / "one", "--resume-from", str(stop / "state0.json"),
                       nodes=1, env=env)[0]  # fmt: skip
    store = PackedRayStore(url, storage_options=s3.storage_options)
    dataset = HierarchicalVoxelRayDataset(ds, rays, "train", ray_store=store, seed=4)
    n1 = len(GPURayLoader(dataset, rays_per_batch=256, subvolumes_per_batch=4, store="striped"))
    assert len(one["batches"]["0"]) == n1 - 1 * n1 // saved["num_batches"]
    assert len(one["batches"]["1"]) == n1  # the next epoch whole
    shutil.rmtree(tmp_path / "run")
