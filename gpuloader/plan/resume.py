"""Resume states: where an epoch's order stands, saved and checked.

A state is ``{epoch, batches_yielded, seed, world_size, num_batches[, shard]}`` plus what
identifies the batching arguments and the data (:func:`batching_identity`: ``rays_per_batch``,
``subvolumes_per_batch``, ``shuffle``, ``drop_last``, ``mixed_levels``, ``num_samples`` and
``samples_fingerprint``). :func:`resume_state` makes one (a finished epoch reads as the next
epoch at batch 0) and :func:`check_resume_state` gives back ``(epoch, batches_yielded)``
after checking that the state belongs to the same arguments, data, seed, world size, epoch
length and shard mode. A saved state must hold :data:`REQUIRED_KEYS` (``epoch``,
``batches_yielded``, ``seed``, ``num_batches``), each an integer (a float or bool is refused,
as is ``world_size`` of another type); a bare hand-written position ``{epoch,
batches_yielded}`` (those two keys only) is taken as it is. Of ``world_size`` and the
identity keys only those a state holds are checked, so older states (without them) still
load. Used by ``RayBatchSampler.state_dict`` and the GPU loader's.

A state of another world size is mapped onto this one (:func:`_other_world_position`, with a
:class:`ResumeWorldSizeWarning`): exactly at an epoch boundary; mid-epoch, with one global
order (``shard="batches"``) no batch is skipped and fewer than ``world_size`` are taken
twice, and with per-rank samples (``shard="samples"``) the epoch resumes at the same
fraction.
"""

from __future__ import annotations

import hashlib
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "IDENTITY_KEYS",
    "POSITION_KEYS",
    "REQUIRED_KEYS",
    "ResumeWorldSizeWarning",
    "batching_identity",
    "check_resume_state",
    "is_bare_position",
    "resume_state",
    "samples_fingerprint",
]

#: the keys of :func:`batching_identity`, in the order a mismatch is reported
IDENTITY_KEYS: tuple[str, ...] = (
    "num_samples",
    "samples_fingerprint",
    "rays_per_batch",
    "subvolumes_per_batch",
    "shuffle",
    "drop_last",
    "mixed_levels",
)


def samples_fingerprint(samples: Sequence[dict[str, Any]]) -> str:
    """16 hex digits of a SHA-1 over each sample's ``(level, hash, num_rays, ray_offset)``,
    in order (missing keys read as empty): the same for the same sample list."""
    text = "\n".join(
        f"{s.get('level', '')}:{s.get('hash', '')}:{s.get('num_rays', '')}:"
        f"{s.get('ray_offset', '')}"
        for s in samples
    )
    return hashlib.sha1(f"{len(samples)}\n{text}".encode()).hexdigest()[:16]


def batching_identity(
    *,
    num_samples: int,
    fingerprint: str | None,
    rays_per_batch: int | None,
    subvolumes_per_batch: int,
    shuffle: bool,
    drop_last: bool,
    mixed_levels: bool,
) -> dict[str, Any]:
    """What a state must match besides its position (module doc); ``fingerprint`` None (not
    known) leaves ``samples_fingerprint`` out."""
    identity: dict[str, Any] = {
        "num_samples": int(num_samples),
        "samples_fingerprint": fingerprint,
        "rays_per_batch": None if rays_per_batch is None else int(rays_per_batch),
        "subvolumes_per_batch": int(subvolumes_per_batch),
        "shuffle": bool(shuffle),
        "drop_last": bool(drop_last),
        "mixed_levels": bool(mixed_levels),
    }
    if fingerprint is None:
        del identity["samples_fingerprint"]
    return identity


def resume_state(
    epoch: int,
    done: int,
    num_batches: int,
    seed: int,
    world_size: int,
    shard: str | None = None,
    identity: dict[str, Any] | None = None,
) -> dict:
    """A resume state ``{epoch, batches_yielded, seed, world_size, num_batches[, shard]}``
    (plus ``identity``, :func:`batching_identity`'s); a finished epoch (``done >=
    num_batches``) becomes the next epoch at batch 0."""
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
    if identity:
        state.update(identity)
    return state


def _check_identity(state: Mapping, identity: dict[str, Any], num_batches: int, owner: str) -> None:
    """Refuse a state whose identity keys (those it holds) differ from ``identity``."""
    differ = [k for k in IDENTITY_KEYS if k in state and k in identity and state[k] != identity[k]]
    if not differ:
        return
    if "num_batches" in state and state["num_batches"] != num_batches:
        differ.append("num_batches")
        identity = {**identity, "num_batches": int(num_batches)}
    saved = ", ".join(f"{k}={state[k]!r}" for k in differ)
    mine = ", ".join(f"{k}={identity[k]!r}" for k in differ)
    raise ValueError(
        f"{owner}.load_state_dict: the state was saved with {saved}; this one has {mine}; "
        "resume with the same dataset (split, levels, samples), sampler arguments, seed and "
        "number of processes"
    )


