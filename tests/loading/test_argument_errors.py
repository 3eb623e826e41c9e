"""User mistakes in arguments: each one error, raised by the call the user made, whose first
line names the argument, the value given and what is allowed (issue 17, "API mistakes")."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gpuloader.augment import transforms as T
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.loading.loader import GPURayLoader
from gpuloader.plan.sampler import RayBatchSampler


def first_line(err: pytest.ExceptionInfo) -> str:
    return str(err.value).splitlines()[0]


def fake(n: int = 12, seed: int = 3, tag: str = "h") -> SimpleNamespace:
    """``n`` samples over two levels, 50 rays each; ``tag`` changes the hashes."""
    samples = [{"level": i % 2, "hash": f"{tag}{i}", "num_rays": 50} for i in range(n)]
    return SimpleNamespace(samples=samples, seed=seed)


@pytest.fixture(scope="module")
def dataset(tiny_dataset) -> HierarchicalVoxelRayDataset:
    return HierarchicalVoxelRayDataset(*tiny_dataset, "train")


def loader(ds, **kw) -> GPURayLoader:
    args = {"device": "cpu", "store": "stream", "backend": "torch", "num_workers": 0}
    return GPURayLoader(ds, **{**args, **kw})


# -- device ------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(dataset):
    with pytest.raises(ValueError) as err:
        loader(dataset, device="cuda")
    line = first_line(err)
    assert line.startswith("GPURayLoader: device='cuda' needs CUDA")
    assert "device='cpu'" in line


@pytest.mark.parametrize(
    "device,says",
    [("cuda:x", "is a malformed device"), ("tpu", "is not a CPU or CUDA device")],
)
def test_device_malformed(dataset, device, says):
    with pytest.raises(ValueError) as err:
        loader(dataset, device=device)
    line = first_line(err)
    assert line.startswith(f"GPURayLoader: device={device!r} {says}")
    assert "'auto', 'cpu', 'cuda' or 'cuda:N'" in line


def test_device_wrong_type(dataset):
    with pytest.raises(TypeError, match=r"^GPURayLoader: device=1\.5 is not a device"):
        loader(dataset, device=1.5)


# -- batch counts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,kw,says",
    [
        ((0,), {}, "rays_per_batch must be an int >= 1 or None (every ray of each sub-volume); "
                   "got rays_per_batch=0"),
        ((-5, 2), {}, "got rays_per_batch=-5"),
        ((100, 0), {}, "subvolumes_per_batch must be an int >= 1 or None (the default, 8); "
                       "got subvolumes_per_batch=0"),
        ((100, -1), {}, "got subvolumes_per_batch=-1"),
        ((), {"batch_size": 0}, "batch_size must be an int >= 1; got batch_size=0"),
        ((0, True), {}, "got batch_size=0"),
    ],
)  # fmt: skip
def test_sampler_counts_below_one(args, kw, says):
    with pytest.raises(ValueError) as err:
        RayBatchSampler(fake(), *args, **kw)
    assert first_line(err).startswith("RayBatchSampler: ") and says in first_line(err)


def test_sampler_count_wrong_type():
    with pytest.raises(TypeError) as err:
        RayBatchSampler(fake(), 2.5)
    assert "rays_per_batch=2.5 (float)" in first_line(err)


@pytest.mark.parametrize(
    "kw,says",
    [
        ({"rays_per_batch": 0}, "rays_per_batch must be an int >= 1 or None"),
        ({"subvolumes_per_batch": -2}, "got subvolumes_per_batch=-2"),
    ],
)
def test_loader_counts_below_one(dataset, kw, says):
    with pytest.raises(ValueError) as err:
        loader(dataset, **kw)
    assert first_line(err).startswith("GPURayLoader: ") and says in first_line(err)


# -- levels ------------------------------------------------------------------------------


def test_levels_not_in_dataset(tiny_dataset):
    with pytest.raises(ValueError) as err:
        HierarchicalVoxelRayDataset(*tiny_dataset, "train", levels=[1, 9])
    line = first_line(err)
    assert line.startswith("HierarchicalVoxelRayDataset: levels=[1, 9]: level(s) [9] not in")
    assert "has levels [0, 1]" in line


def test_levels_single_int_is_accepted(tiny_dataset):
    ds = HierarchicalVoxelRayDataset(*tiny_dataset, "train", levels=1)
    assert ds.levels == [1] and len(ds) > 0
    assert {s["level"] for s in ds.samples} == {1}


@pytest.mark.parametrize("levels,says", [([1, "2"], "('2' is a str)"), ("1", "levels='1'")])
def test_levels_not_ints(tiny_dataset, levels, says):
    with pytest.raises(TypeError) as err:
        HierarchicalVoxelRayDataset(*tiny_dataset, "train", levels=levels)
    line = first_line(err)
    assert line.startswith("HierarchicalVoxelRayDataset: levels must be None, an int >= 0")
    assert says in line


# -- transforms --------------------------------------------------------------------------

NAN = float("nan")
TRANSFORM_MISTAKES = [
    (lambda: T.RandomRotation90(axes=("w",)), ValueError,
     "RandomRotation90: axes must be", "got axes=('w',) ('w' is not an axis)"),
    (lambda: T.RandomRotation90(axes=("x", 0)), ValueError,
     "RandomRotation90: axes must be", "(an axis twice)"),
    (lambda: T.RandomRotation90(axes=3), TypeError, "RandomRotation90: axes must be", "axes=3"),
    (lambda: T.RandomRotation90(p=1.5), ValueError,
     "RandomRotation90: p must be a number in [0, 1]", "got p=1.5"),
    (lambda: T.RandomRotation90(p=NAN), ValueError, "RandomRotation90: p must be", "got p=nan"),
    (lambda: T.RandomFlip(axes=[0, 3]), ValueError,
     "RandomFlip: axes must be", "(3 is not an axis)"),
    (lambda: T.RandomFlip(p="0.5"), TypeError, "RandomFlip: p must be", "got p='0.5' (str)"),
    (lambda: T.NormalizeRayOrigins(voxel_size=NAN), ValueError,
     "NormalizeRayOrigins: voxel_size must be a finite number > 0", "got voxel_size=nan"),
    (lambda: T.NormalizeRayOrigins(voxel_size=0), ValueError,
     "NormalizeRayOrigins: voxel_size must be", "got voxel_size=0"),
    (lambda: T.NormalizeDistances(mode="cube"), ValueError,
     "NormalizeDistances: mode must be one of", "got mode='cube'"),
    (lambda: T.RandomRaySubsample(0), ValueError,
     "RandomRaySubsample: num_rays must be an int >= 1", "got num_rays=0"),
    (lambda: T.RandomRaySubsample(2.5), TypeError,
     "RandomRaySubsample: num_rays must be", "got num_rays=2.5 (float)"),
    (lambda: T.AddNoise(origin_std=-0.1), ValueError,
     "AddNoise: origin_std must be a finite number >= 0", "got origin_std=-0.1"),
    (lambda: T.AddNoise(direction_std=NAN), ValueError,
     "AddNoise: direction_std must be", "got direction_std=nan"),
    (lambda: T.VoxelOccupancyJitter(flip_prob=-1), ValueError,
     "VoxelOccupancyJitter: flip_prob must be a number in [0, 1]", "got flip_prob=-1"),
    (lambda: T.ToDevice("tpu:x"), ValueError, "ToDevice: device='tpu:x' is not", "'cpu'"),
    (lambda: T.Compose(T.RandomFlip()), TypeError,
     "Compose: transforms must be a list", "Compose([t])"),
]  # fmt: skip


@pytest.mark.parametrize(
    "make,cls,head,says",
    TRANSFORM_MISTAKES,
    ids=[m[2].split(" must")[0] for m in TRANSFORM_MISTAKES],
)
def test_transform_arguments(make, cls, head, says):
    with pytest.raises(cls) as err:
        make()
    line = first_line(err)
    assert line.startswith(head) and says in line


def test_transform_good_arguments_still_work():
    assert T.RandomFlip(axes=["x", "z"]).axes == (0, 2)  # names work, kept as numbers
    assert T.RandomRotation90(p=1, axes="xz").axes == ("x", "z")


# -- resume states of other arguments ----------------------------------------------------


def test_sampler_state_of_other_rays_per_batch():
    state = RayBatchSampler(fake(), 100, 2).state_dict()
    with pytest.raises(ValueError) as err:
        RayBatchSampler(fake(), 200, 2).load_state_dict(state)
    line = first_line(err)
    assert "saved with rays_per_batch=100; this one has rays_per_batch=200" in line


def test_sampler_state_of_other_subvolumes_names_both():
    state = RayBatchSampler(fake(), 100, 2).state_dict()
    with pytest.raises(ValueError) as err:
        RayBatchSampler(fake(), 100, 3).load_state_dict(state)
    line = first_line(err)
    assert "saved with subvolumes_per_batch=2, num_batches=6" in line
    assert "this one has subvolumes_per_batch=3, num_batches=4" in line


def test_sampler_state_of_another_dataset_of_the_same_length():
    state = RayBatchSampler(fake(tag="a"), 100, 2).state_dict()
    with pytest.raises(ValueError) as err:
        RayBatchSampler(fake(tag="b"), 100, 2).load_state_dict(state)
    assert "saved with samples_fingerprint=" in first_line(err)


def test_sampler_state_of_another_seed():
    state = RayBatchSampler(fake(seed=3), 100, 2).state_dict()
    with pytest.raises(ValueError, match=r"saved with seed=3, this one has seed=4"):
        RayBatchSampler(fake(seed=4), 100, 2).load_state_dict(state)


def test_sampler_state_beyond_the_epoch():
    s = RayBatchSampler(fake(), 100, 2)
    state = dict(s.state_dict(), batches_yielded=len(s) + 1)
    with pytest.raises(ValueError) as err:
        s.load_state_dict(state)
    assert first_line(err).startswith(
        f"RayBatchSampler.load_state_dict: batches_yielded={len(s) + 1} is beyond the epoch "
        f"(num_batches={len(s)})"
    )
    s.load_state_dict(dict(state, epoch=4, batches_yielded=len(s)))  # finished: next epoch
    assert (s.epoch, s.state_dict()["batches_yielded"]) == (5, 0)


def test_old_state_without_identity_keys_loads():
    s = RayBatchSampler(fake(), 100, 2)
    s.load_state_dict({"epoch": 2, "batches_yielded": 1, "seed": 3, "num_batches": len(s)})
    assert (s.epoch, s.state_dict()["batches_yielded"]) == (2, 1)


def test_loader_state_of_other_rays_per_batch(dataset):
    with loader(dataset, rays_per_batch=100, subvolumes_per_batch=2) as ld:
        state = ld.state_dict()
        assert state["rays_per_batch"] == 100 and state["num_samples"] == len(dataset)
    with loader(dataset, rays_per_batch=50, subvolumes_per_batch=2) as ld:
        with pytest.raises(ValueError) as err:
            ld.load_state_dict(state)
        assert first_line(err).startswith(
            "GPURayLoader.load_state_dict: the state was saved with rays_per_batch=100; this "
            "one has rays_per_batch=50"
        )
        with pytest.raises(ValueError, match=r"batches_yielded=99 is beyond the epoch"):
            ld.load_state_dict({"epoch": 0, "batches_yielded": 99})
