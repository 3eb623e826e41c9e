"""Draw parameters, then apply them (design decision 2, the kornia pattern).

A :class:`SamplePlan` is the small per-sample record that the known transforms of one
``Compose`` segment boil down to: one symmetry (every rotation and flip composed), one
origin scale, noise levels, a ray count and a jitter probability. It is drawn from the
counter-based generator with the sample's :class:`~gpuloader.augment.rng.SampleContext`, so the
same seed gives the same plan on every back end, and it is applied by one batched pass
(:func:`gpuloader.augment.apply.apply_plan` per sample; the fused pass of
:mod:`gpuloader.fused` per batch).

Canonical order of application: select rows -> P -> scale origins -> origin noise ->
direction noise (renormalized) -> scale distances; voxels: P -> jitter. The order in which
the transforms were listed only changes the parameters (a normalization after a noise scales
that noise; two noises add in quadrature), never the distribution of the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpuloader.augment import rng
from gpuloader.augment.numpy_backend import BatchParams

__all__ = ["SamplePlan", "to_batch_params"]


@dataclass(frozen=True)
class SamplePlan:
    """Per-sample augmentation record (see module doc)."""

    symmetry: int = 0
    origin_scale: float = 1.0
    distance_scale: float = 1.0
    origin_std: float = 0.0
    direction_std: float = 0.0
    jitter_prob: float = 0.0
    num_rays: int | None = None
    purpose_offset: int = 0

    @property
    def turns_only(self) -> bool:
        """At most a rotation or flip: no scale, noise or jitter."""
        return (
            self.origin_scale == 1.0
            and self.distance_scale == 1.0
            and self.origin_std == 0.0
            and self.direction_std == 0.0
            and self.jitter_prob == 0.0
        )

    @property
    def is_identity(self) -> bool:
        return self.symmetry == 0 and self.turns_only


def to_batch_params(plans: list[SamplePlan], contexts: list[rng.SampleContext]) -> BatchParams:
    """Stack per-sample plans into the struct of arrays the back ends take."""
    if len(plans) != len(contexts):
        raise ValueError(f"{len(plans)} plans for {len(contexts)} contexts")
    seeds = {c.seed for c in contexts}
    if len(seeds) > 1:
        raise ValueError(f"one batch must share one seed; got {sorted(seeds)}")
    return BatchParams.make(
        seed=seeds.pop() if seeds else 0,
        epoch=np.array([c.epoch for c in contexts], dtype=np.uint32),
        index=np.array([c.index for c in contexts], dtype=np.uint32),
        symmetry=np.array([p.symmetry for p in plans], dtype=np.int32),
        origin_scale=np.array([p.origin_scale for p in plans], dtype=np.float32),
        distance_scale=np.array([p.distance_scale for p in plans], dtype=np.float32),
        origin_std=np.array([p.origin_std for p in plans], dtype=np.float32),
        direction_std=np.array([p.direction_std for p in plans], dtype=np.float32),
        jitter_threshold=np.array(
            [rng.bernoulli_threshold(p.jitter_prob) for p in plans], dtype=np.uint32
        ),
        purpose_offset=np.array([p.purpose_offset for p in plans], dtype=np.uint32),
    )