def check_resume_state(
    state: Mapping,
    num_batches: int,
    seed: int,
    world_size: int,
    owner: str,
    shard: str | None = None,
    identity: dict[str, Any] | None = None,
) -> tuple[int, int]:
    """``(epoch, batches_yielded)`` of a resume state, after checking that it fits.

    ``shard``: the shard mode to check against the state's, when both are given.
    ``identity``: :func:`batching_identity` of the caller, checked key by key against the
    state's (keys the state lacks are not checked).

    Raises:
        ValueError: a missing required key (:data:`REQUIRED_KEYS`: the message names it), one
            that is not an integer (a float, a bool), a negative position, a position beyond
            the epoch (``batches_yielded > num_batches``; equal means the epoch finished), or a
            state of other batching arguments or samples, another seed, world size, epoch length
            or shard mode (the message names what differs).
    """
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{owner}.load_state_dict: state must be a dict (from state_dict()); got "
            f"{type(state).__name__} {state!r:.80}"
        )
    epoch, done = _required_counts(state, owner)
    if identity:
        _check_identity(state, identity, num_batches, owner)
    mine: dict[str, Any] = {
        "seed": int(seed),
        "world_size": int(world_size),
        "num_batches": int(num_batches),
    }
    if shard is not None:
        mine["shard"] = shard
    saved_world = int(state.get("world_size", world_size))
    if saved_world != int(world_size):  # another number of processes: mapped (module doc)
        del mine["world_size"], mine["num_batches"]
    for key, value in mine.items():
        if key in state and type(value)(state[key]) != value:
            raise ValueError(
                f"{owner}.load_state_dict: the state was saved with {key}={state[key]}, this "
                f"one has {key}={value}; resume with the same dataset, sampler arguments, seed "
                "and number of processes"
            )
    epoch_length = int(state.get("num_batches", num_batches))
    if done > epoch_length:
        raise ValueError(
            f"{owner}.load_state_dict: batches_yielded={done} is beyond the epoch "
            f"(num_batches={epoch_length}); it must be in [0, {epoch_length}] "
            f"({epoch_length} means epoch {epoch} finished)"
        )
    if saved_world != int(world_size) and done < epoch_length:
        done = _other_world_position(
            state, done, epoch_length, saved_world, int(world_size), int(num_batches)
        )
        warnings.warn(
            f"{owner}.load_state_dict: the state was saved with world_size={saved_world}, "
            f"this run has world_size={world_size}: epoch {epoch} resumes at batch {done} "
            f"of {num_batches} of each rank ({_mapping_words(state)})",
            ResumeWorldSizeWarning,
            stacklevel=3,
        )
    if done >= num_batches:
        epoch, done = epoch + 1, 0
    return epoch, done


#: the keys every saved state holds (:func:`resume_state`'s), each an integer
REQUIRED_KEYS: tuple[str, ...] = ("epoch", "batches_yielded", "seed", "num_batches")
#: a bare position, written by hand: taken as it is (no seed or length to check it against)
POSITION_KEYS = frozenset({"epoch", "batches_yielded"})
#: integer keys checked when present (older states lack ``world_size``)
_INTEGER_KEYS: tuple[str, ...] = (*REQUIRED_KEYS, "world_size")


def is_bare_position(state: Mapping) -> bool:
    """Whether ``state`` is a hand-written ``{epoch, batches_yielded}`` and nothing else."""
    return set(state) == POSITION_KEYS


def _required_counts(state: Mapping, owner: str) -> tuple[int, int]:
    """``(epoch, batches_yielded)`` after checking :data:`REQUIRED_KEYS` (module doc): each
    present (a bare position needs only its two), an integer (not bool, not float), ``>= 0``
    (``world_size >= 1``).

    Raises:
        ValueError: a key missing or of another type or value (the message names it).
    """
    need = POSITION_KEYS if is_bare_position(state) else REQUIRED_KEYS
    missing = [k for k in REQUIRED_KEYS if k in need and k not in state]
    if missing:
        raise ValueError(
            f"{owner}.load_state_dict: the state lacks {', '.join(map(repr, missing))} (a state "
            f"holds {', '.join(REQUIRED_KEYS)}); pass the dict state_dict() returned, whole"
        )
    for key in _INTEGER_KEYS:
        if key not in state:
            continue
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(
                f"{owner}.load_state_dict: {key} must be an integer; got "
                f"{type(value).__name__} {value!r:.40}"
            )
        low = 1 if key == "world_size" else 0
        if key != "seed" and int(value) < low:
            raise ValueError(f"{owner}.load_state_dict: {key} must be >= {low}; got {value}")
    return int(state["epoch"]), int(state["batches_yielded"])


class ResumeWorldSizeWarning(UserWarning):
    """A state saved with another world size was mapped onto this one (module doc)."""


def _other_world_position(
    state: Mapping, done: int, epoch_length: int, saved_world: int, world_size: int, n: int
) -> int:
    """A rank's position in this world size for a state of ``saved_world`` ranks.

    ``shard="batches"`` (one global order): the ranks had taken ``done * saved_world`` global
    batches; each rank now starts at ``floor(done * saved_world / world_size)``, so nothing is
    skipped and fewer than ``world_size`` global batches are taken twice (none when it
    divides). ``shard="samples"`` (each rank its own samples): the same fraction of the
    epoch, ``floor(done * n / epoch_length)`` of this run's ``n`` batches per rank; which
    samples of that epoch were seen is not kept. Clamped to ``n``.
    """
    if state.get("shard", "batches") == "samples":
        return min(n, done * n // max(1, epoch_length))
    return min(n, done * saved_world // world_size)


def _mapping_words(state: Mapping) -> str:
    if state.get("shard", "batches") == "samples":
        return (
            "shard_store: the same fraction of the epoch; the new ranks own other samples, so "
            "which of this epoch's samples come again or not is not exact"
        )
    return "the global order: no batch skipped, fewer than world_size batches taken twice"
