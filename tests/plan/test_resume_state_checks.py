"""``load_state_dict`` refuses a malformed state, naming the key (issue 18, item 9): a
position beyond the epoch, a float, a negative number, a bool, or a required key removed
(``seed``, ``epoch``, ... and, for the loader, ``dataset``)."""

from __future__ import annotations

import pytest

from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.loading.loader import GPURayLoader
from gpuloader.plan.resume import REQUIRED_KEYS, check_resume_state, resume_state
from gpuloader.plan.sampler import RayBatchSampler


def _state() -> dict:
    return resume_state(1, 3, 10, seed=5, world_size=1)


@pytest.mark.parametrize(
    "value,match",
    [
        (10**6, "beyond the epoch"),
        (2.7, "integer"),
        (-1, ">= 0"),
        (True, "integer"),
        ("3", "integer"),
    ],  # fmt: skip
)
def test_bad_positions_are_refused(value, match):
    state = {**_state(), "batches_yielded": value}
    with pytest.raises(ValueError, match=match) as info:
        check_resume_state(state, 10, 5, 1, "X")
    assert "batches_yielded" in str(info.value)


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_a_removed_key_is_named(key):
    state = _state()
    del state[key]
    with pytest.raises(ValueError, match=f"lacks '{key}'"):
        check_resume_state(state, 10, 5, 1, "X")


def test_float_epoch_and_bool_seed_are_refused():
    with pytest.raises(ValueError, match="epoch must be an integer"):
        check_resume_state({**_state(), "epoch": 1.0}, 10, 5, 1, "X")
    with pytest.raises(ValueError, match="seed must be an integer"):
        check_resume_state({**_state(), "seed": False}, 10, 5, 1, "X")
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        check_resume_state({**_state(), "world_size": 0}, 10, 5, 1, "X")


def test_a_bare_position_is_taken_as_it_is_but_still_checked():
    assert check_resume_state({"epoch": 2, "batches_yielded": 3}, 10, 5, 1, "X") == (2, 3)
    for value in (2.7, True, -1, 10**6):
        with pytest.raises(ValueError, match="batches_yielded"):
            check_resume_state({"epoch": 2, "batches_yielded": value}, 10, 5, 1, "X")


def test_sampler_and_loader_refuse_malformed_states(tiny_dataset):
    ds = HierarchicalVoxelRayDataset(*tiny_dataset, split="train")
    sampler = RayBatchSampler(ds, None, 2, seed=3)
    good = sampler.state_dict()
    sampler.load_state_dict(good)  # the whole state loads
    for key, value in (("batches_yielded", 10**6), ("batches_yielded", 2.7),
                       ("batches_yielded", -1), ("batches_yielded", True)):  # fmt: skip
        with pytest.raises(ValueError, match="batches_yielded"):
            sampler.load_state_dict({**good, key: value})
    with pytest.raises(ValueError, match="'seed'"):
        sampler.load_state_dict({k: v for k, v in good.items() if k != "seed"})

    with GPURayLoader(ds, None, 2, device="cpu", store="host", backend="torch",
                      num_workers=0, seed=3) as ld:  # fmt: skip
        state = ld.state_dict()
        ld.load_state_dict(state)
        for key in ("seed", "dataset", "num_batches"):
            with pytest.raises(ValueError, match=f"'{key}'"):
                ld.load_state_dict({k: v for k, v in state.items() if k != key})
        with pytest.raises(ValueError, match="batches_yielded"):
            ld.load_state_dict({**state, "batches_yielded": 10**6})
        with pytest.raises(ValueError, match="batches_yielded must be an integer"):
            ld.load_state_dict({**state, "batches_yielded": 2.7})
