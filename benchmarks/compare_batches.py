"""Bit-for-bit comparison of every store and back end against another checkout of gpuloader.

Dumps two epochs of batches from every path (the CPU API, the host store filled by each
fill, the per-sample stream on npz with DALI and torch workers, with a custom CPU transform
and with two fused runs, the pack stream with DALI and torch workers, mixed levels) on the
demo data and on a generated dataset, through the public API only, so the same script runs
on an older checkout (``PYTHONPATH=OLD_TREE python benchmarks/compare_batches.py dump ...``).
Then ``compare`` says, case by case, whether two dumps are equal: same keys, dtypes, shapes
and values, bit for bit.

    python benchmarks/compare_batches.py dump /tmp/ab/new --data /tmp/ab/data
    PYTHONPATH=/tmp/before python benchmarks/compare_batches.py dump /tmp/ab/old --data /tmp/ab/data
    python benchmarks/compare_batches.py compare /tmp/ab/old /tmp/ab/new
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import gpuloader
from gpuloader import (
    GPURayLoader,
    HierarchicalVoxelRayDataset,
    PackedRayStore,
    RayBatchSampler,
    collate_ray_batch,
    pack_rays,
)
from gpuloader import transforms as T

RAYS, SPB, EPOCHS = 512, 4, 2


def swap_halves(sample: dict) -> dict:
    """A custom CPU transform (module level, so DALI's spawned workers can load it)."""
    out = dict(sample)
    d = sample["distances"]
    out["distances"] = d.flip(0) if isinstance(d, torch.Tensor) else d[::-1].copy()
    return out


def known(num_rays: int = 200) -> T.Compose:
    return T.Compose(
        [
            T.RandomRotation90(p=0.7),
            T.RandomFlip(axes=[0, 1, 2], p=0.5),
            T.NormalizeRayOrigins(voxel_size=1.0, scale_distances=True),
            T.RandomRaySubsample(num_rays=num_rays),
            T.AddNoise(origin_std=0.01, direction_std=0.01),
            T.VoxelOccupancyJitter(flip_prob=0.02),
        ]
    )


def custom_first() -> T.Compose:
    return T.Compose([swap_halves, *known().transforms])


def two_runs() -> T.Compose:
    return T.Compose(
        [
            T.RandomFlip(axes=[0, 1, 2], p=0.5),
            T.ToDevice("cpu"),
            T.RandomRotation90(p=0.7),
            T.RandomRaySubsample(num_rays=150),
        ]
    )


def ensure_data(root: Path) -> dict[str, tuple[Path, Path, Path]]:
    """The demo data and a generated dataset (with packs), made once under ``root``."""
    out = {}
    specs = {
        "demo": ["--preset", "demo"],
        "gen": [
            "--shapes",
            "sphere",
            "torus",
            "asym",
            "--resolution",
            "32",
            "--min-resolution",
            "8",
            "--divisions",
            "3",
            "--samples-per-view",
            "200",
            "--seed",
            "3",
        ],
    }
    for name, args in specs.items():
        d = root / name
        if not (d / "dataset" / "splits.json").exists():
            subprocess.run(
                [sys.executable, "-m", "gpuloader.commands.cli", "generate", str(d), *args],
                check=True,
            )
        pack = root / f"{name}_pack"
        if not (pack / "manifest.json").exists():
            pack_rays(d / "ray_dataset_hierarchical", pack)
        out[name] = (d / "dataset", d / "ray_dataset_hierarchical", pack)
    return out


def plain(batch: dict) -> dict:
    """A batch with CPU tensors only (lists kept), for torch.save."""
    res: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            res[k] = v.detach().cpu().clone()
        elif isinstance(v, list):
            res[k] = [x.detach().cpu().clone() if isinstance(x, torch.Tensor) else x for x in v]
        else:
            res[k] = v
    return res


def cases(data: dict[str, tuple[Path, Path, Path]]) -> dict[str, Callable[[], list[dict]]]:
    """name -> a function giving EPOCHS epochs of batches."""

    def dataset(name: str, transform=None, pack: bool = False, **kw):
        ds, rays, packdir = data[name]
        store = PackedRayStore(packdir) if pack else None
        return HierarchicalVoxelRayDataset(
            ds, rays, "train", transform=transform, ray_store=store, **kw
        )

    def cpu_api(name: str, transform=None, **kw) -> list[dict]:
        ds = dataset(name, transform, **kw)
        sampler = RayBatchSampler(ds, RAYS, SPB, shuffle=True)
        out = []
        for e in range(EPOCHS):
            sampler.set_epoch(e)
            dl = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_ray_batch)
            out += [plain(b) for b in dl]
        return out

    def loader(name: str, transform=None, pack=False, ds_kw=None, **kw) -> list[dict]:
        ds = dataset(name, transform, pack, **(ds_kw or {}))
        out = []
        with GPURayLoader(ds, RAYS, SPB, device="cpu", **kw) as ld:
            for _ in range(EPOCHS):
                out += [plain(b) for b in ld]
        return out

    got: dict[str, Callable[[], list[dict]]] = {}
    for name in data:
        got[f"{name}/cpu_api"] = lambda n=name: cpu_api(n, known())
        got[f"{name}/cpu_api_levels"] = lambda n=name: cpu_api(n, known(), levels=[1, 2])
        got[f"{name}/host_torch0"] = lambda n=name: loader(
            n, known(), store="host", backend="torch", num_workers=0
        )
        got[f"{name}/host_direct"] = lambda n=name: loader(
            n, known(), store="host", backend="torch", num_workers=2
        )
        got[f"{name}/host_dali"] = lambda n=name: loader(
            n, known(), store="host", backend="dali", num_workers=2
        )
        got[f"{name}/host_pack"] = lambda n=name: loader(
            n, known(), pack=True, store="host", backend="torch", num_workers=0
        )
        got[f"{name}/stream_npz_torch"] = lambda n=name: loader(
            n, known(), store="stream", backend="torch", num_workers=2
        )
        got[f"{name}/stream_npz_dali"] = lambda n=name: loader(
            n, known(), store="stream", backend="dali", num_workers=2
        )
        got[f"{name}/stream_custom_torch"] = lambda n=name: loader(
            n, custom_first(), store="auto", backend="torch", num_workers=2
        )
        got[f"{name}/stream_custom_dali"] = lambda n=name: loader(
            n, custom_first(), store="auto", backend="dali", num_workers=2
        )
        got[f"{name}/stream_two_runs"] = lambda n=name: loader(
            n, two_runs(), store="auto", backend="torch", num_workers=0
        )
        got[f"{name}/stream_levels"] = lambda n=name: loader(
            n, known(), store="stream", backend="torch", num_workers=0, ds_kw={"levels": [1, 2]}
        )
        got[f"{name}/pack_stream_torch"] = lambda n=name: loader(
            n, known(), pack=True, store="stream", backend="torch", num_workers=2
        )
        got[f"{name}/pack_stream_dali"] = lambda n=name: loader(
            n, known(), pack=True, store="stream", backend="dali", num_workers=2
        )
        got[f"{name}/pack_stream_levels"] = lambda n=name: loader(
            n,
            known(),
            pack=True,
            store="stream",
            backend="torch",
            num_workers=0,
            ds_kw={"levels": [1, 2]},
        )
    return got


