"""One rank of a multi-node run, launched by ``torchrun`` (tests/loading/test_multinode.py).

Reads the train split of a striped pack (a folder or an ``s3://`` URL; its fsspec options as
JSON in ``GPULOADER_TEST_STORAGE_OPTIONS``) with ``GPURayLoader(store="striped",
shard_store=True)`` on a node that has no ray tree (the dataset's index comes from the pack),
over the gloo group torchrun set up, and writes ``OUT/rank<r>.json``: per epoch the
``(level, hash)`` of every sample of every batch and the rays per batch; with ``--resume-from
FILE`` it starts from a loader state saved by an earlier run and with ``--save-after N`` it
saves its state after N batches of the first epoch and stops (a job stopped mid-epoch).

    torchrun --nnodes 2 --node-rank R --nproc-per-node 1 --rdzv-backend c10d \
        --rdzv-endpoint 127.0.0.1:PORT multinode_worker.py DATASET PACK OUT
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dataset", type=Path)
    p.add_argument("pack")
    p.add_argument("out", type=Path)
    p.add_argument("--epochs", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rays-per-batch", type=int, default=256)
    p.add_argument("--subvolumes-per-batch", type=int, default=4)
    p.add_argument("--save-after", type=int)
    p.add_argument("--resume-from", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    from gpuloader import GPURayLoader, HierarchicalVoxelRayDataset, PackedRayStore
    from gpuloader.augment import transforms as T

    options = json.loads(os.environ.get("GPULOADER_TEST_STORAGE_OPTIONS") or "null")
    no_tree = args.out / "no_ray_tree_here"  # this node has no ray files
    store = PackedRayStore(
        args.pack, check="none", ray_dataset_dir=no_tree, storage_options=options
    )
    ds = HierarchicalVoxelRayDataset(args.dataset, no_tree, "train", ray_store=store, seed=4)
    w = int(store.stripe_rays)
    loader = GPURayLoader(
        ds,
        rays_per_batch=args.rays_per_batch,
        subvolumes_per_batch=args.subvolumes_per_batch,
        transform=T.Compose([T.RandomFlip(), T.RandomRaySubsample(num_rays=w)]),
        store="striped",
        shard_store=True,
        device="cpu",
    )
    if args.resume_from is not None:
        loader.load_state_dict(json.loads(args.resume_from.read_text()))
    record: dict[str, list] = {}
    for epoch in args.epochs:
        loader.set_epoch(epoch)
        got = []
        for b, batch in enumerate(loader):
            levels = batch["levels"].tolist()
            got.append([[lv, h] for lv, h in zip(levels, batch["hashes"], strict=True)])
            if args.save_after is not None and b + 1 == args.save_after:
                state = loader.state_dict()
                (args.out / f"state{rank}.json").write_text(json.dumps(state))
                break
        record[str(epoch)] = got
        if args.save_after is not None:
            break
    result = {"rank": rank, "world_size": world, "store": loader.store, "batches": record}
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
