"""The seed's transforms, with the seed's names and arguments, made consistent and seeded.

Known transforms (this module's classes) are not applied one after the other: a run of them
inside a :class:`Compose` is a *segment* that draws one :class:`~gpuloader.augment.plan.SamplePlan`
from the sample's counter-based random stream and applies it in one pass (numpy here, CUDA
in the GPU loader). So every rotation and flip of a sample is one signed permutation applied
once to the grid, the rays and the view positions, which keeps
``trace(voxels', origins', directions') == distances``.

Any other callable in a ``Compose`` is applied as it is, in its place, to the sample dict.

Transforms take a sample dict (the seed's keys) of numpy arrays or torch tensors and return
a new dict of the same kind; inputs are never modified in place. Random draws come from a
:class:`~gpuloader.augment.rng.SampleContext` (seed, epoch, index) that the dataset passes; called
without one, a transform uses seed 0, epoch 0 and a running call counter.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gpuloader import schema
from gpuloader.augment import rng, symmetry
from gpuloader.augment.apply import apply_plan
from gpuloader.augment.arguments import AXES, axes_arg, probability_arg, real_arg
from gpuloader.augment.plan import SamplePlan
from gpuloader.errors import UnsupportedTransformError

__all__ = [
    "Transform",
    "Compose",
    "RandomRotation90",
    "RandomFlip",
    "NormalizeRayOrigins",
    "NormalizeDistances",
    "RandomRaySubsample",
    "AddNoise",
    "VoxelOccupancyJitter",
    "ToDevice",
    "apply_transform",
    "ray_budget",
    "draw_plan",
    "draw_plans",
    "apply_plan",
    "split_for_device",
]

#: per-ray keys that follow the row selection
RAY_KEYS = schema.RAY_FIELDS
_calls = itertools.count()


def _default_context() -> rng.SampleContext:
    return rng.SampleContext(seed=0, epoch=0, index=next(_calls))


class Transform:
    """Base class of the known transforms: ``t(sample, context=None) -> new sample``."""

    def __call__(self, sample: dict, context: rng.SampleContext | None = None) -> dict:
        return Compose([self])(sample, context)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class RandomRotation90(Transform):
    """With probability ``p`` (in [0, 1]), rotate by ``k * 90`` degrees (k in 1..3) about a
    world axis drawn uniformly from ``axes`` (distinct 'x', 'y', 'z' or 0, 1, 2; default all
    three). Rays, view positions and the grid turn together. Bad arguments raise
    ValueError/TypeError naming them."""

    def __init__(self, p: float = 0.5, axes: Sequence[str | int] = ("x", "y", "z")):
        self.p = probability_arg("RandomRotation90", "p", p)
        self.axes = axes_arg("RandomRotation90", axes)

    def draw(self, words: np.ndarray) -> int:
        """Four Philox words -> symmetry index."""
        if int(words[0]) >> 8 >= rng.bernoulli_threshold(self.p):
            return symmetry.IDENTITY
        axis = self.axes[(int(words[1]) >> 8) * len(self.axes) >> 24]
        k = 1 + ((int(words[2]) >> 8) * 3 >> 24)
        return symmetry.rotation(axis, k)

    def draw_many(self, words: np.ndarray) -> np.ndarray:
        """:meth:`draw` for many samples: (B, 4) uint32 words -> (B,) int32 symmetries."""
        w = np.asarray(words, dtype=np.uint32).astype(np.int64) >> 8
        table = np.array(
            [[symmetry.rotation(a, k) for k in (1, 2, 3)] for a in self.axes], dtype=np.int32
        )
        axis = (w[:, 1] * len(self.axes)) >> 24
        k = (w[:, 2] * 3) >> 24
        on = w[:, 0] < rng.bernoulli_threshold(self.p)
        return np.where(on, table[axis, k], symmetry.IDENTITY).astype(np.int32)


class RandomFlip(Transform):
    """Flip each world axis in ``axes`` (distinct 0 = x, 1 = y, 2 = z; the names work too,
    kept as numbers) independently with probability ``p`` (in [0, 1])."""

    def __init__(self, axes: Sequence[int | str] = (0, 1, 2), p: float = 0.5):
        self.axes = tuple(AXES[a] for a in axes_arg("RandomFlip", axes))
        self.p = probability_arg("RandomFlip", "p", p)

    def draw(self, words: np.ndarray) -> int:
        s = symmetry.IDENTITY
        thr = rng.bernoulli_threshold(self.p)
        for j, a in enumerate(self.axes):
            if int(words[j]) >> 8 < thr:
                s = symmetry.compose(symmetry.flip(a), s)
        return s

    def draw_many(self, words: np.ndarray) -> np.ndarray:
        """:meth:`draw` for many samples: (B, 4) uint32 words -> (B,) int32 symmetries."""
        w = np.asarray(words, dtype=np.uint32) >> np.uint32(8)
        thr = rng.bernoulli_threshold(self.p)
        s = np.full(w.shape[0], symmetry.IDENTITY, dtype=np.int64)
        for j, a in enumerate(self.axes):
            s = np.where(w[:, j] < thr, symmetry.COMPOSE[symmetry.flip(a), s], s)
        return s.astype(np.int32)


class NormalizeRayOrigins(Transform):
    """Scale origins (and view positions) by ``2 / (voxel_size * side)`` so the grid's box
    maps to [-1, 1]^3. ``scale_distances=True`` scales distances by the same factor (off by
    default, as the seed)."""

    def __init__(self, voxel_size: float = 1.0, scale_distances: bool = False):
        self.voxel_size = real_arg(
            "NormalizeRayOrigins", "voxel_size", voxel_size, "a finite number > 0", lambda v: v > 0
        )
        self.scale_distances = bool(scale_distances)

    def factor(self, grid_side: int) -> float:
        return 2.0 / (self.voxel_size * float(grid_side))


class NormalizeDistances(Transform):
    """Divide distances by a length of the grid (folded into the plan's distance scale).

    ``mode='diagonal'``: the grid's diagonal, ``sqrt(3) * side`` (voxel size 1), so every
    distance lies in [0, 1] whatever the data's base resolution. ``mode='upstream-new'``:
    ``sqrt(3) * 2 ** (7 - level)``, what the newer upstream loader does to every sample
    (the diagonal only when the level-0 grid is 128^3); it needs the sample's ``level``.
    """

    MODES = ("diagonal", "upstream-new")

    def __init__(self, mode: str = "diagonal"):
        if not isinstance(mode, str) or mode not in self.MODES:
            raise ValueError(
                f"NormalizeDistances: mode must be one of {self.MODES}; got mode={mode!r}"
            )
        self.mode = mode

    def factor(self, grid_side: int, level: int | None = None) -> float:
        """The multiplier of the distances of one sample (float64 arithmetic)."""
        if self.mode == "diagonal":
            return 1.0 / (float(np.sqrt(3.0)) * float(grid_side))
        if level is None:
            raise ValueError(
                "NormalizeDistances(mode='upstream-new') needs the sample's level: "
                "the sample dict has no 'level' (pass level= to draw_plan)"
            )
        return 1.0 / (float(np.sqrt(3.0)) * 2.0 ** (7 - int(level)))

    def factors(self, grid_side: np.ndarray, level: np.ndarray | None = None) -> np.ndarray:
        """:meth:`factor` for many samples: (B,) float64, the same values."""
        if self.mode == "diagonal":
            return 1.0 / (float(np.sqrt(3.0)) * np.asarray(grid_side, dtype=np.float64))
        if level is None:
            raise ValueError(
                "NormalizeDistances(mode='upstream-new') needs the samples' levels "
                "(pass level= to draw_plans)"
            )
        exp = 7 - np.asarray(level, dtype=np.int64)
        return 1.0 / (float(np.sqrt(3.0)) * np.ldexp(1.0, exp))


class RandomRaySubsample(Transform):
    """Keep ``num_rays`` (an int >= 1) rays drawn without replacement (all of them when
    there are fewer)."""

    def __init__(self, num_rays: int = 1024):
        allowed = "an int >= 1"
        if isinstance(num_rays, bool) or not isinstance(num_rays, (int, np.integer)):
            raise TypeError(
                f"RandomRaySubsample: num_rays must be {allowed}; got num_rays={num_rays!r} "
                f"({type(num_rays).__name__})"
            )
        if num_rays < 1:
            raise ValueError(f"RandomRaySubsample: num_rays must be {allowed}; got {num_rays=}")
        self.num_rays = int(num_rays)


class AddNoise(Transform):
    """Gaussian noise on origins (std in world units) and directions (renormalized); each
    std a finite number >= 0."""

    def __init__(self, origin_std: float = 0.01, direction_std: float = 0.001):
        allowed = "a finite number >= 0"
        self.origin_std = real_arg("AddNoise", "origin_std", origin_std, allowed, lambda v: v >= 0)
        self.direction_std = real_arg(
            "AddNoise", "direction_std", direction_std, allowed, lambda v: v >= 0
        )


class VoxelOccupancyJitter(Transform):
    """Flip each voxel's occupancy with probability ``flip_prob`` (in [0, 1]; labels
    unchanged)."""

    def __init__(self, flip_prob: float = 0.01):
        self.flip_prob = probability_arg("VoxelOccupancyJitter", "flip_prob", flip_prob)


class ToDevice(Transform):
    """Turn every array of the sample into a torch tensor on ``device`` (anything
    ``torch.device`` takes; a malformed one raises ValueError here)."""

    def __init__(self, device: Any = "cpu"):
        import torch

        try:
            torch.device(device)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(
                f"ToDevice: device={device!r} is not a torch device ({exc}); use e.g. 'cpu', "
                "'cuda' or 'cuda:0'"
            ) from exc
        self.device = device

    def __call__(self, sample: dict, context: rng.SampleContext | None = None) -> dict:
        import torch

        out = {}
        for k, v in sample.items():
            if isinstance(v, np.ndarray):
                v = torch.from_numpy(np.ascontiguousarray(v))
            if isinstance(v, torch.Tensor):
                v = v.to(self.device)
            out[k] = v
        return out


_PLANNED = (
    RandomRotation90,
    RandomFlip,
    NormalizeRayOrigins,
    NormalizeDistances,
    RandomRaySubsample,
    AddNoise,
    VoxelOccupancyJitter,
)


class Compose:
    """Chain transforms. Runs of known transforms are fused into one plan each."""

    def __init__(self, transforms: Sequence[Callable]):
        if (
            callable(transforms)
            or isinstance(transforms, str)
            or not hasattr(transforms, "__iter__")
        ):
            raise TypeError(
                f"Compose: transforms must be a list (or tuple) of transforms; got "
                f"{transforms!r}; write Compose([t]) for a single one"
            )
        self.transforms = list(transforms)
        self.segments: list[list[Transform] | Callable] = []
        for t in self.transforms:
            if isinstance(t, Compose):
                raise TypeError("Compose: nest the inner list instead of a Compose in a Compose")
            if isinstance(t, _PLANNED):
                if self.segments and isinstance(self.segments[-1], list):
                    self.segments[-1].append(t)
                else:
                    self.segments.append([t])
            elif callable(t):
                self.segments.append(t)
            else:
                raise TypeError(f"Compose: {t!r} is not callable")

    def __call__(self, sample: dict, context: rng.SampleContext | None = None) -> dict:
        context = context or _default_context()
        planned = 0
        for seg in self.segments:
            if isinstance(seg, list):
                side = _grid_side(sample)
                level = sample.get("level")
                level = None if level is None else int(level)
                plan = draw_plan(seg, context, side, segment=planned, level=level)
                sample = apply_plan(plan, sample, context)
                planned += 1
            elif isinstance(seg, Transform):
                sample = seg(sample, context)
            else:
                sample = seg(sample)
        return sample

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{inner}\n])"


def _grid_side(sample: dict) -> int:
    return int(max(tuple(sample["voxels"].shape)[-3:]))


def draw_plan(
    transforms: Sequence[Transform],
    context: rng.SampleContext,
    grid_side: int,
    segment: int = 0,
    level: int | None = None,
) -> SamplePlan:
    """Fold one run of known transforms into a :class:`SamplePlan` for one sample.

    Args:
        transforms: the known transforms of the run, in list order.
        context: the sample's (seed, epoch, index).
        grid_side: the side of the sample's (cubic) grid, for NormalizeRayOrigins and
            NormalizeDistances.
        segment: which run of the Compose this is (offsets the random purposes).
        level: the sample's octree level (only NormalizeDistances('upstream-new') needs it).
    """
    offset = segment * rng.Purpose.SEGMENT_STRIDE
    sym = symmetry.IDENTITY
    oscale = dscale = 1.0
    ostd = dstd = jitter = 0.0
    num_rays: int | None = None
    for slot, t in enumerate(transforms):
        if isinstance(t, (RandomRotation90, RandomFlip)):
            words = rng.random_words(
                context.seed, context.epoch, context.index, rng.Purpose.SYMMETRY + offset, slot
            )
            sym = symmetry.compose(t.draw(words), sym)
        elif isinstance(t, NormalizeRayOrigins):
            f = t.factor(grid_side)
            oscale *= f
            ostd *= f
            if t.scale_distances:
                dscale *= f
        elif isinstance(t, NormalizeDistances):
            dscale *= t.factor(grid_side, level)
        elif isinstance(t, AddNoise):
            ostd = float(np.hypot(ostd, t.origin_std))
            dstd = float(np.hypot(dstd, t.direction_std))
        elif isinstance(t, RandomRaySubsample):
            num_rays = t.num_rays if num_rays is None else min(num_rays, t.num_rays)
        elif isinstance(t, VoxelOccupancyJitter):
            jitter = jitter + t.flip_prob - 2.0 * jitter * t.flip_prob
        else:
            raise TypeError(f"draw_plan: {t!r} is not a known transform")
    return SamplePlan(
        symmetry=sym,
        origin_scale=oscale,
        distance_scale=dscale,
        origin_std=ostd,
        direction_std=dstd,
        jitter_prob=jitter,
        num_rays=num_rays,
        purpose_offset=offset,
    )


def draw_plans(
    transforms: Sequence[Transform],
    seed: int,
    epoch: int,
    index: np.ndarray,
    grid_side: np.ndarray,
    segment: int = 0,
    level: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """:func:`draw_plan` for many samples of one epoch at once, vectorized.

    Args:
        transforms: the known transforms of one run, in list order.
        seed, epoch: the samples' stream (as ``SampleContext``).
        index: (B,) dataset indices. grid_side: (B,) side of each sample's grid.
        segment: which run of the Compose this is.
        level: (B,) octree level of each sample (for NormalizeDistances('upstream-new')).

    Returns:
        ``symmetry`` (B,) int32, ``origin_scale``, ``distance_scale``, ``origin_std``,
        ``direction_std`` (B,) float32, ``jitter_threshold`` (B,) uint32, ``purpose_offset``
        (B,) uint32 and ``num_rays`` (int or None): exactly the values of ``draw_plan``
        (and ``plan.to_batch_params``) for each sample, computed in the same float64 order.
    """
    index = np.asarray(index, dtype=np.int64)
    side = np.asarray(grid_side, dtype=np.float64)
    b = index.shape[0]
    offset = segment * rng.Purpose.SEGMENT_STRIDE
    sym = np.zeros(b, dtype=np.int64)
    oscale = np.ones(b)
    dscale = np.ones(b)
    ostd = np.zeros(b)
    dstd = 0.0
    jitter = 0.0
    num_rays: int | None = None
    for slot, t in enumerate(transforms):
        if isinstance(t, (RandomRotation90, RandomFlip)):
            words = rng.random_words(seed, epoch, index, rng.Purpose.SYMMETRY + offset, slot)
            sym = symmetry.COMPOSE[t.draw_many(words.reshape(b, 4)), sym]
        elif isinstance(t, NormalizeRayOrigins):
            f = 2.0 / (t.voxel_size * side)
            oscale = oscale * f
            ostd = ostd * f
            if t.scale_distances:
                dscale = dscale * f
        elif isinstance(t, NormalizeDistances):
            dscale = dscale * t.factors(side, level)
        elif isinstance(t, AddNoise):
            ostd = np.hypot(ostd, t.origin_std)
            dstd = float(np.hypot(dstd, t.direction_std))
        elif isinstance(t, RandomRaySubsample):
            num_rays = t.num_rays if num_rays is None else min(num_rays, t.num_rays)
        elif isinstance(t, VoxelOccupancyJitter):
            jitter = jitter + t.flip_prob - 2.0 * jitter * t.flip_prob
        else:
            raise TypeError(f"draw_plans: {t!r} is not a known transform")
    return {
        "symmetry": sym.astype(np.int32),
        "origin_scale": oscale.astype(np.float32),
        "distance_scale": dscale.astype(np.float32),
        "origin_std": ostd.astype(np.float32),
        "direction_std": np.full(b, dstd, dtype=np.float32),
        "jitter_threshold": np.full(b, rng.bernoulli_threshold(jitter), dtype=np.uint32),
        "purpose_offset": np.full(b, offset, dtype=np.uint32),
        "num_rays": num_rays,
    }


def apply_transform(transform: Callable | None, sample: dict, context: rng.SampleContext) -> dict:
    """Call ``transform`` on a sample: ours get the context, plain callables only the sample."""
    if transform is None:
        return sample
    if isinstance(transform, (Transform, Compose)):
        return transform(sample, context)
    return transform(sample)


def ray_budget(transform: Callable | None) -> int | None:
    """Rays the transform keeps when it subsamples before anything else could change the rays.

    The dataset reads only that many rows (``select_rows`` with the same key gives the same
    rows the transform would pick), so the transform's own selection is then a no-op.
    """
    if isinstance(transform, RandomRaySubsample):
        return transform.num_rays
    if isinstance(transform, Compose) and transform.segments:
        first = transform.segments[0]
        if isinstance(first, list):
            subs = [t.num_rays for t in first if isinstance(t, RandomRaySubsample)]
            return min(subs) if subs else None
    return None


def split_for_device(
    transform: Callable | None,
) -> tuple[list[Callable], list[Transform], Any]:
    """Split a transform for the GPU loader: (CPU callables first, known run, ToDevice target).

    Custom callables run per sample in the reader, before the known transforms, which run in
    the batched kernels. A custom callable after a known transform cannot keep its place and
    is rejected (:class:`UnsupportedTransformError`) rather than silently moved or dropped.
    """
    if transform is None:
        return [], [], None
    items = transform.transforms if isinstance(transform, Compose) else [transform]
    cpu: list[Callable] = []
    known: list[Transform] = []
    device = None
    for t in items:
        if isinstance(t, ToDevice):
            device = t.device
        elif isinstance(t, _PLANNED):
            known.append(t)
        elif callable(t):
            if known:
                raise UnsupportedTransformError(
                    f"{t!r} comes after {known[-1]!r}: the GPU loader applies the known "
                    "transforms in one batched pass after the reader, so a custom transform "
                    "must come before all of them (move it to the front of the Compose), or "
                    "use the CPU API (HierarchicalVoxelRayDataset + DataLoader)."
                )
            cpu.append(t)
        else:
            raise UnsupportedTransformError(f"{t!r} is not callable")
    return cpu, known, device