def dump(out: Path, data_root: Path, only: list[str] | None) -> None:
    data = ensure_data(data_root)
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpuloader from {Path(gpuloader.__file__).parent}")
    for name, make in cases(data).items():
        if only and not any(o in name for o in only):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batches = make()
        path = out / (name.replace("/", "__") + ".pt")
        torch.save(batches, path)
        print(f"{name}: {len(batches)} batches")


def _same(a: Any, b: Any) -> str | None:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor):
            return "not a tensor"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        return None if torch.equal(a, b) else "values differ"
    if isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            return "list lengths differ"
        for x, y in zip(a, b, strict=True):
            why = _same(x, y)
            if why:
                return why
        return None
    return None if a == b else f"{a!r} vs {b!r}"


def compare(old: Path, new: Path) -> int:
    bad = 0
    names = sorted(p.name for p in old.glob("*.pt"))
    for name in names:
        a = torch.load(old / name, weights_only=False)
        if not (new / name).exists():
            print(f"{name}: missing in {new}")
            bad += 1
            continue
        b = torch.load(new / name, weights_only=False)
        why = None
        if len(a) != len(b):
            why = f"{len(a)} vs {len(b)} batches"
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            if why:
                break
            if list(x) != list(y):
                why = f"batch {i}: keys {list(x)} vs {list(y)}"
                break
            for k in x:
                w = _same(x[k], y[k])
                if w:
                    why = f"batch {i} key {k}: {w}"
                    break
        print(
            f"{name[:-3].replace('__', '/')}: {'EQUAL' if not why else 'DIFFERENT: ' + why}"
            f" ({len(a)} batches)"
        )
        bad += why is not None
    print(f"{len(names) - bad} of {len(names)} cases equal bit for bit")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("out", type=Path)
    d.add_argument("--data", type=Path, default=Path("/tmp/ab/data"))
    d.add_argument("--only", nargs="*")
    c = sub.add_parser("compare")
    c.add_argument("old", type=Path)
    c.add_argument("new", type=Path)
    args = ap.parse_args()
    if args.cmd == "dump":
        dump(args.out, args.data, args.only)
        return 0
    return compare(args.old, args.new)


if __name__ == "__main__":
    sys.exit(main())
