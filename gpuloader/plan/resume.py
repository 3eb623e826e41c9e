"""Resume states: where an epoch's order stands, saved and checked.

A state is ``{epoch, batches_yielded, seed, world_size, num_batches[, shard]}``:
:func:`resume_state` makes one (a finished epoch reads as the next epoch at batch 0) and
:func:`check_resume_state` gives back ``(epoch, batches_yielded)`` after checking that the
state belongs to the same seed, world size, epoch length and shard mode. Used by
``RayBatchSampler.state_dict`` and the GPU loader's.
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_resume_state", "resume_state"]


def resume_state(
    epoch: int, done: int, num_batches: int, seed: int, world_size: int, shard: str | None = None
) -> dict:
    """A resume state ``{epoch, batches_yielded, seed, world_size, num_batches[, shard]}``; a
    finished epoch (``done >= num_batches``) becomes the next epoch at batch 0."""
    epoch, done = int(epoch), int(done)
    if done >= num_batches:
        epoch, done = epoch + 1, 0
    state = {
        "epoch": epoch,
        "batches_yielded": done,
        "seed": int(seed),
        "world_size": int(world_size),
        "num_batches": int(num_batches),
    }
    if shard is not None:
        state["shard"] = shard
    return state


def check_resume_state(
    state: dict, num_batches: int, seed: int, world_size: int, owner: str, shard: str | None = None
) -> tuple[int, int]:
    """``(epoch, batches_yielded)`` of a resume state, after checking that it fits.

    ``shard``: the shard mode to check against the state's, when both are given.

    Raises:
        ValueError: a missing key, a negative position, or a state of another seed, world
            size, epoch length or shard mode.
    """
    try:
        epoch, done = int(state["epoch"]), int(state["batches_yielded"])
    except (KeyError, TypeError) as exc:
        raise ValueError(
            f"{owner}.load_state_dict: the state needs 'epoch' and 'batches_yielded'; got {state!r}"
        ) from exc
    if epoch < 0 or done < 0:
        raise ValueError(f"{owner}.load_state_dict: negative epoch or position in {state!r}")
    mine: dict[str, Any] = {
        "seed": int(seed),
        "world_size": int(world_size),
        "num_batches": int(num_batches),
    }
    if shard is not None:
        mine["shard"] = shard
    for key, value in mine.items():
        if key in state and type(value)(state[key]) != value:
            raise ValueError(
                f"{owner}.load_state_dict: the state was saved with {key}={state[key]}, this "
                f"one has {key}={value}; resume with the same dataset, sampler arguments, seed "
                "and number of processes"
            )
    if done >= num_batches:
        epoch, done = epoch + 1, 0
    return epoch, done
