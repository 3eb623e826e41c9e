"""Train a small neural renderer on hierarchical voxel ray data, and beat trivial baselines.

Model: a small 3D-CNN voxel encoder turns each grid into a feature volume; an MLP ray decoder
predicts each ray's path length through the occupied voxels from the voxel features sampled
along the ray (defined by its normalized origin and direction): a learnt density integrated
over the ray. Distances are learnt in units of the grid's
half side (``NormalizeRayOrigins(scale_distances=True)``), so every level shares one scale.

Each epoch prints the train loss, the validation loss and two trivial baselines on the same
validation rays: predict the training mean distance, and predict the training mean of the
ray's level. Runs with no arguments on the demo data (generated into ./demo_data)::

    python examples/train_neural_rendering.py
    python examples/train_neural_rendering.py --dataset-dir dataset \\
        --ray-dataset-dir ray_dataset_hierarchical --batch-size 8 --rays-per-batch 4096 \\
        --epochs 10 --checkpoint runs/model.pt --plot runs/curves.png
    python examples/train_neural_rendering.py --checkpoint runs/model.pt --resume --epochs 20

Mid-epoch checkpoints: ``--checkpoint-every N`` also saves every N steps, with the loader's
``state_dict()``; ``--resume`` then continues at the very next batch, so a run cut anywhere
and resumed trains on the batches (and to the losses) of an uninterrupted one.

Several processes (DDP): each rank's loader reads its shard of every epoch (``rank`` and
``world_size`` come from ``torch.distributed``); rank 0 prints and saves. On the CPU::

    torchrun --nproc_per_node 2 examples/train_neural_rendering.py --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from gpuloader import transforms
from gpuloader.commands.demo import DEFAULT_OUT, resolve_data_dirs
from gpuloader.dataset.collate import collate_ray_batch
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.errors import NoSamplesError
from gpuloader.plan.sampler import RayBatchSampler


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset-dir", type=Path, help="voxel dataset root (default: demo data)")
    p.add_argument("--ray-dataset-dir", type=Path, help="ray dataset root")
    p.add_argument("--demo-dir", type=Path, default=DEFAULT_OUT, help="where demo data lives")
    p.add_argument("--batch-size", type=int, default=8, help="sub-volumes per batch (8)")
    p.add_argument("--rays-per-batch", type=int, default=4096, help="rays per batch (4096)")
    p.add_argument("--epochs", type=int, default=10, help="epochs in all, resumed ones too (10)")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (5e-3)")
    p.add_argument("--hidden", type=int, default=32, help="decoder MLP width (32)")
    p.add_argument("--points", type=int, default=16, help="feature samples per ray (16)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    p.add_argument(
        "--loader",
        choices=["gpu", "dataloader"],
        default="gpu",
        help="gpu: GPURayLoader (DALI/CuPy, CPU fallback); dataloader: torch DataLoader",
    )
    p.add_argument("--num-workers", type=int, default=2, help="reader workers (2)")
    p.add_argument("--levels", type=int, nargs="+", help="octree levels to use (all)")
    p.add_argument("--max-steps", type=int, help="stop each epoch after this many batches")
    p.add_argument("--val-batches", type=int, help="validation batches per epoch (all)")
    p.add_argument("--checkpoint", type=Path, help="save model and optimizer here every epoch")
    p.add_argument(
        "--checkpoint-every", type=int, metavar="N", help="also save every N steps (mid-epoch)"
    )
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="stop after N steps of this run, as if interrupted (to try --resume)",
    )
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="plot the loss curves here")
    p.add_argument("--metrics", type=Path, metavar="FILE.json", help="write the history here")
    p.add_argument("--seed", type=int, default=0, help="seed of model, order, augmentation (0)")
    return p.parse_args(argv)


# -- model ------------------------------------------------------------------------------


class VoxelEncoder(nn.Module):
    """3D CNN: (B, 1, D, H, W) occupancy -> (B, 1 + width, D, H, W) feature volume.

    The occupancy itself is kept as channel 0 next to the learnt features.
    """

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(1, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv3d(width, width, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.channels = 1 + width

    def forward(self, voxels: torch.Tensor) -> torch.Tensor:
        return torch.cat([voxels, self.net(voxels)], dim=1)


def box_exit(origins: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """(N,) ray parameter where ``o + t d`` leaves the box [-1, 1]^3 (0 when never inside)."""
    d = torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9), directions)
    t_far = torch.maximum((1.0 - origins) / d, (-1.0 - origins) / d).amin(dim=-1)
    return t_far.clamp(min=0.0)


class RayDecoder(nn.Module):
    """MLP over voxel features sampled along each ray -> the ray's distance.

    ``points`` positions evenly spread between the ray's origin (on the grid's box) and its
    exit; at each, the features of the voxel holding it are gathered and an MLP of (features,
    position, direction) gives a non-negative density; the distance is the density
    integrated along the ray (sum times step length), in units of the half side.
    """

    def __init__(self, channels: int, hidden: int = 32, points: int = 16) -> None:
        super().__init__()
        self.points = points
        self.mlp = nn.Sequential(
            nn.Linear(channels + 6, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 1),
            nn.Softplus(),
        )
        nn.init.constant_(self.mlp[4].bias, -3.0)  # start near zero density

    def forward(
        self,
        volume: torch.Tensor,
        ray_to_voxel: torch.Tensor,
        origins: torch.Tensor,
        directions: torch.Tensor,
        extent: torch.Tensor,
    ) -> torch.Tensor:
        """volume (B, C, D, H, W); rays (N, 3) normalized; extent (N,) = own side / padded side."""
        n, k = origins.shape[0], self.points
        t1 = box_exit(origins, directions)
        frac = (torch.arange(k, device=origins.device, dtype=origins.dtype) + 0.5) / k
        t = t1[:, None] * frac  # (N, K)
        pts = origins[:, None, :] + t[..., None] * directions[:, None, :]  # (N, K, 3) in [-1, 1]
        # a grid smaller than the padded batch grid sits at its low corner (collate pad='end')
        grid_pts = (pts + 1.0) * extent[:, None, None] - 1.0
        # nearest voxel of each point, gathered from the (B * D * H * W, C) feature table
        b, c, dd, hh, ww = volume.shape
        size = torch.tensor([ww, hh, dd], device=origins.device, dtype=grid_pts.dtype)
        ijk = ((grid_pts + 1.0) * 0.5 * size).floor().long()  # (N, K, 3) as (x, y, z)
        upper = torch.tensor([ww - 1, hh - 1, dd - 1], device=origins.device)
        ijk = torch.minimum(ijk.clamp(min=0), upper)
        flat = ((ray_to_voxel[:, None] * dd + ijk[..., 2]) * hh + ijk[..., 1]) * ww + ijk[..., 0]
        table = volume.permute(0, 2, 3, 4, 1).reshape(b * dd * hh * ww, c)
        feats = table[flat.reshape(-1)].reshape(n, k, c)  # (N, K, C)
        x = torch.cat([feats, pts, directions[:, None, :].expand(n, k, 3)], dim=-1)
        density = self.mlp(x).squeeze(-1)  # (N, K)
        step = t1 * directions.norm(dim=-1) / k
        return density.sum(dim=-1) * step


class NeuralRenderer(nn.Module):
    """Voxel encoder + ray decoder; ``forward(batch) -> (N,) predicted distances``."""

    def __init__(self, width: int = 8, hidden: int = 32, points: int = 16) -> None:
        super().__init__()
        self.encoder = VoxelEncoder(width)
        self.decoder = RayDecoder(self.encoder.channels, hidden, points)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        voxels = batch["voxels"].float()
        volume = self.encoder(voxels)
        own = batch["voxel_shapes"].to(voxels.device).float()  # (B, 3)
        extent = (own / torch.tensor(voxels.shape[-3:], device=voxels.device)).amin(dim=1)
        r2v = batch["ray_to_voxel"]
        return self.decoder(volume, r2v, batch["origins"], batch["directions"], extent[r2v])


# -- data -------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_transform(train: bool) -> transforms.Compose:
    """Augment the training split; both splits get origins and distances normalized."""
    ops: list[Any] = []
    if train:
        ops += [transforms.RandomRotation90(p=0.75), transforms.RandomFlip(p=0.5)]
    ops.append(transforms.NormalizeRayOrigins(voxel_size=1.0, scale_distances=True))
    return transforms.Compose(ops)


class Batches:
    """One loader per split, the same interface for both back ends: ``epoch(e)`` iterates."""

    def __init__(
        self, args: argparse.Namespace, split: str, device: torch.device, train: bool
    ) -> None:
        dd, rd = resolve_data_dirs(args.dataset_dir, args.ray_dataset_dir, args.demo_dir)
        self.device = device
        self.kind = args.loader
        tf = make_transform(train)
        # validation is small and re-read from its start every epoch: read it in this process
        # (a cut or repeated epoch would restart the reader workers each time)
        workers = args.num_workers if train else 0
        common = {"split": split, "levels": args.levels, "seed": args.seed}
        # training batches are sharded over the ranks of torch.distributed (the default);
        # every rank evaluates the whole validation split
        shard = {} if train else {"rank": 0, "world_size": 1}
        if args.loader == "gpu":
            from gpuloader.loading.loader import GPURayLoader

            self.dataset = HierarchicalVoxelRayDataset(dd, rd, **common)
            self.loader: Any = GPURayLoader(
                self.dataset,
                rays_per_batch=args.rays_per_batch,
                subvolumes_per_batch=args.batch_size,
                transform=tf,
                shuffle=train,
                drop_last=False,
                seed=args.seed,
                num_workers=workers,
                prefetch=2,
                device=str(device),
                backend="auto",
                **shard,
            )
            self.backend = str(getattr(self.loader, "backend", "gpu"))
        else:
            self.dataset = HierarchicalVoxelRayDataset(dd, rd, transform=tf, **common)
            self.sampler = RayBatchSampler(
                self.dataset,
                args.rays_per_batch,
                args.batch_size,
                shuffle=train,
                seed=args.seed,
                **shard,
            )
            self.loader = DataLoader(
                self.dataset,
                batch_sampler=self.sampler,
                collate_fn=collate_ray_batch,
                num_workers=workers,
                pin_memory=device.type == "cuda",
                persistent_workers=workers > 0,
            )
            self.backend = "torch DataLoader"

    def position(self, epoch: int, steps: int) -> dict[str, Any]:
        """Where training stands, for a mid-epoch checkpoint: the GPU loader's own state (it
        counts the batches handed out); a DataLoader's workers read ahead, so there the
        sampler's state is built from the steps taken."""
        if self.kind == "gpu":
            return self.loader.state_dict()
        return {"epoch": epoch, "batches_yielded": steps}

    def epoch(self, epoch: int, resume: dict | None = None) -> Iterator[dict[str, Any]]:
        """The batches of ``epoch``; from a saved :meth:`position` when ``resume`` is given."""
        target = self.loader if self.kind == "gpu" else self.sampler
        if resume is not None:
            target.load_state_dict(resume)
        target.set_epoch(epoch)  # the epoch restored keeps its place
        for batch in self.loader:
            yield {
                k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()
            }


