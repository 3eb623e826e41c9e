"""Basic dataset operations: load samples, look at statistics, augment, batch.

Runs with no arguments on the demo data (generated into ./demo_data when missing)::

    python examples/dataset_usage_example.py
    python examples/dataset_usage_example.py --dataset-dir dataset \\
        --ray-dataset-dir ray_dataset_hierarchical --split val
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.utils.data import DataLoader

from gpuloader import transforms
from gpuloader.commands.demo import DEFAULT_OUT, resolve_data_dirs, retrace_error
from gpuloader.dataset.collate import collate_ray_batch
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.plan.sampler import RayBatchSampler


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset-dir", type=Path, help="voxel dataset root (default: demo data)")
    p.add_argument("--ray-dataset-dir", type=Path, help="ray dataset root")
    p.add_argument("--demo-dir", type=Path, default=DEFAULT_OUT, help="where demo data lives")
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dataset_dir, ray_dir = resolve_data_dirs(args.dataset_dir, args.ray_dataset_dir, args.demo_dir)

    # 1. Simple loading
    dataset = HierarchicalVoxelRayDataset(
        dataset_dir=dataset_dir, ray_dataset_dir=ray_dir, split=args.split, cache_size=100
    )
    print(f"== {dataset}")
    sample = dataset[0]
    print(
        f"voxels {tuple(sample['voxels'].shape)}, rays {tuple(sample['origins'].shape)}, "
        f"hit rate {sample['hits'].float().mean():.2%}, level {sample['level']}, "
        f"hash {sample['hash'][:12]}"
    )
    for key, value in sample.items():
        desc = f"{tuple(value.shape)} {value.dtype}" if hasattr(value, "shape") else repr(value)
        print(f"  {key:15s} {desc}")

    # 2. Statistics
    print("\n== statistics")
    print(f"level distribution: {dataset.get_level_distribution()}")
    print(f"unique sub-volumes: {len({(s['level'], s['hash']) for s in dataset.samples})}")
    occupancy = [float(dataset.voxels(i).mean()) for i in range(len(dataset))]
    print(f"average occupancy:  {sum(occupancy) / len(occupancy):.2%} (grids only, no rays read)")
    print(
        f"rays per sample:    {min(s['num_rays'] for s in dataset.samples)} .. "
        f"{max(s['num_rays'] for s in dataset.samples)}"
    )

    # 3. Level-specific, memory-efficient loading
    finest = max(dataset.get_level_distribution())
    small = HierarchicalVoxelRayDataset(
        dataset_dir,
        ray_dir,
        split=args.split,
        levels=[finest],
        samples_per_subvolume=512,
        cache_size=10,
    )
    s = small[0]
    print(
        f"\n== levels=[{finest}], samples_per_subvolume=512: {len(small)} samples, "
        f"voxels {tuple(s['voxels'].shape)}, rays {tuple(s['origins'].shape)}"
    )

    # 4. Augmentation: rotations and flips keep every ray label valid
    transform = transforms.Compose(
        [
            transforms.RandomRotation90(p=0.5),
            transforms.RandomFlip(axes=[0, 1, 2], p=0.5),
            transforms.RandomRaySubsample(num_rays=1024),
        ]
    )
    augmented = HierarchicalVoxelRayDataset(
        dataset_dir, ray_dir, split=args.split, transform=transform
    )
    worst = 0.0
    for i in range(min(8, len(augmented))):
        batch = collate_ray_batch([augmented[i]])
        worst = max(worst, retrace_error(batch)[0])
    print("\n== augmented:", " ".join(repr(transform).split()))
    print(f"re-traced 8 augmented samples: max |trace - distance| = {worst:.2e} voxels")

    # 5. Batching: every batch holds exactly rays_per_batch rays, one level per batch
    sampler = RayBatchSampler(augmented, rays_per_batch=4096, subvolumes_per_batch=8)
    loader = DataLoader(
        augmented, batch_sampler=sampler, collate_fn=collate_ray_batch, num_workers=args.num_workers
    )
    print(f"\n== DataLoader + RayBatchSampler: {len(sampler)} batches")
    for i, batch in enumerate(loader):
        if i < 3:
            print(
                f"batch {i}: voxels {tuple(batch['voxels'].shape)}, "
                f"origins {tuple(batch['origins'].shape)}, "
                f"ray_to_voxel {tuple(batch['ray_to_voxel'].shape)}, "
                f"levels {batch['levels'].unique().tolist()}"
            )
    print(f"voxel cache of this process: {augmented.cache_info()}")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