def level_means(dataset: HierarchicalVoxelRayDataset, max_samples: int = 256) -> dict:
    """Training means of the normalized distance: overall and per level (the baselines).

    Distances are invariant under rotations and flips, so the raw rays suffice; each
    sample's distances are scaled by 2 / side, as NormalizeRayOrigins does.
    """
    rng = np.random.default_rng(0)
    idx = np.arange(len(dataset))
    if idx.size > max_samples:
        idx = rng.choice(idx, max_samples, replace=False)
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for i in idx:
        s = dataset.read_sample(int(i), epoch=0, num_rays=2048)
        side = max(s["voxels"].shape[-3:])
        d = s["distances"].astype(np.float64) * 2.0 / side
        lv = int(s["level"])
        sums[lv] = sums.get(lv, 0.0) + float(d.sum())
        counts[lv] = counts.get(lv, 0) + int(d.size)
    total = sum(counts.values())
    return {
        "mean": sum(sums.values()) / max(total, 1),
        "per_level": {lv: sums[lv] / counts[lv] for lv in sorted(sums)},
    }


# -- training ---------------------------------------------------------------------------


def evaluate(
    model: NeuralRenderer, batches: Iterable[dict[str, Any]], base: dict, limit: int | None
) -> dict[str, float]:
    """Validation MSE of the model and of both baselines on the same rays."""
    model.eval()
    sq = {"model": 0.0, "mean": 0.0, "level_mean": 0.0}
    n = 0
    table = torch.zeros(max(base["per_level"]) + 1, dtype=torch.float64)
    for lv, m in base["per_level"].items():
        table[lv] = m
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if limit is not None and i >= limit:
                break
            target = batch["distances"].double()
            pred = model(batch).double()
            lvl = batch["levels"][batch["ray_to_voxel"]].clamp(0, table.numel() - 1)
            per_level = table.to(target.device)[lvl]
            sq["model"] += float(((pred - target) ** 2).sum())
            sq["mean"] += float(((base["mean"] - target) ** 2).sum())
            sq["level_mean"] += float(((per_level - target) ** 2).sum())
            n += int(target.numel())
    model.train()
    return {k: v / max(n, 1) for k, v in sq.items()} | {"rays": n}


def setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device): joins the process group when started by ``torchrun``
    (gloo on the CPU, NCCL on CUDA, one GPU per local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def plain(value: Any) -> Any:
    """``value`` as what ``torch.load(weights_only=True)`` reads back: tensors, dicts, lists,
    tuples, str, int, float, bool and None (numpy scalars and arrays, paths converted)."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"checkpoint: cannot save a {type(value).__name__} ({value!r:.60})")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (made :func:`plain`) so that :func:`load_checkpoint` can read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(plain(state), tmp)
    tmp.replace(path)  # never leave a half-written checkpoint


#: keys every checkpoint of this script holds
CHECKPOINT_KEYS: tuple[str, ...] = ("model", "optimizer", "epoch", "history", "baselines")


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint :func:`save_checkpoint` wrote, read with ``weights_only=True``: a file that
    holds other Python objects (a crafted pickle) is refused before any of its code runs.

    Raises:
        SystemExit: the file cannot be read so, or lacks a key this script needs (the
            message names the file and what to do).
    """
    fix = "resume from a checkpoint this script wrote (--checkpoint), or delete the file"
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # UnpicklingError (a refused object), RuntimeError, EOFError
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SystemExit(
            f"error: {path}: not a checkpoint that can be loaded safely "
            f"(torch.load(weights_only=True) refused it: {type(exc).__name__}: {detail}); "
            f"nothing in it was run; {fix}"
        ) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise SystemExit(f"error: {path}: not a checkpoint of this script (no {missing}); {fix}")
    return state


def plot_curves(path: Path, history: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    steps = np.arange(1, len(history["train_loss"]) + 1)
    ax.plot(steps, history["train_loss"], color="tab:blue", alpha=0.35, lw=1, label="train (step)")
    if len(steps) >= 5:
        k = max(2, len(steps) // 20)
        smooth = np.convolve(history["train_loss"], np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, color="tab:blue", lw=2, label=f"train ({k}-step mean)")
    ends = np.asarray(history["epoch_end_step"])
    val = history["val"]
    if "val_initial" in history:  # the untrained model, at step 0
        ends, val = np.concatenate([[0], ends]), [history["val_initial"], *val]
    if val:
        ax.plot(ends, [v["model"] for v in val], "o-", color="tab:green", lw=2, label="val: model")
        ax.plot(ends, [v["mean"] for v in val], "--", color="tab:red", label="val: mean baseline")
        ax.plot(
            ends,
            [v["level_mean"] for v in val],
            ":",
            color="tab:orange",
            lw=2,
            label="val: per-level mean baseline",
        )
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("MSE of distance / half side")
    ax.set_title("neural renderer: loss against trivial baselines")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_validation_split(args: argparse.Namespace) -> int:
    """Number of validation samples; exits with a clear message when the split has none.

    With too few objects every object can land in train: the validation split then holds
    nothing but the all-empty blocks that every split shares (skipped as samples), and its
    loss would measure nothing.
    """
    dd, rd = resolve_data_dirs(args.dataset_dir, args.ray_dataset_dir, args.demo_dir)
    fix = (
        "generate a dataset whose val split has objects (3 or more objects and a non-zero "
        "val ratio, e.g. `gpuloader generate OUT --preset demo`)"
    )
    if args.levels is not None:
        fix += f" or widen --levels (now {' '.join(map(str, args.levels))})"
    try:
        samples = HierarchicalVoxelRayDataset(dd, rd, split="val", levels=args.levels).samples
    except NoSamplesError:
        samples = []
    own = [s for s in samples if not (s["is_trivial"] or s["is_empty"])]
    if not own:
        raise SystemExit(
            f"error: the validation split of {dd} has nothing to evaluate on: no sample of "
            f"its own ({len(samples)} trivial sub-volume(s) that every split shares); {fix}"
        )
    return len(own)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rank, world, device = setup_distributed(pick_device(args.device))
    say = print if rank == 0 else (lambda *a, **k: None)
    t_start = time.perf_counter()
    check_validation_split(args)
    train = Batches(args, "train", device, train=True)
    val = Batches(args, "val", device, train=False)
    base = level_means(train.dataset)
    net = NeuralRenderer(hidden=args.hidden, points=args.points).to(device)
    model: nn.Module = net
    if world > 1:  # same initial weights on every rank (seeded), gradients averaged
        model = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    history: dict[str, Any] = {"train_loss": [], "epoch_end_step": [], "val": []}
    start_epoch, resume, losses = 0, None, []
    if args.resume:
        if args.checkpoint is None:
            raise SystemExit("--resume needs --checkpoint PATH")
        if args.checkpoint.is_file():
            state = load_checkpoint(args.checkpoint, device)
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            history, base, start_epoch = state["history"], state["baselines"], state["epoch"] + 1
            if state.get("position") is not None:  # a mid-epoch checkpoint
                resume, losses = state["position"], state["epoch_losses"]
                start_epoch = resume["epoch"]
                say(
                    f"resumed from {args.checkpoint} in epoch {start_epoch + 1}, after "
                    f"{resume['step']} steps"
                )
            else:
                say(f"resumed from {args.checkpoint} after epoch {start_epoch}")
        else:
            say(f"no checkpoint at {args.checkpoint}: starting afresh")

    def checkpoint(epoch_done: int, position: dict | None = None) -> None:
        if args.checkpoint is None or rank != 0:
            return
        save_checkpoint(
            args.checkpoint,
            {
                "model": net.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": epoch_done,  # the last finished epoch
                "position": position,  # mid-epoch: epoch, step and the loader's state
                "epoch_losses": list(losses),
                "history": history,
                "baselines": base,
                "args": vars(args)
                | {k: str(v) for k, v in vars(args).items() if isinstance(v, Path)},
            },
        )

    params = sum(p.numel() for p in net.parameters())
    say(
        f"data: train {len(train.dataset)} / val {len(val.dataset)} sub-volumes; "
        f"loader: {train.backend}; device: {device}; model: {params:,} parameters"
        + (f"; DDP world size {world} ({len(train.loader)} batches per rank)" if world > 1 else "")
    )
    say(
        f"baselines (normalized distance): mean {base['mean']:.4f}, per level "
        + ", ".join(f"L{lv} {m:.4f}" for lv, m in base["per_level"].items())
    )

    if "val_initial" not in history:
        history["val_initial"] = evaluate(net, val.epoch(0), base, args.val_batches)
        say(f"before training: val {history['val_initial']['model']:.4f}")
    steps_this_run = 0
    for epoch in range(start_epoch, args.epochs):
        tick = time.perf_counter()
        rays = 0
        first = resume["step"] if resume is not None else 0
        limit = len(train.loader)
        if args.max_steps is not None:
            limit = min(limit, args.max_steps)
        # a checkpoint taken at the epoch's last step resumes straight into its validation
        batches = train.epoch(epoch, resume and resume["loader"]) if first < limit else iter(())
        for step, batch in enumerate(batches, first):
            if step >= limit:
                break
            loss = torch.mean((model(batch) - batch["distances"]) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            logged = loss.detach()
            if world > 1:  # the loss over every rank's batch
                import torch.distributed as dist

                dist.all_reduce(logged)
                logged /= world
            losses.append(logged.item())
            rays += int(batch["distances"].numel())
            steps_this_run += 1
            if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
                position = {"epoch": epoch, "step": step + 1}
                checkpoint(epoch - 1, position | {"loader": train.position(epoch, step + 1)})
            if args.stop_after is not None and steps_this_run >= args.stop_after:
                say(f"stopped after {steps_this_run} steps, as if interrupted")
                return 0
        resume = None
        history["train_loss"] += losses
        history["epoch_end_step"].append(len(history["train_loss"]))
        metrics = evaluate(net, val.epoch(0), base, args.val_batches)
        history["val"].append(metrics)
        secs = time.perf_counter() - tick
        verdict = (
            "beats both"
            if metrics["model"] < min(metrics["mean"], metrics["level_mean"])
            else ("does not beat both yet")
        )
        train_mean = float(np.mean(losses)) if losses else float("nan")
        say(
            f"epoch {epoch + 1:3d}/{args.epochs}  train {train_mean:.4f}  "
            f"val {metrics['model']:.4f} | mean baseline {metrics['mean']:.4f} | "
            f"level-mean baseline {metrics['level_mean']:.4f}  ({verdict}; "
            f"{rays / secs:,.0f} rays/s, {secs:.1f} s)"
        )
        losses = []
        checkpoint(epoch)

    summary = {
        "epochs": args.epochs,
        "steps": len(history["train_loss"]),
        "train_loss": history["train_loss"],
        "val": history["val"],
        "val_initial": history["val_initial"],
        "baselines": {"mean": base["mean"], "per_level": base["per_level"]},
        "loader": train.backend,
        "device": str(device),
        "world_size": world,
        "seconds": time.perf_counter() - t_start,
    }
    if history["val"]:
        last = history["val"][-1]
        say(
            f"final val MSE: model {last['model']:.4f}, mean baseline {last['mean']:.4f} "
            f"({last['mean'] / max(last['model'], 1e-12):.1f}x worse), per-level mean baseline "
            f"{last['level_mean']:.4f} ({last['level_mean'] / max(last['model'], 1e-12):.1f}x "
            "worse)"
        )
    if args.metrics is not None and rank == 0:
        args.metrics.parent.mkdir(parents=True, exist_ok=True)
        args.metrics.write_text(json.dumps(summary, indent=1))
    if args.plot is not None and rank == 0:
        plot_curves(args.plot, history)
        say(f"plot: {args.plot}")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
